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

    >>> from mpimoe.model.config import model_config
    >>> plan = make_plan(model_config('paper-61l'), 3904, 'dedicated', gpus_per_node=8)
    >>> plan.n_frontends, plan.n_expert_ranks, plan.n_nodes
    (192, 3712, 488)
    >>> plan.rank_experts(192)
    [(3, 0)]

**Topology.**  The node of rank ``r`` is ``r // gpus_per_node``.  Given the
expert loads of a previous run (``loads``: token copies [Lm, E], e.g. from its
run.json), :func:`make_plan` permutes the experts *within* each MoE layer over
that layer's slots (the same ranks, the same number of experts per rank) so that
the busiest node receives as few token copies as we can find: greedy LPT,
hottest expert first to the least loaded node with a free slot (ties by node
index), then pairwise swaps out of the busiest node while they lower it; then
the same within each node over its ranks.  A layer keeps the block layout above
unless the result is strictly better on (busiest node, busiest rank).  Copies
from a front-end on the same node are counted as inbound too.  ``mpimoe run``
passes the real node of every rank (``nodes``, from the MPI shared-memory
split) instead of ``gpus_per_node``; under Slurm's block distribution the two
agree, and so do the plan hashes.

**Replicas.**  With loads and ``replicas=R``, R extra ranks ``[P-R, P)`` (beyond
F and the mode's expert ranks) host copies of the hottest (layer, expert) pairs,
chosen by :func:`mpimoe.planning.balance.replicate`: highest load per copy first, each
extra rank taking at most K experts of one layer and K * Lm/G in all (what an
expert rank of the mode holds).  ``owner`` stays the primary; ``replicas`` lists
the copies; front-end f sends token t's copy for a replicated expert to copy
``(f + t) mod copies`` (:func:`mpimoe.moe.router.spread_copies`).  The LPT layout above
then balances the primaries' share of the loads (load / copies).
"""

import hashlib
import json
import os
import shlex
from dataclasses import dataclass, field

import numpy as np

from mpimoe.planning.balance import replicate
from mpimoe.model.config import ModelConfig
from mpimoe.errors import ConfigError, DataError

__all__ = ['Plan', 'make_plan', 'parse_mode', 'load_stats', 'node_inbound', 'sbatch_script',
           'write_sbatch']

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
    """The :class:`~mpimoe.model.config.ModelConfig` placed."""
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
    """Ranks per node (block distribution: node of rank r is ``r // gpus_per_node``;
    with a given node layout, the most ranks on one node)."""
    owner: np.ndarray
    """int32 [n_moe_layers, n_experts]: rank hosting (MoE layer index, expert)."""
    nodes: np.ndarray
    """int32 [world_size]: node of each rank."""
    loads: np.ndarray = None
    """float64 [n_moe_layers, n_experts]: token copies per expert the layout was
    balanced for (None: no stats, the block layout)."""
    replicas: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int32))
    """int32 [X, 3]: copies of hot experts beyond the primary ``owner``, rows
    (MoE layer index, expert, rank) sorted; ranks in ``[P - R, P)``."""
    n_replica_ranks: int = 0
    """R: the last R ranks host replicas only."""

    @property
    def n_expert_ranks(self):
        """Ranks hosting experts (replica ranks included): P - F."""
        return self.world_size - self.n_frontends

    @property
    def n_nodes(self):
        return int(self.nodes.max()) + 1

    @property
    def block_owner(self):
        """int32 [n_moe_layers, n_experts]: the block layout of this mode, F, K and
        G (``owner`` without load balancing)."""
        return _block_owner(self.n_frontends, self.n_groups, self.experts_per_rank,
                            self.cfg.n_moe_layers, self.cfg.n_experts)

    def is_frontend(self, rank):
        return 0 <= rank < self.n_frontends

    def rank_experts(self, rank):
        """(layer index in the model, expert) pairs hosted by ``rank`` (replicas
        included), sorted; empty for a front-end."""
        moe_idx, experts = np.nonzero(self.owner == rank)
        rep = self.replicas[self.replicas[:, 2] == rank]                  # replica ranks only
        pairs = zip(moe_idx.tolist() + rep[:, 0].tolist(), experts.tolist() + rep[:, 1].tolist())
        return sorted((self.cfg.n_dense_layers + m, e) for m, e in pairs)

    def layer_ranks(self, moe_idx):
        """Sorted ranks of MoE layer ``moe_idx``'s communicator: the front-ends and
        the ranks hosting that layer's experts (replicas included)."""
        rep = self.replicas[self.replicas[:, 0] == moe_idx, 2]
        hosts = np.unique(np.concatenate([self.owner[moe_idx], rep]))
        return list(range(self.n_frontends)) + [int(r) for r in hosts]

    def copy_ranks(self, moe_idx):
        """The ranks hosting each expert of MoE layer ``moe_idx``, primary first:
        (ranks int32 [E, C], n_copies int64 [E]); C is the most copies of one
        expert in the layer, columns past ``n_copies[e]`` repeat the primary."""
        E = self.cfg.n_experts
        rep = self.replicas[self.replicas[:, 0] == moe_idx]              # [x, 3] by expert
        n = 1 + np.bincount(rep[:, 1], minlength=E)                      # [E]
        out = np.repeat(self.owner[moe_idx][:, None], n.max(), axis=1)   # [E, C]
        nth = np.arange(len(rep)) - np.searchsorted(rep[:, 1], rep[:, 1])
        out[rep[:, 1], 1 + nth] = rep[:, 2]
        return out, n.astype(np.int64)

    def dispatch_keys(self, moe_idx):
        """Permute keys of MoE layer ``moe_idx``: (keys int64 [E, C], n_copies int64
        [E], K).  Copy c of expert e (columns as :meth:`copy_ranks`) has key
        ``position * K + slot``: position of its rank in :meth:`layer_ranks`, slot
        the expert's index among that rank's experts of the layer in expert order
        (the order :meth:`rank_experts` lists them and an expert rank loads them),
        K the most experts one rank hosts in the layer."""
        ranks, n = self.copy_ranks(moe_idx)                                  # [E, C]
        valid = np.arange(ranks.shape[1])[None, :] < n[:, None]              # [E, C]
        r, e = ranks[valid], np.nonzero(valid)[0]                            # [copies] each
        order = np.lexsort((e, r))                                           # by rank, expert
        slot = np.empty(len(r), dtype=np.int64)
        slot[order] = np.arange(len(r)) - np.searchsorted(r[order], r[order])
        k = int(slot.max()) + 1
        keys = np.empty(ranks.shape, dtype=np.int64)
        keys[valid] = np.searchsorted(self.layer_ranks(moe_idx), r) * k + slot
        keys[~valid] = np.broadcast_to(keys[:, :1], keys.shape)[~valid]
        return keys, n, k

    def replica_table(self):
        """The replicated pairs: list of ((layer index in the model, expert),
        [primary rank, replica ranks...]) in layer, expert order."""
        out = {}
        for m, e, r in self.replicas.tolist():
            key = (self.cfg.n_dense_layers + m, e)
            out.setdefault(key, [int(self.owner[m, e])]).append(r)
        return list(out.items())

    def weight_bytes(self):
        """int64 [world_size]: bytes of weights each rank holds (a front-end holds
        all non-expert weights, an expert rank its experts)."""
        cfg = self.cfg
        hosted = np.bincount(np.concatenate([self.owner.ravel(), self.replicas[:, 2]]),
                             minlength=self.world_size)                        # [P]
        out = hosted.astype(np.int64) * (cfg.expert_params * cfg.itemsize)
        out[:self.n_frontends] = cfg.nonexpert_params * cfg.itemsize
        return out

    def plan_hash(self):
        """16 hex digits of sha256 over the config, P, F, mode and ``owner``."""
        head = json.dumps({'config': json.loads(self.cfg.to_json()), 'world_size': self.world_size,
                           'n_frontends': self.n_frontends, 'mode': self.mode}, sort_keys=True)
        h = hashlib.sha256(head.encode())
        h.update(self.owner.astype('<i4').tobytes())
        if len(self.replicas):
            h.update(self.replicas.astype('<i4').tobytes())
        return h.hexdigest()[:16]

    def describe(self, full=False):
        """Human-readable summary; ``full`` lists every rank (and node loads) on
        its own line."""
        cfg, F, P = self.cfg, self.n_frontends, self.world_size
        lm, per_group = cfg.n_moe_layers, cfg.n_moe_layers // self.n_groups
        wb = self.weight_bytes()
        expert_wb = wb[F:]
        one = cfg.expert_params * cfg.itemsize
        hosted = expert_wb // one
        lines = [
            f'placement {self.mode} on {P} ranks: {_count(F, "front-end")} '
            f'({_labelled("rank", 0, F - 1)}) + {_count(self.n_expert_ranks, "expert rank")} '
            f'({_labelled("rank", F, P - 1)})' + self._replica_ranks_text(),
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
            return '\n'.join(lines + self._describe_ranks(wb) + self._describe_replicas(full)
                             + self._describe_loads(full))
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
        n_perm = int(self._permuted_layers().sum())
        if n_perm:
            lines.append(f'(the block layout; the stats permute the experts within '
                         f'{_count(n_perm, "MoE layer")}: --full lists each rank\'s experts)')
        return '\n'.join(lines + self._describe_replicas(full) + self._describe_loads(full))

    def _replica_ranks_text(self):
        """', of which 64 replica ranks (ranks 3904-3967)' or ''."""
        P, R = self.world_size, self.n_replica_ranks
        return f', of which {_count(R, "replica rank")} ({_labelled("rank", P - R, P - 1)})' \
            if R else ''

    def _describe_replicas(self, full):
        """The replica table (every pair with ``full``, else the first ones): lines."""
        if not self.n_replica_ranks:
            return []
        table, copies = self.replica_table(), _copies(self.replicas, self.owner.shape)
        per_copy = self.loads / copies                                    # [Lm, E]
        lines = [f'replicas: {_count(len(self.replicas), "replica")} of '
                 f'{_count(len(table), "hot (layer, expert) pair")} for the stats (copies '
                 f'share the tokens round-robin); busiest expert copy {self.loads.max():.6g} -> '
                 f'{per_copy.max():.6g} token copies, sum over layers of the busiest '
                 f'{self.loads.max(axis=1).sum():.6g} -> {per_copy.max(axis=1).sum():.6g}']
        shown = table if full or len(table) <= _MAX_BLOCK_LINES else table[:_MAX_BLOCK_LINES - 1]
        for (layer, e), ranks in shown:
            m = layer - self.cfg.n_dense_layers
            listed = ranks if full or len(ranks) <= 6 else ranks[:5] + ['...']
            lines.append(f'  layer {layer} expert {e}: {len(ranks)} copies on ranks '
                         f'{", ".join(map(str, listed))} (primary first), load '
                         f'{self.loads[m, e]:.6g}, {per_copy[m, e]:.6g} per copy')
        if len(shown) < len(table):
            lines.append(f'  ... {len(table) - len(shown)} more replicated pairs (--full lists '
                         'every one)')
        return lines

    def _permuted_layers(self):
        """bool [n_moe_layers]: layers whose experts differ from the block layout."""
        return (self.owner != self.block_owner).any(axis=1)

    def _describe_loads(self, full):
        """Node loads of the block and the balanced layout for ``loads``: lines."""
        if self.loads is None:
            return []
        block = node_inbound(self.block_owner, self.nodes, self.loads)    # [Lm, N]
        plan = self._node_loads()                                         # [Lm, N]
        hosts = np.unique(self.nodes[self.n_frontends:])                 # nodes with experts
        lines = ['node loads for the stats (token copies into a node per MoE layer; the '
                 'layers run one after the other):']
        ours = 'LPT + replicas' if self.n_replica_ranks else 'balanced (LPT)'
        for name, per in (('block layout', block), (ours, plan)):
            worst = per[:, hosts].max(axis=0)                     # [hosts] max over layers
            m, j = np.unravel_index(np.argmax(per), per.shape)
            lines.append(f'  {name + ":":16s}busiest node {per.max():.6g} (node {j}, layer '
                         f'{self.cfg.n_dense_layers + m}); sum over layers of the busiest '
                         f'node {per.max(axis=1).sum():.6g}; max/mean over nodes '
                         f'{worst.max() / max(worst.mean(), 1e-300):.3f}')
        lines.append(f'  {int(self._permuted_layers().sum())} of {self.cfg.n_moe_layers} MoE '
                     f'layers permuted: busiest node {_change(block.max(), plan.max())}, sum '
                     f'over layers {_change(block.max(axis=1).sum(), plan.max(axis=1).sum())}'
                     + ('' if full else ' (--full lists every rank and node)'))
        if full:
            lines += [f'  node {j}: block {block[:, j].max():.6g}, balanced {plan[:, j].max():.6g}'
                      for j in hosts]
        return lines

    def _node_loads(self):
        """Token copies into each node per MoE layer under this plan for ``loads``,
        a replicated expert's split evenly over its copies: float64 [Lm, N]."""
        rep = self.replicas
        share = self.loads / _copies(rep, self.owner.shape)                 # [Lm, E]
        out = node_inbound(self.owner, self.nodes, share)
        np.add.at(out, (rep[:, 0], self.nodes[rep[:, 2]]), share[rep[:, 0], rep[:, 1]])
        return out

    def _hosted_ranges(self, owner):
        """Per rank, the layer and expert ranges it hosts in ``owner`` (int [Lm, E]):
        four int64 [P] arrays (first layer, last layer, first expert, last expert;
        layers as model indices)."""
        P = self.world_size
        flat = owner.ravel()                                                 # [Lm*E]
        moe_idx, experts = np.indices(owner.shape).reshape(2, -1)            # [Lm*E] each
        layers = moe_idx + self.cfg.n_dense_layers
        lo_l, lo_e = np.full(P, np.iinfo(np.int64).max), np.full(P, np.iinfo(np.int64).max)
        hi_l, hi_e = np.full(P, -1), np.full(P, -1)
        np.minimum.at(lo_l, flat, layers)
        np.maximum.at(hi_l, flat, layers)
        np.minimum.at(lo_e, flat, experts)
        np.maximum.at(hi_e, flat, experts)
        return lo_l, hi_l, lo_e, hi_e

    def _blocks(self):
        """Runs of consecutive expert ranks of the block layout hosting the same
        layers and consecutive expert blocks: tuples (first rank, last rank, first
        layer, last layer, first expert, experts per rank); with ``loads`` the
        experts are then permuted within layers (see :meth:`_describe_loads`)."""
        lo_l, hi_l, lo_e, hi_e = (a.tolist() for a in self._hosted_ranges(self.block_owner))
        blocks = []
        for r in range(self.n_frontends, self.world_size - self.n_replica_ranks):
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
        rule = f'node = rank // {g}'
        if (self.nodes != np.arange(self.world_size) // g).any():
            shape, rule = f'{self.n_nodes}, at most {g} ranks each', 'the MPI node layout'
        return (f'nodes: {shape} ({rule}); front-ends on '
                f'{_labelled("node", 0, self.nodes[F - 1])}, expert ranks on '
                f'{_labelled("node", self.nodes[F], self.n_nodes - 1)}')

    def _describe_ranks(self, wb):
        """One line per rank: its node, what it hosts (ranges when they form a
        product of layer and expert ranges, else layer: experts lists), bytes."""
        lo_l, hi_l, lo_e, hi_e = self._hosted_ranges(self.owner)
        count = np.bincount(self.owner.ravel(), minlength=self.world_size)
        box = (count == (hi_l - lo_l + 1) * (hi_e - lo_e + 1)).tolist()
        lo_l, hi_l, lo_e, hi_e = (a.tolist() for a in (lo_l, hi_l, lo_e, hi_e))
        nodes = self.nodes.tolist()
        out = []
        for r in range(self.world_size):
            if r < self.n_frontends:
                what = 'front-end'
            elif r >= self.world_size - self.n_replica_ranks:
                what = 'replicas: ' + _pairs_text(self.rank_experts(r))
            elif box[r]:
                what = (f'{_labelled("layer", lo_l[r], hi_l[r])} '
                        f'{_labelled("expert", lo_e[r], hi_e[r])}')
            else:
                what = _pairs_text(self.rank_experts(r))
            out.append(f'rank {r} (node {nodes[r]}): {what}, {_size(wb[r])}')
        return out


def make_plan(cfg, world_size, mode='per-layer', n_frontends=None, gpus_per_node=None,
              loads=None, nodes=None, replicas=0):
    """The placement of ``cfg`` on ``world_size`` ranks.

    ``n_frontends=None`` picks the smallest F >= 1 for which the remaining ranks
    fit ``mode``; ``gpus_per_node=None`` puts every rank on one node, ``nodes``
    (int [world_size], e.g. :func:`mpimoe.parallel.mpiutil.node_ids`) gives the node of
    each rank instead.  ``loads`` (token copies per expert, [n_moe_layers,
    n_experts]) balances the node links; with ``replicas=R`` the last R ranks
    host replicas of hot experts (module docstring).  A world size or F that
    does not fit raises :class:`ConfigError` saying which fit.
    """
    name, k = parse_mode(mode)
    canonical = f'packed:{k}' if name == 'packed' else name
    P = _positive_int('world size', world_size)
    R = _positive_int('replicas', replicas, least=0)
    if R and loads is None:
        raise ConfigError('--replicas needs --stats: the expert loads of a previous run '
                          'say which experts are hot')
    nodes, gpn = _node_layout(P, gpus_per_node, nodes)
    E, lm = cfg.n_experts, cfg.n_moe_layers
    if E % k:
        raise ConfigError(f'placement {canonical}: K={k} must divide n_experts={E} '
                          f'(choose K in {_divisors(E)})')
    ranks_per_group = E // k
    groups = {'per-layer': [1], 'dedicated': [lm], 'packed': _divisors(lm)}[name]
    fits = [ranks_per_group * g for g in groups]                  # expert-rank counts, ascending

    # choose F (smallest fitting when automatic) and the matching G on the P - R
    # ranks that are not replica ranks
    base, extra = P - R, f' + {_count(R, "replica rank")}' if R else ''
    if n_frontends is None:
        usable = [n for n in fits if n <= base - 1]
        if not usable:
            raise ConfigError(f'placement {canonical} needs {_fits_text(fits, name, lm)} '
                              f'expert ranks + F front-ends{extra}: world size must be '
                              f'>= {fits[0] + 1 + R} (got {P})')
        F = base - usable[-1]
    else:
        F = _positive_int('n_frontends', n_frontends)
        if base - F not in fits:
            sizes = _or_list([F + n + R for n in fits])
            raise ConfigError(f'placement {canonical} needs {_fits_text(fits, name, lm)} '
                              f'expert ranks + {_count(F, "front-end")}{extra}: world size '
                              f'must be {sizes} (got {P})')
    G = (base - F) // ranks_per_group

    owner = _block_owner(F, G, k, lm, E)
    rep = np.zeros((0, 3), dtype=np.int32)                # (MoE layer, expert, rank) rows
    if loads is not None:
        loads = _check_loads(loads, cfg)
        rep = replicate(loads, R, k, k * lm // G).astype(np.int32)
        rep[:, 2] += base
        owner = _balance(owner, nodes, loads / _copies(rep, loads.shape))
        loads.flags.writeable = False
    for a in (owner, nodes, rep):
        a.flags.writeable = False
    return Plan(cfg=cfg, world_size=P, mode=canonical, n_frontends=F, experts_per_rank=k,
                n_groups=G, gpus_per_node=gpn, owner=owner, nodes=nodes, loads=loads,
                replicas=rep, n_replica_ranks=R)


def _node_layout(P, gpus_per_node, nodes):
    """(nodes int32 [P], ranks per node): the block layout of ``gpus_per_node``
    (None: one node), or the given ``nodes`` and the most ranks on one node."""
    if nodes is None:
        gpn = P if gpus_per_node is None else _positive_int('gpus_per_node', gpus_per_node)
        return (np.arange(P) // gpn).astype(np.int32), gpn
    a = np.asarray(nodes)
    if gpus_per_node is not None or a.shape != (P,) or a.dtype.kind not in 'iu' or \
            (a < 0).any():
        raise ConfigError(f'nodes must be {P} node indices >= 0 (and no gpus_per_node)')
    return a.astype(np.int32), int(np.bincount(a).max())


def _copies(rep, shape):
    """Copies of every (MoE layer, expert), primary included: int64 [Lm, E].
    rep: int [X, 3] replica rows (MoE layer, expert, rank)."""
    out = np.ones(shape, dtype=np.int64)
    np.add.at(out, (rep[:, 0], rep[:, 1]), 1)
    return out


def _block_owner(F, G, k, lm, E):
    """int32 [lm, E]: owner[m, e] = F + group(m) * E/K + e // K (module docstring)."""
    group = np.arange(lm) // (lm // G)                                    # [lm]
    return (F + group[:, None] * (E // k) + np.arange(E)[None, :] // k).astype(np.int32)


def _check_loads(loads, cfg):
    """loads as float64 [n_moe_layers, n_experts], finite and >= 0, else ConfigError."""
    shape = (cfg.n_moe_layers, cfg.n_experts)
    try:
        a = np.array(loads, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f'expert loads must be numbers [n_moe_layers, n_experts] = '
                          f'{list(shape)}') from None
    if a.shape != shape:
        raise ConfigError(f'expert loads have shape {list(a.shape)}; this model needs '
                          f'[n_moe_layers, n_experts] = {list(shape)}')
    if not np.isfinite(a).all() or (a < 0).any():
        raise ConfigError('expert loads must be finite and >= 0')
    return a


def _balance(owner, nodes, loads):
    """Per MoE layer, the LPT permutation of its experts over its slots where it
    beats the block layout.  owner: int32 [Lm, E]; nodes: int32 [P];
    loads: float64 [Lm, E] -> int32 [Lm, E]."""
    out = owner.copy()
    tol = 1e-9 * max(float(loads.sum()), 1.0)                    # float sums of equal sets
    for m, w in enumerate(loads):
        cand = _lpt_layer(owner[m], nodes, w)
        (n0, r0), (n1, r1) = _busiest(owner[m], nodes, w), _busiest(cand, nodes, w)
        if n1 < n0 - tol or (n1 <= n0 + tol and r1 < r0 - tol):
            out[m] = cand
    return out


def _busiest(row, nodes, w):
    """(busiest node, busiest rank) inbound copies of one layer.  row: int [E]
    ranks; w: float [E] copies per expert."""
    return (np.bincount(nodes[row], weights=w).max(), np.bincount(row, weights=w).max())


def _lpt_layer(row, nodes, w):
    """:func:`_pack` of one layer's experts over its slots: first over nodes, then
    over the ranks of each node.  row: int [E] ranks of the block layout (each rank as
    often as it has experts); w: float [E] -> int32 [E] new ranks."""
    ranks, cap = np.unique(row, return_counts=True)                   # [R] each
    node_ids, node_of_rank = np.unique(nodes[ranks], return_inverse=True)
    node_cap = np.bincount(node_of_rank, weights=cap).astype(np.int64)
    to_node = _pack(w, node_cap)                                      # [E]
    out = np.empty_like(row)
    for j in range(len(node_ids)):
        items = np.flatnonzero(to_node == j)
        here = np.flatnonzero(node_of_rank == j)
        out[items] = ranks[here[_pack(w[items], cap[here])]]
    return out


def _pack(w, capacity):
    """Items into bins of fixed capacity, heaviest bin as light as we can:
    :func:`_lpt`, then :func:`_swap_down`.  w: float [n]; capacity: int [B]
    summing to n -> int [n] bin of each item."""
    return _swap_down(w, _lpt(w, capacity), len(capacity))


def _swap_down(w, bins, n_bins):
    """Swap an item of the heaviest bin (lowest index on ties) with a lighter item
    elsewhere while that lowers the heaviest bin's load without making the other
    bin as heavy; the best swap first.  w: float [n]; bins: int [n] -> int [n]."""
    bins = bins.copy()
    tol = 1e-12 * max(float(w.sum()), 1.0)
    while True:
        load = np.bincount(bins, weights=w, minlength=n_bins)               # [B]
        b = int(np.argmax(load))
        mine, other = np.flatnonzero(bins == b), np.flatnonzero(bins != b)
        if not len(other):
            return bins
        d = w[mine][:, None] - w[other][None, :]                           # [|mine|, |other|]
        after = np.maximum(load[b] - d, load[bins[other]][None, :] + d)    # new max of the two
        i, j = np.unravel_index(np.argmin(after), after.shape)
        if not after[i, j] < load[b] - tol:
            return bins
        bins[mine[i]], bins[other[j]] = bins[other[j]], b


def _lpt(w, capacity):
    """Greedy LPT with capacities: heaviest item first (ties by index) to the bin
    of least load that has room (ties by lowest bin).  w: float [n];
    capacity: int [B] summing to n -> int [n] bin of each item."""
    load = np.zeros(len(capacity))
    room = np.array(capacity, dtype=np.int64)
    out = np.empty(len(w), dtype=np.int64)
    for i in np.argsort(-w, kind='stable'):
        b = int(np.argmin(np.where(room > 0, load, np.inf)))
        out[i] = b
        load[b] += w[i]
        room[b] -= 1
    return out


def node_inbound(owner, nodes, loads):
    """Token copies into each node per MoE layer: float64 [Lm, n_nodes].
    owner: int [Lm, E] ranks; nodes: int [P]; loads: float [Lm, E]."""
    n_nodes = int(nodes.max()) + 1
    return np.stack([np.bincount(nodes[row], weights=w, minlength=n_nodes)
                     for row, w in zip(owner, loads)])


def load_stats(path, cfg):
    """Expert loads from a run.json: ``expert_loads.counts`` as float64 [n_moe_layers,
    n_experts]; its ``layers`` must be ``cfg.moe_layers``.  Raises DataError."""
    from mpimoe.io.inputs import read_json
    doc = read_json(path, '--stats')
    el = doc.get('expert_loads') if isinstance(doc, dict) else None
    if not isinstance(el, dict) or 'counts' not in el:
        raise DataError(f'--stats {path}: no expert_loads.counts (expected the run.json '
                        f'written by `mpimoe run --metrics`)')
    if 'layers' in el and el['layers'] != cfg.moe_layers:
        raise DataError(f'--stats {path}: loads are for MoE layers {el["layers"]}, this '
                        f'model has {cfg.moe_layers}')
    try:
        return _check_loads(el['counts'], cfg)
    except ConfigError as e:
        raise DataError(f'--stats {path}: {e}') from None


def sbatch_script(plan, model_args, micro_batches=2, batch_tokens=None, stats=None):
    """A Slurm job script that runs ``plan``: one task per GPU, ``plan.gpus_per_node``
    per node, ``srun -K1 python -m mpi4py -m mpimoe run ... --placement MODE
    --frontends F``.  ``model_args`` (e.g. ``'--preset paper-61l'``) completes the
    `mpimoe plan` command recorded in a comment.  A plan made with loads needs
    ``stats``, the run.json they came from: the job passes it (and the replica
    count) to `mpimoe run`, which computes the same plan."""
    if (plan.loads is None) != (stats is None):
        raise ConfigError('sbatch_script: give stats exactly when the plan has loads')
    placement = [f'--placement {plan.mode}', f'--frontends {plan.n_frontends}']
    if stats is not None:
        placement.append(f'--stats {shlex.quote(stats)}')
    if plan.n_replica_ranks:
        placement.append(f'--replicas {plan.n_replica_ranks}')
    run = placement + [f'--micro-batches {_positive_int("micro_batches", micro_batches)}']
    if batch_tokens is not None:
        run.append(f'--batch-tokens {batch_tokens}')
    return _SBATCH.format(
        command=f'mpimoe plan {model_args} --gpus {plan.world_size} --gpus-per-node '
                f'{plan.gpus_per_node} {" ".join(placement)} --emit-sbatch FILE',
        summary=f'{plan.cfg.n_layers}-layer model, placement {plan.mode}: {plan.n_frontends} '
                f'front-ends + {plan.n_expert_ranks} expert ranks, plan hash {plan.plan_hash()}',
        nodes=plan.n_nodes, ntasks=plan.world_size, per_node=plan.gpus_per_node,
        run_options=' '.join(run))


#: The job script of :func:`sbatch_script` (slurm/mpimoe.sbatch is one).
_SBATCH = '''#!/bin/bash
# Written by: {command}
# {summary}
# (`mpimoe run` prints its plan hash: it must match this one.)
#
#   WEIGHTS=model.h5 INPUT=prompts.jsonl OUTPUT=out.h5 sbatch THIS_FILE
#
# How a long job survives its time limit:
#  - --signal=B:USR1@120 sends SIGUSR1 to this batch shell 120 s before the limit;
#  - the trap below forwards it to the job step (srun passes it to every task);
#  - mpimoe stops at the next step (forward pass), keeps the committed
#    rounds, writes this segment's run report and exits with 75;
#  - this script then requeues the job (--requeue), which reruns the same
#    command: it resumes after the last committed round; --open-mode=append
#    keeps one log across requeues.  A launcher that reports the clean stop
#    with another code is not trusted alone: the segment's report
#    ("outcome": "stopped") also requeues.
#  A job killed outright (node failure, scancel -9) resumes the same way when
#  resubmitted with the same OUTPUT: only the round in flight is lost.
#SBATCH --job-name=mpimoe
#SBATCH --nodes={nodes}
#SBATCH --ntasks={ntasks}
#SBATCH --ntasks-per-node={per_node}
#SBATCH --gpus-per-node={per_node}
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=mpimoe-%j.out

set -uo pipefail
WEIGHTS=${{WEIGHTS:?set WEIGHTS to the HDF5 weight file}}
INPUT=${{INPUT:?set INPUT to the token file (.jsonl or .h5)}}
OUTPUT=${{OUTPUT:-out.h5}}          # the same name on every requeue: that is what resumes
MAX_NEW_TOKENS=${{MAX_NEW_TOKENS:-64}}

# mpi4py must be built against the site MPI (README: "Install and test").
export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK
echo "mpimoe: job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) on $SLURM_JOB_NUM_NODES nodes"
# one run report per segment: a stale one never decides a requeue
METRICS="run-$SLURM_JOB_ID-${{SLURM_RESTART_COUNT:-0}}.json"

# -K1: end the whole step when one task fails; python -m mpi4py: an uncaught
# exception on any rank aborts all of them.
srun -K1 --cpu-bind=cores python -m mpi4py -m mpimoe run \\
    --weights "$WEIGHTS" --input "$INPUT" --output "$OUTPUT" \\
    {run_options} \\
    --max-new-tokens "$MAX_NEW_TOKENS" --metrics "$METRICS" \\
    --log-dir "logs-$SLURM_JOB_ID" &
step=$!
trap 'echo "mpimoe: time limit near, asking the job step to stop"; kill -USR1 "$step"' USR1
# `wait` returns early when the trap fires: wait again until the step has ended
while true; do
    wait "$step"; rc=$?
    kill -0 "$step" 2>/dev/null || break
done

if [ "$rc" -eq 75 ] || grep -q '"outcome": "stopped"' "$METRICS" 2>/dev/null; then
    echo "mpimoe: stopped cleanly; requeueing to resume"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
'''


def write_sbatch(path, text):
    """Write the job script ``text`` to ``path`` (atomically); an existing file
    is never replaced (DataError)."""
    from mpimoe.io.files import atomic_write, check_writable
    if os.path.exists(path):
        raise DataError(f'--emit-sbatch {path}: file exists; remove it or choose another '
                        f'name')
    check_writable(path, '--emit-sbatch', overwrite=False)
    with atomic_write(path) as tmp, open(tmp, 'w', encoding='utf-8') as f:
        f.write(text)


def _positive_int(what, v, least=1):
    """v as an int, or ConfigError unless it is an integer >= ``least``."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < least:
        raise ConfigError(f'{what}={v!r}: must be an integer >= {least}')
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


def _change(before, after):
    """'-28.1%' (relative change; '+0.0%' when before is 0)."""
    return f'{100 * (after / before - 1) if before else 0.0:+.1f}%'


def _pairs_text(pairs):
    """[(1, 5), (2, 2), (2, 7)] -> 'layer 1 expert 5; layer 2 experts 2, 7'."""
    by_layer = {}
    for layer, e in pairs:
        by_layer.setdefault(layer, []).append(str(e))
    return '; '.join(f'layer {layer} expert{"s" if len(es) > 1 else ""} {", ".join(es)}'
                     for layer, es in by_layer.items())


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
