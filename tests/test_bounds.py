"""Bounded, finite, honest model files (issue #12, items 6-9): files that are not
regular files, config values no real model has, NaN/Inf words with a correct
checksum, NaN/Inf logits at run time, HDF5 datasets whose data lies elsewhere,
and attribute or JSON contents built to break the reader.  Each is refused in
one line, quickly, in bounded memory, naming the file, field or tensor.
"""

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import zlib

import h5py
import numpy as np
import pytest

from mpirun import mpiexec
from mpimoe.checkpoint.layout import tensor_specs
from mpimoe.checkpoint.weights import WeightFile, inspect_report
from mpimoe.checkpoint.writer import write_synthetic
from mpimoe.model.config import MAX, MAX_EXPERTS_TOTAL, ModelConfig, model_config
from mpimoe.errors import CLIP, ConfigError, DataError, clip
from mpimoe.model.reference import load_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: seconds a CLI child may run: a regression that blocks is killed (a refusal
#: takes a second; the rest is room for a loaded machine)
FAST = 60
#: address space of a CLI child: a reader that sizes anything by a claimed
#: config runs out of it (MemoryError, exit 70) instead of passing
LIMIT_AS = 1 << 30
#: largest finite bfloat16 (about 3.39e38) and float16 (65504) words; a NaN word
BF16_MAX, F16_MAX, BF16_NAN = 0x7f7f, 0x7bff, 0x7fc0


def _mpimoe(*args, stdin=None):
    """``python -m mpimoe ARGS`` with at most LIMIT_AS of address space, killed
    after FAST seconds -> CompletedProcess (text)."""
    env = {**os.environ, 'OPENBLAS_NUM_THREADS': '1', 'OMP_NUM_THREADS': '1',
           'PYTHONPATH': ROOT + os.pathsep + os.environ.get('PYTHONPATH', '')}
    return subprocess.run([sys.executable, '-m', 'mpimoe', *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=FAST,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS,
                                                                (LIMIT_AS, LIMIT_AS)))


def _one_line(proc, code, *fragments):
    """Exit ``code`` and exactly one ``mpimoe: error:`` line holding every
    fragment; nothing else on stderr but progress lines (``mpimoe: 0/12 sequences``)."""
    assert proc.returncode == code, proc.stderr
    lines = [line for line in proc.stderr.splitlines()
             if not re.match(r'mpimoe: \d+/\d+ sequences', line)]
    assert len(lines) == 1 and lines[0].startswith('mpimoe: error: '), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture
def weights(tmp_path, tiny_weights):
    """A private copy of the tiny weights, to corrupt."""
    path = str(tmp_path / 'w.h5')
    shutil.copyfile(tiny_weights, path)
    return path


def _set_root_attr(path, key, value):
    with h5py.File(path, 'r+') as f:
        f.attrs[key] = value


def _config_with(path, **changes):
    """The stored config JSON of ``path`` with ``changes`` (unvalidated)."""
    with h5py.File(path, 'r') as f:
        d = json.loads(f.attrs['config'])
    return json.dumps({**d, **changes})


def _set_word(path, name, index, word):
    """Word ``index`` (flat) of tensor ``name`` := ``word``, crc32 recomputed:
    a file whose checksums are all correct."""
    with h5py.File(path, 'r+') as f:
        ds = f[name]
        words = ds[()]
        words.flat[index] = word
        ds[...] = words
        ds.attrs['crc32'] = zlib.crc32(words)


def _fill(path, name, word):
    """Every word of tensor ``name`` := ``word``, crc32 recomputed."""
    with h5py.File(path, 'r+') as f:
        ds = f[name]
        words = np.full(ds.shape, word, np.uint16)
        ds[...] = words
        ds.attrs['crc32'] = zlib.crc32(words)


# ---------------------------------------------------------------- non-regular files

@pytest.fixture
def fifo(tmp_path):
    path = str(tmp_path / 'pipe.h5')
    os.mkfifo(path)
    return path


def test_fifo_and_directory_weights_refused(fifo, tmp_path):
    with pytest.raises(DataError, match='is a FIFO .*not a regular file'):
        WeightFile(fifo)
    with pytest.raises(DataError, match='is a directory, not a regular file'):
        WeightFile(str(tmp_path))


@pytest.mark.timeout(4 * FAST + 10)
def test_fifo_weights_refused_by_the_commands(fifo, tiny_inputs, tmp_path):
    _one_line(_mpimoe('inspect', fifo), 65, f'weights {fifo}: is a FIFO')
    _one_line(_mpimoe('reference', '--weights', fifo, '--input', tiny_inputs,
                      '--output', tmp_path / 'out.h5'), 65, 'is a FIFO')
    assert not (tmp_path / 'out.h5').exists()
    _one_line(_mpimoe('plan', '--preset', 'tiny', '--gpus', 9, '--stats', fifo), 65,
              f'--stats {fifo}: is a FIFO')
    _one_line(_mpimoe('plan', '--preset', 'tiny', '--gpus', 9, '--calibration', fifo), 65,
              f'--calibration {fifo}: is a FIFO')


@pytest.mark.timeout(FAST + 10)
def test_fifo_config_json_refused_by_convert(tmp_path):
    src = tmp_path / 'hf'
    src.mkdir()
    os.mkfifo(src / 'config.json')
    _one_line(_mpimoe('convert', '--from-hf', src, '--out', tmp_path / 'w.h5'), 65,
              'config.json: is a FIFO')


# ---------------------------------------------------------------- config bounds

@pytest.mark.parametrize('field', sorted(MAX))
def test_every_field_bounded(field):
    top = MAX[field]
    with pytest.raises(ConfigError) as e:
        model_config('tiny', [f'{field}={top + 1}'])
    assert str(e.value).startswith(f'{field}={top + 1}: must be in [1, {top}]')


@pytest.mark.parametrize('sets,message', [
    (['rope_theta=inf'], 'rope_theta=inf: must be in (0, 1e+12]'),
    (['rope_theta=nan'], 'rope_theta=nan: must be in'),
    (['norm_eps=1'], 'norm_eps=1.0: must be in (0, 1)'),
    (['n_layers=1024', 'n_experts=4096', 'top_k=1'],
     f'n_experts=4096 x 1023 MoE layers = 4190208 experts: must be <= {MAX_EXPERTS_TOTAL}'),
    (['d_model=65536', 'd_expert=262144', 'n_experts=256'],
     '3.96e+13 parameters: must be <= 2e+13'),
])
def test_values_and_totals_no_model_has(sets, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        model_config('tiny', sets)


def test_presets_and_context_length_within_bounds(tmp_path):
    for name in ('paper-61l', 'paper-16l', 'paper-4l', 'small', 'tiny'):
        model_config(name)
    cfg = model_config('tiny', ['max_position_embeddings=77'])
    assert cfg.max_position_embeddings == 77
    assert ModelConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.timeout(2 * FAST + 10)
@pytest.mark.parametrize('changes,fragment', [
    (dict(n_experts=10 ** 9), 'n_experts=1000000000: must be in [1, 4096]'),
    (dict(n_layers=1024, n_experts=4096, top_k=1), 'experts: must be <='),
    (dict(n_layers=int('9' * 4000)), 'n_layers=' + '9' * CLIP + '...: must be in [1, 1024]'),
])
def test_absurd_stored_config_refused_fast(weights, tiny_inputs, tmp_path, changes, fragment):
    """A file that claims a model no one has: one line, before anything is sized
    by it (the child has LIMIT_AS of address space)."""
    _set_root_attr(weights, 'config', _config_with(weights, **changes))
    line = _one_line(_mpimoe('inspect', weights), 65, f'{weights}: bad config attribute',
                     fragment)
    assert len(line) < 400
    if 'n_experts' in changes:
        _one_line(_mpimoe('reference', '--weights', weights, '--input', tiny_inputs,
                          '--output', tmp_path / 'out.h5'), 65, fragment)


@pytest.mark.timeout(FAST + 10)
@pytest.mark.parametrize('text,fragment', [
    ('[' * 100_000 + ']' * 100_000, 'config is not usable JSON: nested too deeply'),
    ('{"n_layers": ' + '7' * 5000 + '}', 'config is not valid JSON: Exceeds the limit'),
])
def test_hostile_config_json_in_weights(weights, text, fragment):
    _set_root_attr(weights, 'config', text)
    _one_line(_mpimoe('inspect', weights), 65, f'{weights}: bad config attribute', fragment)


@pytest.mark.timeout(FAST + 10)
@pytest.mark.parametrize('text,fragment', [
    ('{"a": ' * 100_000 + '1' + '}' * 100_000,
     'config.json is not usable JSON: nested too deeply'),
    ('{"vocab_size": ' + '7' * 5000 + '}', 'config.json is not valid JSON: Exceeds the limit'),
])
def test_hostile_config_json_in_hf_dir(tmp_path, text, fragment):
    src = tmp_path / 'hf'
    src.mkdir()
    (src / 'config.json').write_text(text)
    _one_line(_mpimoe('convert', '--from-hf', src, '--out', tmp_path / 'w.h5'), 65, fragment)
    assert not (tmp_path / 'w.h5').exists()


# ---------------------------------------------------------------- clipped echoes

def test_clip():
    assert clip('abc') == 'abc' and clip('x' * CLIP) == 'x' * CLIP
    assert clip('x' * 10_000) == 'x' * CLIP + '...'


@pytest.mark.parametrize('edit', [
    lambda p: _set_root_attr(p, 'format', 'f' * 100_000),
    lambda p: _set_root_attr(p, 'format_version', 'v' * 100_000),
    lambda p: _set_root_attr(p, 'config', _config_with(p, **{'k' * 100_000: 1})),
    lambda p: _set_root_attr(p, 'config', _config_with(p, expert_kind='e' * 100_000)),
])
def test_long_root_attributes_not_echoed(weights, edit):
    edit(weights)
    with pytest.raises(DataError) as e:
        WeightFile(weights)
    assert '...' in str(e.value) and len(str(e.value)) < 400, str(e.value)[:500]


def test_long_tensor_attribute_not_echoed(weights):
    with h5py.File(weights, 'r+') as f:
        f['lm_head'].attrs['dtype'] = 'd' * 100_000
    with WeightFile(weights) as wf:
        with pytest.raises(DataError, match=r'tensor lm_head: dtype attribute .*\.\.\.') as e:
            wf.read('lm_head')
        assert len(str(e.value)) < 400
        assert all(len(p) < 400 for p in wf.validate())


# ---------------------------------------------------------------- NaN and Inf words

@pytest.mark.parametrize('name,index,word', [
    ('layers/2/experts/5/up', 1234, BF16_NAN),            # [9, 82] of [64, 128]
    ('embed', 0, 0x7f80),                                 # +Inf
    ('final_norm', 63, 0xff80),                           # -Inf
])
def test_nonfinite_word_with_correct_crc_refused(weights, name, index, word):
    _set_word(weights, name, index, word)
    at = [int(i) for i in np.unravel_index(index, dict(tensor_specs(model_config('tiny')))[name])]
    with WeightFile(weights) as wf:
        with pytest.raises(DataError, match=re.escape(f'tensor {name}: value at {at} is NaN or '
                                                      'Inf (not a usable model); rewrite')):
            wf.read(name)
        assert wf.validate() == [f'{name}: value at {at} is NaN or Inf (not a usable model)']
        assert wf.validate(checksums=False) == []
    text, ok = inspect_report(weights)
    assert not ok and f'{name}: value at' in text


def test_largest_finite_words_pass(weights, tmp_path):
    _set_word(weights, 'lm_head', 7, BF16_MAX)
    with WeightFile(weights) as wf:
        assert wf.validate() == []
        assert float(wf.read('lm_head').reshape(-1)[7]) > 3e38
    f16 = str(tmp_path / 'f16.h5')
    write_synthetic(model_config('tiny', ['dtype=float16']), f16)
    _set_word(f16, 'lm_head', 7, F16_MAX)
    _set_word(f16, 'embed', 3, 0x7c00)                      # float16 +Inf
    with WeightFile(f16) as wf:
        assert float(wf.read('lm_head').reshape(-1)[7]) == 65504
        assert wf.validate() == ['embed: value at [0, 3] is NaN or Inf (not a usable model)']


@pytest.mark.timeout(2 * FAST + 10)
def test_nonfinite_word_refused_by_the_commands(weights, tiny_inputs, tmp_path):
    name = 'layers/3/experts/7/down'
    _set_word(weights, name, 5, BF16_NAN)
    proc = _mpimoe('inspect', weights)
    assert proc.returncode == 65 and f'{name}: value at [0, 5] is NaN or Inf' in proc.stdout
    _one_line(_mpimoe('reference', '--weights', weights, '--input', tiny_inputs,
                      '--output', tmp_path / 'out.h5'), 65,
              f'tensor {name}: value at [0, 5] is NaN or Inf')


# ---------------------------------------------------------------- NaN/Inf logits

@pytest.fixture(scope='module')
def prompts():
    return [np.arange(1, 9), np.arange(20, 23)]


@pytest.mark.parametrize('edit,where', [
    (lambda m: m.front.layer[2]['wo'].fill(3e38), 'after the attention of layer 2'),
    (lambda m: m.front.dense[0]['down'].fill(3e38), 'after the dense MLP of layer 0'),
    (lambda m: [w['down'].fill(3e38) for w in m.experts[1]], 'after the MoE FFN of layer 1'),
    (lambda m: m.front.t['lm_head'].fill(3e38), 'after the final norm and LM head'),
])
def test_nonfinite_logits_name_the_stage(tiny_weights, prompts, edit, where):
    """Finite weights large enough to overflow FP32: a one-line DataError naming
    the first stage whose output was not finite, not NaN logits and token 0."""
    with WeightFile(tiny_weights) as wf:
        model = load_reference(wf)
    model.generate(prompts, 2)
    edit(model)
    with pytest.raises(DataError, match='^the logits are NaN or Inf: the activations were '
                       f'first non-finite {where} ') as e:
        model.generate(prompts, 2)
    assert '\n' not in str(e.value)
    assert model.front._finite == []             # the notes do not outlive the pass


@pytest.mark.timeout(FAST + 10)
def test_nonfinite_logits_refused_by_reference(weights, tiny_inputs, tmp_path):
    _fill(weights, 'layers/1/experts/0/down', BF16_MAX)
    _fill(weights, 'layers/1/experts/1/down', BF16_MAX)
    with WeightFile(weights) as wf:
        assert wf.validate() == []
    _one_line(_mpimoe('reference', '--weights', weights, '--input', tiny_inputs,
                      '--output', tmp_path / 'out.h5', '--max-new-tokens', 2), 65,
              'the logits are NaN or Inf', 'after the MoE FFN of layer 1')
    assert not (tmp_path / 'out.h5').exists()


@pytest.mark.timeout(120)
def test_nonfinite_logits_end_the_engine_run(weights, tiny_inputs, tmp_path):
    """Expert ranks compute the overflow, the front-end (rank 0) finds it: exit 65."""
    for e in range(8):
        _fill(weights, f'layers/2/experts/{e}/down', BF16_MAX)
    out = tmp_path / 'out.h5'
    proc = mpiexec(5, ['run', '--weights', weights, '--input', tiny_inputs, '--output', out,
                       '--placement', 'packed:2', '--max-new-tokens', 2], timeout=90)
    lines = proc.stderr.splitlines()
    errors = [line for line in lines if line.startswith('mpimoe: error')]
    assert proc.returncode == 65, proc.stderr
    assert not any('Warning' in line for line in lines), proc.stderr    # from no rank
    assert len(errors) == 1 and re.search(r'\(rank 0\b.*\): the logits are NaN or Inf: '
                                          r'.*after the MoE FFN of layer 2', errors[0]), errors
    assert not out.exists()


# ---------------------------------------------------------------- data that lies elsewhere

def _replace(path, name, make):
    """Delete tensor ``name`` and let ``make(f, name, words)`` recreate it; the
    words and attributes are the original's, so only the storage differs."""
    with h5py.File(path, 'r+') as f:
        words, attrs = f[name][()], dict(f[name].attrs)
        del f[name]
        make(f, name, words)
        f[name].attrs.update(attrs)


def _virtual(tmp_path):
    def make(f, name, words):
        other = str(tmp_path / 'other.h5')
        with h5py.File(other, 'w') as g:
            g['x'] = words
        layout = h5py.VirtualLayout(shape=words.shape, dtype=words.dtype)
        layout[...] = h5py.VirtualSource(other, 'x', shape=words.shape)
        f.create_virtual_dataset(name, layout)
    return make


def _external(tmp_path):
    def make(f, name, words):
        raw = str(tmp_path / 'raw.bin')
        words.tofile(raw)
        f.create_dataset(name, shape=words.shape, dtype=words.dtype,
                         external=[(raw, 0, words.nbytes)])
    return make


def _compact(f, name, words):
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.COMPACT)
    space = h5py.h5s.create_simple(words.shape)
    h5py.h5d.create(f.id, name.encode(), h5py.h5t.STD_U16LE, space, dcpl=dcpl)
    f[name][...] = words


@pytest.mark.parametrize('kind,message', [
    ('virtual', 'not contiguous in this file (a virtual dataset: its data lies in other files)'),
    ('external', 'not contiguous in this file (external storage: its data lies in other files)'),
    ('compact', 'not contiguous in this file (compact)'),
])
def test_data_elsewhere_refused(weights, tmp_path, kind, message):
    make = {'virtual': _virtual(tmp_path), 'external': _external(tmp_path),
            'compact': _compact}[kind]
    name = 'final_norm'
    _replace(weights, name, make)
    with WeightFile(weights) as wf:
        with pytest.raises(DataError, match=re.escape(f'tensor {name}: {message}')):
            wf.read(name)
        assert wf.validate() == [f'{name}: {message}']
