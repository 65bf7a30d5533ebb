"""Weight format (mpimoe/checkpoint/layout.py, writer.py, weights.py): layout, round
trip, partial reads, corruption and every user error as a one-line DataError."""

import json
import io
import os
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest

from mpimoe.checkpoint.layout import expert_tensor_names, nonexpert_tensor_names, tensor_specs
from mpimoe.checkpoint.weights import WeightFile, inspect_report
from mpimoe.checkpoint.writer import write_synthetic
from mpimoe.model.config import model_config
from mpimoe.errors import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def tiny():
    return model_config('tiny')


@pytest.fixture
def tiny_file(tmp_path, tiny):
    path = str(tmp_path / 'w.h5')
    write_synthetic(tiny, path, seed=0)
    return path


def _nbytes(shape):
    return int(np.prod(shape)) * 2


# ---------------------------------------------------------------- layout

@pytest.mark.parametrize('preset,sets', [('tiny', []), ('tiny', ['expert_kind=mlp']),
                                         ('small', []), ('paper-61l', []), ('paper-16l', [])])
def test_specs_match_param_counts(preset, sets):
    cfg = model_config(preset, sets)
    specs = tensor_specs(cfg)
    assert len({n for n, _ in specs}) == len(specs)
    expert = {n for l in cfg.moe_layers for e in range(cfg.n_experts)
              for n in expert_tensor_names(l, e, cfg)}
    sizes = {n: int(np.prod(s)) for n, s in specs}
    assert sum(sizes[n] for n in expert) == cfg.expert_params * cfg.n_experts * cfg.n_moe_layers
    nonexpert = nonexpert_tensor_names(cfg)
    assert sum(sizes[n] for n in nonexpert) == cfg.nonexpert_params
    assert set(nonexpert) | expert == set(sizes)


def test_expert_names_reject_dense_layer(tiny):
    with pytest.raises(ValueError):
        expert_tensor_names(0, 0, tiny)


# ---------------------------------------------------------------- round trip

def test_round_trip(tiny_file, tiny):
    with WeightFile(tiny_file) as wf:
        assert wf.config == tiny
        assert wf.validate() == []
        for name, shape in tensor_specs(tiny):
            a = wf.read(name)
            assert a.shape == shape and a.dtype.name == 'bfloat16', name
        expert = wf.read_expert(tiny.moe_layers[-1], tiny.n_experts - 1)
        assert list(expert) == list(tiny.expert_matrices)
        assert expert['down'].shape == (tiny.d_expert, tiny.d_model)
        assert set(wf.read_nonexpert()) == set(nonexpert_tensor_names(tiny))
        assert np.all(wf.read('layers/2/ffn_norm').astype(np.float32) == 1.0)
        embed = wf.read('embed').astype(np.float32)           # [V, d]
    rms = np.sqrt((embed ** 2).mean(axis=1))
    assert 0.8 < rms.mean() < 1.2


def test_float16_config(tmp_path, tiny):
    cfg = tiny.replace(dtype='float16')
    path = str(tmp_path / 'f16.h5')
    write_synthetic(cfg, path)
    with WeightFile(path) as wf:
        assert wf.validate() == []
        assert wf.read('lm_head').dtype == np.float16


def test_seed_reproducible(tmp_path, tiny):
    paths = [str(tmp_path / f'{k}.h5') for k in 'abc']
    for path, seed in zip(paths, (3, 3, 4)):
        write_synthetic(tiny, path, seed=seed)
    blobs = [open(p, 'rb').read() for p in paths]
    assert blobs[0] == blobs[1]
    with WeightFile(paths[0]) as a, WeightFile(paths[2]) as c:
        assert not np.array_equal(a.read('layers/1/experts/0/up'), c.read('layers/1/experts/0/up'))


def test_summary_and_no_partial_left(tmp_path, tiny):
    path = str(tmp_path / 'w.h5')
    lines = []
    summary = write_synthetic(tiny, path, log=lines.append)
    assert summary['tensors'] == len(tensor_specs(tiny))
    assert summary['bytes'] == sum(_nbytes(s) for _, s in tensor_specs(tiny))
    assert lines and os.listdir(tmp_path) == ['w.h5']


# ---------------------------------------------------------------- partial read

class CountingFile(io.FileIO):
    """A file that counts the bytes h5py reads from it."""

    bytes_read = 0

    def readinto(self, b):
        n = super().readinto(b)
        self.bytes_read += n or 0
        return n

    def read(self, size=-1):
        data = super().read(size)
        self.bytes_read += len(data)
        return data


def test_reads_only_one_expert(tmp_path):
    cfg = model_config('tiny', ['d_model=128', 'd_expert=512', 'n_experts=8'])
    path = str(tmp_path / 'big.h5')
    write_synthetic(cfg, path)
    expert_bytes = cfg.expert_params * cfg.itemsize
    with CountingFile(path, 'rb') as raw:
        with WeightFile(raw) as wf:
            before = raw.bytes_read
            expert = wf.read_expert(2, 5)
        after = raw.bytes_read
    assert expert['up'].shape == (128, 512)
    assert expert_bytes <= after - before < expert_bytes + 64 * 1024
    assert after < expert_bytes + 64 * 1024
    assert os.path.getsize(path) > 20 * after


# ---------------------------------------------------------------- corruption

def _flip(path, name, at=10):
    """Flip one byte ``at`` bytes into dataset ``name`` on disk."""
    with h5py.File(path, 'r') as f:
        offset = f[name].id.get_offset()
    with open(path, 'r+b') as fh:
        fh.seek(offset + at)
        b = fh.read(1)
        fh.seek(offset + at)
        fh.write(bytes([b[0] ^ 0xFF]))


def test_corrupted_expert(tiny_file):
    bad = 'layers/2/experts/5/up'
    _flip(tiny_file, bad)
    with WeightFile(tiny_file) as wf:
        with pytest.raises(DataError, match=f'tensor {bad}: checksum mismatch'):
            wf.read_expert(2, 5)
        assert wf.read(bad, verify=False).shape == (64, 128)
        assert wf.validate() == [f'{bad}: checksum mismatch (file corrupted?)']
        wf.read_expert(2, 4)
        wf.read_expert(3, 5)
        wf.read_nonexpert()
    text, ok = inspect_report(tiny_file)
    assert not ok and bad in text
    assert inspect_report(tiny_file, checksums=False)[1]


def _modify(path, edit):
    with h5py.File(path, 'r+') as f:
        edit(f)


@pytest.mark.parametrize('edit,name,message', [
    (lambda f: f.__delitem__('layers/1/router'), 'layers/1/router', 'missing'),
    (lambda f: f['layers/1/experts/2/down'].attrs.__setitem__('dtype', 'float16'),
     'layers/1/experts/2/down', "dtype attribute 'float16'"),
    (lambda f: f['lm_head'].attrs.__delitem__('crc32'), 'lm_head', 'crc32 attribute'),
    (lambda f: (f.__delitem__('layers/0/wq'),
                f.create_dataset('layers/0/wq', data=np.zeros((64, 63), np.uint16),
                                 ).attrs.update(dtype='bfloat16', crc32=0)),
     'layers/0/wq', 'shape (64, 63), expected (64, 64)'),
    (lambda f: (f.__delitem__('final_norm'),
                f.create_dataset('final_norm', data=np.ones(64, np.float32))
                .attrs.update(dtype='bfloat16', crc32=0)),
     'final_norm', 'stored as float32'),
    (lambda f: (f.__delitem__('final_norm'),
                f.create_dataset('final_norm', data=np.ones(64, np.uint16), chunks=(16,),
                                 compression='gzip').attrs.update(dtype='bfloat16', crc32=0)),
     'final_norm', 'not contiguous'),
    (lambda f: (f.__delitem__('embed'), f.__setitem__('embed', h5py.ExternalLink('x.h5', 'e'))),
     'embed', 'ExternalLink'),
])
def test_bad_tensor(tiny_file, edit, name, message):
    _modify(tiny_file, edit)
    with WeightFile(tiny_file) as wf:
        pattern = f'tensor {re.escape(name)}: .*{re.escape(message)}'
        with pytest.raises(DataError, match=pattern) as e:
            wf.read(name)
        assert '\n' not in str(e.value)
        problems = wf.validate(checksums=False)
    assert len(problems) == 1 and problems[0].startswith(f'{name}: ')


def test_dataset_instead_of_layer_group(tiny_file, tiny):
    _modify(tiny_file, lambda f: (f.__delitem__('layers/3'),
                                  f.create_dataset('layers/3', data=[1])))
    with WeightFile(tiny_file) as wf:
        with pytest.raises(DataError, match='layers/3/wq: layers/3 is a dataset, not a group'):
            wf.read('layers/3/wq')
        problems = wf.validate()
    assert len(problems) == 1 + sum(n.startswith('layers/3/') for n, _ in tensor_specs(tiny))


def test_extra_dataset(tiny_file):
    _modify(tiny_file, lambda f: f.create_dataset('layers/1/experts/99/up', data=[1]))
    with WeightFile(tiny_file) as wf:
        assert wf.validate() == ['layers/1/experts/99/up: extra object (not in the layout)']


# ---------------------------------------------------------------- bad files

def _set_attr(key, value):
    return lambda f: f.attrs.__setitem__(key, value)


@pytest.mark.parametrize('edit,message', [
    (_set_attr('format_version', 3), 'format_version 3 is not supported'),
    (_set_attr('format', 'other'), 'not an mpimoe weight file'),
    (_set_attr('config', '{"n_layers": '), 'bad config attribute: config is not valid JSON'),
    (_set_attr('config', '{"n_layers": 4}'), 'bad config attribute: config keys'),
])
def test_bad_root_attrs(tiny_file, edit, message):
    _modify(tiny_file, edit)
    with pytest.raises(DataError, match=message) as e:
        WeightFile(tiny_file)
    assert str(e.value).startswith(tiny_file) and '\n' not in str(e.value)


def test_truncated_file(tiny_file):
    with open(tiny_file, 'r+b') as fh:
        fh.truncate(os.path.getsize(tiny_file) // 2)
    with pytest.raises(DataError, match='not a readable HDF5 file'):
        WeightFile(tiny_file)


def test_not_hdf5(tmp_path):
    path = tmp_path / 'w.h5'
    path.write_text('hello\n')
    with pytest.raises(DataError, match='not a readable HDF5 file'):
        WeightFile(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match='no such file'):
        WeightFile(str(tmp_path / 'nope.h5'))


def test_unknown_tensor(tiny_file):
    with WeightFile(tiny_file) as wf, pytest.raises(DataError, match='not a tensor'):
        wf.read('layers/0/router')


# ---------------------------------------------------------------- writer refusals

def test_existing_output(tiny_file, tiny):
    before = open(tiny_file, 'rb').read()
    with pytest.raises(DataError, match='exists; pass --overwrite'):
        write_synthetic(tiny, tiny_file, seed=1)
    assert open(tiny_file, 'rb').read() == before
    write_synthetic(tiny, tiny_file, seed=1, overwrite=True)
    assert open(tiny_file, 'rb').read() != before
    with WeightFile(tiny_file) as wf:
        assert wf.validate() == []


def test_missing_directory(tmp_path, tiny):
    with pytest.raises(DataError, match='does not exist'):
        write_synthetic(tiny, str(tmp_path / 'no' / 'w.h5'))


# ---------------------------------------------------------------- CLI

def _mpimoe(*args):
    env = {**os.environ, 'PYTHONPATH': ROOT + os.pathsep + os.environ.get('PYTHONPATH', '')}
    return subprocess.run([sys.executable, '-m', 'mpimoe', *args], capture_output=True,
                          text=True, env=env, timeout=60)


def test_cli(tmp_path):
    path = str(tmp_path / 'w.h5')
    r = _mpimoe('init-weights', '--preset', 'tiny', '--out', path)
    assert r.returncode == 0, r.stderr
    r = _mpimoe('inspect', path)
    assert r.returncode == 0, r.stderr
    assert 'validation: valid' in r.stdout and 'n_experts = 8' in r.stdout
    r = _mpimoe('init-weights', '--preset', 'tiny', '--out', path)
    assert r.returncode == 65 and r.stderr.startswith('mpimoe: error:')

    _flip(path, 'layers/3/experts/0/down')
    r = _mpimoe('inspect', path)
    assert r.returncode == 65 and 'layers/3/experts/0/down: checksum mismatch' in r.stdout

    bad = tmp_path / 'bad.h5'
    bad.write_bytes(b'not hdf5')
    for args in (['inspect', str(bad)], ['inspect', str(tmp_path / 'missing.h5')]):
        r = _mpimoe(*args)
        assert r.returncode == 65
        assert r.stderr.startswith('mpimoe: error:') and r.stderr.count('\n') == 1
        assert 'Traceback' not in r.stderr


def test_version_1_file_loads(tiny_file):
    """A version-1 file (no router/attention/shared groups in its config)
    reads with the groups' defaults, the same tensors and the same values."""
    with WeightFile(tiny_file) as wf:
        cfg, before = wf.config, wf.read_nonexpert()
    old = json.loads(cfg.to_json())
    for group in ('router', 'attention', 'shared'):
        del old[group]
    with h5py.File(tiny_file, 'r+') as f:
        f.attrs['format_version'] = 1
        f.attrs['config'] = json.dumps(old)
    with WeightFile(tiny_file) as wf:
        assert wf.format_version == 1 and wf.config == cfg and wf.validate() == []
        after = wf.read_nonexpert()
    assert all(np.array_equal(before[n].view(np.uint16), after[n].view(np.uint16))
               for n in before)
