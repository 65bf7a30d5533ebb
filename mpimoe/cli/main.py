"""The ``mpimoe`` command: argparse subcommands, one handler each.

Handlers import their modules lazily, so ``mpimoe plan`` or ``mpimoe inspect``
never start MPI.  A user's mistake raises an :class:`~mpimoe.errors.MpimoeError`
and becomes one line on stderr and a non-zero exit code, never a traceback.
"""

import argparse
import os
import sys
import time

from mpimoe import __version__
from mpimoe.backends.backend import MPI_GPU_MODES
from mpimoe.backends.binding import launcher_rank
from mpimoe.model.config import PRESETS
from mpimoe.errors import (EXIT_INTERNAL, ConfigError, DataError, IOFailure, MpimoeError,
                           UsageError)
from mpimoe.runtime.options import MAX_MICRO_BATCHES, JobOptions, RunOptions, add_arguments

__all__ = ['main']

#: seconds a rank other than 0 waits before exiting on a usage error
_QUIET_EXIT_S = 1.0


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that takes options only by their full names (no
    silent abbreviations: ``--max-new`` is an error, not ``--max-new-tokens``);
    the subcommands' parsers are of this class too."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message):
        """Under a launcher only rank 0 of ``run`` and ``bench`` (the MPI
        subcommands, whose every rank parses the same command line) prints
        the usage error; the others wait a moment, so that an abort on their
        exit does not cut rank 0's message, and exit 2."""
        mpi = self.prog.split()[1:2] in (['run'], ['bench'])
        if mpi and launcher_rank(os.environ):
            time.sleep(_QUIET_EXIT_S)
            sys.exit(2)
        super().error(message)


def _add_model_args(p, required=True):
    p.add_argument('--preset', required=required, metavar='NAME',
                   help=f'named model configuration ({", ".join(PRESETS)})')
    p.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE',
                   help='override one config field, e.g. --set top_k=3 or --set '
                        'router.scoring=sigmoid (repeatable)')


def _cmd_init_weights(args):
    from mpimoe.checkpoint.writer import write_synthetic
    from mpimoe.model.config import model_config
    cfg = model_config(args.preset, args.overrides)
    files = None
    if args.tokenizer:
        from mpimoe.checkpoint.tokenizer_files import load_tokenizer
        files, tokenizer = load_tokenizer(args.tokenizer, cfg.vocab_size)
    write_synthetic(cfg, args.out, seed=args.seed, overwrite=args.overwrite, log=print,
                    tokenizer_files=files)
    if files:
        print(f'tokenizer: {", ".join(files)} of {args.tokenizer} embedded '
              f'({tokenizer.vocab_size} tokens, chat template: '
              f'{"yes" if tokenizer.has_chat_template else "no"})')


def _cmd_convert(args):
    from mpimoe.checkpoint.convert import convert_hf
    convert_hf(args.from_hf, args.out, overwrite=args.overwrite, log=print)


def _cmd_inspect(args):
    from mpimoe.checkpoint.weights import inspect_report
    text, ok = inspect_report(args.file, checksums=not args.no_checksums)
    print(text)
    return 0 if ok else 65


def _cmd_make_input(args):
    from mpimoe.io.inputs import write_synthetic_inputs
    if args.weights:
        from mpimoe.checkpoint.weights import WeightFile
        with WeightFile(args.weights) as wf:
            vocab = wf.config.vocab_size
    else:
        vocab = args.vocab
    write_synthetic_inputs(args.out, vocab_size=vocab, num_seqs=args.num_seqs,
                           min_len=args.min_len, max_len=args.max_len, seed=args.seed,
                           overwrite=args.overwrite)
    print(f'wrote {args.num_seqs} sequences to {args.out}')


def _cmd_plan(args):
    import dataclasses
    import os
    from mpimoe.planning import costmodel
    from mpimoe.model.config import model_config
    from mpimoe.errors import ConfigError
    from mpimoe.planning.placement import make_plan
    from mpimoe.planning.sbatch import sbatch_script, write_sbatch
    from mpimoe.planning.stats import load_stats
    if (args.batch_seqs is None) != (args.seq_len is None):
        raise ConfigError('--batch-seqs and --seq-len go together (the batch of one pass)')
    if args.emit_sbatch and args.gpus_per_node is None:
        raise ConfigError('--emit-sbatch needs --gpus-per-node (GPUs and tasks per node)')
    if not 1 <= args.micro_batches <= MAX_MICRO_BATCHES:    # what `run` takes
        raise ConfigError(f'--micro-batches {args.micro_batches}: must be in '
                          f'1..{MAX_MICRO_BATCHES}')
    cfg = model_config(args.preset, args.overrides)
    loads = load_stats(args.stats, cfg) if args.stats else None
    plan = make_plan(cfg, args.gpus, mode=args.placement, n_frontends=args.frontends,
                     gpus_per_node=args.gpus_per_node, loads=loads, replicas=args.replicas,
                     tp=args.tp)
    work = None if args.batch_seqs is None else costmodel.Workload(
        args.batch_seqs, args.seq_len, args.micro_batches)
    calib = costmodel.load_calibration(args.calibration) if args.calibration else None
    consts = costmodel.make_constants(calib, args.calibration, link_gbps=args.link_gbps)
    baseline = None if loads is None else dataclasses.replace(plan, owner=plan.block_owner)
    costmodel.check_memory(costmodel.memory(plan, work, args.kv_tokens), args.gpu_memory_gb)
    model = ' '.join([f'--preset {args.preset}'] + [f'--set {o}' for o in args.overrides])
    # the KV pool and running sequences of the planned workload, per front-end
    seqs = None if work is None else work.seqs_per_frontend(plan)
    kv = args.kv_tokens or (None if work is None else seqs * work.seq_len)
    stats = os.path.abspath(args.stats) if args.stats else None
    text = sbatch_script(plan, model, args.micro_batches, kv, seqs, stats) \
        if args.emit_sbatch else None
    if text is not None:
        write_sbatch(args.emit_sbatch, text)
    print(plan.describe(full=args.full))
    print('\n'.join(costmodel.describe(plan, work, consts, args.gpu_memory_gb, baseline,
                                        args.kv_tokens)))
    if text is not None:
        print(f'wrote {args.emit_sbatch}: {plan.n_nodes} nodes x {plan.gpus_per_node} tasks '
              f'({plan.world_size} in all)')


def _cmd_reference(args):
    from mpimoe.model.reference import run_reference
    from mpimoe.runtime.options import JobOptions, from_args
    from mpimoe.runtime.threads import apply_threads, process_threads
    apply_threads(process_threads(args.threads)[0])
    run_reference(from_args(JobOptions, args), log=print)


def _cmd_run(args):
    from mpimoe.backends.binding import bind_early
    bind_early(args.backend)        # the GPU current before MPI_Init creates a context
    from mpi4py import MPI
    # no plan fits one rank (it needs a front-end and an expert rank): most
    # likely started without mpiexec/srun, so say how to launch
    if MPI.COMM_WORLD.size == 1:
        raise UsageError(_launch_hint(args))
    from mpimoe.runtime.engine import run_engine
    from mpimoe.runtime.options import RunOptions, from_args
    return run_engine(from_args(RunOptions, args))


def _launch_hint(args):
    """The error of `mpimoe run` on a single rank: how to launch it and, when
    the weights and --stats can be read, the world sizes that fit (the error
    of mpimoe.planning.placement.make_plan for one rank, which names them)."""
    from mpimoe.checkpoint.weights import WeightFile
    from mpimoe.planning.placement import make_plan
    from mpimoe.planning.stats import load_stats
    text = ('`mpimoe run` is an MPI program and has only 1 rank here (started without a '
            'launcher?): launch P ranks with `mpiexec -n P python -m mpi4py -m mpimoe run ...` '
            '(Slurm: `srun -K1 -n P python -m mpi4py -m mpimoe run ...`)')
    try:
        with WeightFile(args.weights) as wf:
            cfg = wf.config
        loads = load_stats(args.stats, cfg) if args.stats else None
        make_plan(cfg, 1, args.placement, args.frontends, loads=loads, replicas=args.replicas)
    except ConfigError as e:                    # names the world sizes that fit
        text += f'; for {args.weights}: {e}'
    except (MpimoeError, OSError):
        pass        # unreadable weights or --stats: a launched run reports them
    return text + '; `mpimoe plan --preset NAME --gpus P` prints the placement on P ranks'


def _cmd_show(args):
    from mpimoe.cli.show import show
    from mpimoe.io.paths import regular_file
    for path, what in ((args.file, 'output'), (args.input, 'input')):
        if path is not None:
            regular_file(path, what)
            if not os.path.exists(path):
                unfinished = what == 'output' and os.path.isdir(path + '.chunks')
                raise DataError(f'{path}: {what} file not found' + (
                    f'; its run has not finished ({path}.chunks holds what it committed): '
                    'rerun it to complete the output' if unfinished else ''))
    show(args.file, args.id, args.limit, args.input)


def _cmd_report(args):
    from mpimoe.cli.report import load_report, plot, summarize
    report = load_report(args.file)
    print(summarize(report))
    if args.png:
        for path in plot(report, args.png):
            print(f'wrote {path}')


def _cmd_bench(args):
    from mpimoe.backends.binding import bind_early
    bind_early(args.backend)        # the GPU current before MPI_Init creates a context
    from mpimoe.bench.moe_layer import BenchOptions, bench_moe_layer
    opts = BenchOptions(d_model=args.d_model, experts=args.experts, d_expert=args.d_expert,
                        top_k=args.top_k, tokens=args.tokens, micro_batches=args.micro_batches,
                        repeats=args.repeats, warmup=args.warmup, kind=args.kind,
                        seed=args.seed, placement=args.placement, deadline=args.deadline,
                        calibration_out=args.calibration_out, backend=args.backend,
                        mpi_gpu=args.mpi_gpu)
    return bench_moe_layer(opts)


def _cmd_bench_gpu(args):
    from mpimoe.bench.gpu import GpuBenchOptions, run_gpu_bench
    opts = GpuBenchOptions(gemm_tokens=args.gemm_tokens, decode_batches=args.decode_batches,
                           square=args.square,
                           moe_tokens=args.moe_tokens, sizes_mb=args.sizes_mb,
                           repeats=args.repeats, warmup=args.warmup, seed=args.seed,
                           torch=not args.no_torch, mpi_gpu=args.mpi_gpu,
                           deadline=args.deadline)
    return run_gpu_bench(opts)


def _number_list(kind):
    """argparse type: comma-separated numbers of ``kind`` (int, float) -> tuple."""
    def parse(text):
        try:
            return tuple(kind(v) for v in text.split(','))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f'{text!r}: expected comma-separated {kind.__name__} values') from None
    return parse


def _positive_int(text):
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f'{text!r}: expected an integer >= 1')
    return value


def _add_mpi_gpu_arg(p):
    p.add_argument('--mpi-gpu', choices=MPI_GPU_MODES, default='auto',
                   help='how MPI gets GPU rows: device (a CUDA-aware MPI takes device '
                   'buffers), host (staged through pinned host buffers), auto (device when '
                   'the MPI library says it supports CUDA; default)')


def _add_replicas_arg(p):
    p.add_argument('--replicas', type=int, default=0, metavar='R',
                   help='R extra ranks host replicas of the hottest experts for --stats '
                   '(world size = F + expert ranks of the placement + R; default 0)')


def _build_parser():
    from mpimoe.bench.gpu import GpuBenchOptions
    parser = _Parser(
        prog='mpimoe', description='Mixture-of-Experts inference with large expert '
        'parallelism over MPI. Run a subcommand with --help for its options.')
    parser.add_argument('--version', action='version', version=f'mpimoe {__version__}')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND', required=True,
                                help='the subcommand (each has --help)')

    p = sub.add_parser('init-weights', help='write seeded synthetic weights for a preset',
                       description='Write seeded synthetic BF16 weights (weights/FORMAT.md), '
                       'tensor by tensor, so memory stays small whatever the model size.')
    _add_model_args(p)
    p.add_argument('--out', required=True, metavar='FILE', help='HDF5 weight file to write')
    p.add_argument('--seed', type=int, default=0, help='random seed (default 0)')
    p.add_argument('--tokenizer', metavar='PATH',
                   help='embed this tokenizer: tokenizer.json, or a directory holding it (and '
                   'tokenizer_config.json, generation_config.json, chat_template.jinja); '
                   'its vocabulary must fit the model\'s vocab_size')
    p.add_argument('--overwrite', action='store_true', help='replace FILE if it exists')
    p.set_defaults(func=_cmd_init_weights)

    p = sub.add_parser('convert', help='convert a Hugging Face Mixtral checkpoint',
                       description='Convert a Hugging Face MixtralForCausalLM checkpoint '
                       '(config.json + *.safetensors) to the mpimoe weight format, tensor by '
                       'tensor, with its tokenizer files (tokenizer.json, tokenizer_config.json, '
                       'generation_config.json, chat_template.jinja) when tokenizer.json is '
                       'there. Everything mpimoe cannot run is refused first, in one error.')
    p.add_argument('--from-hf', required=True, metavar='DIR',
                   help='directory with config.json and model.safetensors (or shards '
                   'with model.safetensors.index.json); its tokenizer.json, when there, '
                   'is copied')
    p.add_argument('--out', required=True, metavar='FILE', help='HDF5 weight file to write')
    p.add_argument('--overwrite', action='store_true', help='replace FILE if it exists')
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser('inspect', help='print and validate a weight file',
                       description='Print the config, tensor count, sizes and tokenizer of a '
                       'weight file and validate it (format version, shapes, dtypes, checksums, '
                       'the tokenizer files).')
    p.add_argument('file', metavar='FILE', help='HDF5 weight file')
    p.add_argument('--no-checksums', action='store_true',
                   help='check structure only, do not read the tensors (the small tokenizer '
                   'files are checked in full)')
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser('make-input', help='write synthetic token sequences',
                       description='Write random token-id sequences as JSONL (.jsonl) or '
                       'HDF5 (.h5/.hdf5), chosen by the extension of --out.')
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument('--weights', metavar='FILE', help='take the vocabulary size from FILE')
    src.add_argument('--vocab', type=int, metavar='V', help='vocabulary size')
    p.add_argument('--num-seqs', type=int, required=True, metavar='N',
                   help='number of sequences')
    p.add_argument('--min-len', type=int, required=True, metavar='A',
                   help='tokens of the shortest sequence (lengths uniform in [A, B])')
    p.add_argument('--max-len', type=int, required=True, metavar='B',
                   help='tokens of the longest sequence')
    p.add_argument('--seed', type=int, default=0, help='random seed (default 0)')
    p.add_argument('--out', required=True, metavar='FILE',
                   help='file to write: .jsonl, or .h5/.hdf5 for HDF5')
    p.add_argument('--overwrite', action='store_true', help='replace FILE if it exists')
    p.set_defaults(func=_cmd_make_input)

    p = sub.add_parser('plan', help='print the placement of experts on ranks (no MPI needed)',
                       description='Print which rank hosts which (layer, expert) for a model '
                       'on a world size, the ranks per role, nodes, memory per rank and, for a '
                       'stated batch, estimated prefill tokens/s and time per output token.')
    _add_model_args(p)
    p.add_argument('--gpus', type=int, required=True, metavar='P',
                   help='world size: MPI ranks, one per GPU')
    p.add_argument('--gpus-per-node', type=int, metavar='G',
                   help='ranks per node, block distribution (default: all on one node)')
    p.add_argument('--placement', default='per-layer', metavar='MODE',
                   help='per-layer (default), dedicated or packed:K')
    p.add_argument('--frontends', type=int, metavar='F',
                   help='front-ends (groups of T ranks with --tp T; default: the smallest '
                   'F >= 1 that fits)')
    p.add_argument('--tp', type=int, default=1, metavar='T',
                   help='tensor-parallel front-ends: each front-end a group of T ranks on one '
                   'node that split the non-expert weights (heads, MLPs, vocabulary); T '
                   'divides the heads, KV heads, vocabulary and the GPUs per node (default 1)')
    p.add_argument('--full', action='store_true', help='list every rank on its own line')
    p.add_argument('--stats', metavar='RUN_JSON',
                   help='balance node links for the expert loads of a previous run '
                   '(expert_loads.counts of its run.json)')
    _add_replicas_arg(p)
    p.add_argument('--gpu-memory-gb', type=float, default=80.0, metavar='GB',
                   help='memory per GPU; a rank that does not fit is refused (default 80)')
    p.add_argument('--batch-seqs', type=int, metavar='B',
                   help='sequences in flight over all front-ends (with --seq-len: KV '
                   'cache, buffers, time estimates)')
    p.add_argument('--seq-len', type=int, metavar='S', help='tokens per sequence')
    add_arguments(p, RunOptions, only=('micro_batches', 'kv_tokens'))
    p.add_argument('--link-gbps', type=float, metavar='GBPS',
                   help='inter-node bandwidth per node and direction, Gb/s (default: the '
                   'calibration file, else 200)')
    p.add_argument('--calibration', metavar='FILE',
                   help='measured cost-model constants, JSON (keys in mpimoe/planning/costmodel.py)')
    p.add_argument('--emit-sbatch', metavar='FILE',
                   help='write a Slurm job script for this plan (never overwrites FILE)')
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser('reference', help='single-process reference inference (the oracle)',
                       description='Run the single-process NumPy reference model over an '
                       'input file and write the output format the engine also writes.')
    add_arguments(p, JobOptions)
    p.set_defaults(func=_cmd_reference)

    p = sub.add_parser('run', help='distributed expert-parallel inference (under mpiexec/srun)',
                       description='Run the model over MPI ranks: front-ends run attention and '
                       'the dense parts, expert ranks their experts; tokens travel by '
                       'non-blocking all-to-all. Launch as: mpiexec -n P python -m mpi4py '
                       '-m mpimoe run ... Writes the same output format as `mpimoe reference`.')
    add_arguments(p, RunOptions)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser('bench', help='benchmarks that print figures (under mpiexec/srun)',
                       description='Benchmarks of the distributed engine; each prints a '
                       'table. See benchmarks/README.md.')
    bench = p.add_subparsers(dest='benchmark', metavar='BENCHMARK', required=True,
                             help='the benchmark (each has --help)')
    p = bench.add_parser('moe-layer', help='one MoE layer over P ranks vs its expert GEMMs',
                         description='Run one MoE layer (random BF16 weights in memory) over '
                         'the ranks: 1 front-end + the expert ranks of the placement. Prints '
                         'tokens/s and the ratio to the same expert computation on rank 0 '
                         'alone, timed in the same job. Launch as: mpiexec -n 9 python -m '
                         'mpi4py -m mpimoe bench moe-layer')
    for flag, default, help_ in (('--d-model', 1024, 'residual width'),
                                 ('--experts', 8, 'experts in the layer (E)'),
                                 ('--d-expert', 2048, 'hidden width of an expert'),
                                 ('--top-k', 2, 'experts per token'),
                                 ('--tokens', 4096, 'tokens in the batch'),
                                 ('--micro-batches', 4, 'micro-batches, pipelined'),
                                 ('--repeats', 5, 'timed repeats'),
                                 ('--warmup', 1, 'untimed repeats first'),
                                 ('--seed', 0, 'random seed of weights and activations')):
        p.add_argument(flag, type=int, default=default, metavar='N',
                       help=f'{help_} (default {default})')
    p.add_argument('--kind', choices=('mlp', 'swiglu'), default='mlp',
                   help='expert kind: mlp = up, GELU, down (default); swiglu = gate, up, down')
    p.add_argument('--placement', default='per-layer', metavar='MODE',
                   help='per-layer (default) or packed:K; world size = 1 + expert ranks')
    p.add_argument('--deadline', type=float, default=600.0, metavar='SECONDS',
                   help='abort when a wait makes no progress for this long (default 600)')
    p.add_argument('--calibration-out', metavar='FILE',
                   help='write the measured GEMM rate as a calibration file for '
                   '`mpimoe plan --calibration`')
    p.add_argument('--backend', choices=('numpy', 'cupy'), default='numpy',
                   help='numpy (CPU; default) or cupy (one GPU per rank: node-local rank '
                   'modulo the visible GPUs; ranks may share one)')
    _add_mpi_gpu_arg(p)
    p.set_defaults(func=_cmd_bench)

    p = bench.add_parser('gpu', help='GEMM, MoE-layer, decode-step and MPI transfer figures '
                         'of a GPU',
                         description='Time BF16 GEMMs and the expert stage by token count, '
                         'one MoE layer against a PyTorch loop over experts, a decode step of '
                         'the small preset by batch size, and (on 2 ranks) '
                         'MPI transfers of device rows, direct and host-staged. Needs CuPy '
                         'and a CUDA GPU. Launch as: mpiexec -n 2 python -m mpi4py -m mpimoe '
                         'bench gpu')
    p.add_argument('--gemm-tokens', type=_number_list(int),
                   default=GpuBenchOptions.gemm_tokens, metavar='N,N,...',
                   help='token counts of the GEMM figures (default '
                   f'{",".join(map(str, GpuBenchOptions.gemm_tokens))})')
    p.add_argument('--decode-batches', type=_number_list(int),
                   default=GpuBenchOptions.decode_batches, metavar='B,B,...',
                   help='batch sizes of the decode-step figures on the small preset (default '
                   f'{",".join(map(str, GpuBenchOptions.decode_batches))})')
    p.add_argument('--sizes-mb', type=_number_list(float), default=GpuBenchOptions.sizes_mb,
                   metavar='MB,MB,...', help='message sizes of the transfer figures (default '
                   f'{",".join(map(str, GpuBenchOptions.sizes_mb))})')
    for flag, help_ in (('--square', 'side of the square BF16 matmul'),
                        ('--moe-tokens', 'tokens in the MoE layer'),
                        ('--repeats', 'timed repeats'), ('--warmup', 'untimed repeats first'),
                        ('--seed', 'random seed')):
        default = getattr(GpuBenchOptions, flag[2:].replace('-', '_'))
        p.add_argument(flag, type=int, default=default, metavar='N',
                       help=f'{help_} (default {default})')
    p.add_argument('--no-torch', action='store_true',
                   help='skip the PyTorch baseline of the MoE layer')
    _add_mpi_gpu_arg(p)
    p.add_argument('--deadline', type=float, default=GpuBenchOptions.deadline, metavar='SECONDS',
                   help='abort when a wait makes no progress for this long (default 600)')
    p.set_defaults(func=_cmd_bench_gpu)

    p = sub.add_parser('report', help='summarise a run report (run.json), optionally plot it',
                       description='Print a readable summary of the run.json written by '
                       '`mpimoe run --metrics`; with --png DIR also write an expert-load '
                       'heatmap and per-rank time bars (needs matplotlib).')
    p.add_argument('file', metavar='RUN_JSON', help='run report of `mpimoe run --metrics`')
    p.add_argument('--png', metavar='DIR', help='write expert_loads.png and rank_times.png here')
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser('show', help='print results readably (text, or token ids)',
                       description='Print the results of an output (.h5 or .jsonl of `mpimoe '
                       'run`/`reference`) readably: id, finish reason, token counts and the '
                       'generated text (token ids when the run had no tokenizer); with '
                       '--input, also each prompt as the input gave it. Reads only what '
                       'it prints.')
    p.add_argument('file', metavar='OUT', help='output file (.h5 or .jsonl)')
    p.add_argument('--id', metavar='ID', help='show only the result with this id (custom_id '
                   'for OpenAI batch output)')
    p.add_argument('--limit', type=_positive_int, default=10, metavar='N',
                   help='show the first N results (default 10)')
    p.add_argument('--input', metavar='IN', help='the run\'s JSONL input, to show the prompts')
    p.set_defaults(func=_cmd_show)
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
