"""Errors a user can cause, each with the process exit code it maps to.

The CLI prints ``mpimoe: error: <message>`` (one line, no traceback) and exits
with ``exit_code``.  Codes follow BSD ``sysexits.h`` where one fits.
"""

__all__ = ['MpimoeError', 'UsageError', 'ConfigError', 'DataError',
           'IOFailure', 'Stopped', 'Interrupted', 'EXIT_INTERNAL', 'clip']

#: exit code for an unexpected exception (a bug): EX_SOFTWARE
EXIT_INTERNAL = 70
#: characters of file-supplied text a message echoes (see :func:`clip`)
CLIP = 80


class MpimoeError(Exception):
    """Base class: a user-facing error with a one-line message."""
    exit_code = 1


class UsageError(MpimoeError):
    """Bad command line: unknown option, preset or value (EX_USAGE)."""
    exit_code = 2


class ConfigError(UsageError, ValueError):
    """A model or run configuration that cannot work; names the field."""


class DataError(MpimoeError):
    """Bad input data: weight file, token file, existing output (EX_DATAERR)."""
    exit_code = 65


class IOFailure(MpimoeError):
    """An operating-system level I/O failure: disk full, permission (EX_IOERR)."""
    exit_code = 74


class Stopped(MpimoeError):
    """Stopped cleanly on a signal after a committed chunk; rerun to resume
    (EX_TEMPFAIL)."""
    exit_code = 75


class Interrupted(MpimoeError):
    """Interrupted by SIGINT (Ctrl-C) at a step boundary; committed chunks stay
    and a rerun resumes (128 + SIGINT, as a shell reports it)."""
    exit_code = 130


def clip(text, limit=CLIP):
    """``text`` (any object: its ``str``) cut to ``limit`` characters plus
    ``...``, so that a message never echoes unbounded file contents."""
    text = str(text)
    return text if len(text) <= limit else text[:limit] + '...'
