"""The :class:`Plan`: which rank hosts which (MoE layer, expert), and what the
ranks ask of it (their experts, a layer's communicator, the dispatch keys, the
plan hash).  Built by :func:`mpimoe.planning.placement.make_plan`, whose
docstring gives the layouts; immutable, identical on every rank; no MPI.

    >>> from mpimoe.model.config import model_config
    >>> from mpimoe.planning.placement import make_plan
    >>> plan = make_plan(model_config('paper-61l'), 3904, 'dedicated', gpus_per_node=8)
    >>> plan.rank_experts(192), plan.layer_ranks(0)[190:194]
    ([(3, 0)], [190, 191, 192, 193])
"""

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from mpimoe.model.config import ModelConfig
from mpimoe.planning.describe import describe_plan
from mpimoe.planning.tensor_parallel import frontend_rank_params

__all__ = ['Plan', 'block_layout']


@dataclass(frozen=True, eq=False)
class Plan:
    """A placement of every (MoE layer, expert) on one rank; build with
    :func:`~mpimoe.planning.placement.make_plan`."""

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
    tp: int = 1
    """T: ranks per front-end group (tensor parallel); ``n_frontends`` counts
    ranks, F x T."""

    @property
    def n_frontend_groups(self):
        """F: front-end groups of :attr:`tp` ranks (the data-parallel width)."""
        return self.n_frontends // self.tp

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
        return block_layout(self.n_frontends, self.n_groups, self.experts_per_rank,
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
        all non-expert weights, or its group's share of them with ``tp`` > 1; an
        expert rank its experts)."""
        cfg = self.cfg
        hosted = np.bincount(np.concatenate([self.owner.ravel(), self.replicas[:, 2]]),
                             minlength=self.world_size)                        # [P]
        out = hosted.astype(np.int64) * (cfg.expert_params * cfg.itemsize)
        out[:self.n_frontends] = frontend_rank_params(cfg, self.tp) * cfg.itemsize
        return out

    def plan_hash(self):
        """16 hex digits of sha256 over the config, P, F, mode, T (when > 1) and
        ``owner``."""
        fields = {'config': json.loads(self.cfg.to_json()), 'world_size': self.world_size,
                  'n_frontends': self.n_frontends, 'mode': self.mode}
        if self.tp > 1:                                 # plans without TP keep their hashes
            fields['tp'] = self.tp
        head = json.dumps(fields, sort_keys=True)
        h = hashlib.sha256(head.encode())
        h.update(self.owner.astype('<i4').tobytes())
        if len(self.replicas):
            h.update(self.replicas.astype('<i4').tobytes())
        return h.hexdigest()[:16]


    def describe(self, full=False):
        """Human-readable summary (:func:`mpimoe.planning.describe.describe_plan`);
        ``full`` lists every rank (and node loads) on its own line."""
        return describe_plan(self, full)


def block_layout(F, G, k, lm, E):
    """int32 [lm, E]: owner[m, e] = F + group(m) * E/K + e // K (the block layout
    of :mod:`mpimoe.planning.placement`)."""
    group = np.arange(lm) // (lm // G)                                    # [lm]
    return (F + group[:, None] * (E // k) + np.arange(E)[None, :] // k).astype(np.int32)
