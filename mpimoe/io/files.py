"""Writing files safely: path checks before any work, the one atomic write,
OS errors as one-line IOFailures, a free-space check, HDF5 files built in
memory and written by plain file I/O, and JSON."""

import contextlib
import hashlib
import io
import json
import os
import re
import sys
import tempfile

import h5py

from mpimoe.errors import DataError, IOFailure, UsageError
from mpimoe.io.paths import regular_file

__all__ = ['check_writable', 'os_errors', 'atomic_write', 'hdf5_image', 'check_space',
           'remove_if_present', 'write_json', 'read_json', 'file_digest']


def check_writable(path, what, overwrite, reads=()):
    """Refuse, before any work, a file that cannot or must not be written: one
    of ``reads`` ((option, path) pairs: the run's inputs and other outputs,
    refused even with ``overwrite``), a directory, one whose directory is
    missing or not writable, or an existing file unless ``overwrite``.
    ``what`` names the option in the messages ('--metrics'; '' for none)."""
    path = os.fspath(path)
    label = f'{what} {path}' if what else path
    for option, other in reads:
        if other is not None and _same_file(path, other):
            raise UsageError(f'{label} is also the {option} of this run and would be '
                             'destroyed; choose another file')
    if os.path.isdir(path):
        raise DataError(f'{label} is a directory; give a file name')
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise DataError(f'{label}: directory {parent} does not exist; create it first')
    try:        # a real file, not os.access: root passes it on read-only mounts
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise IOFailure(f'{label}: directory {parent} is not writable ({e.strerror}); '
                        'choose another') from None
    if os.path.exists(path) and not overwrite:
        raise DataError(f'{label} exists; pass --overwrite to replace it')


def _same_file(a, b):
    """Whether paths ``a`` and ``b`` name one file (symbolic and hard links too)."""
    try:
        return os.path.samefile(a, b)
    except OSError:                 # one of them does not exist (yet)
        return os.path.realpath(a) == os.path.realpath(b)


@contextlib.contextmanager
def os_errors(path, *also):
    """Turn an OSError about ``path`` (or one of ``also``, or about no named
    file, as h5py's are) into an IOFailure: one line naming ``path`` (exit 74).

    A write that fails while h5py drops an object is reported only from its
    destructor (otherwise lost, or printed as an 'Exception ignored' traceback
    per object): such errors fail the block too, once.
    """
    lost, hook = [], sys.unraisablehook

    def collect(unraisable):
        if 'h5py' in str(unraisable.object):
            lost.append(unraisable.exc_value)
        else:
            hook(unraisable)
    sys.unraisablehook = collect
    try:
        yield
    except OSError as e:
        if e.filename not in (None, path, *also):
            raise
        raise _io_failure(path, e) from None
    except RuntimeError as e:       # h5py's, when closing after a failed write
        if 'write failed' not in str(e):
            raise
        raise _io_failure(path, e) from None
    finally:
        sys.unraisablehook = hook
    if lost:
        raise _io_failure(path, lost[0])


def _io_failure(path, e):
    """IOFailure naming ``path`` for the OSError (or h5py error) ``e``."""
    h5_reason = re.search(r"error message = '([^']*)'", str(e))
    reason = os.strerror(e.errno) if getattr(e, 'errno', None) else \
        h5_reason[1] if h5_reason else str(e).splitlines()[0]
    return IOFailure(f'cannot write {path}: {reason}; fix the cause (disk space, quota, '
                     'permissions) and rerun')


@contextlib.contextmanager
def atomic_write(path):
    """Yield the temporary name ``path + '.partial'`` to write ``path`` through.

    When the block ends cleanly the file is synced, renamed to ``path`` and
    its directory synced: a reader sees the old file or the whole new one, and
    the new one survives a crash.  On any error the temporary file is removed
    and ``path`` is untouched; an OSError of the writing (disk full, quota,
    permission, I/O) becomes an IOFailure naming ``path``.  Every file mpimoe
    replaces goes through here.
    """
    path = os.fspath(path)
    tmp = path + '.partial'
    with os_errors(path, tmp):
        try:
            yield tmp
            _fsync(tmp)
            os.replace(tmp, path)
        except BaseException:
            remove_if_present(tmp)
            raise
        _fsync(os.path.dirname(path) or '.')


@contextlib.contextmanager
def hdf5_image(path):
    """Yield an h5py.File built in memory; when the block ends its bytes are
    written to ``path`` by plain file I/O.  (h5py copes badly with a disk that
    fills under it: errors from destructors, a crash at exit; a plain write
    fails with one OSError.)  For files that fit in memory: chunks, inputs."""
    image = io.BytesIO()
    with h5py.File(image, 'w') as f:
        yield f
    with open(path, 'wb') as out:
        out.write(image.getbuffer())


def check_space(path, nbytes):
    """IOFailure before writing ``nbytes`` to ``path`` where its filesystem has
    less free space (h5py, which writes the large files, fails badly on a full
    disk; a quota is not seen here)."""
    st = os.statvfs(os.path.dirname(os.path.abspath(path)))
    free = st.f_bavail * st.f_frsize
    if free < nbytes:
        raise IOFailure(f'cannot write {path}: it needs about {nbytes:,} bytes, its '
                        f'filesystem has {free:,} free; free some space and rerun')


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_if_present(path):
    """Remove the file ``path``; nothing when it does not exist."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def write_json(path, obj, indent=1):
    """Write ``obj`` as JSON to ``path`` atomically (:func:`atomic_write`)."""
    with atomic_write(path) as tmp, open(tmp, 'w') as f:
        json.dump(obj, f, indent=indent, sort_keys=True)


def read_json(path, what):
    """A JSON document from ``path``; DataError naming ``what`` (e.g. '--stats')
    when the file cannot be read or parsed."""
    regular_file(path, what)
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except OSError as e:
        raise DataError(f'{what} {path}: cannot read: {e.strerror}') from None
    except (ValueError, RecursionError) as e:
        raise DataError(f'{what} {path}: not valid JSON: {e}') from None


def file_digest(path, block=1 << 22):
    """sha256 hex digest of a file, read in blocks (the input's identity)."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()
