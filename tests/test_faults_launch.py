"""Faults around launching and checkpointing (issue 15, items 3 and 6): stop signals reach every worker, one error
path for every launch mode, a full disk during a save, and fsync before a checkpoint becomes visible."""

import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from trainer_utils import ROOT, TINY, metrics, train

POINTER = "latest_checkpointed_iteration.txt"


def _wait_for_first_row(proc, save, timeout=300):
    path = os.path.join(save, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline and not (os.path.exists(path) and os.path.getsize(path) > 0):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.5)


def _workers(launcher_pid):
    """The launcher's spawned workers (not multiprocessing's resource tracker)."""
    out = subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout.split()
    workers = []
    for pid in map(int, out):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            workers.append(pid)
    return workers


def _alive(pid):
    """Running (a zombie waiting for a reaper is dead)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("sig,at_start_up", [(signal.SIGTERM, False), (signal.SIGTERM, True), (signal.SIGKILL, False)],
                         ids=["sigterm", "sigterm-during-start-up", "sigkill"])
def test_a_signal_to_the_launcher_reaches_every_worker(tmp_path, cache, sig, at_start_up):
    """SIGTERM: forwarded, every worker saves at the same step and the launcher exits 0, also when it comes while
    the workers are still starting. SIGKILL (nothing can be forwarded): the workers' parent-death signal ends them;
    none is left orphaned."""
    save = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "megatron_simreg.cli", "train", *TINY, "--data-cache-path", cache,
           "--train-iters", "100000", "--save", save, "--nproc-per-node", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        if at_start_up:
            deadline = time.time() + 120
            while time.time() < deadline and len(_workers(proc.pid)) < 2:
                time.sleep(0.1)
        else:
            _wait_for_first_row(proc, save)
        workers = _workers(proc.pid)
        assert len(workers) == 2, workers
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=200)
        if sig == signal.SIGTERM:
            assert proc.returncode == 0, err[-3000:]
            last = int(open(os.path.join(save, POINTER)).read())
            assert last == metrics(save)[-1]["iteration"] and last < 100000
            assert os.path.isdir(os.path.join(save, f"iter_{last:07d}"))
        deadline = time.time() + 10  # SIGKILL: the kernel delivers the death signal as the launcher exits
        while time.time() < deadline and any(map(_alive, workers)):
            time.sleep(0.2)
        assert not [pid for pid in workers if _alive(pid)], f"workers outlived the launcher: {workers}"
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in _workers(proc.pid):
            os.kill(pid, signal.SIGKILL)


def test_a_corrupt_checkpoint_is_one_error_line_in_every_launch_mode(tmp_path, cache):
    save = str(tmp_path / "run")
    train("--train-iters", "2", "--save", save, cache=cache)
    with open(os.path.join(save, "iter_0000002", "__0_0.distcp"), "r+b") as f:  # a torch_dist tensor file
        f.truncate(100)
    for launch in ([], ["--nproc-per-node", "2"]):
        out = train("--train-iters", "2", "--load", save, *launch, cache=cache, expect_ok=False)
        errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
        assert out.returncode == 2, (launch, out.returncode, out.stderr[-3000:])
        assert len(errors) == 1 and "iter_0000002" in errors[0] and "--load" in errors[0], (launch, out.stderr[-3000:])
        assert "Traceback" not in out.stderr, (launch, out.stderr[-3000:])


def test_a_corrupt_deepspeed_checkpoint_file_is_named(tmp_path, cache):
    save = str(tmp_path / "run")
    ds = ["--deepspeed", "--zero-stage", "2"]
    train("--train-iters", "2", "--save", save, *ds, cache=cache)
    state = os.path.join(save, "iter_0000002", "deepspeed", "state")
    bad = os.path.join(state, "mp_rank_00_model_states.pt")
    assert os.path.isfile(bad), os.listdir(state)
    with open(bad, "r+b") as f:
        f.truncate(100)
    out = train("--train-iters", "2", "--load", save, *ds, cache=cache, expect_ok=False)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and len(errors) == 1, out.stderr[-3000:]
    assert bad in errors[0] and "point --load at another checkpoint" in errors[0], errors


# Runs the trainer in this process with its Megatron backend's checkpoint writer failing as a full disk does at
# iteration 2 (after writing part of a file): no production test hook needed.
_FULL_DISK = """
import errno, os, sys
from megatron_simreg.training import backends
write = backends.MegatronBackend.write_checkpoint
def full_disk(self, directory, iteration):
    if iteration == 2:
        with open(os.path.join(directory, "__0_0.distcp"), "wb") as f:
            f.write(b"partial")
        raise RuntimeError("writing __0_0.distcp failed") from OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return write(self, directory, iteration)
backends.MegatronBackend.write_checkpoint = full_disk
from megatron_simreg.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _assert_full_disk_handled(out, save, previous):
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and len(errors) == 1, (out.returncode, out.stderr[-3000:])
    assert "no space left" in errors[0] and os.path.join(save, "iter_0000002.tmp") in errors[0], errors
    assert f"iter_{previous:07d}" in errors[0] and "--load" in errors[0], errors
    assert not [d for d in os.listdir(save) if d.endswith(".tmp")], os.listdir(save)
    assert open(os.path.join(save, POINTER)).read() == str(previous)
    assert os.path.isfile(os.path.join(save, f"iter_{previous:07d}", "meta.json"))


def test_a_full_disk_during_a_save_says_so_and_removes_the_partial_directory(tmp_path, cache):
    save = str(tmp_path / "run")
    cmd = [sys.executable, "-c", _FULL_DISK, "train", *TINY, "--data-cache-path", cache, "--train-iters", "3",
           "--save", save, "--save-interval", "1"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    _assert_full_disk_handled(out, save, previous=1)


def test_a_full_tmpfs_during_a_save(tmp_path, cache):
    """A real full filesystem: a tmpfs with room for one checkpoint, not two (two ranks write the second)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    size = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2500k", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if size.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {size.stderr.strip()}")
    try:
        save = str(mnt / "run")
        out = train("--train-iters", "3", "--save", save, "--save-interval", "1", "--nproc-per-node", "2",
                    cache=cache, expect_ok=False)
        _assert_full_disk_handled(out, save, previous=1)
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


class _FakeBackend:
    """``write_checkpoint`` writes one file, or fails with ``error`` after writing part of it."""

    reshardable = True

    def __init__(self, error=None):
        self.error = error

    def write_checkpoint(self, directory, iteration):
        with open(os.path.join(directory, "shard.bin"), "wb") as f:
            f.write(b"x" * 10)
        if self.error is not None and iteration > 1:
            raise self.error


def test_an_opaque_write_error_on_a_full_disk_is_a_full_disk(tmp_path, monkeypatch):
    """torch's C++ writer may say only "basic_ios::clear: iostream error": the free space tells."""
    import shutil

    from megatron_simreg.training import checkpoint as ckpt

    root = str(tmp_path / "run")
    ckpt.save(root, 1, {}, _FakeBackend())
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=4096))
    with pytest.raises(ckpt.CheckpointError, match="no space left on device") as e:
        ckpt.save(root, 2, {}, _FakeBackend(RuntimeError("basic_ios::clear: iostream error")))
    assert "iter_0000001" in str(e.value)
    assert sorted(os.listdir(root)) == ["iter_0000001", POINTER]
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10**12))
    with pytest.raises(ckpt.CheckpointError, match="iostream error") as e:  # any other failure: named, cleaned up
        ckpt.save(root, 2, {}, _FakeBackend(RuntimeError("basic_ios::clear: iostream error")))
    assert "no space" not in str(e.value) and sorted(os.listdir(root)) == ["iter_0000001", POINTER]
    with pytest.raises(ckpt.CheckpointError, match="no space left on device"):
        ckpt.save(root, 2, {}, _FakeBackend(OSError(errno.ENOSPC, "No space left on device")))


def test_a_save_is_fsynced_before_it_becomes_visible(tmp_path, monkeypatch):
    """The files and the directory are on disk before the rename; the rename and the pointer before returning."""
    from megatron_simreg.training import checkpoint as ckpt

    events = []
    fsync, rename, replace = os.fsync, os.rename, os.replace

    def record_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append(("rename", a)), rename(a, b)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", b)), replace(a, b)))
    root = str(tmp_path / "run")
    os.makedirs(root)
    ckpt.save(root, 1, {}, _FakeBackend())
    tmp = os.path.join(root, "iter_0000001.tmp")
    i_rename = events.index(("rename", tmp))
    i_pointer = events.index(("replace", os.path.join(root, POINTER)))
    before = events[:i_rename]
    for path in (os.path.join(tmp, "shard.bin"), os.path.join(tmp, "meta.json"), tmp):
        assert ("fsync", path) in before, (path, events)
    assert before.index(("fsync", tmp)) > before.index(("fsync", os.path.join(tmp, "shard.bin")))
    assert ("fsync", root) in events[i_rename:i_pointer], events
    assert ("fsync", root) in events[i_pointer:], events


def test_rendezvous_ports_come_from_below_the_ephemeral_range(monkeypatch):
    """A port from the ephemeral range can be given to an outgoing connection between free_port() and rank 0's bind
    (EADDRINUSE, seen once in about 300 rendezvous under load); below it only another free_port() can take it."""
    from megatron_simreg.parallel import process

    low = process._ephemeral_low()
    assert low > process.LOWEST_PORT + 1000, f"this machine's ephemeral range starts at {low}"
    assert all(process.LOWEST_PORT <= process.free_port() < low for _ in range(20))
    monkeypatch.setattr(process, "_bindable", lambda port: False)  # every pick in use: the kernel picks one
    assert process.free_port() >= low
