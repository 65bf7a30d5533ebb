"""Making placement plans: which rank hosts which (MoE layer, expert) for a mode,
a world size and (optionally) the expert loads of a previous run.

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
run.json, :func:`mpimoe.planning.stats.load_stats`), :func:`make_plan` permutes
the experts *within* each MoE layer over that layer's slots so that the busiest
node receives as few token copies as we can find
(:func:`mpimoe.planning.topology.balance_layers`: greedy LPT, then swaps); a
layer keeps the block layout above unless that is strictly better.  Copies
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

import numpy as np

from mpimoe.errors import ConfigError
from mpimoe.planning.balance import replicate
from mpimoe.planning.plan import Plan, block_layout
from mpimoe.planning.stats import check_loads
from mpimoe.planning.tensor_parallel import check_tp
from mpimoe.planning.text import or_list, plural
from mpimoe.planning.topology import balance_layers, copy_loads

__all__ = ['make_plan', 'parse_mode', 'positive_int']


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


def make_plan(cfg, world_size, mode='per-layer', n_frontends=None, gpus_per_node=None,
              loads=None, nodes=None, replicas=0, tp=1):
    """The placement of ``cfg`` on ``world_size`` ranks.

    ``n_frontends=None`` picks the smallest F >= 1 for which the remaining ranks
    fit ``mode``; ``gpus_per_node=None`` puts every rank on one node, ``nodes``
    (int [world_size], e.g. :func:`mpimoe.parallel.mpiutil.node_ids`) gives the node of
    each rank instead.  ``loads`` (token copies per expert, [n_moe_layers,
    n_experts]) balances the node links; with ``replicas=R`` the last R ranks
    host replicas of hot experts (module docstring).  With ``tp=T`` every
    front-end is a group of T ranks on one node (F groups: F x T front-end
    ranks; mpimoe.planning.tensor_parallel).  A world size, F or T that does
    not fit raises :class:`ConfigError` saying which fit.
    """
    name, k = parse_mode(mode)
    canonical = f'packed:{k}' if name == 'packed' else name
    P = positive_int('world size', world_size)
    R = positive_int('replicas', replicas, least=0)
    if R and loads is None:
        raise ConfigError('--replicas needs --stats: the expert loads of a previous run '
                          'say which experts are hot')
    check_tp(cfg, tp)
    T = tp
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
    base, extra = P - R, f' + {plural(R, "replica rank")}' if R else ''
    groups_of = '' if T == 1 else f' of {T} ranks'
    if n_frontends is None:
        usable = [n for n in fits if n <= base - T and (base - n) % T == 0]
        if not usable:
            more = '' if T == 1 else f' (F x {T} front-end ranks)'
            raise ConfigError(f'placement {canonical} needs {_fits_text(fits, name, lm)} '
                              f'expert ranks + F front-ends{groups_of}{more}{extra}: world '
                              f'size must be >= {fits[0] + T + R}' +
                              ('' if T == 1 else f' and exceed an expert-rank count by a '
                               f'multiple of {T}') + f' (got {P})')
        F = base - usable[-1]
    else:
        F = positive_int('n_frontends', n_frontends) * T
        if base - F not in fits:
            sizes = or_list([F + n + R for n in fits])
            raise ConfigError(f'placement {canonical} needs {_fits_text(fits, name, lm)} '
                              f'expert ranks + {plural(F // T, "front-end")}{groups_of}'
                              f'{extra}: world size must be {sizes} (got {P})')
    _check_groups_on_nodes(nodes, F, T, gpn)
    G = (base - F) // ranks_per_group

    owner = block_layout(F, G, k, lm, E)
    rep = np.zeros((0, 3), dtype=np.int32)                # (MoE layer, expert, rank) rows
    if loads is not None:
        loads = check_loads(loads, cfg)
        rep = replicate(loads, R, k, k * lm // G).astype(np.int32)
        rep[:, 2] += base
        owner = balance_layers(owner, nodes, copy_loads(loads, rep))
        loads.flags.writeable = False
    for a in (owner, nodes, rep):
        a.flags.writeable = False
    return Plan(cfg=cfg, world_size=P, mode=canonical, n_frontends=F, experts_per_rank=k,
                n_groups=G, gpus_per_node=gpn, owner=owner, nodes=nodes, loads=loads,
                replicas=rep, n_replica_ranks=R, tp=T)


def _check_groups_on_nodes(nodes, F, T, gpn):
    """ConfigError unless each front-end group (ranks [g*T, (g+1)*T)) is on one node."""
    if T == 1:
        return
    split = [g for g in range(F // T) if len(set(nodes[g * T:(g + 1) * T].tolist())) > 1]
    if split:
        g = split[0]
        raise ConfigError(f'--tp {T}: front-end group {g} (ranks {g * T}-{(g + 1) * T - 1}) '
                          f'would straddle nodes {sorted(set(nodes[g * T:(g + 1) * T].tolist()))}'
                          f'; a group must be on one node: choose --tp dividing the GPUs per '
                          f'node ({gpn})')


def _node_layout(P, gpus_per_node, nodes):
    """(nodes int32 [P], ranks per node): the block layout of ``gpus_per_node``
    (None: one node), or the given ``nodes`` and the most ranks on one node."""
    if nodes is None:
        gpn = P if gpus_per_node is None else positive_int('gpus_per_node', gpus_per_node)
        return (np.arange(P) // gpn).astype(np.int32), gpn
    a = np.asarray(nodes)
    if gpus_per_node is not None or a.shape != (P,) or a.dtype.kind not in 'iu' or \
            (a < 0).any():
        raise ConfigError(f'nodes must be {P} node indices >= 0 (and no gpus_per_node)')
    return a.astype(np.int32), int(np.bincount(a).max())


def positive_int(what, v, least=1):
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
    return f'{or_list(fits)} ({fits[0]} per layer group, G dividing {lm} MoE layers)'
