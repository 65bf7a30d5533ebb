"""``mpimoe convert`` (mpimoe/checkpoint/convert.py): Hugging Face Mixtral checkpoints -> mpimoe.

Format and refusals use checkpoints written here with NumPy (``_write_checkpoint``:
config.json, safetensors shards, index), so they run without PyTorch.  Parity
tests (skipped without torch and transformers: ``pip install -e ".[hf]"``)
build small random ``MixtralForCausalLM`` models, save them with
``save_pretrained``, convert, and compare transformers' logits with
``mpimoe reference`` and ``mpimoe run`` on the converted file.

Parity tolerance, from the arithmetic.  The weights are bf16-exact before
saving, so conversion is lossless (checked bit for bit below) and both sides
compute in FP32 from the same values.  The one intended difference: mpimoe
rounds each expert's input, hidden activations and output to bf16 (the wire
format contract, mpimoe.model.layers.expert_ffn); transformers does not.  One rounding
has relative error <= u = 2^-9 (bf16 keeps 8 significant bits); to first order
the input error reaches the output through both the gate and up branches
(2u), then hidden (u) and output (u): <= 4u relative on a layer's MoE output, a
convex combination of expert outputs no larger than the residual stream here.
Allowing each such error to be amplified at most 2x by the layers after it
(pre-norm residual blocks with O(1) weights) and the final RMSNorm making the
error relative, the last logits differ by at most 8u per MoE layer in relative
L2 norm: ``PARITY_TOL = L * 2^-6``.  A wrong mapping (transpose, gate/up swap,
RoPE layout, theta, norm) moves logits by O(1) relative, far above it.
"""

import json
import os
import shutil
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from mpimoe.checkpoint.layout import tensor_specs
from mpimoe.checkpoint.weights import WeightFile
from mpimoe.cli.main import main
from mpimoe.checkpoint.hf_archs import hf_source
from mpimoe.io.inputs import read_inputs, write_synthetic_inputs
from mpimoe.io.outputs import read_outputs
from hf_models import model_factory, randomize
from mpirun import mpiexec

BF16 = np.dtype(ml_dtypes.bfloat16)
U = 2.0 ** -9                     # unit roundoff of bf16 (round to nearest-even)
#: relative L2 difference of last logits per MoE layer, argued in the module docstring
PARITY_TOL_PER_LAYER = 8 * U
#: engine vs reference: GEMMs of other batch shapes may move one bf16 rounding of a
#: rare activation by one ulp (2^-8 relative of that element); bound the whole row by it
ENGINE_TOL = 2.0 ** -8

SMALL = dict(vocab_size=100, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
             num_attention_heads=3, num_key_value_heads=3, head_dim=16, num_local_experts=5,
             num_experts_per_tok=2, rope_theta=1e6, rms_norm_eps=1e-5)


# ---------------------------------------------------------------- NumPy checkpoints

def _hf_config(**kw):
    """config.json of a Mixtral model as transformers 4.x writes it."""
    return {'architectures': ['MixtralForCausalLM'], 'model_type': 'mixtral',
            'hidden_act': 'silu', 'max_position_embeddings': 4096, 'sliding_window': None,
            'tie_word_embeddings': False, 'torch_dtype': 'bfloat16', **SMALL, **kw}


def _hf_tensors(hf, seed=0):
    """Random bf16-exact float32 tensors of ``hf`` in the torch layout ([out, in])."""
    rng = np.random.default_rng(seed)
    d, v, h = hf['hidden_size'], hf['vocab_size'], hf['intermediate_size']
    q = hf['num_attention_heads'] * hf['head_dim']
    kv = hf['num_key_value_heads'] * hf['head_dim']
    shapes = {'model.embed_tokens.weight': (v, d), 'model.norm.weight': (d,),
              'lm_head.weight': (v, d)}
    for i in range(hf['num_hidden_layers']):
        p = f'model.layers.{i}.'
        shapes.update({p + 'input_layernorm.weight': (d,),
                       p + 'post_attention_layernorm.weight': (d,),
                       p + 'self_attn.q_proj.weight': (q, d),
                       p + 'self_attn.k_proj.weight': (kv, d),
                       p + 'self_attn.v_proj.weight': (kv, d),
                       p + 'self_attn.o_proj.weight': (d, q),
                       p + 'block_sparse_moe.gate.weight': (hf['num_local_experts'], d)})
        for e in range(hf['num_local_experts']):
            x = f'{p}block_sparse_moe.experts.{e}.'
            shapes.update({x + 'w1.weight': (h, d), x + 'w3.weight': (h, d),
                           x + 'w2.weight': (d, h)})
    return {n: rng.standard_normal(s, dtype=np.float32).astype(BF16).astype(np.float32)
            for n, s in shapes.items()}


_ST_NAMES = {np.dtype(np.float32): 'F32', np.dtype(np.float16): 'F16', BF16: 'BF16',
             np.dtype(np.float64): 'F64', np.dtype(ml_dtypes.float8_e4m3fn): 'F8_E4M3'}


def _write_safetensors(path, tensors):
    """The safetensors format: u64 LE header length, JSON header, raw LE data."""
    header, offset = {'__metadata__': {'format': 'pt'}}, 0
    for name, a in tensors.items():
        header[name] = {'dtype': _ST_NAMES[a.dtype], 'shape': list(a.shape),
                        'data_offsets': [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header).encode()
    raw += b' ' * (-len(raw) % 8)
    with open(path, 'wb') as f:
        f.write(len(raw).to_bytes(8, 'little') + raw)
        for a in tensors.values():
            f.write(np.ascontiguousarray(a).tobytes())


def _write_checkpoint(directory, hf, tensors, shards=1, dtype=BF16):
    """config.json plus model.safetensors (shards=1) or N shards and their index;
    float32 tensors are stored as ``dtype``, others as they are."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, 'config.json'), 'w') as f:
        json.dump(hf, f)
    tensors = {n: a.astype(dtype) if a.dtype == np.float32 else a for n, a in tensors.items()}
    names = list(tensors)
    if shards == 1:
        _write_safetensors(os.path.join(directory, 'model.safetensors'),
                           {n: tensors[n] for n in names})
        return
    weight_map = {}
    for s in range(shards):
        file = f'model-{s + 1:05d}-of-{shards:05d}.safetensors'
        part = names[s::shards]
        _write_safetensors(os.path.join(directory, file), {n: tensors[n] for n in part})
        weight_map.update({n: file for n in part})
    with open(os.path.join(directory, 'model.safetensors.index.json'), 'w') as f:
        json.dump({'metadata': {}, 'weight_map': weight_map}, f)


@pytest.fixture
def checkpoint(tmp_path):
    """(directory, config dict, tensors) of a valid small BF16 checkpoint, with a
    RoPE buffer of old checkpoints that transformers (and convert) ignore."""
    hf = _hf_config()
    tensors = _hf_tensors(hf)
    _write_checkpoint(tmp_path / 'hf', hf, {**tensors, 'model.layers.0.self_attn.rotary_emb.'
                                            'inv_freq': np.ones(8, np.float32)})
    return str(tmp_path / 'hf'), hf, tensors


def _convert(src, out, *extra):
    return main(['convert', '--from-hf', str(src), '--out', str(out), *extra])


def _assert_matches(out, tensors):
    """Every tensor of ``out`` is the (transposed) source, bit for bit."""
    with WeightFile(out) as wf:
        assert wf.validate() == []
        for name, shape in tensor_specs(wf.config):
            hf, transposed = hf_source(name)
            want = tensors[hf].T if transposed else tensors[hf]
            got = wf.read(name)
            assert got.shape == shape
            np.testing.assert_array_equal(got.view(np.uint16), want.astype(BF16).view(np.uint16),
                                          err_msg=name)
        return wf.config


# ---------------------------------------------------------------- format

def test_convert_maps_config_and_tensors(checkpoint, tmp_path, capsys):
    src, hf, tensors = checkpoint
    out = tmp_path / 'w.h5'
    assert _convert(src, out) == 0
    cfg = _assert_matches(out, tensors)
    assert (cfg.d_model, cfg.n_layers, cfg.n_dense_layers, cfg.n_experts, cfg.top_k) == \
        (48, 2, 0, 5, 2)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_expert, cfg.d_dense) == \
        (3, 3, 16, 40, 40)
    assert (cfg.vocab_size, cfg.expert_kind, cfg.dtype, cfg.rope_theta, cfg.norm_eps) == \
        (100, 'swiglu', 'bfloat16', 1e6, 1e-5)
    out = capsys.readouterr().out
    assert 'rounding' not in out
    assert f'note: {src} has no tokenizer.json, so the weight file carries no tokenizer; text ' \
        'inputs then need --tokenizer at run time' in out
    with WeightFile(tmp_path / 'w.h5') as wf:
        assert wf.tokenizer_files() is None


def test_sharded_gqa_and_transformers5_config(tmp_path):
    """Shards with an index; head_dim from hidden/heads; rope_parameters (transformers 5);
    the context length."""
    hf = _hf_config(num_attention_heads=4, num_key_value_heads=2, head_dim=None, hidden_size=64,
                    max_position_embeddings=32768)
    del hf['rope_theta']
    hf['rope_parameters'] = {'rope_type': 'default', 'rope_theta': 5e5}
    tensors = _hf_tensors(hf | {'head_dim': 16})
    _write_checkpoint(tmp_path / 'hf', hf, tensors, shards=3)
    assert _convert(tmp_path / 'hf', tmp_path / 'w.h5') == 0
    cfg = _assert_matches(tmp_path / 'w.h5', tensors)
    assert (cfg.head_dim, cfg.n_kv_heads, cfg.rope_theta) == (16, 2, 5e5)
    assert cfg.max_position_embeddings == 32768


@pytest.mark.parametrize('value, expected', [(2, (2,)), ([2, 7], (2, 7)), (None, ()),
                                             ('absent', ())])
def test_end_of_sequence_ids_are_carried(tmp_path, value, expected):
    """config.json's eos_token_id (an int, a list, null or absent) is the
    model's: an input sequence ends there."""
    hf = _hf_config() if value == 'absent' else _hf_config(eos_token_id=value)
    tensors = _hf_tensors(hf)
    _write_checkpoint(tmp_path / 'hf', hf, tensors)
    assert _convert(tmp_path / 'hf', tmp_path / 'w.h5') == 0
    assert _assert_matches(tmp_path / 'w.h5', tensors).eos_token_id == expected


# ---------------------------------------------------------------- tokenizer

#: tokens of the tests' BPE (tests/bpe.py, conftest's bpe_tokenizer_dir)
BPE_TOKENS = 164
#: a chat_template.jinja beside the others: it wins over tokenizer_config's template
JINJA = b"{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


def _with_tokenizer(directory, bpe_tokenizer_dir):
    """Copy the BPE's files and a chat_template.jinja into ``directory``; -> {name: bytes}."""
    for file in bpe_tokenizer_dir.iterdir():
        shutil.copy(file, directory)
    with open(os.path.join(directory, 'chat_template.jinja'), 'wb') as f:
        f.write(JINJA)
    names = ('tokenizer.json', 'tokenizer_config.json', 'generation_config.json',
             'chat_template.jinja')
    return {n: open(os.path.join(directory, n), 'rb').read() for n in names}


def test_tokenizer_files_are_copied(bpe_tokenizer_dir, tmp_path, capsys):
    """The four files travel byte for byte; generation_config.json's eos ids
    (</s> and <|im_end|>) win over config.json's."""
    hf = _hf_config(vocab_size=256, eos_token_id=2)
    tensors = _hf_tensors(hf)
    _write_checkpoint(tmp_path / 'hf', hf, tensors)
    files = _with_tokenizer(tmp_path / 'hf', bpe_tokenizer_dir)
    out = tmp_path / 'w.h5'
    assert _convert(tmp_path / 'hf', out) == 0
    assert f'tokenizer: copying {", ".join(files)} ({BPE_TOKENS} tokens, chat template: yes)' \
        in capsys.readouterr().out
    cfg = _assert_matches(out, tensors)
    assert cfg.eos_token_id == (1, 4)
    with WeightFile(out) as wf:
        assert wf.tokenizer_files() == files
        tok = wf.tokenizer()
        assert tok.render_chat([{'role': 'user', 'content': 'Hi'}]) == '[user] Hi\n'
    assert main(['inspect', str(out)]) == 0
    assert f'tokenizer: {BPE_TOKENS} tokens, chat template: yes, files: {", ".join(files)}\n' \
        in capsys.readouterr().out


def test_files_transformers_saves_are_copied(bpe_tokenizer_dir, tmp_path):
    """A tokenizer and generation config as transformers' save_pretrained
    writes them (transformers 5 puts the chat template in chat_template.jinja)."""
    transformers = pytest.importorskip('transformers')
    hf = _hf_config(vocab_size=256, eos_token_id=1)
    _write_checkpoint(tmp_path / 'hf', hf, _hf_tensors(hf))
    tok = transformers.AutoTokenizer.from_pretrained(str(bpe_tokenizer_dir))
    tok.save_pretrained(tmp_path / 'hf')
    transformers.GenerationConfig(eos_token_id=[1, 4]).save_pretrained(tmp_path / 'hf')
    saved = sorted(n for n in os.listdir(tmp_path / 'hf') if n.endswith(('.json', '.jinja')))
    assert _convert(tmp_path / 'hf', tmp_path / 'w.h5') == 0
    with WeightFile(tmp_path / 'w.h5') as wf:
        files = wf.tokenizer_files()
        assert wf.config.eos_token_id == (1, 4)
        assert wf.tokenizer().has_chat_template
    assert sorted(files) == sorted(set(saved) - {'config.json', 'special_tokens_map.json'})
    assert all(files[n] == (tmp_path / 'hf' / n).read_bytes() for n in files)


@pytest.mark.parametrize('generation, config, expected', [
    ({'eos_token_id': 7}, 2, (7,)), ({'eos_token_id': [9, 4]}, 2, (9, 4)),
    ({'eos_token_id': None}, 2, (2,)), ({'bos_token_id': 1}, [2, 3], (2, 3)),
    ({'eos_token_id': 7}, None, (7,))])
def test_generation_config_gives_the_end_of_sequence_ids(generation, config, expected,
                                                          tmp_path):
    """generation_config.json's eos_token_id (an int or a list; null or absent:
    config.json's) is the model's, with or without a tokenizer.json."""
    hf = _hf_config(eos_token_id=config)
    _write_checkpoint(tmp_path / 'hf', hf, _hf_tensors(hf))
    (tmp_path / 'hf' / 'generation_config.json').write_text(json.dumps(generation))
    assert _convert(tmp_path / 'hf', tmp_path / 'w.h5') == 0
    with WeightFile(tmp_path / 'w.h5') as wf:
        assert wf.config.eos_token_id == expected
        assert wf.tokenizer_files() is None


TOKENIZER_REFUSALS = {
    # the tiny test vocabulary (100) is smaller than the BPE's
    'more tokens than the model': (
        {}, None, f'the tokenizer has ids up to {BPE_TOKENS - 1}, beyond the vocabulary of the '
                  'model (vocab_size = 100)'),
    'tokenizer.json not a tokenizer': (
        {'vocab_size': 256}, ('tokenizer.json', b'{"version": "1.0"}'),
        'tokenizer.json is not a tokenizer the `tokenizers` library reads'),
    'generation_config.json not JSON': (
        {'vocab_size': 256}, ('generation_config.json', b'{"eos_token_id": [1,'),
        'generation_config.json is not valid JSON'),
    'generation_config.json not an object': (
        {'vocab_size': 256}, ('generation_config.json', b'[1]'),
        'generation_config.json: not a JSON object'),
    'end-of-sequence id of generation_config.json outside the vocabulary': (
        {'vocab_size': 256}, ('generation_config.json', b'{"eos_token_id": [1, 256]}'),
        'config.json and generation_config.json do not give a valid model: '
        'eos_token_id=[1, 256]: 256 is not a token id in [0, vocab_size=256)'),
}


@pytest.mark.parametrize('case', TOKENIZER_REFUSALS)
def test_tokenizer_refusals(case, bpe_tokenizer_dir, tmp_path, capsys):
    """Listed with the other problems (here a sliding window) in one line;
    nothing written."""
    config, replaced, message = TOKENIZER_REFUSALS[case]
    hf = _hf_config(sliding_window=128, **config)
    _write_checkpoint(tmp_path / 'hf', hf, _hf_tensors(hf))
    _with_tokenizer(tmp_path / 'hf', bpe_tokenizer_dir)
    if replaced:
        (tmp_path / 'hf' / replaced[0]).write_bytes(replaced[1])
    assert _convert(tmp_path / 'hf', tmp_path / 'w.h5') == 65
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and message in err and 'sliding_window 128' in err, err
    assert sorted(os.listdir(tmp_path)) == ['hf']


@pytest.mark.parametrize('dtype,name', [(np.float32, 'F32'), (np.float16, 'F16')])
def test_f32_and_f16_round_to_nearest_even(dtype, name, tmp_path, capsys):
    """F32/F16 sources are rounded to bf16 nearest-even, with a note."""
    hf = _hf_config()
    tensors = _hf_tensors(hf)
    # bf16 ulp at 1 is 2^-7: ties go to the even significand, above a tie goes up
    # (F16 itself stores 1 + 2^-8 + 2^-20 as the tie 1 + 2^-8)
    tensors['model.norm.weight'][:4] = [1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -20,
                                        -(1 + 2 ** -8)]
    expected = [0x3F80, 0x3F82, 0x3F81 if name == 'F32' else 0x3F80, 0xBF80]
    _write_checkpoint(tmp_path / 'hf', hf, tensors, dtype=dtype)
    assert _convert(tmp_path / 'hf', tmp_path / 'w.h5') == 0
    assert f'stores {name} tensors; rounding them to bfloat16' in capsys.readouterr().out
    with WeightFile(tmp_path / 'w.h5') as wf:
        np.testing.assert_array_equal(wf.read('final_norm').view(np.uint16)[:4], expected)
        down = tensors['model.layers.1.block_sparse_moe.experts.4.w2.weight'].astype(dtype)
        np.testing.assert_array_equal(wf.read('layers/1/experts/4/down'),
                                      down.astype(np.float32).T.astype(BF16))


def test_existing_output_needs_overwrite(checkpoint, tmp_path, capsys):
    src, _, tensors = checkpoint
    out = tmp_path / 'w.h5'
    out.write_bytes(b'old')
    assert _convert(src, out) == 65
    assert 'exists; pass --overwrite' in capsys.readouterr().err
    assert out.read_bytes() == b'old'
    assert _convert(src, out, '--overwrite') == 0
    _assert_matches(out, tensors)


# ---------------------------------------------------------------- refusals

def _set(key, value):
    def edit(hf, tensors):
        hf[key] = value
    return edit


def _drop(name):
    def edit(hf, tensors):
        del tensors[name]
    return edit


def _put(name, shape):
    """Replace (or add) tensor ``name`` by zeros of ``shape``."""
    def edit(hf, tensors):
        tensors[name] = np.zeros(shape, np.float32)
    return edit


REFUSALS = {
    'architecture': (_set('architectures', ['LlamaForCausalLM']),
                     "architectures ['LlamaForCausalLM']: mpimoe converts MixtralForCausalLM, "
                     "Qwen2MoeForCausalLM, Qwen3MoeForCausalLM, OlmoeForCausalLM, "
                     "DeepseekV3ForCausalLM"),
    'missing tensor': (_drop('model.layers.1.block_sparse_moe.experts.3.w3.weight'),
                       'missing tensors (1): model.layers.1.block_sparse_moe.experts.3.w3.weight'),
    'shape': (_put('model.layers.0.self_attn.k_proj.weight', (32, 48)),
              'model.layers.0.self_attn.k_proj.weight: shape [32, 48], '
              'config.json implies [48, 48]'),
    'sliding window': (_set('sliding_window', 1024),
                       'sliding_window 1024 < max_position_embeddings 4096'),
    'tied embeddings': (_set('tie_word_embeddings', True), 'tie_word_embeddings true'),
    'rope scaling': (_set('rope_scaling', {'type': 'linear', 'factor': 2.0}), 'rope_scaling'),
    'activation': (_set('hidden_act', 'gelu'), "hidden_act 'gelu'"),
    'attention bias': (_set('attention_bias', True), 'attention_bias true'),
    'shared experts': (_set('shared_expert_intermediate_size', 64),
                       'unknown config keys for MixtralForCausalLM (they may change the '
                       'results) (1): shared_expert_intermediate_size'),
    'bias tensor': (_put('model.layers.0.self_attn.q_proj.bias', (48,)),
                    'unexpected tensors (a feature mpimoe lacks, e.g. biases or shared experts?) '
                    '(1): model.layers.0.self_attn.q_proj.bias'),
    'config value': (_set('num_experts_per_tok', 6), 'top_k=6: must be <= n_experts=5'),
    'no context length': (_set('max_position_embeddings', None),
                          'missing config keys (1): max_position_embeddings'),
    'context length no model has': (
        _set('max_position_embeddings', 1 << 30),
        'max_position_embeddings=1073741824: must be in [1, 16777216]'),
    'end-of-sequence id outside the vocabulary': (
        _set('eos_token_id', [2, 100]),
        'eos_token_id=[2, 100]: 100 is not a token id in [0, vocab_size=100)'),
    'end-of-sequence id not an int': (
        _set('eos_token_id', '2'), "eos_token_id=['2']: '2' is not a token id"),
}


@pytest.mark.parametrize('case', REFUSALS)
def test_refusals(case, tmp_path, capsys):
    edit, message = REFUSALS[case]
    hf, tensors = _hf_config(), _hf_tensors(_hf_config())
    edit(hf, tensors)
    _write_checkpoint(tmp_path / 'hf', hf, tensors)
    out = tmp_path / 'w.h5'
    assert _convert(tmp_path / 'hf', out) == 65
    err = capsys.readouterr().err
    assert message in err and err.count('\n') == 1, err
    assert not out.exists() and not (tmp_path / 'w.h5.partial').exists()


def test_every_problem_in_one_error(tmp_path, capsys):
    """Several problems at once, F64 and a tensor missing from its shard: one line lists all."""
    hf, tensors = _hf_config(sliding_window=128), _hf_tensors(_hf_config())
    tensors['model.norm.weight'] = tensors['model.norm.weight'].astype(np.float64)
    _write_checkpoint(tmp_path / 'hf', hf, tensors, shards=2)
    shard = tmp_path / 'hf' / 'model-00001-of-00002.safetensors'
    index = json.loads((tmp_path / 'hf' / 'model.safetensors.index.json').read_text())
    in_shard = sorted(n for n, f in index['weight_map'].items() if f == shard.name)
    kept = {n: tensors[n].astype(BF16) for n in in_shard[1:]}
    _write_safetensors(shard, kept)        # drop in_shard[0] from the shard, not from the index
    assert _convert(tmp_path / 'hf', tmp_path / 'w.h5') == 65
    err = capsys.readouterr().err
    assert err.count('\n') == 1
    for part in ('sliding_window 128',
                 f'missing tensors (1): {in_shard[0]} (absent from {shard.name})',
                 'model.norm.weight: dtype F64'):
        assert part in err, err
    assert sorted(os.listdir(tmp_path)) == ['hf']


@pytest.mark.parametrize('layout', ['no directory', 'no config', 'no safetensors'])
def test_not_a_checkpoint(layout, tmp_path, capsys):
    src = tmp_path / 'hf'
    if layout != 'no directory':
        src.mkdir()
    if layout == 'no safetensors':
        (src / 'config.json').write_text(json.dumps(_hf_config()))
    assert _convert(src, tmp_path / 'w.h5') == 65
    err = capsys.readouterr().err
    assert err.startswith('mpimoe: error: ') and err.count('\n') == 1, err


def test_cli_exit_code_and_one_line(checkpoint, tmp_path):
    """The installed command: exit 65 and one line on stderr, no traceback."""
    src, hf, _ = checkpoint
    hf['architectures'] = ['LlamaForCausalLM']
    with open(os.path.join(src, 'config.json'), 'w') as f:
        json.dump(hf, f)
    proc = subprocess.run([sys.executable, '-m', 'mpimoe', 'convert', '--from-hf', src,
                           '--out', str(tmp_path / 'w.h5')], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 65
    assert proc.stderr.count('\n') == 1 and 'LlamaForCausalLM' in proc.stderr, proc.stderr


# ---------------------------------------------------------------- parity with transformers

PARITY_MODELS = {
    # odd sizes, MHA, top-2, one safetensors file
    'mha-top2': dict(SMALL, shards=None),
    # GQA, top-3 of 6, 3 layers, sharded
    'gqa-top3': dict(SMALL, vocab_size=101, hidden_size=64, intermediate_size=56,
                     num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                     num_local_experts=6, num_experts_per_tok=3, shards='4KB'),
    # MQA, head_dim * heads != hidden, other theta and eps
    'mqa-headdim': dict(SMALL, vocab_size=96, hidden_size=40, intermediate_size=24,
                        num_attention_heads=4, num_key_value_heads=1, head_dim=12,
                        num_local_experts=4, rope_theta=1e4, rms_norm_eps=1e-6, shards=None),
}


@pytest.fixture(scope='module')
def hf_model_dir(tmp_path_factory):
    """Factory: name of PARITY_MODELS -> (checkpoint dir, float32 model, tokens file)."""
    return model_factory(tmp_path_factory, _save_random_mixtral)


def _save_random_mixtral(torch, transformers, name, directory):
    """A random MixtralForCausalLM with bf16-exact weights, saved as BF16."""
    spec = dict(PARITY_MODELS[name])
    shards = spec.pop('shards')
    torch.manual_seed(0)
    config = transformers.MixtralConfig(**spec, tie_word_embeddings=False)
    model = randomize(torch, transformers.MixtralForCausalLM(config))
    kwargs = {'max_shard_size': shards} if shards else {}
    model.to(torch.bfloat16).save_pretrained(directory, safe_serialization=True, **kwargs)
    inputs = directory / 'in.jsonl'
    write_synthetic_inputs(inputs, spec['vocab_size'], num_seqs=5, min_len=1, max_len=12, seed=1)
    return directory, model.to(torch.float32), inputs


def _hf_last_logits(model, inputs):
    """transformers' float32 logits at the last position of every sequence: [n, V]."""
    import torch
    seqs = read_inputs(inputs, model.config.vocab_size)
    with torch.no_grad():
        return np.stack([model(torch.as_tensor(seqs.seq(i), dtype=torch.long)[None]).logits[0, -1]
                         .numpy() for i in range(len(seqs))])


def _rel(a, b):
    """Per-row relative L2 difference of a against the reference b: [n]."""
    return np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)


def _reference_logits(weights, inputs, out):
    assert main(['reference', '--weights', str(weights), '--input', str(inputs),
                 '--output', str(out), '--save-logits']) == 0
    return read_outputs(out)['last_logits']


@pytest.mark.parametrize('name', PARITY_MODELS)
def test_parity_with_transformers(name, hf_model_dir, tmp_path):
    directory, model, inputs = hf_model_dir(name)
    if PARITY_MODELS[name]['shards']:
        assert (directory / 'model.safetensors.index.json').exists()
    assert _convert(directory, tmp_path / 'w.h5') == 0
    with WeightFile(tmp_path / 'w.h5') as wf:
        assert wf.config.n_layers == model.config.num_hidden_layers
    ref = _reference_logits(tmp_path / 'w.h5', inputs, tmp_path / 'ref.h5')
    hf = _hf_last_logits(model, inputs)
    rel = _rel(ref, hf)
    print(f'{name}: relative L2 difference per sequence {", ".join(f"{r:.2g}" for r in rel)}, '
          f'tolerance {PARITY_TOL_PER_LAYER * model.config.num_hidden_layers:.3g}')
    assert np.all(rel <= PARITY_TOL_PER_LAYER * model.config.num_hidden_layers)


@pytest.mark.timeout(120)
def test_engine_on_converted_checkpoint(hf_model_dir, tmp_path):
    """transformers -> convert -> ``mpimoe run`` (1 front-end + 5 expert ranks, per-layer)."""
    directory, model, inputs = hf_model_dir('mha-top2')
    weights = tmp_path / 'w.h5'
    assert _convert(directory, weights) == 0
    ref = _reference_logits(weights, inputs, tmp_path / 'ref.h5')
    proc = mpiexec(1 + model.config.num_local_experts,
                   ['run', '--weights', weights, '--input', inputs, '--output', tmp_path / 'run.h5',
                    '--placement', 'per-layer', '--save-logits'], timeout=60)
    assert proc.returncode == 0, proc.stderr
    run = read_outputs(tmp_path / 'run.h5')['last_logits']
    hf = _hf_last_logits(model, inputs)
    print(f'engine vs reference {_rel(run, ref).max():.2g}, engine vs transformers '
          f'{_rel(run, hf).max():.2g}')
    assert np.all(_rel(run, ref) <= ENGINE_TOL)
    assert np.all(_rel(run, hf) <= PARITY_TOL_PER_LAYER * model.config.num_hidden_layers)
