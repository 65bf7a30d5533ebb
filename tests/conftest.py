"""Shared fixtures: synthetic weight files and a token file, written once per session.

    def test_x(tiny_weights, tiny_inputs, make_weights):
        mlp = make_weights('tiny', ['expert_kind=mlp'])     # path (str) of an HDF5 file

Files are written with the package's own writers (mpimoe.checkpoint.writer.write_synthetic,
mpimoe.io.inputs.write_synthetic_inputs) into a session temporary directory; tests must
treat them as read-only (copy a file before corrupting it).  ``bpe_tokenizer_dir`` is a
real tokenizer for ``tiny`` (tests/bpe.py's BPE with a generation_config.json).
``tiny_reference(weights, max_new)`` is the single-process reference's output
over ``tiny_inputs``, run once per session for each weight file and length;
``skewed`` is tiny with a router that makes two experts hot (load balancing).
"""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from bpe import write_bpe
from mpimoe.checkpoint.writer import write_synthetic
from mpimoe.model.config import model_config
from mpimoe.io.inputs import write_synthetic_inputs


@pytest.fixture(scope='session')
def make_weights(tmp_path_factory):
    """Factory ``make_weights(preset='tiny', overrides=(), seed=0) -> path`` (str).

    overrides: ``--set`` style strings, e.g. ``['top_k=8', 'expert_kind=mlp']``.
    Each distinct (preset, overrides, seed) is written once per session.
    """
    root = tmp_path_factory.mktemp('weights')
    written = {}

    def make(preset='tiny', overrides=(), seed=0):
        key = (preset, tuple(overrides), seed)
        if key not in written:
            path = str(root / f'w{len(written)}-{preset}.h5')
            write_synthetic(model_config(preset, list(overrides)), path, seed=seed)
            written[key] = path
        return written[key]

    return make


@pytest.fixture(scope='session')
def tiny_weights(make_weights):
    """Path (str) of the ``tiny`` preset's synthetic weights, seed 0."""
    return make_weights('tiny')


@pytest.fixture(scope='session')
def skewed(tiny_weights, tmp_path_factory):
    """tiny with 2 added to the router columns of experts 0 and 1 in every MoE
    layer (benchmarks/balance.py skew_router): they win the gate for most
    tokens (max/mean ~2 instead of ~1.3)."""
    spec = importlib.util.spec_from_file_location(
        'balance_benchmark', Path(__file__).resolve().parents[1] / 'benchmarks' / 'balance.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = tmp_path_factory.mktemp('skewed') / 'hot01.h5'
    shutil.copyfile(tiny_weights, path)
    module.skew_router(str(path), [0, 1], 2.0)
    return str(path)


@pytest.fixture(scope='session')
def tiny_inputs(tmp_path_factory):
    """Path (str) of a JSONL token file for ``tiny``: 12 sequences, ids
    ``seq-000000``..., lengths 3..20, tokens in [0, 256), seed 0."""
    path = str(tmp_path_factory.mktemp('inputs') / 'tiny.jsonl')
    write_synthetic_inputs(path, model_config('tiny').vocab_size, num_seqs=12,
                           min_len=3, max_len=20, seed=0)
    return path


@pytest.fixture(scope='session')
def bpe_tokenizer_dir(tmp_path_factory):
    """Directory (pathlib.Path) of a real tokenizer for ``tiny`` (vocab_size
    256): the byte-level BPE of tests/bpe.py (164 tokens; <s> 0, </s> 1,
    <unk> 2, <|im_start|> 3, <|im_end|> 4; a ChatML-like chat template with
    bos_token and add_generation_prompt) as tokenizer.json and
    tokenizer_config.json, plus a generation_config.json whose eos_token_id
    lists </s> and <|im_end|>.  Read-only: copy it before editing a file."""
    folder = write_bpe(tmp_path_factory.mktemp('bpe-tokenizer'))
    tok = Tokenizer.from_file(str(folder / 'tokenizer.json'))
    (folder / 'generation_config.json').write_text(json.dumps(
        {'bos_token_id': tok.token_to_id('<s>'),
         'eos_token_id': [tok.token_to_id('</s>'), tok.token_to_id('<|im_end|>')]}))
    return folder


@pytest.fixture(scope='session')
def tiny_reference(tiny_inputs, tmp_path_factory):
    """Factory ``tiny_reference(weights, max_new) -> outputs``: the reference
    (mpimoe.model.reference.run_reference, last logits saved) over
    ``tiny_inputs`` with ``weights`` (a path), read back with
    mpimoe.io.outputs.read_outputs; each (weights, max_new) is run once."""
    from mpimoe.io.outputs import read_outputs
    from mpimoe.model.reference import run_reference
    from mpimoe.runtime.options import JobOptions
    root = tmp_path_factory.mktemp('reference')
    done = {}

    def get(weights, max_new):
        key = (str(weights), max_new)
        if key not in done:
            out = root / f'ref{len(done)}.h5'
            run_reference(JobOptions(weights=str(weights), input=tiny_inputs, output=str(out),
                                     max_new_tokens=max_new, save_logits=True),
                          log=lambda *a: None)
            done[key] = read_outputs(out)
        return done[key]

    return get
