"""The lock on an output: one job writes it at a time (:class:`OutputLock`, a
lock file created with O_EXCL, taken over only from a job known to be dead)."""

import json
import logging
import os
import socket
import time

from mpimoe.errors import DataError
from mpimoe.io.files import os_errors, remove_if_present, write_json

__all__ = ['OutputLock']

log = logging.getLogger('mpimoe')

#: attempts, and seconds between them, to take a lock being written or taken over
_LOCK_TRIES, _LOCK_NAP_S = 40, 0.05


class OutputLock:
    """An exclusive lock on the output ``path`` for a whole job: the file
    ``path + '.lock'``, created with O_EXCL (unlike flock this works on NFS and
    Lustre), holding the holder's host, pid and start time.

        lock = OutputLock(out)        # DataError naming the holder if it is taken
        ...
        lock.release()                # idempotent

    A lock left by a dead job (SIGKILL, a lost node) is taken over when the job
    is known to be gone: same host and its pid is gone (or is now another
    process), or an earlier run of this same requeued Slurm job.  The takeover
    happens while holding ``path + '.lock.break'`` (O_EXCL as well), so two jobs
    cannot both take one stale lock.  A lock of another host is never broken:
    its message says to remove it by hand once that job is known to be dead.
    """

    def __init__(self, path):
        self.output = os.fspath(path)
        self.path = self.output + '.lock'
        self.info = _lock_info()
        self.held = False
        with os_errors(self.path, self.path + '.break', self.path + '.partial'):
            self._acquire()

    def _acquire(self):
        why = f'{self.path}: other jobs keep taking and releasing it; rerun'
        for _ in range(_LOCK_TRIES):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder, unreadable = _read_lock(self.path)
                why = unreadable or why
                if holder is not None:
                    stale = _stale(holder, self.info)
                    if not stale:
                        raise DataError(self._held_message(holder)) from None
                    if self._take_over(holder, stale):
                        return
                    why = (f'{self.path}.break exists: another job is taking over the stale '
                           f'lock, or was killed doing so; if no other job is starting, '
                           f'remove {self.path}.break and rerun')
                if holder is not None or unreadable:
                    time.sleep(_LOCK_NAP_S)
                continue
            with os.fdopen(fd, 'w') as f:
                json.dump(self.info, f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return
        raise DataError(why)

    def _take_over(self, stale, reason):
        """Replace the lock of the dead holder ``stale`` by this one; False when
        another job is doing so (or has done so) at the same moment."""
        guard = self.path + '.break'
        try:
            os.close(os.open(guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            return False
        try:
            if _read_lock(self.path)[0] != stale:
                return False
            write_json(self.path, self.info, indent=None)
            self.held = True
        finally:
            os.remove(guard)
        log.warning(f'{self.path}: took over the lock of a dead job (pid {stale["pid"]} on '
                    f'{stale["host"]}: {reason})')
        return True

    def _held_message(self, holder):
        who = f'pid {holder["pid"]} on host {holder["host"]}, since {holder.get("started")}'
        if holder['host'] == self.info['host']:
            return (f'{self.output} is being written by another job ({who}); wait for it to '
                    'end or choose another --output')
        return (f'{self.output} is being written by another job ({who}; lock {self.path}); '
                f'wait for it to end or choose another --output; if that job is dead (its '
                f'node failed), remove {self.path} and rerun')

    def release(self):
        """Remove the lock file if this lock holds it (and no other job took it over)."""
        if self.held:
            self.held = False
            if _read_lock(self.path)[0] == self.info:
                remove_if_present(self.path)


def _lock_info():
    """What a lock file says about its holder (this process)."""
    return {'host': socket.gethostname(), 'pid': os.getpid(),
            'proc_start': _process_start(os.getpid()),
            'started': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
            'slurm_job': os.environ.get('SLURM_JOB_ID'),
            'slurm_restart': int(os.environ.get('SLURM_RESTART_COUNT') or 0)}


def _read_lock(path):
    """(holder dict, '') from a lock file; (None, '') when it is gone; (None,
    why) when it cannot be read (maybe still being written)."""
    try:
        with open(path, encoding='utf-8') as f:
            holder = json.load(f)
    except FileNotFoundError:
        return None, ''
    except (OSError, ValueError) as e:
        holder = e
    if isinstance(holder, dict) and type(holder.get('host')) is str \
            and type(holder.get('pid')) is int:
        return holder, ''
    return None, (f'{path}: unreadable lock file ({holder}); if no job is writing the output, '
                  'remove it and rerun')


def _stale(holder, me):
    """Why the job that wrote the lock ``holder`` is known to be gone ('' when
    it may be alive); ``me``: this process's lock info."""
    if holder.get('slurm_job') and holder['slurm_job'] == me['slurm_job'] \
            and (holder.get('slurm_restart') or 0) < me['slurm_restart']:
        return 'an earlier run of this requeued Slurm job'
    if holder['host'] != me['host']:
        return ''
    start = _process_start(holder['pid'])
    if start is None:
        return 'the process is gone'
    if start and holder.get('proc_start') and start != holder['proc_start']:
        return 'its pid now belongs to a newer process'
    return ''


def _process_start(pid):
    """The start time of process ``pid`` in clock ticks since boot (Linux
    /proc); 0 where /proc cannot tell but the process exists; None when there
    is no such process (or only its zombie)."""
    try:
        with open(f'/proc/{pid}/stat', 'rb') as f:
            fields = f.read().rsplit(b')', 1)[1].split()
        return None if fields[0] == b'Z' else int(fields[19])
    except FileNotFoundError:
        if os.path.isdir('/proc/self'):
            return None
    except (OSError, IndexError, ValueError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:         # another user's process
        pass
    return 0
