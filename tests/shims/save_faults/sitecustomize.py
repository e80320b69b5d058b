"""Test-only faults at exact points of a checkpoint save (tests/test_checkpointing.py), for the old code and the new
alike: put this directory on ``PYTHONPATH`` (every spawned rank imports it at start-up) and set
``MEGATRON_SIMREG_SAVE_FAULT``:

* ``mkdir:<name>``: rank 0's ``os.makedirs`` of the directory ``<name>`` (e.g. ``iter_0000002.tmp``) raises
  ``PermissionError``, as on a directory this job may no longer write.
* ``crash-between-renames``: just before a re-save renames ``iter_N.tmp`` to ``iter_N``, after it moved the previous
  ``iter_N`` aside (``iter_N.old`` exists), :class:`InjectedCrash` (a ``BaseException``, which no handler of the
  trainer catches) ends the process, leaving the disk as a kill there would. (Not a real SIGKILL: the torch_dist
  writer's multiprocessing manager would outlive it holding the test's output pipes.)
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
