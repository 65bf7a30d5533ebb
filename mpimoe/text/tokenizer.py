"""The checkpoint's tokenizer: Hugging Face ``tokenizers`` over the
checkpoint's ``tokenizer.json``, with ``tokenizer_config.json`` (special
tokens, ``add_bos_token``, chat template) and ``chat_template.jinja``.

    files = read_tokenizer_files('path/to/model-dir')     # {name: bytes}
    tok = TextTokenizer(files, 'path/to/model-dir')
    ids = tok.encode_prompt('Hello')                      # BOS as the config says
    ids = tok.encode_chat([{'role': 'user', 'content': 'Hi'}])
    text = tok.decode(ids)                                # special tokens skipped

The files travel inside the weight file (``mpimoe convert`` copies them,
weights/FORMAT.md); ``--tokenizer PATH`` reads them from a directory.
"""

import hashlib
import json
import os

from tokenizers import Tokenizer

from mpimoe.errors import DataError
from mpimoe.text.chat import ChatTemplate, text_messages

__all__ = ['TOKENIZER_FILES', 'MAX_FILE_BYTES', 'read_tokenizer_files', 'TextTokenizer']

#: the files of a tokenizer, tokenizer.json first (the only one required)
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'generation_config.json',
                   'chat_template.jinja')
#: the special tokens a chat template sees, by their tokenizer_config.json keys
_SPECIAL = ('bos_token', 'eos_token', 'unk_token', 'sep_token', 'pad_token', 'cls_token',
            'mask_token')
#: the largest tokenizer file read or stored
MAX_FILE_BYTES = 256 << 20


def read_tokenizer_files(path):
    """{name: bytes} of the TOKENIZER_FILES in directory ``path`` (or beside
    the tokenizer.json file ``path``); DataError when tokenizer.json is not
    there or a file cannot be read."""
    path = os.fspath(path)
    folder = path if os.path.isdir(path) else os.path.dirname(path) or '.'
    main = path if not os.path.isdir(path) else os.path.join(path, TOKENIZER_FILES[0])
    if not os.path.isfile(main):
        raise DataError(f'{path}: no tokenizer.json there; give a tokenizer.json file or the '
                        "directory of a Hugging Face checkpoint that has one")
    files = {}
    for name in TOKENIZER_FILES:
        file = main if name == TOKENIZER_FILES[0] else os.path.join(folder, name)
        if not os.path.exists(file):
            continue
        if not os.path.isfile(file):
            raise DataError(f'{file}: not a regular file (a FIFO, device or directory); a '
                            'tokenizer file is read whole')
        try:
            if os.path.getsize(file) > MAX_FILE_BYTES:
                raise DataError(f'{file}: larger than {MAX_FILE_BYTES >> 20} MiB; not a tokenizer '
                                'file')
            with open(file, 'rb') as f:
                files[name] = f.read()
        except OSError as e:
            raise DataError(f'{file}: cannot read: {e.strerror or e}') from None
    return files


def _json(source, name, raw):
    try:
        obj = json.loads(raw.decode('utf-8'))
    except (UnicodeDecodeError, ValueError) as e:
        raise DataError(f'{source}: {name} is not valid JSON ({e})') from None
    if not isinstance(obj, dict):
        raise DataError(f'{source}: {name} is a JSON {type(obj).__name__}, not an object')
    return obj


def _token_text(value):
    """A special token of tokenizer_config.json: a string or an AddedToken
    object {"content": ...}; None otherwise."""
    if isinstance(value, dict):
        value = value.get('content')
    return value if isinstance(value, str) else None


def _template(config, files):
    """The chat template's text: chat_template.jinja, else tokenizer_config's
    "chat_template" (a string, or a list of {name, template}: "default"); None."""
    if 'chat_template.jinja' in files:
        return files['chat_template.jinja'].decode('utf-8', 'replace')
    value = config.get('chat_template')
    if isinstance(value, list):
        named = {t.get('name'): t.get('template') for t in value if isinstance(t, dict)}
        value = named.get('default')
    return value if isinstance(value, str) else None


class TextTokenizer:
    """A tokenizer from its files ({name: bytes}, TOKENIZER_FILES); ``source``
    names them in messages (a path, or 'W.h5 (tokenizer)').  Every problem
    with the files is a DataError naming ``source``."""

    def __init__(self, files, source):
        self.source = source
        if TOKENIZER_FILES[0] not in files:
            raise DataError(f'{source}: no tokenizer.json')
        digest = hashlib.sha256()
        for name in sorted(files):
            digest.update(f'{name}\0{len(files[name])}\0'.encode())
            digest.update(files[name])
        self.sha256 = digest.hexdigest()
        try:
            self._tok = Tokenizer.from_str(files[TOKENIZER_FILES[0]].decode('utf-8'))
        except Exception as e:          # tokenizers raises a bare Exception
            hint = ' (it is an HDF5 file: give tokenizer.json or its directory, not a weight ' \
                'file)' if files[TOKENIZER_FILES[0]].startswith(b'\x89HDF') else ''
            raise DataError(f'{source}: tokenizer.json is not a tokenizer the `tokenizers` '
                            f'library reads ({" ".join(str(e).split())[:200]}){hint}') from None
        config = _json(source, 'tokenizer_config.json', files['tokenizer_config.json']) \
            if 'tokenizer_config.json' in files else {}
        self.special_tokens = {k: t for k in _SPECIAL if (t := _token_text(config.get(k)))}
        self.add_bos = config.get('add_bos_token')
        self.bos_id = self._tok.token_to_id(self.special_tokens['bos_token']) \
            if 'bos_token' in self.special_tokens else None
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values(), default=-1) + 1
        template = _template(config, files)
        try:
            self._chat = None if template is None else ChatTemplate(template)
        except ValueError as e:
            raise DataError(f'{source}: {e}') from None

    @property
    def has_chat_template(self):
        return self._chat is not None

    def check_vocab(self, model_vocab):
        """DataError unless every id of the tokenizer is below the model's
        vocab_size ``model_vocab``."""
        if self.vocab_size > model_vocab:
            raise DataError(f'{self.source}: the tokenizer has ids up to {self.vocab_size - 1}, '
                            f'beyond the vocabulary of the model (vocab_size = {model_vocab}); '
                            "use the model's own tokenizer")

    def encode_prompt(self, text):
        """A text prompt -> token ids: the tokenizer's own special tokens
        (tokenizer.json's post-processor), except that tokenizer_config.json's
        ``add_bos_token``, where it says, decides the leading BOS."""
        ids = self._tok.encode(text, add_special_tokens=True).ids
        if self.add_bos is None or self.bos_id is None:
            return ids
        starts = bool(ids) and ids[0] == self.bos_id
        if self.add_bos and not starts:
            return [self.bos_id] + ids
        if not self.add_bos and starts and \
                self._tok.encode(text, add_special_tokens=False).ids[:1] != [self.bos_id]:
            return ids[1:]
        return ids

    def render_chat(self, messages):
        """The chat template's text for ``messages`` (a list of {"role",
        "content"}), with the generation prompt; ValueError(problem) for bad
        messages, no template, or a template error."""
        if self._chat is None:
            raise ValueError(f'the tokenizer ({self.source}) has no chat template; send '
                             '"prompt" text, or give a tokenizer whose tokenizer_config.json '
                             'has one (--tokenizer)')
        return self._chat.render(text_messages(messages), self.special_tokens)

    def encode_chat(self, messages):
        """Token ids of the rendered chat: the template writes every special
        token itself, so none is added (as transformers does)."""
        return self._tok.encode(self.render_chat(messages), add_special_tokens=False).ids

    def decode(self, ids):
        """Text of token ids, special tokens skipped."""
        return self._tok.decode(list(map(int, ids)), skip_special_tokens=True)

    @property
    def backend(self):
        """The ``tokenizers.Tokenizer`` (for mpimoe.text.stops)."""
        return self._tok
