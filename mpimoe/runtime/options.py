"""The options of ``mpimoe reference`` and ``mpimoe run``, defined once.

Each option is a field of :class:`JobOptions` (both commands) or
:class:`RunOptions` (``run`` only) whose metadata holds its help; the
command line is built from the fields (:func:`add_arguments`), parsed back
into the dataclass (:func:`from_args`) and checked (:meth:`JobOptions.validate`:
one ConfigError naming the flag).  Programs build the dataclasses directly.
"""

import argparse
import dataclasses
import math
from dataclasses import dataclass, field

from mpimoe.backends.backend import BACKENDS, MPI_GPU_MODES
from mpimoe.errors import ConfigError
from mpimoe.model.config import int_list
from mpimoe.runtime.progress import EVERY_S
from mpimoe.runtime.request import SamplingParams

__all__ = ['JobOptions', 'RunOptions', 'add_arguments', 'from_args', 'MAX_MICRO_BATCHES']


#: the most --micro-batches: every one posts its collectives at every MoE
#: layer of every step, carrying rows or not (3000 made a tiny run crawl, a
#: step outlasting SIGTERM's grace); pipelining gains little past a few
MAX_MICRO_BATCHES = 64


def _opt(default, help, *, aliases=(), metavar=None, choices=None, lo=None, above=None,
         hi=None, repeat=False):
    """A field with its command-line metadata: ``lo`` <= value <= ``hi``
    (``above`` < value) when it is set; the field's type is the argparse
    type; ``repeat``: the option may be given several times, the field is
    the tuple of them."""
    return field(default=default, metadata=dict(
        help=help, aliases=aliases, metavar=metavar, choices=choices, lo=lo, above=above,
        hi=hi, repeat=repeat))


def _required(help, metavar='FILE'):
    return field(metadata=dict(help=help, metavar=metavar, required=True))


@dataclass(frozen=True)
class JobOptions:
    """Options of ``mpimoe reference`` (and, through RunOptions, ``run``)."""
    weights: str = _required('HDF5 weight file (from `mpimoe init-weights` or `mpimoe convert`)')
    input: str = _required('.jsonl requests (token ids, a text prompt, chat messages or '
                           'OpenAI batch lines; a line may set its own max_tokens, '
                           'temperature, top_k, top_p, seed, stop, stop_token_ids, '
                           'ignore_eos) or .h5 token sequences (see README)')
    output: str = _required('output to write: .h5 (HDF5), or .jsonl (one result per line; '
                            'the OpenAI batch output shape for an OpenAI batch input)')
    tokenizer: str = _opt(None, 'tokenizer.json, or a directory holding it (and '
                          'tokenizer_config.json: chat template, BOS); default: the one in '
                          'the weight file (`mpimoe convert` copies it)', metavar='PATH')
    max_new_tokens: int = _opt(0, 'default max_tokens: new tokens per sequence at most '
                               '(default 0: prefill only)', metavar='N')
    temperature: float = _opt(0.0, 'default sampling temperature (default 0: greedy)',
                              metavar='T')
    top_k: int = _opt(0, 'default top-k: sample among the K most likely tokens (default 0: '
                      'all)', metavar='K')
    top_p: float = _opt(1.0, 'default top-p (nucleus) in (0, 1] (default 1: all)',
                        metavar='P')
    seed: int = _opt(0, 'default seed of the sampling streams; a sequence draws from (seed, '
                     'its id, its step) only, whatever the layout (default 0)', metavar='S')
    stop_token_ids: str = _opt('', 'default stop tokens: a sequence also ends at any of these '
                               'comma-separated ids (kept in the output)', metavar='ID,ID,...')
    ignore_eos: bool = _opt(False, "by default, do not stop at the model's end-of-sequence "
                            'token(s)')
    stop: tuple = _opt((), 'default stop string (repeat for several): a sequence ends once '
                       'its generated text contains one, the text returned ending before it '
                       '(needs a tokenizer)', metavar='TEXT', repeat=True)
    save_logits: bool = _opt(False, 'also store last_logits [n, vocab] at the last prompt '
                             'position')
    max_batch_tokens: int = _opt(4096, 'tokens one step of a front-end computes at most '
                                 '(decodes plus joining prompts; a prompt must fit; '
                                 'default 4096)', aliases=('--batch-tokens',), metavar='T',
                                 lo=1)
    max_seqs: int = _opt(256, 'sequences a front-end runs at once at most (default 256; '
                         'never more than --max-batch-tokens, one token each a step)',
                         metavar='N', lo=1)
    kv_tokens: int = _opt(None, 'KV cache of a front-end, in tokens (default: 4 x '
                          '--max-batch-tokens; for `mpimoe plan`, --batch-seqs x --seq-len '
                          'per front-end); a sequence reserves prompt + max_tokens',
                          metavar='N', lo=1)
    chunk_tokens: int = _opt(None, 'prompt tokens per committed chunk of the output, per '
                             'front-end (default: 16 x --max-batch-tokens); each chunk runs '
                             'from an empty batch, so a resumed run is bit for bit an '
                             'uninterrupted one', metavar='T', lo=1)
    batching: str = _opt('continuous', 'continuous: a sequence that ends leaves at once and '
                         'the next waiting one joins (default); static: a front-end takes new '
                         'sequences only once all its running ones ended (the baseline of '
                         'benchmarks/continuous_batching.py)', choices=('continuous', 'static'))
    overwrite: bool = _opt(False, 'replace OUTPUT if it exists, discarding a partial run to '
                           'resume')
    threads: int = _opt(None, 'BLAS threads per process (default: SLURM_CPUS_PER_TASK under '
                        'srun, else the cores of its CPU affinity divided among the ranks '
                        'sharing them)', metavar='N', lo=1)

    def validate(self):
        """ConfigError naming the first option out of its range."""
        for f in dataclasses.fields(self):
            m, v = f.metadata, getattr(self, f.name)
            if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            flag = _flag(f)
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f'{flag} {v}: must be a finite number')
            if m.get('lo') is not None and v < m['lo']:
                raise ConfigError(f'{flag} {v}: must be >= {m["lo"]}')
            if m.get('above') is not None and not v > m['above']:
                raise ConfigError(f'{flag} {v}: must be > {m["above"]}')
            if m.get('hi') is not None and v > m['hi']:
                raise ConfigError(f'{flag} {v}: must be <= {m["hi"]}')

    @property
    def kv_cache_tokens(self):
        return self.kv_tokens or 4 * self.max_batch_tokens

    def chunk_budget(self, n_frontends=1):
        """Prompt tokens of one committed chunk of the input."""
        return (self.chunk_tokens or 16 * self.max_batch_tokens) * n_frontends

    def schedule(self, n_frontends=1):
        """The options that shape the steps, so the numbers (a resumed output
        must be bit for bit an uninterrupted one): for the output's identity."""
        return {'batch_tokens': self.max_batch_tokens, 'max_seqs': self.max_seqs,
                'kv_tokens': self.kv_cache_tokens, 'chunk_tokens': self.chunk_budget(n_frontends),
                'batching': self.batching}

    def sampling(self):
        """The run's default SamplingParams (a line's keys override them; their
        ranges are checked with the input, mpimoe.io.fields.check_defaults)."""
        try:
            stops = int_list(self.stop_token_ids)
        except ValueError:
            raise ConfigError(f'--stop-token-ids {self.stop_token_ids}: expected token ids '
                              'separated by commas, e.g. 2,7') from None
        return SamplingParams(max_tokens=self.max_new_tokens, temperature=self.temperature,
                              top_k=self.top_k, top_p=self.top_p, seed=self.seed,
                              stop_token_ids=stops, ignore_eos=self.ignore_eos,
                              stop=tuple(self.stop))


@dataclass(frozen=True)
class RunOptions(JobOptions):
    """Options of ``mpimoe run``."""
    placement: str = _opt('per-layer', 'per-layer | dedicated | packed:K (default per-layer)',
                          metavar='MODE')
    frontends: int = _opt(None, 'front-ends (groups of T ranks with --tp T; default: the '
                          'fewest >= 1 that fit the placement)', metavar='F', lo=1)
    tp: int = _opt(1, 'tensor-parallel front-ends: each front-end a group of T ranks on one '
                   'node that split the heads (and their KV cache), the dense and shared MLPs '
                   'and the vocabulary; T divides them and the ranks per node (default 1)',
                   metavar='T', lo=1)
    stats: str = _opt(None, 'place experts for the expert loads of a previous run (its '
                      'run.json): the topology layout of `mpimoe plan --stats` on the MPI '
                      'node layout', metavar='RUN_JSON')
    replicas: int = _opt(0, 'R extra ranks host replicas of the hottest experts for --stats '
                         '(world size = F + expert ranks of the placement + R; default 0)',
                         metavar='R', lo=0)
    balance: str = _opt('off', 'bias: adjust a per-expert gate bias from the loads as the run '
                        'goes (changes which experts tokens choose, so outputs differ from the '
                        'reference); off (default)', choices=('off', 'bias'))
    balance_every: int = _opt(1, 'update the gate bias every K steps (default 1)',
                              metavar='K', lo=1)
    balance_step: float = _opt(0.01, 'bias step per update, in gate-probability units '
                               '(default 0.01)', metavar='S', above=0.0)
    balance_clip: float = _opt(0.5, 'the bias stays within [-C, C] (default 0.5)',
                               metavar='C', above=0.0)
    micro_batches: int = _opt(2, f'micro-batches per step, pipelined, 1..{MAX_MICRO_BATCHES} '
                              '(default 2: double buffering)', metavar='M', lo=1,
                              hi=MAX_MICRO_BATCHES)
    metrics: str = _opt(None, 'write the run report (JSON) to FILE', metavar='FILE')
    deadline: float = _opt(600.0, 'abort the job when a wait makes no progress for this long '
                           '(default 600)', metavar='SECONDS', above=0.0)
    trace: str = _opt(None, 'write DIR/trace.json: a Chrome/Perfetto timeline of every stage '
                      'of every rank (for short runs on few ranks)', metavar='DIR')
    log_dir: str = _opt(None, 'also write one log file per rank here', metavar='DIR')
    verbose: bool = _opt(False, 'let every rank log to stderr (default: rank 0 only)')
    progress_every: float = _opt(EVERY_S, 'when stderr is not a terminal (a batch log), '
                                 'progress is a line at the start and one per committed '
                                 'chunk, at most one per SECONDS (the first and last chunk '
                                 f'always; default {EVERY_S:g})', metavar='SECONDS',
                                 above=0.0)
    backend: str = _opt('auto', 'numpy (CPU), cupy (one GPU per rank: node-local rank modulo '
                        'the visible devices), auto (cupy when CuPy and a GPU are usable; '
                        'default)', choices=BACKENDS)
    mpi_gpu: str = _opt('auto', 'how MPI gets GPU rows: device (a CUDA-aware MPI takes device '
                        'buffers), host (staged through pinned host buffers), auto (device '
                        'when the MPI library says it supports CUDA; default)',
                        choices=MPI_GPU_MODES)


def _flag(f):
    return '--' + f.name.replace('_', '-')


def add_arguments(parser, cls, only=None):
    """Add one argument per field of ``cls`` (JobOptions or RunOptions), or
    per field named in ``only`` (the options another command shares)."""
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        m = f.metadata
        names = [_flag(f), *m.get('aliases', ())]
        if m.get('required'):
            parser.add_argument(*names, dest=f.name, required=True, metavar=m['metavar'],
                                help=m['help'])
        elif isinstance(f.default, bool):
            parser.add_argument(*names, dest=f.name, action='store_true', help=m['help'])
        elif m.get('repeat'):
            parser.add_argument(*names, dest=f.name, action='append', default=None,
                                metavar=m.get('metavar'), help=m['help'])
        else:
            kind = f.type
            parser.add_argument(*names, dest=f.name, type=_typed(kind),
                                default=f.default, metavar=m.get('metavar'),
                                choices=m.get('choices'), help=m['help'])


def from_args(cls, args):
    """The ``cls`` of a parsed namespace (fields missing there keep their default)."""
    def value(f):
        v = getattr(args, f.name)
        return tuple(v or ()) if f.metadata.get('repeat') else v
    return cls(**{f.name: value(f) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def _typed(kind):
    """argparse type: ``kind`` of the text, else a one-line error (argparse names the flag)."""
    if kind is str:
        return str

    def parse(text):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f'{text!r}: expected {"an integer" if kind is int else "a number"}') from None
    parse.__name__ = kind.__name__
    return parse
