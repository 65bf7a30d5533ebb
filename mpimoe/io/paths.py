"""Checks on the paths mpimoe reads, before anything opens them."""

import os
import stat

from mpimoe.errors import DataError

__all__ = ['regular_file']

_KINDS = ((stat.S_ISDIR, 'directory'), (stat.S_ISFIFO, 'FIFO (named pipe)'),
          (stat.S_ISSOCK, 'socket'), (stat.S_ISCHR, 'character device'),
          (stat.S_ISBLK, 'block device'))


def regular_file(path, what):
    """Refuse ``path`` when it exists but is not a regular file (after symlinks).

    Opening a FIFO blocks until a writer comes, reading a device may never
    end: nothing of the kind is ever opened.  A missing or unstat-able path
    passes: the caller's ``open`` says so in its own words.  ``what`` names the
    file in the message (``'weights'``, ``'--stats'``, ...).
    """
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), 'special file')
        raise DataError(f'{what} {path}: is a {kind}, not a regular file; pass a file')
