"""Starting the trainer: in-process under a launcher, or N local processes.

Under torchrun, srun or the deepspeed launcher ``RANK`` is set and the trainer
runs in this process. Otherwise ``--nproc-per-node N`` starts N processes on
this machine (gloo on CPU) with the usual environment variables.

Both modes end the same way: a bad-input error (:func:`_error_exit`) is one
``error: ...`` line and exit 2 (a stopped run, exit 3), never a traceback. With
N processes each worker writes its line into a folder the launcher reads, and
the launcher prints one (rank 0's, else the lowest failing rank's), not N.
The launcher forwards SIGTERM and SIGUSR1 to every worker (they save at the
next step boundary and exit, see :mod:`.signals`), and a worker dies with its
launcher even when the launcher is SIGKILLed (:func:`_die_with_parent`).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
from typing import Optional, Tuple

from ..parallel.process import free_port

FORWARDED = (signal.SIGTERM, signal.SIGUSR1)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _error_exit(e: BaseException) -> Optional[Tuple[int, str]]:
    """``(exit code, message)`` for an error whose message says what to fix; ``None`` for anything else (a bug:
    its traceback is the report)."""
    from .checkpoint import CheckpointError
    from .trainer import TrainingStopped

    if isinstance(e, TrainingStopped):
        return 3, str(e)
    if isinstance(e, (ValueError, FileNotFoundError, CheckpointError)):
        return 2, str(e)
    return None


def _die_with_parent(launcher_pid: int) -> None:
    """Have the kernel SIGKILL this worker when the launcher dies, even by SIGKILL (Linux; a no-op elsewhere).

    SIGKILL, not SIGTERM: the launcher forwards SIGTERM itself when it can; a
    launcher that is gone without forwarding was killed hard (OOM killer, the
    scheduler's final kill), and nobody is left to collect an exit code. A
    SIGTERM would start a save that waits in collectives for ranks that may be
    dead; the last completed checkpoint is intact (saves are atomic), so ending
    at once loses at most the steps since it. torch sets SIGINT here, which a
    worker blocked in a collective does not act on.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != launcher_pid:  # the launcher died before prctl took effect
        os._exit(1)


def _child(rank: int, world: int, port: int, argv, launcher_pid: int, errors_dir: str):
    _die_with_parent(launcher_pid)
    from .. import known_warnings

    known_warnings.install()  # a spawned worker does not inherit the launcher's warning filters
    from .signals import install_signal_handlers

    install_signal_handlers()  # a signal during start-up (imports, data) stops the run at its first step
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)  # blocked by the launcher until now
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from .args import parse_train_args
    from .trainer import run

    try:
        run(parse_train_args(argv))
    except Exception as e:
        report = _error_exit(e)
        if report is None:
            raise  # torch.multiprocessing passes the traceback to the launcher
        path = os.path.join(errors_dir, str(rank))
        with open(path + ".tmp", "w") as f:  # renamed when complete: the launcher may kill this rank meanwhile
            f.write(f"{report[0]}\n{report[1]}")
        os.replace(path + ".tmp", path)
        sys.exit(report[0])


def _forward_signals(pids):
    """Pass SIGTERM/SIGUSR1 on to the workers ``pids()``; returns a function restoring the old handlers."""
    def handler(signum, frame):
        for pid in pids():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:  # already exited
                pass

    previous = {sig: signal.signal(sig, handler) for sig in FORWARDED}

    def restore():
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore


def _worker_error(errors_dir: str) -> Optional[Tuple[int, str]]:
    """The failing workers' one report: rank 0's, else the lowest rank's, as ``(exit code, message)``."""
    ranks = sorted(int(name) for name in os.listdir(errors_dir) if name.isdigit())
    if not ranks:
        return None
    code, message = open(os.path.join(errors_dir, str(ranks[0]))).read().split("\n", 1)
    return int(code), message


def _launch_local(n: int, argv) -> int:
    """Run ``n`` workers on this machine; returns the exit code (the workers' reported one on failure)."""
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException, ProcessExitedException

    if not os.environ.get("OMP_NUM_THREADS"):
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
    errors_dir = tempfile.mkdtemp(prefix="megatron-simreg-errors-")
    # Blocked while the workers start, and inherited blocked by them until their handlers are installed: a signal
    # in the meantime waits (here, then in the worker) instead of being lost or killing a worker mid-import.
    # (multiprocessing's resource tracker, started by the first spawn, would unblock SIGTERM: start it before.)
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    restore = lambda: None  # noqa: E731
    try:
        context = mp.start_processes(_child, args=(n, free_port(), argv, os.getpid(), errors_dir), nprocs=n,
                                     start_method="spawn", join=False)
        restore = _forward_signals(context.pids)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
        try:
            # a failure ends the others: a grace period to report their own error, then SIGTERM, then SIGKILL
            while not context.join(grace_period=10):
                pass
        except ProcessException as e:
            reported = _worker_error(errors_dir)
            if reported is not None:
                print(f"error: {reported[1]}", file=sys.stderr)
                return reported[0]
            if isinstance(e, ProcessExitedException):  # killed (e.g. out of memory), no Python error
                print(f"error: worker {e.error_index} (pid {e.error_pid}) {str(e).split(' ', 2)[2]}",
                      file=sys.stderr)
                return 1
            print(str(e).strip(), file=sys.stderr)  # a worker's traceback: a bug
            return 1
        return 0
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
        restore()
        shutil.rmtree(errors_dir, ignore_errors=True)


def launch(args, argv) -> int:
    """Run training for parsed ``args`` (``argv`` re-parsed in children)."""
    n = args.nproc_per_node
    if n and n > 1 and "RANK" not in os.environ:
        return _launch_local(n, argv)
    from .trainer import run

    try:
        run(args)
    except Exception as e:
        report = _error_exit(e)
        if report is None:
            raise
        print(f"error: {report[1]}", file=sys.stderr)
        return report[0]
    return 0
