"""Test-only faults at exact points of a checkpoint save (tests/test_checkpointing.py), for the old code and the new
alike: put this directory on ``PYTHONPATH`` (every spawned rank imports it at start-up) and set
``MEGATRON_SIMREG_SAVE_FAULT``:

* ``mkdir:<name>``: rank 0's ``os.makedirs`` of the directory ``<name>`` (e.g. ``iter_0000002.tmp``) raises
  ``PermissionError``, as on a directory this job may no longer write.
* ``crash-between-renames``: just before a re-save renames ``iter_N.tmp`` to ``iter_N``, after it moved the previous
  ``iter_N`` aside (``iter_N.old`` exists), :class:`InjectedCrash` (a ``BaseException``, which no handler of the
  trainer catches) ends the process, leaving the disk as a kill there would. (Not a real SIGKILL: the torch_dist
  writer's multiprocessing manager would outlive it holding the test's output pipes.)
* ``pause-at-fsync:<name>``: the first ``os.fsync`` of a file under a directory ``<name>`` (torch_dist's writer syncs
  each file it writes, so this is inside ``dist_checkpointing.save``) creates the file named by
  ``MEGATRON_SIMREG_SAVE_FAULT_MARKER`` and sleeps, so that a test can SIGKILL the whole process group mid-save.
"""

import errno
import os

_FAULT = os.environ.get("MEGATRON_SIMREG_SAVE_FAULT", "")

if _FAULT.startswith("mkdir:"):
    _name = _FAULT.split(":", 1)[1]
    _makedirs = os.makedirs

    def _failing_makedirs(name, *args, **kwargs):
        if os.path.basename(os.path.normpath(str(name))) == _name and os.environ.get("RANK", "0") == "0":
            raise PermissionError(errno.EACCES, "Permission denied (injected by tests/shims/save_faults)", str(name))
        return _makedirs(name, *args, **kwargs)

    os.makedirs = _failing_makedirs
elif _FAULT == "crash-between-renames":
    _rename = os.rename

    class InjectedCrash(BaseException):
        pass

    def _crashing_rename(src, dst, *args, **kwargs):
        src, dst = str(src), str(dst)
        if src.endswith(".tmp") and src[:-4] == dst and os.path.isdir(dst + ".old"):
            raise InjectedCrash(f"crash injected between the renames of a re-save, before {src} -> {dst}")
        return _rename(src, dst, *args, **kwargs)

    os.rename = _crashing_rename
elif _FAULT.startswith("pause-at-fsync:"):
    import time

    _name = _FAULT.split(":", 1)[1]
    _fsync = os.fsync

    def _pausing_fsync(fd):
        try:
            path = os.readlink(f"/proc/self/fd/{fd}") if isinstance(fd, int) else ""
        except OSError:
            path = ""
        if f"/{_name}/" in path:
            with open(os.environ["MEGATRON_SIMREG_SAVE_FAULT_MARKER"], "a") as marker:
                marker.write(f"{os.getpid()} {path}\n")
            time.sleep(600)  # until the test kills the process group
        return _fsync(fd)

    os.fsync = _pausing_fsync
