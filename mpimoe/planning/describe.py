"""``mpimoe plan``'s summary of a :class:`~mpimoe.planning.plan.Plan`: ranks per
role, nodes, weights per rank, the blocks of expert ranks (or, with ``full``,
every rank), replicas and the node loads for the stats.

    >>> from mpimoe.model.config import model_config
    >>> from mpimoe.planning.placement import make_plan
    >>> print(describe_plan(make_plan(model_config('tiny'), 9)).splitlines()[-1])
    ranks 1-8: expert e = rank-1 of layers 1-3
"""

import numpy as np

from mpimoe.planning.text import MB, change, labelled, plural, size_text, span
from mpimoe.planning.topology import copy_loads, node_inbound

__all__ = ['describe_plan']

#: ``describe_plan()`` lists at most this many expert-rank blocks before eliding.
_MAX_BLOCK_LINES = 12


def describe_plan(plan, full=False):
    """Human-readable summary of ``plan`` (a :class:`~mpimoe.planning.plan.Plan`);
    ``full`` lists every rank (and node loads) on its own line."""
    cfg, F, P = plan.cfg, plan.n_frontends, plan.world_size
    lm, per_group = cfg.n_moe_layers, cfg.n_moe_layers // plan.n_groups
    wb = plan.weight_bytes()
    expert_wb = wb[F:]
    one = cfg.expert_params * cfg.itemsize
    hosted = expert_wb // one
    lines = [
        f'placement {plan.mode} on {P} ranks: {plural(F, "front-end")} '
        f'({labelled("rank", 0, F - 1)}) + {plural(plan.n_expert_ranks, "expert rank")} '
        f'({labelled("rank", F, P - 1)})' + _replica_ranks_text(plan),
        f'model: {cfg.n_layers} layers = {cfg.n_dense_layers} dense + {lm} MoE '
        f'(layers {span(cfg.n_dense_layers, cfg.n_layers - 1)}), {cfg.n_experts} experts '
        f'each, {lm * cfg.n_experts} (layer, expert) pairs',
        f'K = {plural(plan.experts_per_rank, "expert")} per rank per MoE layer, G = '
        f'{plural(plan.n_groups, "layer group")} of {plural(per_group, "MoE layer")}',
        _describe_nodes(plan),
        _frontend_weights_text(plan, wb[0]),
        f'weights per expert rank: max {size_text(expert_wb.max())}, '
        f'{plural(int(hosted.max()), "expert")}; min {size_text(expert_wb.min())}, '
        f'{plural(int(hosted.min()), "expert")}; one expert = {one / MB:.2f} MB',
        f'weights in total: {size_text(wb.sum())}',
        f'plan hash: {plan.plan_hash()}',
    ]
    if full:
        return '\n'.join(lines + _describe_ranks(plan, wb) + _describe_replicas(plan, full)
                         + _describe_loads(plan, full))
    lines.append(f'{labelled("rank", 0, F - 1)}: {"front-end" if F == 1 else "front-ends"}'
                 + ('' if plan.tp == 1 else f' in groups of {plan.tp} (group g: ranks '
                    f'{plan.tp}g-{plan.tp}g+{plan.tp - 1})'))
    blocks = _blocks(plan)
    if len(blocks) > _MAX_BLOCK_LINES:
        head, tail = blocks[:_MAX_BLOCK_LINES - 2], blocks[-2:]
        mid = blocks[len(head):-2]
        lines += [_block_line(*b) for b in head]
        lines.append(f'... {len(mid)} more blocks of the same form: ranks '
                     f'{span(mid[0][0], mid[-1][1])}, layers '
                     f'{span(mid[0][2], mid[-1][3])} (--full lists every rank)')
        lines += [_block_line(*b) for b in tail]
    else:
        lines += [_block_line(*b) for b in blocks]
    n_perm = int(_permuted_layers(plan).sum())
    if n_perm:
        lines.append(f'(the block layout; the stats permute the experts within '
                     f'{plural(n_perm, "MoE layer")}: --full lists each rank\'s experts)')
    return '\n'.join(lines + _describe_replicas(plan, full) + _describe_loads(plan, full))


def _replica_ranks_text(plan):
    """', of which 64 replica ranks (ranks 3904-3967)' or ''."""
    P, R = plan.world_size, plan.n_replica_ranks
    return f', of which {plural(R, "replica rank")} ({labelled("rank", P - R, P - 1)})' \
        if R else ''


def _describe_replicas(plan, full):
    """The replica table (every pair with ``full``, else the first ones): lines."""
    if not plan.n_replica_ranks:
        return []
    table = plan.replica_table()
    per_copy = copy_loads(plan.loads, plan.replicas)                  # [Lm, E]
    lines = [f'replicas: {plural(len(plan.replicas), "replica")} of '
             f'{plural(len(table), "hot (layer, expert) pair")} for the stats (copies '
             f'share the tokens round-robin); busiest expert copy {plan.loads.max():.6g} -> '
             f'{per_copy.max():.6g} token copies, sum over layers of the busiest '
             f'{plan.loads.max(axis=1).sum():.6g} -> {per_copy.max(axis=1).sum():.6g}']
    shown = table if full or len(table) <= _MAX_BLOCK_LINES else table[:_MAX_BLOCK_LINES - 1]
    for (layer, e), ranks in shown:
        m = layer - plan.cfg.n_dense_layers
        listed = ranks if full or len(ranks) <= 6 else ranks[:5] + ['...']
        lines.append(f'  layer {layer} expert {e}: {len(ranks)} copies on ranks '
                     f'{", ".join(map(str, listed))} (primary first), load '
                     f'{plan.loads[m, e]:.6g}, {per_copy[m, e]:.6g} per copy')
    if len(shown) < len(table):
        lines.append(f'  ... {len(table) - len(shown)} more replicated pairs (--full lists '
                     'every one)')
    return lines


def _permuted_layers(plan):
    """bool [n_moe_layers]: layers whose experts differ from the block layout."""
    return (plan.owner != plan.block_owner).any(axis=1)


def _describe_loads(plan, full):
    """Node loads of the block and the balanced layout for ``loads``: lines."""
    if plan.loads is None:
        return []
    block = node_inbound(plan.block_owner, plan.nodes, plan.loads)    # [Lm, N]
    balanced = _node_loads(plan)                                      # [Lm, N]
    hosts = np.unique(plan.nodes[plan.n_frontends:])                 # nodes with experts
    lines = ['node loads for the stats (token copies into a node per MoE layer; the '
             'layers run one after the other):']
    ours = 'LPT + replicas' if plan.n_replica_ranks else 'balanced (LPT)'
    for name, per in (('block layout', block), (ours, balanced)):
        worst = per[:, hosts].max(axis=0)                     # [hosts] max over layers
        m, j = np.unravel_index(np.argmax(per), per.shape)
        lines.append(f'  {name + ":":16s}busiest node {per.max():.6g} (node {j}, layer '
                     f'{plan.cfg.n_dense_layers + m}); sum over layers of the busiest '
                     f'node {per.max(axis=1).sum():.6g}; max/mean over nodes '
                     f'{worst.max() / max(worst.mean(), 1e-300):.3f}')
    lines.append(f'  {int(_permuted_layers(plan).sum())} of {plan.cfg.n_moe_layers} MoE '
                 f'layers permuted: busiest node {change(block.max(), balanced.max())}, sum '
                 f'over layers {change(block.max(axis=1).sum(), balanced.max(axis=1).sum())}'
                 + ('' if full else ' (--full lists every rank and node)'))
    if full:
        lines += [f'  node {j}: block {block[:, j].max():.6g}, balanced '
                  f'{balanced[:, j].max():.6g}' for j in hosts]
    return lines


def _node_loads(plan):
    """Token copies into each node per MoE layer under ``plan`` for its ``loads``,
    a replicated expert's split evenly over its copies: float64 [Lm, N]."""
    rep = plan.replicas
    share = copy_loads(plan.loads, rep)                                 # [Lm, E]
    out = node_inbound(plan.owner, plan.nodes, share)
    np.add.at(out, (rep[:, 0], plan.nodes[rep[:, 2]]), share[rep[:, 0], rep[:, 1]])
    return out


def _hosted_ranges(plan, owner):
    """Per rank, the layer and expert ranges it hosts in ``owner`` (int [Lm, E]):
    four int64 [P] arrays (first layer, last layer, first expert, last expert;
    layers as model indices)."""
    P = plan.world_size
    flat = owner.ravel()                                                 # [Lm*E]
    moe_idx, experts = np.indices(owner.shape).reshape(2, -1)            # [Lm*E] each
    layers = moe_idx + plan.cfg.n_dense_layers
    lo_l, lo_e = np.full(P, np.iinfo(np.int64).max), np.full(P, np.iinfo(np.int64).max)
    hi_l, hi_e = np.full(P, -1), np.full(P, -1)
    np.minimum.at(lo_l, flat, layers)
    np.maximum.at(hi_l, flat, layers)
    np.minimum.at(lo_e, flat, experts)
    np.maximum.at(hi_e, flat, experts)
    return lo_l, hi_l, lo_e, hi_e


def _blocks(plan):
    """Runs of consecutive expert ranks of the block layout hosting the same
    layers and consecutive expert blocks: tuples (first rank, last rank, first
    layer, last layer, first expert, experts per rank); with ``loads`` the
    experts are then permuted within layers (see :func:`_describe_loads`)."""
    lo_l, hi_l, lo_e, hi_e = (a.tolist() for a in _hosted_ranges(plan, plan.block_owner))
    blocks = []
    for r in range(plan.n_frontends, plan.world_size - plan.n_replica_ranks):
        k = hi_e[r] - lo_e[r] + 1
        if blocks:
            a, b, l0, l1, e0, kb = blocks[-1]
            if (l0, l1, kb) == (lo_l[r], hi_l[r], k) and lo_e[r] == e0 + (b + 1 - a) * k:
                blocks[-1] = (a, r, l0, l1, e0, k)
                continue
        blocks.append((r, r, lo_l[r], hi_l[r], lo_e[r], k))
    return blocks


def _frontend_weights_text(plan, nbytes):
    """The weights line of a front-end rank: all non-expert weights, or with
    --tp its share of them."""
    if plan.tp == 1:
        return f'weights per front-end (all non-expert weights): {size_text(nbytes)}'
    whole = plan.cfg.nonexpert_params * plan.cfg.itemsize
    return (f'front-ends: {plural(plan.n_frontend_groups, "group")} of {plan.tp} ranks '
            f'(tensor parallel, one node each); weights per front-end rank: '
            f'{size_text(nbytes)} (1/{plan.tp} of the split non-expert weights, '
            f'{size_text(whole)} in all, + the norms and routers every rank holds)')


def _describe_nodes(plan):
    g, F = plan.gpus_per_node, plan.n_frontends
    last = plan.world_size - (plan.n_nodes - 1) * g
    shape = (f'{plan.n_nodes} x {g} ranks' if last == g else
             f'{plan.n_nodes} ({g} ranks each, {last} on the last)')
    rule = f'node = rank // {g}'
    if (plan.nodes != np.arange(plan.world_size) // g).any():
        shape, rule = f'{plan.n_nodes}, at most {g} ranks each', 'the MPI node layout'
    return (f'nodes: {shape} ({rule}); front-ends on '
            f'{labelled("node", 0, plan.nodes[F - 1])}, expert ranks on '
            f'{labelled("node", plan.nodes[F], plan.n_nodes - 1)}')


def _describe_ranks(plan, wb):
    """One line per rank: its node, what it hosts (ranges when they form a
    product of layer and expert ranges, else layer: experts lists), bytes."""
    lo_l, hi_l, lo_e, hi_e = _hosted_ranges(plan, plan.owner)
    count = np.bincount(plan.owner.ravel(), minlength=plan.world_size)
    box = (count == (hi_l - lo_l + 1) * (hi_e - lo_e + 1)).tolist()
    lo_l, hi_l, lo_e, hi_e = (a.tolist() for a in (lo_l, hi_l, lo_e, hi_e))
    nodes = plan.nodes.tolist()
    out = []
    for r in range(plan.world_size):
        if r < plan.n_frontends:
            what = 'front-end'
        elif r >= plan.world_size - plan.n_replica_ranks:
            what = 'replicas: ' + _pairs_text(plan.rank_experts(r))
        elif box[r]:
            what = (f'{labelled("layer", lo_l[r], hi_l[r])} '
                    f'{labelled("expert", lo_e[r], hi_e[r])}')
        else:
            what = _pairs_text(plan.rank_experts(r))
        out.append(f'rank {r} (node {nodes[r]}): {what}, {size_text(wb[r])}')
    return out


def _pairs_text(pairs):
    """[(1, 5), (2, 2), (2, 7)] -> 'layer 1 expert 5; layer 2 experts 2, 7'."""
    by_layer = {}
    for layer, e in pairs:
        by_layer.setdefault(layer, []).append(str(e))
    return '; '.join(f'layer {layer} expert{"s" if len(es) > 1 else ""} {", ".join(es)}'
                     for layer, es in by_layer.items())


def _block_line(a, b, l0, l1, e0, k):
    """One run of expert ranks from :func:`_blocks`, e.g.
    ``ranks 192-255: layer 3 experts 0-63 (one each)``."""
    ranks, layers = labelled('rank', a, b), labelled('layer', l0, l1)
    if a == b:
        return f'{ranks}: {layers} experts {span(e0, e0 + k - 1)}'
    if k > 1:
        e1 = e0 + (b - a + 1) * k - 1
        return (f'{ranks}: {layers}, experts {e0}-{e1} in blocks of {k} (rank {a}: '
                f'{e0}-{e0 + k - 1}, ..., rank {b}: {e1 - k + 1}-{e1})')
    if l0 == l1:
        return f'{ranks}: {layers} experts {span(e0, e0 + b - a)} (one each)'
    shift = f'rank-{a - e0}' if a >= e0 else f'rank+{e0 - a}'
    return f'{ranks}: expert e = {shift} of {layers}'
