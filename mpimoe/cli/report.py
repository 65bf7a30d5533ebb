"""``mpimoe report run.json``: a readable summary of a run report, and plots.

The plots (expert-load heatmap, per-rank compute/wait/pack bars) need
matplotlib, an optional extra (``pip install -e ".[report]"``).
"""

import os

import numpy as np

from mpimoe.errors import DataError, UsageError
from mpimoe.io.files import read_json

__all__ = ['load_report', 'summarize', 'plot']

CATEGORIES = ('compute', 'wait', 'pack')


def load_report(path):
    """Read a run.json written by ``mpimoe run --metrics``."""
    report = read_json(path, 'run report')
    missing = [k for k in ('summary', 'expert_loads', 'ranks', 'placement') if k not in report]
    if missing:
        raise DataError(f'{path}: not an mpimoe run report (missing {", ".join(missing)})')
    return report


def summarize(report):
    """The report as plain text lines (a few dozen at most)."""
    s, p, loads = report['summary'], report['placement'], report['expert_loads']
    cfg = report.get('config', {})
    lines = [f'mpimoe {report.get("mpimoe_version", "?")}, '
             f'{report.get("versions", {}).get("mpi", "?")}',
             f'placement {p["mode"]} on {p["world_size"]} ranks: {p["frontends"]} front-ends, '
             f'{p["expert_ranks"]} expert ranks (plan {p["hash"]})',
             f'model: {cfg.get("n_layers", "?")} layers, {cfg.get("n_experts", "?")} experts, '
             f'top-{cfg.get("top_k", "?")}, d_model {cfg.get("d_model", "?")}', '']
    for key, label, unit in (('prefill_tokens_per_s', 'prefill', 'tokens/s'),
                             ('decode_tokens_per_s', 'decode', 'tokens/s'),
                             ('time_per_output_token_ms', 'time per output token', 'ms'),
                             ('tpot_p50_ms', 'TPOT p50', 'ms'), ('tpot_p90_ms', 'TPOT p90', 'ms'),
                             ('tpot_p99_ms', 'TPOT p99', 'ms'), ('mfu', 'MFU (estimate)', ''),
                             ('wall_s', 'wall', 's')):
        if s.get(key) is not None:
            lines.append(f'{label:>24}: {s[key]:.4g} {unit}')
    counts = np.asarray(loads['counts'], dtype=np.float64)
    lines += ['', 'expert loads per MoE layer (token copies; max/mean, idle experts):']
    for layer, row, ratio in zip(loads['layers'], counts, loads['max_over_mean']):
        lines.append(f'  layer {layer:>3}: total {int(row.sum()):>10}  max/mean {ratio:5.2f}  '
                     f'idle {int(np.sum(row == 0))}')
    lines += ['', 'seconds per rank (compute / wait / pack):']
    for role in ('front-end', 'expert'):
        ranks = [r for r in report['ranks'] if r.get('role') == role]
        if ranks:
            t = np.array([[r['category_s'].get(c, 0.0) for c in CATEGORIES] for r in ranks])
            lines.append(f'  {role + "s":>10} ({len(ranks)}): median '
                         + ' / '.join(f'{v:.3f}' for v in np.median(t, axis=0))
                         + '   max ' + ' / '.join(f'{v:.3f}' for v in t.max(axis=0)))
    return '\n'.join(lines)


def plot(report, outdir):
    """Write expert_loads.png and rank_times.png into ``outdir``; their paths."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError('plots need matplotlib: pip install -e ".[report]"') from None
    os.makedirs(outdir, exist_ok=True)
    loads = report['expert_loads']
    counts = np.asarray(loads['counts'], dtype=np.float64)
    fig, ax = plt.subplots(figsize=(max(4, counts.shape[1] * 0.25 + 2),
                                    max(3, counts.shape[0] * 0.25 + 1.5)))
    im = ax.imshow(counts, aspect='auto', cmap='viridis')
    ax.set_xlabel('expert')
    ax.set_ylabel('MoE layer')
    ax.set_yticks(range(len(loads['layers'])), [str(v) for v in loads['layers']])
    ax.set_title('token copies per expert')
    fig.colorbar(im, ax=ax)
    heat = os.path.join(outdir, 'expert_loads.png')
    fig.savefig(heat, dpi=100, bbox_inches='tight')
    plt.close(fig)

    ranks = report['ranks']
    t = np.array([[r['category_s'].get(c, 0.0) for c in CATEGORIES] for r in ranks])
    fig, ax = plt.subplots(figsize=(max(4, len(ranks) * 0.3 + 2), 3.5))
    bottom = np.zeros(len(ranks))
    for j, c in enumerate(CATEGORIES):
        ax.bar(range(len(ranks)), t[:, j], bottom=bottom, label=c)
        bottom += t[:, j]
    ax.set_xlabel('rank')
    ax.set_ylabel('seconds')
    ax.set_title('time per rank')
    ax.legend()
    bars = os.path.join(outdir, 'rank_times.png')
    fig.savefig(bars, dpi=100, bbox_inches='tight')
    plt.close(fig)
    return heat, bars
