"""Machine constants of the cost model (mpimoe.planning.costmodel).

**Constants** (:class:`Constants`): assumed H100 SXM defaults, replaced by a
calibration JSON written by benchmarks (keys below, all optional, numbers),
replaced in turn by command-line options::

    {"gemm_tflops": 989,      # dense 16-bit peak, TFLOP/s per GPU; a benchmark that
                              # measures achieved TFLOP/s writes it with efficiency 1
     "gemm_efficiency": 0.6,  # fraction of the peak reached by the GEMMs, (0, 1]
     "hbm_gbs": 3350,         # device memory bandwidth, GB/s
     "link_gbps": 200,        # inter-node link per node, each direction, Gb/s
     "nvlink_gbs": 450,       # intra-node bandwidth per GPU, each direction, GB/s
     "alpha_us": 10}          # latency of one message (one collective), us
"""

import math
from dataclasses import dataclass, field, fields

from mpimoe.errors import ConfigError, DataError

__all__ = ['ASSUMED', 'NAMES', 'Constants', 'load_calibration', 'make_constants']

#: Why each default was chosen (printed next to an assumed constant).
ASSUMED = {
    'gemm_tflops': 'H100 SXM dense BF16/FP16 peak',
    'gemm_efficiency': 'typical of large cuBLAS GEMMs',
    'hbm_gbs': 'H100 SXM HBM3',
    'link_gbps': 'one 200 Gb/s HDR/NDR200 port per node; 8 x 400 Gb/s NDR is 3200',
    'nvlink_gbs': 'H100 NVLink 4, per direction',
    'alpha_us': 'MPI message latency incl. software overhead',
}


@dataclass(frozen=True)
class Constants:
    """Machine constants of the model; ``source`` says where each came from."""

    gemm_tflops: float = 989.0
    """Dense 16-bit peak TFLOP/s per GPU."""
    gemm_efficiency: float = 0.6
    """Fraction of the peak the GEMMs reach, in (0, 1]."""
    hbm_gbs: float = 3350.0
    """Device memory bandwidth, GB/s."""
    link_gbps: float = 200.0
    """Inter-node bandwidth per node and direction, Gb/s."""
    nvlink_gbs: float = 450.0
    """Intra-node bandwidth per GPU and direction, GB/s."""
    alpha_us: float = 10.0
    """Latency of one message, microseconds; one per collective."""
    source: dict = field(default_factory=dict, compare=False)
    """Constant name -> 'assumed (why)', 'measured (FILE)' or 'option --NAME'."""

    def __post_init__(self):
        for f in fields(self)[:-1]:
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not \
                    (math.isfinite(v) and v > 0):
                raise ConfigError(f'{f.name}={v!r}: must be a number > 0')
        if self.gemm_efficiency > 1:
            raise ConfigError(f'gemm_efficiency={self.gemm_efficiency}: must be in (0, 1]')

    @property
    def flops(self):
        """Effective GEMM rate, FLOP/s."""
        return self.gemm_tflops * 1e12 * self.gemm_efficiency


NAMES = [f.name for f in fields(Constants)][:-1]


def load_calibration(path):
    """Measured constants from a JSON file: dict name -> float (keys above)."""
    from mpimoe.io.files import read_json
    doc = read_json(path, '--calibration')
    if not isinstance(doc, dict):
        raise DataError(f'--calibration {path}: expected a JSON object')
    unknown = sorted(set(doc) - set(NAMES))
    if unknown:
        raise DataError(f'--calibration {path}: unknown keys {unknown}; valid keys: '
                        f'{", ".join(NAMES)}')
    bad = [k for k, v in doc.items() if isinstance(v, bool) or not isinstance(v, (int, float))]
    if bad:
        raise DataError(f'--calibration {path}: {bad[0]} must be a number')
    values = {k: float(v) for k, v in doc.items()}
    try:
        Constants(**values)
    except ConfigError as e:
        raise DataError(f'--calibration {path}: {e}') from None
    return values


def make_constants(calibration=None, calibration_path=None, **options):
    """Defaults < ``calibration`` (from ``calibration_path``) < ``options`` that are
    not None (command-line values, e.g. ``link_gbps=400``)."""
    values, source = {}, {n: f'assumed ({ASSUMED[n]})' for n in NAMES}
    for k, v in (calibration or {}).items():
        values[k], source[k] = v, f'measured ({calibration_path})'
    for k, v in options.items():
        if v is not None:
            values[k], source[k] = v, f'option --{k.replace("_", "-")}'
    return Constants(**values, source=source)
