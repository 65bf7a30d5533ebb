"""run.json: what ``mpimoe run --metrics`` reports, and the summary line.

Gathered on rank 0 after the last step: every front-end's steps (time,
tokens, FLOPs), the expert loads per step, bytes moved per layer, per-rank
times by category, the placement, versions and how the run ended.
"""

import json
import logging
import platform
import time
from dataclasses import asdict

import numpy as np

from mpimoe import __version__
from mpimoe.backends.backend import DTYPES
from mpimoe.io.files import write_json
from mpimoe.parallel.mpiutil import MPI, wait_all
from mpimoe.planning.balance import BIAS_RULE, max_over_mean

__all__ = ['timed_peak', 'pass_summary', 'balance_report', 'finish_report']

log = logging.getLogger('mpimoe')


def timed_peak(opts, world, backend):
    """Rank 0's GEMM rate (run.json's MFU: with --metrics only), timed while
    the others sleep; None on the other ranks and without --metrics."""
    if not opts.metrics:
        return None
    idle = world.Ibarrier()
    peak = _peak_tflops(backend) if world.rank == 0 else None
    wait_all([idle], opts.deadline, lambda: 'rank 0 to finish its report')
    return peak


def _peak_tflops(backend, repeats=3):
    """This rank's GEMM rate, TFLOP/s (best of ``repeats`` n x n products):
    FP32, n = 512 on the CPU (as fast per FLOP as 1024 with OpenBLAS, an
    eighth of the time); BF16, n = 8192 on a GPU (its practical peak)."""
    n, dtype = (8192, DTYPES['bfloat16']) if backend.is_gpu else (512, np.float32)
    rng = backend.xp.random.default_rng(0)
    a = (rng.standard_normal((n, n), dtype=np.float32) * np.float32(n ** -0.5)).astype(dtype)
    best = float('inf')
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        a @ a
        backend.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e12


def pass_summary(fronts):
    """Throughput and latency from every front-end's steps.

    fronts: per front-end, a list of steps (seconds, prompt tokens, generated
    tokens, FLOPs).  Front-ends run side by side: tokens add up, time is the
    busiest one's.  A step mixes prefill and decode, so both rates are over
    the same busy time.
    """
    per = [np.array(f or np.zeros((0, 4)), dtype=np.float64).reshape(-1, 4) for f in fronts]
    busy = max(p[:, 0].sum() for p in per)
    out = {'steps': int(max(len(p) for p in per)), 'busy_s': float(busy),
           'prefill_tokens': int(sum(p[:, 1].sum() for p in per)),
           'decode_tokens': int(sum(p[:, 2].sum() for p in per)),
           'flops': float(sum(p[:, 3].sum() for p in per))}
    for kind in ('prefill', 'decode'):
        out[f'{kind}_tokens_per_s'] = out[f'{kind}_tokens'] / busy if busy > 0 else None
    steps = np.concatenate(per)
    steps = 1e3 * steps[steps[:, 2] > 0, 0]       # ms per step that generated tokens
    for q in (50, 90, 99):
        out[f'tpot_p{q}_ms'] = float(np.percentile(steps, q)) if len(steps) else None
    out['time_per_output_token_ms'] = out['tpot_p50_ms']
    return out


def balance_report(opts, loads, shape, bias):
    """run.json's ``balance``: the policy, the final gate bias (None when off) and,
    per window of ``history_every`` steps (``balance_every``, doubled each time a
    long run's windows were merged; the last may be shorter), the max/mean
    expert load of every MoE layer.  loads: mpimoe.runtime.loads.LoadHistory;
    shape: [Lm, E]."""
    return {'mode': opts.balance, 'every': opts.balance_every, 'step': opts.balance_step,
            'clip': opts.balance_clip, 'rule': BIAS_RULE, 'bias': bias,
            'history_every': loads.width,
            'max_over_mean_history': max_over_mean(loads.history(shape)).tolist()}


def finish_report(opts, cfg, plan, world, reports, seconds, peak_tflops, backend, threads,
                   segment):
    """Rank 0: print the summary and write run.json (backend: _backend_report,
    threads: mpimoe.runtime.engine; peak_tflops None without --metrics;
    segment: mpimoe.runtime.role.Role.segment, how this run ended)."""
    r0 = reports[0]
    summary = pass_summary([r['passes'] for r in reports if r['role'] == 'front-end'])
    busy, flops = summary['busy_s'], summary['flops']
    summary.update(wall_s=seconds, achieved_tflops=flops / busy / 1e12 if busy else None,
                   peak_tflops_per_rank=peak_tflops,
                   peak_source='BF16 GEMM timed on rank 0 (GPU)' if backend['name'] == 'cupy'
                   else 'FP32 GEMM timed on rank 0 (CPU backend)')
    # the processors the peak is counted over: the GPUs in use (ranks sharing a
    # GPU share its peak), on the CPU backend every rank
    summary['mfu_devices'] = backend.get('gpus_used') or world.size
    summary['mfu'] = summary['achieved_tflops'] / (peak_tflops * summary['mfu_devices']) \
        if busy and peak_tflops else None
    shape = (cfg.n_moe_layers, cfg.n_experts)
    loads = r0['loads'].total if r0['loads'].steps else np.zeros(shape, np.int64)   # [Lm, E]
    report = {
        'mpimoe_version': __version__,
        'versions': {'mpi': MPI.Get_library_version().splitlines()[0].strip(),
                     'mpi4py': __import__('mpi4py').__version__, 'numpy': np.__version__,
                     'python': platform.python_version()},
        'config': json.loads(cfg.to_json()),
        'options': asdict(opts),
        'backend': backend,
        'segment': segment,
        'threads': threads,
        'placement': {'mode': plan.mode, 'world_size': world.size,
                      'frontends': plan.n_frontends, 'expert_ranks': plan.n_expert_ranks,
                      'experts_per_rank': plan.experts_per_rank, 'hash': plan.plan_hash(),
                      'stats': opts.stats, 'replica_ranks': plan.n_replica_ranks,
                      'replicas': [[layer, e, ranks] for (layer, e), ranks in
                                   plan.replica_table()]},
        'summary': summary,
        'expert_loads': {'layers': cfg.moe_layers, 'counts': loads.tolist(),
                         'max_over_mean': max_over_mean(loads).tolist()},
        'balance': balance_report(opts, r0['loads'], shape, r0['bias']),
        'bytes_per_layer': r0['bytes_per_layer'],
        'bytes_per_s_per_layer': [b / busy if busy else None for b in r0['bytes_per_layer']],
        'ranks': [{k: v for k, v in r.items() if k not in ('passes', 'loads',
                                                            'bytes_per_layer', 'bias')}
                  for r in reports],
    }
    rate = lambda v: 'n/a' if v is None else f'{v:.0f}'  # noqa: E731
    log.info(f'prefill {rate(summary["prefill_tokens_per_s"])} tokens/s, decode '
             f'{rate(summary["decode_tokens_per_s"])} tokens/s, wall {seconds:.2f} s'
             + (f' -> {opts.output}' if segment['outcome'] == 'complete' else ''))
    if opts.metrics:
        write_json(opts.metrics, report)
