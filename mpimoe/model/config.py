"""Model configuration: one validated dataclass, named presets, ``--set`` overrides.

    >>> cfg = model_config('tiny', ['top_k=3'])
    >>> cfg.moe_layers
    [1, 2, 3]
"""

import dataclasses
import json
from dataclasses import dataclass, fields

from mpimoe.errors import ConfigError, clip

__all__ = ['ModelConfig', 'RouterConfig', 'AttentionConfig', 'SharedExpertConfig', 'PRESETS',
           'model_config', 'build_config', 'parse_overrides', 'parse_json', 'int_list']

EXPERT_KINDS = ('mlp', 'swiglu')
#: fields added after files were first written: a stored config may lack them
#: (their default applies; version-1 files lack the three groups)
LATER_FIELDS = frozenset({'max_position_embeddings', 'eos_token_id', 'router', 'attention',
                          'shared'})
DTYPES = ('bfloat16', 'float16')
SCORINGS = ('softmax', 'sigmoid')
ATTENTION_KINDS = ('gqa', 'mla')
QK_NORMS = ('none', 'head', 'full')
ROPE_SCALINGS = ('none', 'yarn')

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


def _check_types(obj, prefix=''):
    """ConfigError naming the first field of dataclass ``obj`` whose value is
    not of its type (a float field accepts an int; only a bool field a bool)."""
    for f in fields(obj):
        v = getattr(obj, f.name)
        accepted = (int, float) if f.type is float else f.type
        if not isinstance(v, accepted) or (isinstance(v, bool) and f.type is not bool):
            expected = _CONVERTERS[f.type][1] if f.type in _CONVERTERS else 'a JSON object'
            raise ConfigError(f'{prefix}{f.name}={clip(repr(v))}: expected {expected}')


def int_list(text):
    """``'2,7'`` -> ``(2, 7)``; ``''`` -> ``()``."""
    return tuple(int(t) for t in text.split(',')) if text.strip() else ()


def _bool(text):
    """``true``/``1`` -> True, ``false``/``0`` -> False (ValueError otherwise)."""
    value = {'true': True, '1': True, 'false': False, '0': False}.get(text.lower())
    if value is None:
        raise ValueError(text)
    return value


#: field type -> (--set value converter, its name in messages)
_CONVERTERS = {int: (int, 'int'), float: (float, 'float'), str: (str, 'str'),
               bool: (_bool, 'bool (true or false)'),
               tuple: (int_list, 'list of ints (comma-separated: 2,7)')}


class _Group:
    """A frozen group of config fields: type-checked, bounded, JSON-able."""

    #: field -> (lowest, highest) accepted, for the numeric fields
    BOUNDS = {}

    def __post_init__(self):
        _check_types(self, f'{self.KEY}.')
        for name, (lo, hi) in self.BOUNDS.items():
            v = getattr(self, name)
            if not lo <= v <= hi:
                raise ConfigError(f'{self.KEY}.{name}={clip(v)}: must be in [{lo}, {hi}]')
        for name, choices in self.CHOICES.items():
            if getattr(self, name) not in choices:
                raise ConfigError(f'{self.KEY}.{name}={clip(repr(getattr(self, name)))}: '
                                  f'must be one of {choices}')

    @classmethod
    def from_dict(cls, d):
        if not isinstance(d, dict):
            raise ConfigError(f'config {cls.KEY}: expected a JSON object')
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f'config {cls.KEY} keys: unknown {clip(unknown)}')
        return cls(**d)


@dataclass(frozen=True)
class RouterConfig(_Group):
    """How an MoE layer scores and picks its experts (mpimoe.moe.router)."""

    KEY = 'router'
    CHOICES = {'scoring': SCORINGS}
    BOUNDS = {'n_group': (1, 4096), 'topk_group': (1, 4096),
              'routed_scaling_factor': (1e-6, 1e6)}

    scoring: str = 'softmax'
    """``softmax`` over all experts (Mixtral, Qwen, OLMoE) or an independent
    ``sigmoid`` per expert (DeepSeek-V3)."""
    norm_topk_prob: bool = True
    """Renormalise the chosen experts' scores to sum to 1 (Mixtral, Qwen3-MoE,
    DeepSeek-V3) or use them as they are (Qwen2-MoE, OLMoE)."""
    n_group: int = 1
    """Group-limited top-k: the experts fall in ``n_group`` equal groups, a
    group scores the sum of its two best experts, and a token picks its
    experts from its ``topk_group`` best groups only (DeepSeek-V3: 8 and 4)."""
    topk_group: int = 1
    """Groups a token may pick experts from (``<= n_group``)."""
    routed_scaling_factor: float = 1.0
    """Scale of the combine weights (DeepSeek-V3: 2.5)."""
    score_bias: bool = False
    """Whether each MoE layer has ``router_bias`` [E] (FP32; DeepSeek-V3's
    ``e_score_correction_bias``): added to the scores for choosing the
    experts only, never to the combine weights (like ``--balance bias``,
    which adds to it)."""


@dataclass(frozen=True)
class AttentionConfig(_Group):
    """Which attention the layers run (mpimoe.model.attention), and RoPE scaling."""

    KEY = 'attention'
    CHOICES = {'kind': ATTENTION_KINDS, 'qk_norm': QK_NORMS, 'rope_scaling': ROPE_SCALINGS}
    BOUNDS = {'q_lora_rank': (0, 65536), 'kv_lora_rank': (0, 65536),
              'qk_nope_head_dim': (0, 1024), 'qk_rope_head_dim': (0, 1024),
              'v_head_dim': (0, 1024), 'rope_factor': (1.0, 1e4),
              'rope_original_max_position': (0, 1 << 24), 'yarn_beta_fast': (0.0, 1e4),
              'yarn_beta_slow': (0.0, 1e4), 'yarn_mscale': (0.0, 1e4),
              'yarn_mscale_all_dim': (0.0, 1e4)}

    kind: str = 'gqa'
    """``gqa``: grouped-query attention (wq, wk, wv, wo; MHA and MQA included),
    or ``mla``: DeepSeek's multi-head latent attention, whose KV cache holds
    the compressed latent and the RoPE key per token (one 'head' of
    ``kv_lora_rank + qk_rope_head_dim``)."""
    qk_norm: str = 'none'
    """RMSNorm of queries and keys before RoPE: ``head`` (over each head's
    ``head_dim``, one gain per layer shared by the heads: Qwen3-MoE) or
    ``full`` (over all heads of q and of k: OLMoE)."""
    qkv_bias: bool = False
    """Biases on the q, k, v projections (Qwen2-MoE)."""
    q_lora_rank: int = 0
    """MLA: rank of the query compression (0: queries projected directly)."""
    kv_lora_rank: int = 0
    """MLA: width of the compressed key/value latent (the cache holds it)."""
    qk_nope_head_dim: int = 0
    """MLA: per-head query/key width without RoPE."""
    qk_rope_head_dim: int = 0
    """MLA: per-head query/key width with RoPE (the key part is shared by all heads)."""
    v_head_dim: int = 0
    """MLA: per-head value width."""
    rope_scaling: str = 'none'
    """``none`` or ``yarn`` (the context extension DeepSeek-V3 ships)."""
    rope_factor: float = 1.0
    """yarn: context extension factor (DeepSeek-V3: 40)."""
    rope_original_max_position: int = 0
    """yarn: the context the model was trained with before extension (4096)."""
    yarn_beta_fast: float = 32.0
    """yarn: rotations above which a frequency is kept (extrapolated)."""
    yarn_beta_slow: float = 1.0
    """yarn: rotations below which a frequency is interpolated."""
    yarn_mscale: float = 1.0
    """yarn: magnitude scale of cos/sin (``mscale`` of the checkpoint)."""
    yarn_mscale_all_dim: float = 0.0
    """yarn: scale of the softmax (``mscale_all_dim``; 0: none)."""

    @property
    def mla(self):
        return self.kind == 'mla'


@dataclass(frozen=True)
class SharedExpertConfig(_Group):
    """Experts every token goes through, next to its routed ones (run on the
    front-end while the routed rows travel: docs/DESIGN.md)."""

    KEY = 'shared'
    CHOICES = {}
    BOUNDS = {'n_experts': (0, 64), 'd_expert': (0, 262144)}

    n_experts: int = 0
    """Shared experts per MoE layer (DeepSeek-V3: 1, Qwen2-MoE: 1; 0: none);
    stored as one MLP of hidden width ``n_experts * d_expert``."""
    d_expert: int = 0
    """Hidden width of one shared expert."""
    gate: bool = False
    """Scale the shared output by ``sigmoid(h @ shared_gate)`` (Qwen2-MoE)."""

    @property
    def d_hidden(self):
        """Hidden width of the stored shared MLP (0: none)."""
        return self.n_experts * self.d_expert


#: group field name -> its dataclass
GROUPS = {'router': RouterConfig, 'attention': AttentionConfig, 'shared': SharedExpertConfig}


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
    router: RouterConfig = RouterConfig()
    """Expert scoring and choice (version-1 files: the defaults, Mixtral's)."""
    attention: AttentionConfig = AttentionConfig()
    """Attention variant and RoPE scaling (version-1 files: plain GQA)."""
    shared: SharedExpertConfig = SharedExpertConfig()
    """Shared experts of the MoE layers (version-1 files: none)."""

    def __post_init__(self):
        _check_types(self)
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
        self._check_router()
        self._check_attention()
        s = self.shared
        if (s.n_experts == 0) != (s.d_expert == 0) or (s.gate and not s.n_experts):
            raise ConfigError(f'shared.n_experts={s.n_experts}, shared.d_expert={s.d_expert}, '
                              f'shared.gate={s.gate}: both sizes 0 (no shared expert) or both '
                              f'>= 1; a gate needs a shared expert')
        self._check_totals()

    def _check_router(self):
        r, E = self.router, self.n_experts
        if r.n_group == 1 and r.topk_group == 1:
            return
        size = E // r.n_group
        if E % r.n_group or (size < 2) or r.topk_group > r.n_group \
                or self.top_k > r.topk_group * size:
            raise ConfigError(f'router.n_group={r.n_group}, router.topk_group={r.topk_group}: '
                              f'n_group must divide n_experts={E} into groups of >= 2 experts, '
                              f'topk_group <= n_group, and top_k={self.top_k} <= topk_group x '
                              f'group size')

    def _check_attention(self):
        a = self.attention
        mla = (a.q_lora_rank, a.kv_lora_rank, a.qk_nope_head_dim, a.qk_rope_head_dim,
               a.v_head_dim)
        if a.mla:
            if (a.kv_lora_rank < 1 or a.v_head_dim < 1 or a.qk_rope_head_dim < 2
                    or a.qk_rope_head_dim % 2
                    or self.head_dim != a.qk_nope_head_dim + a.qk_rope_head_dim
                    or self.n_kv_heads != self.n_heads or a.qk_norm != 'none' or a.qkv_bias):
                raise ConfigError(
                    f'attention.kind=mla needs kv_lora_rank >= 1, v_head_dim >= 1, an even '
                    f'qk_rope_head_dim >= 2, head_dim = qk_nope_head_dim + qk_rope_head_dim '
                    f'(got {self.head_dim} vs {a.qk_nope_head_dim} + {a.qk_rope_head_dim}), '
                    f'n_kv_heads = n_heads, no qk_norm and no qkv_bias')
        elif any(mla):
            raise ConfigError(f'attention.kind=gqa: the MLA sizes (q_lora_rank, kv_lora_rank, '
                              f'qk_nope_head_dim, qk_rope_head_dim, v_head_dim) must be 0, got '
                              f'{list(mla)}')
        if a.rope_scaling == 'yarn' and a.rope_original_max_position < 1:
            raise ConfigError('attention.rope_scaling=yarn needs rope_original_max_position '
                              '>= 1 (the context before extension)')

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
    def rope_dim(self):
        """Width RoPE rotates per head: head_dim (GQA) or qk_rope_head_dim (MLA)."""
        return self.attention.qk_rope_head_dim if self.attention.mla else self.head_dim

    @property
    def kv_token_elems(self):
        """KV cache elements per token per layer: keys and values of the KV
        heads (GQA), or the latent and the RoPE key (MLA)."""
        a = self.attention
        if a.mla:
            return a.kv_lora_rank + a.qk_rope_head_dim
        return 2 * self.n_kv_heads * self.head_dim

    @property
    def attention_params(self):
        """Parameters of one layer's attention, its two norms included."""
        a, d, H = self.attention, self.d_model, self.n_heads
        if a.mla:
            qk = H * self.head_dim
            q = d * qk if not a.q_lora_rank else d * a.q_lora_rank + a.q_lora_rank \
                + a.q_lora_rank * qk
            kv = d * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank \
                + a.kv_lora_rank * H * (a.qk_nope_head_dim + a.v_head_dim)
            return q + kv + H * a.v_head_dim * d + 2 * d
        q, kv = H * self.head_dim, self.n_kv_heads * self.head_dim
        norms = {'none': 0, 'head': 2 * self.head_dim, 'full': q + kv}[a.qk_norm]
        return d * q + 2 * d * kv + q * d + 2 * d + (q + 2 * kv) * a.qkv_bias + norms

    @property
    def shared_params(self):
        """Parameters of one MoE layer's shared experts (and their gate)."""
        s = self.shared
        return len(self.expert_matrices) * self.d_model * s.d_hidden + self.d_model * s.gate

    @property
    def nonexpert_params(self):
        """Parameters outside the routed experts: embedding, attention, norms,
        dense MLPs, routers, shared experts, LM head (what a front-end holds)."""
        d = self.d_model
        dense_mlp = len(self.expert_matrices) * d * self.d_dense
        router = d * self.n_experts + self.n_experts * self.router.score_bias
        return (2 * self.vocab_size * d + d + self.n_layers * self.attention_params
                + self.n_dense_layers * dense_mlp
                + self.n_moe_layers * (router + self.shared_params))

    @property
    def itemsize(self):
        """Bytes per stored weight (both dtypes are 16-bit)."""
        return 2

    def replace(self, **changes):
        """A new validated config with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def to_json(self):
        """The config as JSON (keys sorted; the groups as nested objects)."""
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
        # JSON has lists and objects, the config tuples and groups
        return cls(**{k: GROUPS[k].from_dict(v) if k in GROUPS else
                      tuple(v) if isinstance(v, list) else v for k, v in d.items()})


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
    # The models people run, at their real sizes, for `mpimoe plan`: each is
    # what convert reads from the config.json of the Hugging Face repository
    # named above it (tests/test_presets.py; transformers' config classes
    # default to some of these figures, not all: OlmoeConfig's experts are
    # 2048 wide, Qwen3MoeConfig has 24 layers).  Qwen's d_dense is its
    # config.json's intermediate_size, which no layer uses (all are MoE).
    # deepseek-ai/DeepSeek-V3 (and -R1): 671B parameters with the 14B MTP
    # module, which inference skips
    'deepseek-v3': dict(n_layers=61, n_dense_layers=3, n_experts=256, top_k=8,
                        d_model=7168, n_heads=128, n_kv_heads=128, head_dim=192,
                        d_expert=2048, d_dense=18432, expert_kind='swiglu',
                        vocab_size=129280, rope_theta=10000.0, norm_eps=1e-6,
                        dtype='bfloat16', max_position_embeddings=163840,
                        router=dict(scoring='sigmoid', norm_topk_prob=True, n_group=8,
                                    topk_group=4, routed_scaling_factor=2.5, score_bias=True),
                        attention=dict(kind='mla', q_lora_rank=1536, kv_lora_rank=512,
                                       qk_nope_head_dim=128, qk_rope_head_dim=64,
                                       v_head_dim=128, rope_scaling='yarn', rope_factor=40.0,
                                       rope_original_max_position=4096, yarn_mscale=1.0,
                                       yarn_mscale_all_dim=1.0),
                        shared=dict(n_experts=1, d_expert=2048)),
    # Qwen/Qwen3-235B-A22B
    'qwen3-235b-a22b': dict(n_layers=94, n_dense_layers=0, n_experts=128, top_k=8,
                            d_model=4096, n_heads=64, n_kv_heads=4, head_dim=128,
                            d_expert=1536, d_dense=12288, expert_kind='swiglu',
                            vocab_size=151936, rope_theta=1e6, norm_eps=1e-6,
                            dtype='bfloat16', max_position_embeddings=40960,
                            attention=dict(qk_norm='head')),
    # Qwen/Qwen3-30B-A3B
    'qwen3-30b-a3b': dict(n_layers=48, n_dense_layers=0, n_experts=128, top_k=8,
                          d_model=2048, n_heads=32, n_kv_heads=4, head_dim=128,
                          d_expert=768, d_dense=6144, expert_kind='swiglu',
                          vocab_size=151936, rope_theta=1e6, norm_eps=1e-6,
                          dtype='bfloat16', max_position_embeddings=40960,
                          attention=dict(qk_norm='head')),
    # mistralai/Mixtral-8x7B-v0.1
    'mixtral-8x7b': dict(n_layers=32, n_dense_layers=0, n_experts=8, top_k=2,
                         d_model=4096, n_heads=32, n_kv_heads=8, head_dim=128,
                         d_expert=14336, d_dense=14336, expert_kind='swiglu',
                         vocab_size=32000, rope_theta=1e6, norm_eps=1e-5,
                         dtype='bfloat16', max_position_embeddings=32768),
    # allenai/OLMoE-1B-7B-0924
    'olmoe-1b-7b': dict(n_layers=16, n_dense_layers=0, n_experts=64, top_k=8,
                        d_model=2048, n_heads=16, n_kv_heads=16, head_dim=128,
                        d_expert=1024, d_dense=1024, expert_kind='swiglu',
                        vocab_size=50304, rope_theta=10000.0, norm_eps=1e-5,
                        dtype='bfloat16', max_position_embeddings=4096,
                        router=dict(norm_topk_prob=False), attention=dict(qk_norm='full')),
}


def parse_overrides(pairs):
    """``['top_k=3', 'eos_token_id=2,7', 'router.scoring=sigmoid']`` ->
    ``{'top_k': 3, 'eos_token_id': (2, 7), 'router': {'scoring': 'sigmoid'}}``.

    Values are converted to the field's type (a tuple: comma-separated ints,
    empty for none; a bool: true or false); a group's field is
    ``GROUP.FIELD``.  An unknown key or a value that does not convert raises
    ConfigError naming the key.
    """
    types = {f.name: f.type for f in fields(ModelConfig) if f.name not in GROUPS}
    for group, cls in GROUPS.items():
        types.update({f'{group}.{f.name}': f.type for f in fields(cls)})
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
            v = conv(value.strip())
        except ValueError:
            raise ConfigError(f'--set {key}={value}: not a valid {expected}') from None
        group, dot, name = key.partition('.')
        if dot:
            out.setdefault(group, {})[name] = v
        else:
            out[key] = v
    return out


def build_config(values):
    """ModelConfig of a dict like PRESETS' (groups as dicts of their fields)."""
    return ModelConfig(**{k: GROUPS[k](**v) if k in GROUPS else v for k, v in values.items()})


def model_config(preset, overrides=()):
    """The validated config of ``preset`` with ``--set`` style ``overrides``."""
    if preset not in PRESETS:
        raise ConfigError(f'unknown preset {preset!r}; choose one of: {", ".join(PRESETS)}')
    values = {k: dict(v) if k in GROUPS else v for k, v in PRESETS[preset].items()}
    for k, v in parse_overrides(overrides).items():
        values[k] = {**values.get(k, {}), **v} if k in GROUPS else v
    return build_config(values)
