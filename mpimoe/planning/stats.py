"""Expert loads for balancing: read from a previous run's run.json and checked
against the model (token copies per (MoE layer, expert), float64 [Lm, E])."""

import numpy as np

from mpimoe.errors import ConfigError, DataError

__all__ = ['load_stats', 'check_loads']


def load_stats(path, cfg):
    """Expert loads from a run.json: ``expert_loads.counts`` as float64 [n_moe_layers,
    n_experts]; its ``layers`` must be ``cfg.moe_layers``.  Raises DataError."""
    from mpimoe.io.files import read_json
    doc = read_json(path, '--stats')
    el = doc.get('expert_loads') if isinstance(doc, dict) else None
    if not isinstance(el, dict) or 'counts' not in el:
        raise DataError(f'--stats {path}: no expert_loads.counts (expected the run.json '
                        f'written by `mpimoe run --metrics`)')
    if 'layers' in el and el['layers'] != cfg.moe_layers:
        raise DataError(f'--stats {path}: loads are for MoE layers {el["layers"]}, this '
                        f'model has {cfg.moe_layers}')
    try:
        return check_loads(el['counts'], cfg)
    except ConfigError as e:
        raise DataError(f'--stats {path}: {e}') from None


def check_loads(loads, cfg):
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
