"""The tokenizer a weight file carries (mpimoe/checkpoint/tokenizer_files.py,
WeightFile.tokenizer_files): ``mpimoe init-weights --tokenizer`` embeds the
files of a real BPE (tests/bpe.py, fixture bpe_tokenizer_dir) byte for byte,
``mpimoe inspect`` reports them, and every way the group can be wrong (a
flipped byte, a link, a dtype, a name, a vocabulary larger than the model's)
is a one-line DataError naming the file and the dataset."""

import shutil

import h5py
import numpy as np
import pytest

from mpimoe.checkpoint.tokenizer_files import write_tokenizer_files
from mpimoe.checkpoint.weights import WeightFile, inspect_report
from mpimoe.checkpoint.writer import write_synthetic
from mpimoe.cli.main import main
from mpimoe.errors import DataError
from mpimoe.model.config import model_config
from mpimoe.text.tokenizer import TOKENIZER_FILES

#: tokens of the tests' BPE (tests/bpe.py): its ids are 0..163
BPE_TOKENS = 164
BPE_FILES = ('tokenizer.json', 'tokenizer_config.json', 'generation_config.json')


def _files(folder):
    return {n: (folder / n).read_bytes() for n in TOKENIZER_FILES if (folder / n).exists()}


@pytest.fixture(scope='module')
def with_tokenizer(bpe_tokenizer_dir, tmp_path_factory):
    """Path (str) of tiny weights, seed 0, written by ``mpimoe init-weights
    --tokenizer`` with the BPE.  Read-only."""
    path = str(tmp_path_factory.mktemp('tok') / 'w.h5')
    assert main(['init-weights', '--preset', 'tiny', '--tokenizer', str(bpe_tokenizer_dir),
                 '--out', path]) == 0
    return path


@pytest.fixture
def copy(with_tokenizer, tmp_path):
    """A copy of ``with_tokenizer`` to damage: path (str)."""
    return str(shutil.copy(with_tokenizer, tmp_path / 'w.h5'))


def test_init_weights_embeds_the_files_byte_for_byte(bpe_tokenizer_dir, with_tokenizer,
                                                    tiny_weights):
    with WeightFile(with_tokenizer) as wf:
        files = wf.tokenizer_files()
        assert list(files) == list(BPE_FILES)             # in the order of TOKENIZER_FILES
        assert files == _files(bpe_tokenizer_dir)
        tok = wf.tokenizer()
        assert (tok.vocab_size, tok.has_chat_template) == (BPE_TOKENS, True)
        assert tok.decode(tok.encode_prompt('Hello world')) == 'Hello world'
        assert wf.validate() == []
        identity = wf.identity()
    with WeightFile(tiny_weights) as wf:           # the same weights, no tokenizer
        assert wf.tokenizer_files() is None and wf.tokenizer() is None
        assert wf.identity() == identity


def test_init_weights_says_what_it_embedded(bpe_tokenizer_dir, tmp_path, capsys):
    """A tokenizer.json path takes the files beside it too."""
    assert main(['init-weights', '--preset', 'tiny', '--tokenizer',
                 str(bpe_tokenizer_dir / 'tokenizer.json'), '--out', str(tmp_path / 'w.h5')]) == 0
    assert (f'tokenizer: {", ".join(BPE_FILES)} of {bpe_tokenizer_dir / "tokenizer.json"} '
            f'embedded ({BPE_TOKENS} tokens, chat template: yes)') in capsys.readouterr().out
    with WeightFile(tmp_path / 'w.h5') as wf:
        assert wf.tokenizer_files() == _files(bpe_tokenizer_dir)


def test_inspect_lines(with_tokenizer, tiny_weights):
    text, ok = inspect_report(with_tokenizer)
    assert ok and f'tokenizer: {BPE_TOKENS} tokens, chat template: yes, files: ' \
        f'{", ".join(BPE_FILES)}\nvalidation: valid' in text, text
    text, ok = inspect_report(tiny_weights)
    assert ok and '\ntokenizer: none\n' in text


def test_no_chat_template(bpe_tokenizer_dir, tmp_path, tiny_weights):
    folder = tmp_path / 'tok'
    folder.mkdir()
    shutil.copy(bpe_tokenizer_dir / 'tokenizer.json', folder)
    assert main(['init-weights', '--preset', 'tiny', '--tokenizer', str(folder),
                 '--out', str(tmp_path / 'w.h5')]) == 0
    text, ok = inspect_report(str(tmp_path / 'w.h5'))
    assert ok and f'tokenizer: {BPE_TOKENS} tokens, chat template: no, files: tokenizer.json\n' \
        in text


def _flip(path, dataset, at):
    """Invert the byte ``at`` of ``dataset`` in the file on disk."""
    with h5py.File(path, 'r') as f:
        offset = f[dataset].id.get_offset()
    with open(path, 'r+b') as fh:
        fh.seek(offset + at)
        b = fh.read(1)
        fh.seek(offset + at)
        fh.write(bytes([b[0] ^ 0xFF]))


def test_a_flipped_byte_is_caught(copy, capsys):
    _flip(copy, 'tokenizer/tokenizer_config.json', 10)
    problem = 'tokenizer/tokenizer_config.json: checksum mismatch (file corrupted?)'
    with WeightFile(copy) as wf:
        with pytest.raises(DataError) as e:
            wf.tokenizer_files()
        assert str(e.value).startswith(f'{copy}: {problem}; rewrite the file')
        assert '\n' not in str(e.value)
        with pytest.raises(DataError, match='checksum mismatch'):
            wf.tokenizer()
        assert wf.validate() == [problem]
        assert wf.validate(checksums=False) == [problem]     # the small files, always
        wf.read_nonexpert()                                   # the weights are fine
    assert main(['inspect', copy]) == 65
    out = capsys.readouterr().out
    assert 'tokenizer: not usable (see validation)\nvalidation: 1 problem(s)\n' \
        f'  {problem}' in out, out


def _replace(name, **kw):
    def edit(f):
        del f[f'tokenizer/{name}']
        ds = f.create_dataset(f'tokenizer/{name}', **kw)
        ds.attrs['crc32'] = 0
    return edit


def _soft_link(f):
    del f['tokenizer/tokenizer.json']
    f['tokenizer/tokenizer.json'] = h5py.SoftLink('/embed')


BAD_GROUPS = {
    'unknown name': (lambda f: f['tokenizer'].create_dataset('vocab.txt', data=np.zeros(3, 'u1')),
                     'tokenizer/vocab.txt: not a tokenizer file (only tokenizer.json, '),
    'words': (_replace('tokenizer_config.json', data=np.zeros(4, np.uint16)),
              'tokenizer/tokenizer_config.json: stored as uint16 of shape (4,), expected the '
              'bytes as uint8 (n,)'),
    '2-d': (_replace('generation_config.json', data=np.zeros((2, 2), np.uint8)),
            'tokenizer/generation_config.json: stored as uint8 of shape (2, 2)'),
    'no dataspace': (_replace('generation_config.json', data=h5py.Empty('u1')),
                     'tokenizer/generation_config.json: stored as uint8 of shape None'),
    'a string': (_replace('tokenizer_config.json', data='{}'),
                 'tokenizer/tokenizer_config.json: stored as object of shape ()'),
    'no crc32': (lambda f: f['tokenizer/tokenizer.json'].attrs.__delitem__('crc32'),
                 'tokenizer/tokenizer.json: crc32 attribute missing or not an integer'),
    'chunked': (_replace('generation_config.json', data=np.zeros(64, np.uint8), chunks=(16,),
                         compression='gzip'),
                'tokenizer/generation_config.json: not contiguous in this file'),
    'soft link': (_soft_link, 'tokenizer/tokenizer.json: SoftLink not allowed'),
    'no tokenizer.json': (lambda f: f.__delitem__('tokenizer/tokenizer.json'),
                          'tokenizer: no tokenizer.json dataset'),
    'a group': (lambda f: (f.__delitem__('tokenizer/tokenizer.json'),
                           f.create_group('tokenizer/tokenizer.json')),
                'tokenizer/tokenizer.json: is a group, not a dataset'),
    'not a group': (lambda f: (f.__delitem__('tokenizer'), f.create_dataset('tokenizer', data=[1])),
                    'tokenizer: is a dataset, not a group'),
    'external link': (lambda f: (f.__delitem__('tokenizer'),
                                 f.__setitem__('tokenizer', h5py.ExternalLink('x.h5', '/t'))),
                      'tokenizer: ExternalLink not allowed'),
}


@pytest.mark.parametrize('case', BAD_GROUPS)
def test_a_badly_stored_group_is_one_problem_naming_the_dataset(copy, case):
    edit, problem = BAD_GROUPS[case]
    with h5py.File(copy, 'r+') as f:
        edit(f)
    with WeightFile(copy) as wf:
        with pytest.raises(DataError) as e:
            wf.tokenizer_files()
        assert str(e.value).startswith(f'{copy}: {problem}') and '\n' not in str(e.value), e.value
        problems = wf.validate(checksums=False)
    assert len(problems) == 1 and problems[0].startswith(problem), problems


def test_a_group_of_another_name_is_reported_with_it(copy):
    with h5py.File(copy, 'r+') as f:
        f['tokenizer'].create_group('sub')
    with WeightFile(copy) as wf:
        assert wf.validate() == ['tokenizer/sub: is a group, not a dataset']


def test_too_many_tokens_refused_nothing_written(bpe_tokenizer_dir, tmp_path, capsys):
    out = tmp_path / 'w.h5'
    assert main(['init-weights', '--preset', 'tiny', '--set', 'vocab_size=100', '--tokenizer',
                 str(bpe_tokenizer_dir), '--out', str(out)]) == 65
    err = capsys.readouterr().err
    assert err == (f'mpimoe: error: {bpe_tokenizer_dir}: the tokenizer has ids up to '
                   f'{BPE_TOKENS - 1}, beyond the vocabulary of the model (vocab_size = 100); '
                   "use the model's own tokenizer\n")
    assert list(tmp_path.iterdir()) == []


def test_no_tokenizer_there_refused_nothing_written(tmp_path, capsys):
    assert main(['init-weights', '--preset', 'tiny', '--tokenizer', str(tmp_path),
                 '--out', str(tmp_path / 'w.h5')]) == 65
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and f'{tmp_path}: no tokenizer.json there' in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('files, problem', [
    # a file written without the check (the writer stores what it is given)
    ('bpe', 'tokenizer: the tokenizer has ids up to 163, beyond the vocabulary of the model '
            '(vocab_size = 100)'),
    ({'tokenizer.json': b'{"not": "a tokenizer"'},
     'tokenizer: tokenizer.json is not a tokenizer the `tokenizers` library reads'),
])
def test_a_stored_tokenizer_that_does_not_fit_or_parse(files, problem, bpe_tokenizer_dir,
                                                       tmp_path, capsys):
    files = _files(bpe_tokenizer_dir) if files == 'bpe' else files
    path = str(tmp_path / 'w.h5')
    write_synthetic(model_config('tiny', ['vocab_size=100']), path, tokenizer_files=files)
    with WeightFile(path) as wf:
        assert wf.tokenizer_files() == files                  # stored intact
        problems = wf.validate()
        assert len(problems) == 1 and problems[0].startswith(problem), problems
        with pytest.raises(DataError, match=f'^{path} \\(tokenizer\\): '):
            wf.tokenizer()
    assert main(['inspect', path]) == 65
    assert 'tokenizer: not usable (see validation)' in capsys.readouterr().out


def test_the_writer_takes_only_known_files(tmp_path):
    with h5py.File(tmp_path / 'x.h5', 'w') as f:
        with pytest.raises(ValueError, match='need tokenizer.json'):
            write_tokenizer_files(f, {'tokenizer_config.json': b'{}'})
        with pytest.raises(ValueError, match='only names of'):
            write_tokenizer_files(f, {'tokenizer.json': b'{}', 'vocab.txt': b''})


def test_an_empty_file_round_trips(bpe_tokenizer_dir, tmp_path):
    files = _files(bpe_tokenizer_dir) | {'chat_template.jinja': b''}
    path = str(tmp_path / 'w.h5')
    write_synthetic(model_config('tiny'), path, tokenizer_files=files)
    with WeightFile(path) as wf:
        assert wf.tokenizer_files() == {n: files[n] for n in TOKENIZER_FILES}
        assert wf.validate() == []
