"""The ``mpimoe`` command: argparse subcommands, one handler each.

Handlers import their modules lazily, so ``mpimoe plan`` or ``mpimoe inspect``
never start MPI.  A user's mistake raises an :class:`~mpimoe.errors.MpimoeError`
and becomes one line on stderr and a non-zero exit code, never a traceback.
"""

import argparse
import sys

from mpimoe import __version__
from mpimoe.errors import EXIT_INTERNAL, IOFailure, MpimoeError

__all__ = ['main']


def _add_model_args(p, required=True):
    p.add_argument('--preset', required=required, metavar='NAME',
                   help='named model configuration (tiny, small, paper-4l, paper-16l, paper-61l)')
    p.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE',
                   help='override one config field, e.g. --set top_k=3 (repeatable)')


def _cmd_init_weights(args):
    from mpimoe.checkpoint import write_synthetic
    from mpimoe.config import model_config
    cfg = model_config(args.preset, args.overrides)
    write_synthetic(cfg, args.out, seed=args.seed, overwrite=args.overwrite, log=print)


def _cmd_inspect(args):
    from mpimoe.checkpoint import inspect_report
    text, ok = inspect_report(args.file, checksums=not args.no_checksums)
    print(text)
    return 0 if ok else 65


def _cmd_make_input(args):
    from mpimoe.io import write_synthetic_inputs
    if args.weights:
        from mpimoe.checkpoint import WeightFile
        with WeightFile(args.weights) as wf:
            vocab = wf.config.vocab_size
    else:
        vocab = args.vocab
    write_synthetic_inputs(args.out, vocab_size=vocab, num_seqs=args.num_seqs,
                           min_len=args.min_len, max_len=args.max_len, seed=args.seed,
                           overwrite=args.overwrite)
    print(f'wrote {args.num_seqs} sequences to {args.out}')


def _cmd_plan(args):
    from mpimoe.config import model_config
    from mpimoe.placement import make_plan
    cfg = model_config(args.preset, args.overrides)
    plan = make_plan(cfg, args.gpus, mode=args.placement, n_frontends=args.frontends,
                     gpus_per_node=args.gpus_per_node)
    print(plan.describe(full=args.full))


def _cmd_reference(args):
    from mpimoe.reference import run_reference
    run_reference(args.weights, args.input, args.output, max_new_tokens=args.max_new_tokens,
                  save_logits=args.save_logits, overwrite=args.overwrite, log=print)


def _cmd_run(args):
    from mpimoe.engine import RunOptions, run_engine
    opts = RunOptions(weights=args.weights, input=args.input, output=args.output,
                      placement=args.placement, frontends=args.frontends,
                      micro_batches=args.micro_batches, max_new_tokens=args.max_new_tokens,
                      save_logits=args.save_logits, metrics=args.metrics,
                      overwrite=args.overwrite, batch_tokens=args.batch_tokens,
                      deadline=args.deadline)
    return run_engine(opts)


def _cmd_report(args):
    from mpimoe.report import load_report, plot, summarize
    report = load_report(args.file)
    print(summarize(report))
    if args.png:
        for path in plot(report, args.png):
            print(f'wrote {path}')


def _build_parser():
    parser = argparse.ArgumentParser(
        prog='mpimoe', description='Mixture-of-Experts inference with large expert '
        'parallelism over MPI. Run a subcommand with --help for its options.')
    parser.add_argument('--version', action='version', version=f'mpimoe {__version__}')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)

    p = sub.add_parser('init-weights', help='write seeded synthetic weights for a preset',
                       description='Write seeded synthetic BF16 weights (weights/FORMAT.md), '
                       'tensor by tensor, so memory stays small whatever the model size.')
    _add_model_args(p)
    p.add_argument('--out', required=True, metavar='FILE', help='HDF5 weight file to write')
    p.add_argument('--seed', type=int, default=0, help='random seed (default 0)')
    p.add_argument('--overwrite', action='store_true', help='replace FILE if it exists')
    p.set_defaults(func=_cmd_init_weights)

    p = sub.add_parser('inspect', help='print and validate a weight file',
                       description='Print the config, tensor count and sizes of a weight '
                       'file and validate it (format version, shapes, dtypes, checksums).')
    p.add_argument('file', metavar='FILE')
    p.add_argument('--no-checksums', action='store_true',
                   help='check structure only, do not read the tensors')
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser('make-input', help='write synthetic token sequences',
                       description='Write random token-id sequences as JSONL (.jsonl) or '
                       'HDF5 (.h5/.hdf5), chosen by the extension of --out.')
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument('--weights', metavar='FILE', help='take the vocabulary size from FILE')
    src.add_argument('--vocab', type=int, metavar='V', help='vocabulary size')
    p.add_argument('--num-seqs', type=int, required=True, metavar='N')
    p.add_argument('--min-len', type=int, required=True, metavar='A')
    p.add_argument('--max-len', type=int, required=True, metavar='B')
    p.add_argument('--seed', type=int, default=0, help='random seed (default 0)')
    p.add_argument('--out', required=True, metavar='FILE')
    p.add_argument('--overwrite', action='store_true', help='replace FILE if it exists')
    p.set_defaults(func=_cmd_make_input)

    p = sub.add_parser('plan', help='print the placement of experts on ranks (no MPI needed)',
                       description='Print which rank hosts which (layer, expert) for a model '
                       'on a world size, the ranks per role, nodes and weight bytes per rank.')
    _add_model_args(p)
    p.add_argument('--gpus', type=int, required=True, metavar='P',
                   help='world size: MPI ranks, one per GPU')
    p.add_argument('--gpus-per-node', type=int, metavar='G',
                   help='ranks per node, block distribution (default: all on one node)')
    p.add_argument('--placement', default='per-layer', metavar='MODE',
                   help='per-layer (default), dedicated or packed:K')
    p.add_argument('--frontends', type=int, metavar='F',
                   help='front-end ranks (default: the smallest F >= 1 that fits)')
    p.add_argument('--full', action='store_true', help='list every rank on its own line')
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser('reference', help='single-process reference inference (the oracle)',
                       description='Run the single-process NumPy reference model over an '
                       'input file and write the output format the engine also writes.')
    p.add_argument('--weights', required=True, metavar='FILE')
    p.add_argument('--input', required=True, metavar='FILE', help='.jsonl or .h5 token sequences')
    p.add_argument('--output', required=True, metavar='FILE', help='HDF5 output to write')
    p.add_argument('--max-new-tokens', type=int, default=0, metavar='N',
                   help='greedy tokens to generate per sequence (default 0: prefill only)')
    p.add_argument('--save-logits', action='store_true',
                   help='also store last_logits [n, vocab] at the last prompt position')
    p.add_argument('--overwrite', action='store_true', help='replace OUTPUT if it exists')
    p.set_defaults(func=_cmd_reference)

    p = sub.add_parser('run', help='distributed expert-parallel inference (under mpiexec/srun)',
                       description='Run the model over MPI ranks: front-ends run attention and '
                       'the dense parts, expert ranks their experts; tokens travel by '
                       'non-blocking all-to-all. Launch as: mpiexec -n P python -m mpi4py '
                       '-m mpimoe run ... Writes the same output format as `mpimoe reference`.')
    p.add_argument('--weights', required=True, metavar='FILE')
    p.add_argument('--input', required=True, metavar='FILE', help='.jsonl or .h5 token sequences')
    p.add_argument('--output', required=True, metavar='FILE', help='HDF5 output to write')
    p.add_argument('--placement', default='per-layer', metavar='MODE',
                   help='per-layer | dedicated | packed:K (default per-layer)')
    p.add_argument('--frontends', type=int, default=None, metavar='F',
                   help='front-end ranks (default: the fewest >= 1 that fit the placement)')
    p.add_argument('--micro-batches', type=int, default=2, metavar='M',
                   help='micro-batches per pass, pipelined (default 2: double buffering)')
    p.add_argument('--max-new-tokens', type=int, default=0, metavar='N',
                   help='greedy tokens to generate per sequence (default 0: prefill only)')
    p.add_argument('--batch-tokens', type=int, default=4096, metavar='T',
                   help='prompt-token budget of one front-end batch (default 4096)')
    p.add_argument('--save-logits', action='store_true',
                   help='also store last_logits [n, vocab] at the last prompt position')
    p.add_argument('--metrics', metavar='FILE', help='write the run report (JSON) to FILE')
    p.add_argument('--deadline', type=float, default=600.0, metavar='SECONDS',
                   help='abort the job when a wait makes no progress for this long '
                   '(default 600)')
    p.add_argument('--overwrite', action='store_true', help='replace OUTPUT if it exists')
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser('report', help='summarise a run report (run.json), optionally plot it',
                       description='Print a readable summary of the run.json written by '
                       '`mpimoe run --metrics`; with --png DIR also write an expert-load '
                       'heatmap and per-rank time bars (needs matplotlib).')
    p.add_argument('file', metavar='RUN_JSON')
    p.add_argument('--png', metavar='DIR', help='write expert_loads.png and rank_times.png here')
    p.set_defaults(func=_cmd_report)
    return parser


def main(argv=None):
    """Entry point of the ``mpimoe`` console script; returns the exit code."""
    args = _build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except MpimoeError as e:
        print(f'mpimoe: error: {e}', file=sys.stderr)
        return e.exit_code
    except OSError as e:
        print(f'mpimoe: error: {e}', file=sys.stderr)
        return IOFailure.exit_code
    except KeyboardInterrupt:
        print('mpimoe: interrupted', file=sys.stderr)
        return 130
    except Exception:
        import traceback
        traceback.print_exc()
        print('mpimoe: internal error (a bug): please report the traceback above',
              file=sys.stderr)
        return EXIT_INTERNAL
