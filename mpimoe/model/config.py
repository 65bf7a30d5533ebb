"""Model configuration: one validated dataclass, named presets, ``--set`` overrides.

    >>> cfg = model_config('tiny', ['top_k=3'])
    >>> cfg.moe_layers
    [1, 2, 3]
"""

import dataclasses
import json
from dataclasses import dataclass, fields

from mpimoe.errors import ConfigError, clip

__all__ = ['ModelConfig', 'PRESETS', 'model_config', 'parse_overrides', 'parse_json', 'int_list']

EXPERT_KINDS = ('mlp', 'swiglu')
#: fields added after files were first written: a stored config may lack them
#: (their default applies)
LATER_FIELDS = frozenset({'max_position_embeddings', 'eos_token_id'})
DTYPES = ('bfloat16', 'float16')

# Upper bounds: a file or a --set can claim any number, and the layout, the
# plan and the buffers grow with them, so each field is bounded by what a
# real model has, with room to spare.  The largest public models (2025):
# DeepSeek-V3 (61 layers, 256 experts of 2048, top-8, d_model 7168, 128 heads,
# vocab 129280, context 163840), Kimi K2 (61 layers, 384 experts, 1.04T
# parameters), Switch-C (2048 experts, 1.6T), Llama 3 405B (126 layers,
# d_model 16384, FFN 53248), PaLM (FFN 73728), Gemma 3 (head_dim 256, vocab
# 262144), Llama 4 Scout (context 10M tokens), Qwen2.5-1M (rope_theta 1e7).
#: field -> largest value accepted (every one must also be >= 1)
MAX = {
    'n_layers': 1024,                   # 8x Llama 3 405B
    'n_experts': 4096,                  # 2x Switch-C
    'top_k': 64,                        # 8x DeepSeek-V3 / Kimi K2
    'd_model': 65536,                   # 4x Llama 3 405B
    'n_heads': 1024,                    # 8x DeepSeek-V3
    'n_kv_heads': 1024,
    'head_dim': 1024,                   # 4x Gemma 3
    'd_expert': 262144,                 # 3.5x PaLM's FFN
    'd_dense': 262144,
    'vocab_size': 1 << 22,              # 16x Gemma 3
    'max_position_embeddings': 1 << 24,  # 1.6x Llama 4 Scout
}
#: most end-of-sequence ids (Llama 3 has 3)
MAX_EOS_IDS = 64
#: largest rope_theta (100000x Qwen2.5-1M)
MAX_ROPE_THETA = 1e12
#: largest number of (MoE layer, expert) pairs: 5.7x Kimi K2's 60 x 384 (each
#: is 2 or 3 tensors the loader lists)
MAX_EXPERTS_TOTAL = 1 << 17
#: largest parameter count: 12x Switch-C (4e13 bytes of bf16 weights)
MAX_PARAMS = 2e13


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only MoE transformer; the first ``n_dense_layers`` are dense."""

    n_layers: int
    """Transformer blocks in total (dense + MoE)."""
    n_dense_layers: int
    """Leading blocks with a dense MLP instead of an MoE FFN."""
    n_experts: int
    """Experts per MoE layer (E)."""
    top_k: int
    """Experts each token is routed to."""
    d_model: int
    """Width of the residual stream."""
    n_heads: int
    """Query heads."""
    n_kv_heads: int
    """Key/value heads (GQA when smaller than ``n_heads``; must divide it)."""
    head_dim: int
    """Width of one attention head (even: RoPE rotates pairs)."""
    d_expert: int
    """Hidden width of one expert."""
    d_dense: int
    """Hidden width of the dense MLP of the first layers."""
    expert_kind: str = 'swiglu'
    """``mlp`` (up, GELU, down) or ``swiglu`` (gate, up, down; Mixtral)."""
    vocab_size: int = 256
    """Token ids are in ``[0, vocab_size)``."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    dtype: str = 'bfloat16'
    """Storage dtype of the weights: ``bfloat16`` or ``float16``."""
    max_position_embeddings: int = 4096
    """Context length: prompt plus generated tokens of one sequence may not
    exceed it (``max_position_embeddings`` of the checkpoint's config.json;
    weight files written before the field existed read as 4096)."""
    eos_token_id: tuple = ()
    """End-of-sequence token id(s): a sequence ends at the first it generates
    (unless its request sets ``ignore_eos``); () = the model has none.
    ``eos_token_id`` of the checkpoint's config.json (an int or a list);
    ``--set eos_token_id=2,7``; weight files written before the field existed
    read as ()."""

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, _field_type(f)) or isinstance(v, bool):
                raise ConfigError(f'{f.name}={clip(repr(v))}: expected '
                                  f'{_CONVERTERS[f.type][1]}')
        for name, top in MAX.items():
            v = getattr(self, name)
            if not 1 <= v <= top:
                raise ConfigError(f'{name}={clip(v)}: must be in [1, {top}]')
        self._check_eos()
        if not 0 <= self.n_dense_layers < self.n_layers:
            raise ConfigError(f'n_dense_layers={clip(self.n_dense_layers)}: must be in '
                              f'[0, n_layers={self.n_layers}) so that one MoE layer is left')
        if self.top_k > self.n_experts:
            raise ConfigError(f'top_k={self.top_k}: must be <= n_experts={self.n_experts}')
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f'n_kv_heads={self.n_kv_heads}: must divide n_heads={self.n_heads}')
        if self.head_dim % 2:
            raise ConfigError(f'head_dim={self.head_dim}: must be even (RoPE rotates pairs)')
        if self.expert_kind not in EXPERT_KINDS:
            raise ConfigError(f'expert_kind={clip(repr(self.expert_kind))}: must be one of '
                              f'{EXPERT_KINDS}')
        if self.dtype not in DTYPES:
            raise ConfigError(f'dtype={clip(repr(self.dtype))}: must be one of {DTYPES}')
        if not 0 < self.rope_theta <= MAX_ROPE_THETA:
            raise ConfigError(f'rope_theta={clip(self.rope_theta)}: must be in '
                              f'(0, {MAX_ROPE_THETA:g}]')
        if not 0 < self.norm_eps < 1:
            raise ConfigError(f'norm_eps={clip(self.norm_eps)}: must be in (0, 1)')
        self._check_totals()

    def _check_eos(self):
        ids = self.eos_token_id
        if len(ids) > MAX_EOS_IDS:
            raise ConfigError(f'eos_token_id: {len(ids)} ids; at most {MAX_EOS_IDS}')
        bad = [t for t in ids if type(t) is not int or not 0 <= t < self.vocab_size]
        if bad:
            raise ConfigError(f'eos_token_id={clip(list(ids))}: {clip(repr(bad[0]))} is not a '
                              f'token id in [0, vocab_size={self.vocab_size})')

    def _check_totals(self):
        """Bound what the fields multiply into: experts (tensors) and parameters."""
        experts = self.n_moe_layers * self.n_experts
        if experts > MAX_EXPERTS_TOTAL:
            raise ConfigError(f'n_experts={self.n_experts} x {self.n_moe_layers} MoE layers = '
                              f'{experts} experts: must be <= {MAX_EXPERTS_TOTAL}')
        params = self.nonexpert_params + experts * self.expert_params
        if params > MAX_PARAMS:
            raise ConfigError(f'{params:.3g} parameters: must be <= {MAX_PARAMS:g} '
                              f'(d_model, d_expert, n_experts or n_layers too large)')

    @property
    def moe_layers(self):
        """Indices of the MoE layers: ``[n_dense_layers, n_layers)``."""
        return list(range(self.n_dense_layers, self.n_layers))

    @property
    def n_moe_layers(self):
        return self.n_layers - self.n_dense_layers

    @property
    def expert_matrices(self):
        """Names of one expert's matrices, in storage order."""
        return ('gate', 'up', 'down') if self.expert_kind == 'swiglu' else ('up', 'down')

    @property
    def expert_params(self):
        """Parameters of one expert (one (layer, expert) pair)."""
        return len(self.expert_matrices) * self.d_model * self.d_expert

    @property
    def nonexpert_params(self):
        """Parameters outside the experts: embedding, attention, norms, dense
        MLPs, routers, LM head (what a front-end holds)."""
        d, q, kv = self.d_model, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        attention = d * q + 2 * d * kv + q * d + 2 * d          # wq wk wv wo + 2 norms
        dense_mlp = len(self.expert_matrices) * d * self.d_dense
        return (2 * self.vocab_size * d + d + self.n_layers * attention
                + self.n_dense_layers * dense_mlp + self.n_moe_layers * d * self.n_experts)

    @property
    def itemsize(self):
        """Bytes per stored weight (both dtypes are 16-bit)."""
        return 2

    def replace(self, **changes):
        """A new validated config with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text):
        """Inverse of :meth:`to_json`; unknown or missing keys raise ConfigError."""
        d = parse_json(text, 'config')
        if not isinstance(d, dict):
            raise ConfigError('config is not a JSON object')
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        missing = sorted(names - set(d) - LATER_FIELDS)
        if unknown or missing:
            raise ConfigError(f'config keys: unknown {clip(unknown)}, missing {missing}')
        # JSON has lists, the config tuples
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def parse_json(text, what, error=ConfigError):
    """``json.loads(text)`` (str or bytes); ``error`` naming ``what`` when it
    is not JSON, nests too deeply (RecursionError) or holds an integer of more
    than 4300 digits (Python refuses to convert it)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise error(f'{what} is not usable JSON: nested too deeply') from None
    except (TypeError, ValueError) as e:
        raise error(f'{what} is not valid JSON: {clip(e)}') from None


def _field_type(f):
    """The accepted Python type(s) of a field: a float field accepts an int."""
    return (int, float) if f.type is float else f.type


def int_list(text):
    """``'2,7'`` -> ``(2, 7)``; ``''`` -> ``()``."""
    return tuple(int(t) for t in text.split(',')) if text.strip() else ()


#: field type -> (--set value converter, its name in messages)
_CONVERTERS = {int: (int, 'int'), float: (float, 'float'), str: (str, 'str'),
               tuple: (int_list, 'list of ints (comma-separated: 2,7)')}


#: Named configurations.  ``paper-*`` follow the reference deployment
#: (shared/DESIGN.md); vocabularies are ours: 129280 (DeepSeek-V3's) for
#: paper-61l, 32000 (Llama/Mixtral's) for the others.  ``tiny`` is for tests,
#: ``small`` for laptops and CPU benchmarks.
PRESETS = {
    'paper-61l': dict(n_layers=61, n_dense_layers=3, n_experts=64, top_k=2,
                      d_model=7168, n_heads=128, n_kv_heads=128, head_dim=128,
                      d_expert=2048, d_dense=18432, expert_kind='mlp',
                      vocab_size=129280, dtype='bfloat16', max_position_embeddings=163840),
    'paper-16l': dict(n_layers=16, n_dense_layers=0, n_experts=16, top_k=2,
                      d_model=4096, n_heads=32, n_kv_heads=32, head_dim=128,
                      d_expert=16384, d_dense=16384, expert_kind='mlp',
                      vocab_size=32000, dtype='bfloat16', max_position_embeddings=16384),
    'paper-4l': dict(n_layers=4, n_dense_layers=0, n_experts=16, top_k=2,
                     d_model=8192, n_heads=16, n_kv_heads=16, head_dim=512,
                     d_expert=32768, d_dense=32768, expert_kind='mlp',
                     vocab_size=32000, dtype='float16'),
    'small': dict(n_layers=6, n_dense_layers=1, n_experts=16, top_k=2,
                  d_model=512, n_heads=8, n_kv_heads=4, head_dim=64,
                  d_expert=1024, d_dense=2048, expert_kind='swiglu',
                  vocab_size=4096, dtype='bfloat16'),
    'tiny': dict(n_layers=4, n_dense_layers=1, n_experts=8, top_k=2,
                 d_model=64, n_heads=4, n_kv_heads=2, head_dim=16,
                 d_expert=128, d_dense=128, expert_kind='swiglu',
                 vocab_size=256, dtype='bfloat16'),
}


def parse_overrides(pairs):
    """``['top_k=3', 'expert_kind=mlp', 'eos_token_id=2,7']`` -> ``{'top_k': 3,
    'expert_kind': 'mlp', 'eos_token_id': (2, 7)}``.

    Values are converted to the field's type (a tuple: comma-separated ints,
    empty for none); an unknown key or a value that does not convert raises
    ConfigError naming the key.
    """
    types = {f.name: f.type for f in fields(ModelConfig)}
    out = {}
    for pair in pairs or ():
        key, sep, value = pair.partition('=')
        key = key.strip()
        if not sep:
            raise ConfigError(f'--set {pair!r}: expected KEY=VALUE')
        if key not in types:
            raise ConfigError(f'--set {key}: unknown key; valid keys: {", ".join(types)}')
        conv, expected = _CONVERTERS[types[key]]
        try:
            out[key] = conv(value.strip())
        except ValueError:
            raise ConfigError(f'--set {key}={value}: not a valid {expected}') from None
    return out


def model_config(preset, overrides=()):
    """The validated config of ``preset`` with ``--set`` style ``overrides``."""
    if preset not in PRESETS:
        raise ConfigError(f'unknown preset {preset!r}; choose one of: {", ".join(PRESETS)}')
    return ModelConfig(**{**PRESETS[preset], **parse_overrides(overrides)})
