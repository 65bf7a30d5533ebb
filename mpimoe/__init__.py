"""mpimoe: Mixture-of-Experts inference with large expert parallelism over MPI."""

__version__ = '0.1.0'
