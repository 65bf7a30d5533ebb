"""Placement plans: which rank hosts which (MoE layer, expert).

A plan is a pure function of (model config, world size, options, node layout),
computed with NumPy and identical on every rank; no MPI.  Ranks ``[0, F)`` are
front-ends (attention, gate, LM head; no experts), ranks ``[F, P)`` are expert
ranks.  Every mode is one block layout with two numbers:

* ``K`` experts per rank per layer (``K`` divides ``E = n_experts``),
* ``G`` layer groups (``G`` divides ``Lm = n_moe_layers``); group ``g`` holds the
  MoE layers with index in ``[g*Lm/G, (g+1)*Lm/G)``,

so there are ``(E/K) * G`` expert ranks, group-major: expert rank ``j`` of group
``g`` (world rank ``F + g*E/K + j``) hosts experts ``[j*K, (j+1)*K)`` of every
layer of its group.

=============  ===  =====================================================
mode           K    G
=============  ===  =====================================================
``per-layer``  1    1: rank ``F+e`` hosts expert ``e`` of every MoE layer
``dedicated``  1    Lm: one (layer, expert) per rank
``packed:K``   K    any divisor of Lm that matches the world size
=============  ===  =====================================================

    >>> from mpimoe.config import model_config
    >>> plan = make_plan(model_config('paper-61l'), 3904, 'dedicated', gpus_per_node=8)
    >>> plan.n_frontends, plan.n_expert_ranks, plan.n_nodes
    (192, 3712, 488)
    >>> plan.rank_experts(192)
    [(3, 0)]
"""

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from mpimoe.config import ModelConfig
from mpimoe.errors import ConfigError

__all__ = ['Plan', 'make_plan', 'parse_mode']

#: ``describe()`` lists at most this many expert-rank blocks before eliding.
_MAX_BLOCK_LINES = 12

_GB = 1e9
_MB = 1e6


def parse_mode(mode):
    """``'packed:4'`` -> ``('packed', 4)``; ``'per-layer'`` -> ``('per-layer', 1)``."""
    name, sep, arg = str(mode).partition(':')
    if name in ('per-layer', 'dedicated') and not sep:
        return name, 1
    if name == 'packed' and sep:
        try:
            k = int(arg)
        except ValueError:
            k = 0
        if k >= 1:
            return name, k
        raise ConfigError(f'placement {mode!r}: K in packed:K must be an integer >= 1')
    raise ConfigError(f'placement {mode!r}: unknown mode; choose per-layer, dedicated '
                      f'or packed:K (K experts per rank per layer)')


@dataclass(frozen=True, eq=False)
class Plan:
    """A placement of every (MoE layer, expert) on one rank; build with :func:`make_plan`."""

    cfg: ModelConfig
    """The :class:`~mpimoe.config.ModelConfig` placed."""
    world_size: int
    """Ranks in total (P)."""
    mode: str
    """Canonical mode string: ``per-layer``, ``dedicated`` or ``packed:K``."""
    n_frontends: int
    """Front-end ranks ``[0, F)``."""
    experts_per_rank: int
    """K: experts per expert rank per MoE layer it hosts."""
    n_groups: int
    """G: layer groups; each expert rank hosts the layers of one group."""
    gpus_per_node: int
    """Ranks per node (block distribution: node of rank r is ``r // gpus_per_node``)."""
    owner: np.ndarray
    """int32 [n_moe_layers, n_experts]: rank hosting (MoE layer index, expert)."""
    nodes: np.ndarray
    """int32 [world_size]: node of each rank."""

    @property
    def n_expert_ranks(self):
        return self.world_size - self.n_frontends

    @property
    def n_nodes(self):
        return int(self.nodes[-1]) + 1

    def is_frontend(self, rank):
        return 0 <= rank < self.n_frontends

    def rank_experts(self, rank):
        """(layer index in the model, expert) pairs hosted by ``rank``, sorted;
        empty for a front-end."""
        moe_idx, experts = np.nonzero(self.owner == rank)
        first = self.cfg.n_dense_layers
        return [(first + int(m), int(e)) for m, e in zip(moe_idx, experts)]

    def layer_ranks(self, moe_idx):
        """Sorted ranks of MoE layer ``moe_idx``'s communicator: the front-ends and
        the ranks hosting that layer's experts."""
        hosts = np.unique(self.owner[moe_idx])
        return list(range(self.n_frontends)) + [int(r) for r in hosts]

    def weight_bytes(self):
        """int64 [world_size]: bytes of weights each rank holds (a front-end holds
        all non-expert weights, an expert rank its experts)."""
        cfg = self.cfg
        hosted = np.bincount(self.owner.ravel(), minlength=self.world_size)   # [P]
        out = hosted.astype(np.int64) * (cfg.expert_params * cfg.itemsize)
        out[:self.n_frontends] = cfg.nonexpert_params * cfg.itemsize
        return out

    def plan_hash(self):
        """16 hex digits of sha256 over the config, P, F, mode and ``owner``."""
        head = json.dumps({'config': json.loads(self.cfg.to_json()), 'world_size': self.world_size,
                           'n_frontends': self.n_frontends, 'mode': self.mode}, sort_keys=True)
        h = hashlib.sha256(head.encode())
        h.update(self.owner.astype('<i4').tobytes())
        return h.hexdigest()[:16]

    def describe(self, full=False):
        """Human-readable summary; ``full`` lists every rank on its own line."""
        cfg, F, P = self.cfg, self.n_frontends, self.world_size
        lm, per_group = cfg.n_moe_layers, cfg.n_moe_layers // self.n_groups
        wb = self.weight_bytes()
        expert_wb = wb[F:]
        one = cfg.expert_params * cfg.itemsize
        hosted = expert_wb // one
        lines = [
            f'placement {self.mode} on {P} ranks: {_count(F, "front-end")} '
            f'({_labelled("rank", 0, F - 1)}) + {_count(self.n_expert_ranks, "expert rank")} '
            f'({_labelled("rank", F, P - 1)})',
            f'model: {cfg.n_layers} layers = {cfg.n_dense_layers} dense + {lm} MoE '
            f'(layers {_span(cfg.n_dense_layers, cfg.n_layers - 1)}), {cfg.n_experts} experts '
            f'each, {lm * cfg.n_experts} (layer, expert) pairs',
            f'K = {_count(self.experts_per_rank, "expert")} per rank per MoE layer, G = '
            f'{_count(self.n_groups, "layer group")} of {_count(per_group, "MoE layer")}',
            self._describe_nodes(),
            f'weights per front-end (all non-expert weights): {_size(wb[0])}',
            f'weights per expert rank: max {_size(expert_wb.max())}, '
            f'{_count(int(hosted.max()), "expert")}; min {_size(expert_wb.min())}, '
            f'{_count(int(hosted.min()), "expert")}; one expert = {one / _MB:.2f} MB',
            f'weights in total: {_size(wb.sum())}',
            f'plan hash: {self.plan_hash()}',
        ]
        if full:
            return '\n'.join(lines + self._describe_ranks(wb))
        lines.append(f'{_labelled("rank", 0, F - 1)}: {"front-end" if F == 1 else "front-ends"}')
        blocks = self._blocks()
        if len(blocks) > _MAX_BLOCK_LINES:
            head, tail = blocks[:_MAX_BLOCK_LINES - 2], blocks[-2:]
            mid = blocks[len(head):-2]
            lines += [_block_line(*b) for b in head]
            lines.append(f'... {len(mid)} more blocks of the same form: ranks '
                         f'{_span(mid[0][0], mid[-1][1])}, layers '
                         f'{_span(mid[0][2], mid[-1][3])} (--full lists every rank)')
            lines += [_block_line(*b) for b in tail]
        else:
            lines += [_block_line(*b) for b in blocks]
        return '\n'.join(lines)

    def _hosted_ranges(self):
        """Per rank, the layer and expert ranges it hosts: four int64 [P] arrays
        (first layer, last layer, first expert, last expert; layers as model
        indices).  Every rank of a block plan hosts such a product of ranges."""
        P = self.world_size
        flat = self.owner.ravel()                                            # [Lm*E]
        moe_idx, experts = np.indices(self.owner.shape).reshape(2, -1)       # [Lm*E] each
        layers = moe_idx + self.cfg.n_dense_layers
        lo_l, lo_e = np.full(P, np.iinfo(np.int64).max), np.full(P, np.iinfo(np.int64).max)
        hi_l, hi_e = np.full(P, -1), np.full(P, -1)
        np.minimum.at(lo_l, flat, layers)
        np.maximum.at(hi_l, flat, layers)
        np.minimum.at(lo_e, flat, experts)
        np.maximum.at(hi_e, flat, experts)
        return lo_l, hi_l, lo_e, hi_e

    def _blocks(self):
        """Runs of consecutive expert ranks hosting the same layers and
        consecutive expert blocks: tuples (first rank, last rank, first layer,
        last layer, first expert, experts per rank)."""
        lo_l, hi_l, lo_e, hi_e = (a.tolist() for a in self._hosted_ranges())
        blocks = []
        for r in range(self.n_frontends, self.world_size):
            k = hi_e[r] - lo_e[r] + 1
            if blocks:
                a, b, l0, l1, e0, kb = blocks[-1]
                if (l0, l1, kb) == (lo_l[r], hi_l[r], k) and lo_e[r] == e0 + (b + 1 - a) * k:
                    blocks[-1] = (a, r, l0, l1, e0, k)
                    continue
            blocks.append((r, r, lo_l[r], hi_l[r], lo_e[r], k))
        return blocks

    def _describe_nodes(self):
        g, F = self.gpus_per_node, self.n_frontends
        last = self.world_size - (self.n_nodes - 1) * g
        shape = (f'{self.n_nodes} x {g} ranks' if last == g else
                 f'{self.n_nodes} ({g} ranks each, {last} on the last)')
        return (f'nodes: {shape} (node = rank // {g}); front-ends on '
                f'{_labelled("node", 0, self.nodes[F - 1])}, expert ranks on '
                f'{_labelled("node", self.nodes[F], self.n_nodes - 1)}')

    def _describe_ranks(self, wb):
        lo_l, hi_l, lo_e, hi_e = (a.tolist() for a in self._hosted_ranges())
        nodes = self.nodes.tolist()
        out = []
        for r in range(self.world_size):
            what = ('front-end' if r < self.n_frontends else
                    f'{_labelled("layer", lo_l[r], hi_l[r])} '
                    f'{_labelled("expert", lo_e[r], hi_e[r])}')
            out.append(f'rank {r} (node {nodes[r]}): {what}, {_size(wb[r])}')
        return out


def make_plan(cfg, world_size, mode='per-layer', n_frontends=None, gpus_per_node=None):
    """The placement of ``cfg`` on ``world_size`` ranks.

    ``n_frontends=None`` picks the smallest F >= 1 for which the remaining ranks
    fit ``mode``; ``gpus_per_node=None`` puts every rank on one node.  A world
    size or F that does not fit raises :class:`ConfigError` saying which fit.
    """
    name, k = parse_mode(mode)
    canonical = f'packed:{k}' if name == 'packed' else name
    P = _positive_int('world size', world_size)
    gpn = P if gpus_per_node is None else _positive_int('gpus_per_node', gpus_per_node)
    E, lm = cfg.n_experts, cfg.n_moe_layers
    if E % k:
        raise ConfigError(f'placement {canonical}: K={k} must divide n_experts={E} '
                          f'(choose K in {_divisors(E)})')
    ranks_per_group = E // k
    groups = {'per-layer': [1], 'dedicated': [lm], 'packed': _divisors(lm)}[name]
    fits = [ranks_per_group * g for g in groups]                  # expert-rank counts, ascending

    # choose F (smallest fitting when automatic) and the matching G
    if n_frontends is None:
        usable = [n for n in fits if n <= P - 1]
        if not usable:
            raise ConfigError(f'placement {canonical} needs {_fits_text(fits, name, lm)} '
                              f'expert ranks + F front-ends: world size must be '
                              f'>= {fits[0] + 1} (got {P})')
        F = P - usable[-1]
    else:
        F = _positive_int('n_frontends', n_frontends)
        if P - F not in fits:
            sizes = _or_list([F + n for n in fits])
            raise ConfigError(f'placement {canonical} needs {_fits_text(fits, name, lm)} '
                              f'expert ranks + {_count(F, "front-end")}: world size must be '
                              f'{sizes} (got {P})')
    G = (P - F) // ranks_per_group

    # owner[m, e] = F + group(m) * E/K + e // K
    group = np.arange(lm) // (lm // G)                                    # [Lm]
    owner = (F + group[:, None] * ranks_per_group + np.arange(E)[None, :] // k).astype(np.int32)
    nodes = (np.arange(P) // gpn).astype(np.int32)                        # [P]
    owner.flags.writeable = False
    nodes.flags.writeable = False
    return Plan(cfg=cfg, world_size=P, mode=canonical, n_frontends=F, experts_per_rank=k,
                n_groups=G, gpus_per_node=gpn, owner=owner, nodes=nodes)


def _positive_int(what, v):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ConfigError(f'{what}={v!r}: must be an integer >= 1')
    return int(v)


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def _fits_text(fits, name, lm):
    """'3712' or '4, 8 or 16 (4 per layer group, G dividing 4 MoE layers)'."""
    if name != 'packed':
        return str(fits[0])
    return f'{_or_list(fits)} ({fits[0]} per layer group, G dividing {lm} MoE layers)'


def _or_list(xs):
    return str(xs[0]) if len(xs) == 1 else ', '.join(map(str, xs[:-1])) + f' or {xs[-1]}'


def _count(n, noun):
    return f'{n} {noun}' + ('' if n == 1 else 's')


def _span(a, b):
    return str(a) if a == b else f'{a}-{b}'


def _labelled(noun, a, b):
    """'rank 0' or 'ranks 0-191'."""
    return f'{noun} {a}' if a == b else f'{noun}s {a}-{b}'


def _size(nbytes):
    """'62.66 GB', or '0.06 GB (58.72 MB)' below one GB."""
    gb = f'{nbytes / _GB:.2f} GB'
    return gb if nbytes >= _GB else f'{gb} ({nbytes / _MB:.2f} MB)'


def _block_line(a, b, l0, l1, e0, k):
    """One run of expert ranks from :meth:`Plan._blocks`, e.g.
    ``ranks 192-255: layer 3 experts 0-63 (one each)``."""
    ranks, layers = _labelled('rank', a, b), _labelled('layer', l0, l1)
    if a == b:
        return f'{ranks}: {layers} experts {_span(e0, e0 + k - 1)}'
    if k > 1:
        e1 = e0 + (b - a + 1) * k - 1
        return (f'{ranks}: {layers}, experts {e0}-{e1} in blocks of {k} (rank {a}: '
                f'{e0}-{e0 + k - 1}, ..., rank {b}: {e1 - k + 1}-{e1})')
    if l0 == l1:
        return f'{ranks}: {layers} experts {_span(e0, e0 + b - a)} (one each)'
    shift = f'rank-{a - e0}' if a >= e0 else f'rank+{e0 - a}'
    return f'{ranks}: expert e = {shift} of {layers}'
