"""``mpimoe convert``: a Hugging Face Mixtral checkpoint -> an mpimoe weight file.

The source is a directory as ``save_pretrained`` writes it: ``config.json``
plus ``model.safetensors``, or shards listed by ``model.safetensors.index.json``.
Only ``MixtralForCausalLM`` is accepted (SwiGLU experts ``w1`` gate, ``w3`` up,
``w2`` down; softmax top-k router with renormalised weights; GQA attention
with rotate-half RoPE; RMSNorm; untied LM head): the same model as
:mod:`mpimoe.model.layers` with ``expert_kind='swiglu'`` and no dense layers.

    summary = convert_hf('Mixtral-8x7B/', 'mixtral.h5')   # {'path', 'tensors', ...}

The tokenizer files of the directory (``tokenizer.json`` and the others of
``TOKENIZER_FILES`` beside it) are copied into the weight file when
``tokenizer.json`` is there (:mod:`mpimoe.checkpoint.tokenizer_files`).  The
end-of-sequence ids are ``generation_config.json``'s ``eos_token_id`` when it
gives one (transformers' ``generate`` stops there; chat models list their
end-of-turn token), else ``config.json``'s.

Everything is checked before anything is written: config features mpimoe does
not implement, missing or unexpected tensors, shapes against config.json,
dtypes, and a tokenizer that does not parse or has more tokens than the
model's vocabulary; the problems are listed in one
:class:`~mpimoe.errors.DataError`.
Safetensors files are parsed here (8-byte little-endian header length, JSON
header, raw data) and memory-mapped, so the conversion needs no PyTorch and
holds one tensor at a time in memory.  Torch ``Linear`` weights are
``[out, in]``; mpimoe stores ``[in, out]`` (``y = x @ W``), so matrices are
transposed.  F32 and F16 sources are rounded to bfloat16 (nearest-even).
"""

import os
import time

import ml_dtypes
import numpy as np

from mpimoe.checkpoint.layout import WORD, tensor_specs
from mpimoe.checkpoint.tokenizer_files import load_tokenizer, write_tokenizer_files
from mpimoe.checkpoint.writer import LOG_EVERY_S, open_for_writing, write_tensor
from mpimoe.model.config import ModelConfig, parse_json
from mpimoe.errors import ConfigError, DataError, clip
from mpimoe.io.paths import regular_file

__all__ = ['convert_hf', 'mixtral_config', 'hf_source']

ARCHITECTURE = 'MixtralForCausalLM'
#: safetensors dtype -> NumPy dtype of the stored values (little-endian)
_ST_DTYPES = {'BF16': np.dtype(ml_dtypes.bfloat16), 'F16': np.dtype('<f2'),
              'F32': np.dtype('<f4')}
#: largest safetensors JSON header accepted (the format's own limit)
_MAX_HEADER = 100_000_000
#: problems of one kind listed by name before "and N more"
_LIST_MAX = 6
#: tensors some checkpoints carry that transformers ignores on load (RoPE
#: frequencies, recomputed from rope_theta)
_IGNORED = '.rotary_emb.inv_freq'

#: config.json keys that do not change inference results (metadata, training,
#: generation defaults); any other key not mapped or checked below is refused
_HARMLESS_KEYS = {
    '_name_or_path', 'architectures', 'model_type', 'transformers_version',
    'torch_dtype', 'dtype', 'use_cache', 'bos_token_id', 'pad_token_id',
    'initializer_range', 'attention_dropout', 'output_router_logits',
    'router_aux_loss_coef', 'router_jitter_noise', 'output_attentions',
    'output_hidden_states', 'return_dict', 'tokenizer_class'}
#: config.json key -> ModelConfig field, each required
_MAPPED_KEYS = {'hidden_size': 'd_model', 'num_hidden_layers': 'n_layers',
                'num_local_experts': 'n_experts', 'num_experts_per_tok': 'top_k',
                'num_attention_heads': 'n_heads', 'num_key_value_heads': 'n_kv_heads',
                'intermediate_size': 'd_expert', 'vocab_size': 'vocab_size',
                'rms_norm_eps': 'norm_eps',
                'max_position_embeddings': 'max_position_embeddings'}
#: keys read by the checks of :func:`_feature_problems` or for RoPE / head_dim
#: / the end-of-sequence ids (optional)
_CHECKED_KEYS = {'hidden_act', 'tie_word_embeddings', 'rope_scaling', 'rope_parameters',
                 'rope_theta', 'sliding_window', 'attention_bias', 'mlp_bias', 'head_dim',
                 'eos_token_id'}


# ---------------------------------------------------------------- config

def _listed(what, items):
    """``'missing tensors (9): a, b, c, d, e, f (and 3 more)'``."""
    items = list(items)
    shown = ', '.join(map(str, items[:_LIST_MAX]))
    more = f' (and {len(items) - _LIST_MAX} more)' if len(items) > _LIST_MAX else ''
    return f'{what} ({len(items)}): {shown}{more}'


def _feature_problems(hf):
    """Features of config.json ``hf`` that mpimoe does not implement: [str]."""
    problems = []
    if hf.get('architectures') != [ARCHITECTURE]:
        problems.append(f'architectures {clip(repr(hf.get("architectures")))}: only '
                        f'[{ARCHITECTURE!r}] can be converted')
    if hf.get('hidden_act', 'silu') != 'silu':
        problems.append(f'hidden_act {clip(repr(hf["hidden_act"]))}: only silu (SwiGLU experts)')
    if hf.get('tie_word_embeddings', False):
        problems.append('tie_word_embeddings true: mpimoe has an untied lm_head')
    if hf.get('rope_scaling') is not None:
        problems.append(f'rope_scaling {clip(repr(hf["rope_scaling"]))}: only plain RoPE')
    rope = hf.get('rope_parameters') or {}
    if not isinstance(rope, dict) or rope.get('rope_type', 'default') != 'default' \
            or set(rope) - {'rope_type', 'rope_theta'}:
        problems.append(f'rope_parameters {clip(repr(rope))}: only plain RoPE '
                        f'(rope_type default)')
    window, max_pos = hf.get('sliding_window'), hf.get('max_position_embeddings')
    if window is not None and not (isinstance(window, int) and isinstance(max_pos, int)
                                   and window >= max_pos):
        problems.append(f'sliding_window {clip(window)} < max_position_embeddings '
                        f'{clip(max_pos)}: mpimoe attends to the whole sequence')
    for key in ('attention_bias', 'mlp_bias'):
        if hf.get(key):
            problems.append(f'{key} true: mpimoe has no biases')
    unknown = sorted(set(hf) - _HARMLESS_KEYS - set(_MAPPED_KEYS) - _CHECKED_KEYS)
    if unknown:
        problems.append(_listed('unknown config keys (they may change the results, e.g. '
                                'shared experts or quantization)', map(clip, unknown)))
    return problems


def _rope_theta(hf):
    """``rope_theta`` (transformers < 5) or ``rope_parameters.rope_theta`` (>= 5), or None."""
    rope = hf.get('rope_parameters')
    return hf.get('rope_theta', rope.get('rope_theta') if isinstance(rope, dict) else None)


def _eos_ids(hf, generation):
    """The end-of-sequence ids: ``eos_token_id`` of generation_config.json
    (dict ``generation``) unless absent or null, else of config.json (``hf``);
    an int, a list of ints, or null/absent (none) -> (tuple, whether it came
    from generation_config.json).  ModelConfig checks the ids."""
    given = generation.get('eos_token_id') is not None
    value = generation['eos_token_id'] if given else hf.get('eos_token_id')
    if value is None:
        return (), given
    return (tuple(value) if isinstance(value, list) else (value,)), given


def mixtral_config(hf, generation=None):
    """config.json of a Mixtral model (dict) and its generation_config.json
    (dict, for the end-of-sequence ids; None: none) -> (ModelConfig or None,
    problems [str]).

    The config is None when a required key is missing or invalid; problems
    lists every feature mpimoe cannot run as well.
    """
    problems = _feature_problems(hf)
    missing = [k for k in _MAPPED_KEYS if hf.get(k) is None]
    theta = _rope_theta(hf)
    if theta is None:
        missing.append('rope_theta')
    if missing:
        return None, problems + [_listed('missing config keys', missing)]
    fields = {f: hf[k] for k, f in _MAPPED_KEYS.items()}
    d, heads = hf['hidden_size'], hf['num_attention_heads']
    # as transformers: head_dim, else hidden_size // num_attention_heads
    head_dim = hf.get('head_dim') or (d // heads if isinstance(d, int) and isinstance(heads, int)
                                      and heads > 0 else None)
    eos, from_generation = _eos_ids(hf, generation or {})
    try:
        cfg = ModelConfig(**fields, n_dense_layers=0, head_dim=head_dim, d_dense=fields['d_expert'],
                          expert_kind='swiglu', rope_theta=theta, dtype='bfloat16',
                          eos_token_id=eos)
    except ConfigError as e:
        given = 'config.json and generation_config.json do' if from_generation \
            else 'config.json does'
        return None, problems + [f'{given} not give a valid model: {e}']
    return cfg, problems


# ---------------------------------------------------------------- names

_TOP = {'embed': ('model.embed_tokens.weight', False), 'final_norm': ('model.norm.weight', False),
        'lm_head': ('lm_head.weight', True)}
_LAYER = {'attn_norm': ('input_layernorm.weight', False),
          'wq': ('self_attn.q_proj.weight', True), 'wk': ('self_attn.k_proj.weight', True),
          'wv': ('self_attn.v_proj.weight', True), 'wo': ('self_attn.o_proj.weight', True),
          'ffn_norm': ('post_attention_layernorm.weight', False),
          'router': ('block_sparse_moe.gate.weight', True)}
_EXPERT = {'gate': 'w1', 'up': 'w3', 'down': 'w2'}


def hf_source(name):
    """mpimoe tensor name -> (Hugging Face tensor name, transposed?).

        >>> hf_source('layers/3/experts/5/up')
        ('model.layers.3.block_sparse_moe.experts.5.w3.weight', True)
    """
    parts = name.split('/')
    if len(parts) == 1:
        return _TOP[name]
    prefix = f'model.layers.{parts[1]}.'
    if len(parts) == 3:
        hf, transposed = _LAYER[parts[2]]
        return prefix + hf, transposed
    return f'{prefix}block_sparse_moe.experts.{parts[3]}.{_EXPERT[parts[4]]}.weight', True


# ---------------------------------------------------------------- safetensors

def _read_header(path):
    """(entries {name: dict(dtype, shape, data_offsets)}, data start byte) of one
    safetensors file; DataError when the header is not readable."""
    regular_file(path, 'safetensors shard')
    with open(path, 'rb') as f:
        raw = f.read(8)
        n = int.from_bytes(raw, 'little') if len(raw) == 8 else -1
        if not 2 <= n <= _MAX_HEADER:
            raise DataError(f'{path}: not a safetensors file (header length {n}); '
                            f're-download or re-save it')
        header = parse_json(f.read(n), f'{path}: safetensors header', DataError)
    if not isinstance(header, dict):
        raise DataError(f'{path}: safetensors header is not a JSON object')
    header.pop('__metadata__', None)
    return header, 8 + n


class _Source:
    """The tensors of a checkpoint directory: where each one lies and its header entry.

    ``entries[hf_name] = (shard path, header entry)``; ``indexed[hf_name]`` is
    the shard file the index names (for messages about a tensor it lacks).
    """

    def __init__(self, directory):
        self.directory = directory
        self.entries, self.indexed, self._start = {}, {}, {}
        for shard, names in self._shards().items():
            header, self._start[shard] = _read_header(shard)
            if names is not None:
                self.indexed.update({n: os.path.basename(shard) for n in names})
            self.entries.update({n: (shard, header[n]) for n in
                                 (header if names is None else names) if n in header})

    def _shards(self):
        """{shard path: [names it should hold] or None (all its tensors)}."""
        index = os.path.join(self.directory, 'model.safetensors.index.json')
        single = os.path.join(self.directory, 'model.safetensors')
        regular_file(index, 'index')
        regular_file(single, 'safetensors file')
        if os.path.isfile(index):
            return self._indexed(index)
        if os.path.isfile(single):
            return {single: None}
        raise DataError(f'{self.directory}: neither model.safetensors nor '
                        f'model.safetensors.index.json; is it a safetensors checkpoint?')

    def _indexed(self, index):
        doc = _read_json(index)
        try:
            weight_map = doc['weight_map']
            shards = {}
            for name, shard in weight_map.items():
                shards.setdefault(os.path.join(self.directory, shard), []).append(name)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DataError(f'{index}: not a valid index (needs a "weight_map" object of '
                            f'tensor -> shard file): {clip(repr(e))}') from None
        absent = sorted(os.path.basename(s) for s in shards if not os.path.exists(s))
        if absent:
            raise DataError(_listed(f'{index}: shard files missing', map(clip, absent)))
        return shards

    def problem(self, name, shape):
        """What is wrong with tensor ``name`` expected as ``shape``, or None."""
        shard, e = self.entries[name]
        try:
            dtype, got, (a, b) = e['dtype'], tuple(e['shape']), map(int, e['data_offsets'])
        except (KeyError, TypeError, ValueError):
            return f'{name}: malformed header entry {clip(repr(e))}'
        if got != shape:
            return f'{name}: shape {clip(list(got))}, config.json implies {list(shape)}'
        if dtype not in _ST_DTYPES:
            return f'{name}: dtype {clip(dtype)} (only {", ".join(_ST_DTYPES)})'
        size = os.path.getsize(shard) - self._start[shard]
        if not 0 <= a <= b <= size or b - a != int(np.prod(shape)) * _ST_DTYPES[dtype].itemsize:
            return f'{name}: data_offsets {[a, b]} do not fit {list(shape)} {dtype} in ' \
                   f'{os.path.basename(shard)} (truncated?)'
        return None

    def dtype(self, name):
        """The safetensors dtype name of tensor ``name`` ('BF16', ...)."""
        return self.entries[name][1]['dtype']

    def read(self, name):
        """Tensor ``name`` memory-mapped, read-only, in its stored dtype."""
        shard, e = self.entries[name]
        return np.memmap(shard, dtype=_ST_DTYPES[e['dtype']], mode='r', shape=tuple(e['shape']),
                         offset=self._start[shard] + e['data_offsets'][0])


# ---------------------------------------------------------------- checks

def _expected(cfg):
    """[(mpimoe name, shape, hf name, hf shape, transposed)] in storage order."""
    out = []
    for name, shape in tensor_specs(cfg):
        hf, transposed = hf_source(name)
        out.append((name, shape, hf, shape[::-1] if transposed else shape, transposed))
    return out


def _tensor_problems(source, expected):
    """Missing, unexpected, misshapen and unreadable tensors: [str]."""
    wanted = {hf for _, _, hf, _, _ in expected}
    problems = []
    missing = [hf + (f' (absent from {source.indexed[hf]})' if hf in source.indexed else '')
               for hf in sorted(wanted) if hf not in source.entries]
    extra = sorted(n for n in set(source.entries) - wanted if not n.endswith(_IGNORED))
    if missing:
        problems.append(_listed('missing tensors', missing))
    if extra:
        problems.append(_listed('unexpected tensors (a feature mpimoe lacks, e.g. biases '
                                'or shared experts?)', extra))
    bad = [p for _, _, hf, shape, _ in expected if hf in source.entries
           for p in [source.problem(hf, shape)] if p]
    if bad:
        problems.append(_listed('bad tensors', bad))
    return problems


def _read_json(path):
    """The JSON document in the regular file ``path``; one-line DataError when it
    is not one (FileNotFoundError passes through)."""
    regular_file(path, 'JSON file')
    with open(path, 'rb') as f:
        return parse_json(f.read(), path, DataError)


def _read_config(directory):
    """config.json of ``directory`` as a dict; one-line DataError when absent or bad."""
    if not os.path.isdir(directory):
        raise DataError(f'{directory}: no such directory; pass the directory holding '
                        f'config.json and the *.safetensors files')
    path = os.path.join(directory, 'config.json')
    try:
        hf = _read_json(path)
    except FileNotFoundError:
        raise DataError(f'{path}: missing; is {directory} a Hugging Face checkpoint '
                        f'directory?') from None
    if not isinstance(hf, dict):
        raise DataError(f'{path}: not a JSON object')
    return hf


def _read_generation_config(directory):
    """generation_config.json of ``directory`` as a dict, {} when absent;
    one-line DataError when it is not a JSON object."""
    path = os.path.join(directory, 'generation_config.json')
    try:
        doc = _read_json(path)
    except FileNotFoundError:
        return {}
    if not isinstance(doc, dict):
        raise DataError(f'{path}: not a JSON object')
    return doc


def _check(directory):
    """-> (cfg, source, expected, tokenizer) when convertible, tokenizer the
    ``(files, TextTokenizer)`` of the directory or None when it has no
    tokenizer.json; else DataError listing every problem."""
    hf, problems = _read_config(directory), []
    try:
        generation = _read_generation_config(directory)
    except DataError as e:
        generation = {}
        problems.append(str(e))
    cfg, config_problems = mixtral_config(hf, generation)
    problems += config_problems
    try:
        source = _Source(directory)
    except DataError as e:
        source = None
        problems.append(str(e))
    expected = _expected(cfg) if cfg is not None else []
    if cfg is not None and source is not None:
        problems += _tensor_problems(source, expected)
    tokenizer = None
    if cfg is not None and os.path.isfile(os.path.join(directory, 'tokenizer.json')):
        try:
            tokenizer = load_tokenizer(directory, cfg.vocab_size)
        except DataError as e:
            problems.append(str(e))
    if problems:
        raise DataError(f'{directory}: cannot convert: ' + '; '.join(problems))
    return cfg, source, expected, tokenizer


def _tokenizer_note(directory, tokenizer):
    """convert's line about the tokenizer it copies (or finds none)."""
    if tokenizer is None:
        return (f'note: {directory} has no tokenizer.json, so the weight file carries no '
                f'tokenizer; text inputs then need --tokenizer at run time')
    files, tok = tokenizer
    return (f'tokenizer: copying {", ".join(files)} ({tok.vocab_size} tokens, chat template: '
            f'{"yes" if tok.has_chat_template else "no"})')


# ---------------------------------------------------------------- writing

def _to_bf16_words(a):
    """BF16, F16 or F32 array -> uint16 words of bfloat16, rounded to nearest-even
    (BF16 is passed through bit for bit).  Same shape."""
    if a.dtype == _ST_DTYPES['BF16']:
        return a.view(WORD)
    return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).view(WORD)


def convert_hf(directory, out, overwrite=False, log=None):
    """Convert the Hugging Face Mixtral checkpoint in ``directory`` to ``out``.

    Checks everything first (DataError listing every problem), then writes
    tensor by tensor to ``out + '.partial'`` and renames it.  Peak memory is
    about twice the largest tensor.  Returns ``{'path', 'tensors', 'bytes',
    'seconds', 'config'}``.
    """
    log = log or (lambda line: None)
    cfg, source, expected, tokenizer = _check(directory)
    rounded = sorted({source.dtype(hf) for _, _, hf, _, _ in expected} - {'BF16'})
    t0 = last = time.monotonic()
    total = 0
    with open_for_writing(out, cfg, overwrite) as f:
        if rounded:
            log(f'note: {directory} stores {"/".join(rounded)} tensors; rounding them to '
                f'bfloat16 (nearest-even)')
        log(f'converting {directory} -> {out}: {len(expected)} tensors, {cfg.n_layers} '
            f'layers x {cfg.n_experts} experts (top-{cfg.top_k}), d_model {cfg.d_model}')
        log(_tokenizer_note(directory, tokenizer))
        if tokenizer is not None:
            write_tokenizer_files(f, tokenizer[0])
        for name, shape, hf, _, transposed in expected:
            words = _to_bf16_words(source.read(hf))
            words = np.ascontiguousarray(words.T if transposed else words)
            total += write_tensor(f, name, shape, cfg.dtype, [(0, shape[0], words)])
            if time.monotonic() - last >= LOG_EVERY_S:
                last = time.monotonic()
                log(f'  {total / 1e9:.3f} GB  {last - t0:.0f} s  {name}')
    secs = time.monotonic() - t0
    log(f'wrote {out}: {len(expected)} tensors, {total / 1e9:.3f} GB in {secs:.1f} s')
    return {'path': out, 'tensors': len(expected), 'bytes': total, 'seconds': secs,
            'config': cfg}
