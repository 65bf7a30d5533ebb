"""``mpimoe show OUT``: results printed readably, read lazily (the first
``--limit`` of an output of any size, or the one ``--id``).

    == doc-1   stop, 12 prompt + 5 generated tokens
    prompt:  (with --input IN: the line's prompt, its messages or token ids)
      Hello world
    text:    (or tokens: [...] when the run had no tokenizer)
      ...
"""

import json
import textwrap

from mpimoe.errors import DataError
from mpimoe.io.files import file_digest
from mpimoe.io.outputs import open_output, output_format
from mpimoe.io.result_lines import iter_result_lines

__all__ = ['results', 'show']

#: HDF5 output sequences read at a time
_SLAB = 1024


def _h5_results(path):
    with open_output(path) as f:
        n, offsets = len(f['ids']), f['generated_offsets']
        for a in range(0, n, _SLAB):
            b = min(a + _SLAB, n)
            ids = f['ids'].asstr()[a:b].tolist()
            off = offsets[a:b + 1]
            gen = f['generated'][off[0]:off[-1]]
            cols = {k: f[k].asstr()[a:b].tolist() if k in f else [None] * (b - a)
                    for k in ('text', 'finish_reason')}
            prompts = f['prompt_tokens'][a:b].tolist() if 'prompt_tokens' in f else \
                [None] * (b - a)
            for j, seq_id in enumerate(ids):
                tokens = gen[off[j] - off[0]:off[j + 1] - off[0]]
                yield (seq_id, cols['text'][j], tokens, cols['finish_reason'][j], prompts[j],
                       tokens.size)


def results(path):
    """Yield (id, text or None, tokens int32 [n] or None, finish reason,
    prompt tokens, completion tokens) of the output ``path`` in order."""
    if output_format(path) == 'jsonl':
        return (fields for _, fields in iter_result_lines(path))
    return _h5_results(path)


def _prompts(path, wanted):
    """{id: printable prompt} of the input lines whose id (or custom_id) is in
    ``wanted``, read line by line."""
    found = {}
    with open(path, 'rb') as f:
        for raw in f:
            try:
                obj = json.loads(raw)
            except (ValueError, RecursionError):
                continue
            if not isinstance(obj, dict):
                continue
            seq_id = str(obj.get('custom_id', obj.get('id')))
            if seq_id not in wanted:
                continue
            body = obj.get('body') if isinstance(obj.get('body'), dict) else obj
            if 'messages' in body and isinstance(body['messages'], list):
                found[seq_id] = '\n'.join(f'{m.get("role")}: {m.get("content")}'
                                          for m in body['messages'] if isinstance(m, dict))
            elif isinstance(body.get('prompt'), str):
                found[seq_id] = body['prompt']
            else:
                found[seq_id] = f'tokens: {body.get("tokens", body.get("prompt"))}'
            if len(found) == len(wanted):
                break
    return found


#: control characters but newline and tab, shown escaped: a generated ESC
#: sequence must not drive the terminal
_CONTROL = {c: f'\\x{c:02x}' for c in [*range(0x20), 0x7f] if chr(c) not in '\n\t'}


def _safe(text):
    """``text`` printable: control characters and lone surrogates escaped."""
    return text.translate(_CONTROL).encode('utf-8', 'backslashreplace').decode('utf-8')


def _input_note(path, input_path, matched):
    """Why the prompts of ``input_path`` may not be those of the output
    ``path``, or ''."""
    if not matched:
        return f'no id of these results is in {input_path}: no prompts shown'
    if output_format(path) == 'hdf5':
        with open_output(path) as f:
            made_from = f.attrs.get('input_sha256')
        if made_from is not None and made_from != file_digest(input_path):
            return (f'{input_path} is not the input {path} was made from (its sha256 differs): '
                    'the prompts shown may not be the ones its results answer')
    return ''


def _indent(text):
    text = _safe(text)
    return textwrap.indent(text, '  ', lambda line: True) if text else '  (empty)'


def show(path, seq_id=None, limit=10, input_path=None, out=print):
    """Print the first ``limit`` results of ``path`` (or the one ``seq_id``),
    with their prompts from ``input_path`` when given."""
    picked = []
    for row in results(path):
        if seq_id is None or row[0] == seq_id:
            picked.append(row)
        if (seq_id is not None and picked) or len(picked) >= limit:
            break
    if seq_id is not None and not picked:
        raise DataError(f'{path}: no result with id {seq_id!r}')
    prompts = _prompts(input_path, {r[0] for r in picked}) if input_path else {}
    if input_path:
        note = _input_note(path, input_path, bool(prompts))
        if note:
            out(f'note: {note}')
    for sid, text, tokens, why, n_prompt, n_new in picked:
        out(f'== {_safe(sid)}   {why}, {n_prompt} prompt + {n_new} generated tokens')
        if sid in prompts:
            out('prompt:\n' + _indent(prompts[sid]))
        if text is not None:
            out('text:\n' + _indent(text))
        else:
            out(f'tokens: {tokens.tolist() if tokens is not None else "(none stored)"}')
