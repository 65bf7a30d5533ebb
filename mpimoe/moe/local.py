"""The dispatcher of the reference: every expert in this process.

Rows are permuted as FP32 values rounded to 16 bits, exactly the values the
distributed engine puts on the wire, and each expert runs on its block at
dispatch time; combine hands the result back.  Same arithmetic, same order
as the MPI dispatcher (mpimoe.parallel.dispatcher).
"""

from mpimoe.backends.backend import round16
from mpimoe.moe.experts import permute, run_experts
from mpimoe.moe.layer import MoELayer

__all__ = ['LocalDispatcher', 'moe_local']


class LocalDispatcher:
    """experts: layer index in the model -> list of E weight dicts (float32)."""

    def __init__(self, cfg, experts):
        self.cfg, self.experts = cfg, experts
        self.results = {}           # micro-batch -> expert rows [T*k, d] until combined

    def keys(self, layer, chosen):
        """A token copy's key is its expert: (chosen int [T, k], E)."""
        return chosen, self.cfg.n_experts

    def dispatch(self, handle, h, key, n_keys):
        """Permute h [T, d] by expert and run every expert on its rows now;
        returns the permutation order [T*k]."""
        if not handle.n_rows:
            return None
        cfg = self.cfg
        rows, order, counts = permute(round16(h, cfg.dtype), key, n_keys)
        self.results[handle.mb] = run_experts(rows, counts, self.experts[handle.layer],
                                              cfg.expert_kind, cfg.dtype)
        return order

    def combine(self, handle):
        """The expert rows of ``handle``'s micro-batch: float32 [T*k, d]."""
        return self.results.pop(handle.mb, None)


def moe_local(h, w_router, experts, cfg, bias=None):
    """One MoE layer with all experts here, on its own (tests, benchmarks).

    h: float32 [T, d] (normed FFN input); w_router: [d, E]; experts: list of E
    weight dicts; bias: optional [E].  Returns (out float32 [T, d], counts
    int64 [E] token copies per expert).
    """
    layer = MoELayer(0, w_router, cfg, LocalDispatcher(cfg, {0: experts}))
    layer.bias = bias
    out = layer.combine(layer.dispatch(h, 0), 0)
    return out, layer.take_counts()
