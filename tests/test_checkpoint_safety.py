"""Checkpoints that survive faults, and bad ones refused clearly: a crash or a real ``kill -9`` in the middle of a
save, a failure to prepare the save directory, a pointer missing or written late, an unwritable save directory,
corrupt or mismatched checkpoints, a NaN loss, SIGUSR1, a tokenizer larger than the checkpoint's vocabulary.
Exact resume is in ``test_checkpointing.py``.

Each run is a ``megatron-simreg train`` subprocess on a tiny GPT over the cached stdlib corpus.
"""

import os
import signal
import subprocess
import sys
import time

from trainer_utils import REG, ROOT, TINY, assert_same_run, metrics, train

DP2 = ["--nproc-per-node", "2"]


def test_crash_mid_save_keeps_the_last_checkpoint(tmp_path, cache):
    save = str(tmp_path / "run")
    out = train("--train-iters", "4", "--save", save, "--save-interval", "2", cache=cache, expect_ok=False,
                env={"MEGATRON_SIMREG_CRASH_IN_SAVE": "4"})
    assert out.returncode != 0 and "crash injected" in out.stderr
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read() == "2"
    assert os.path.isdir(os.path.join(save, "iter_0000004.tmp"))
    train("--train-iters", "4", "--save", save, "--load", save, cache=cache)
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read() == "4"
    assert not os.path.exists(os.path.join(save, "iter_0000004.tmp"))
    # iterations 3-4 ran twice (before the crash, after the resume); the log keeps each once (issue 15, item 7)
    assert [r["iteration"] for r in metrics(save)] == [1, 2, 3, 4]


SAVE_FAULTS = os.path.join(ROOT, "tests", "shims", "save_faults")  # its sitecustomize injects the fault


def fault_env(fault):
    return {"MEGATRON_SIMREG_SAVE_FAULT": fault,
            "PYTHONPATH": os.pathsep.join(p for p in (SAVE_FAULTS, os.environ.get("PYTHONPATH")) if p)}


def test_a_failure_to_prepare_the_save_directory_is_one_clean_error_on_every_rank(tmp_path, cache):
    """Rank 0 makes ``iter_N.tmp`` before any rank writes; when that fails, every rank gets the same error (exit 2,
    one line), none waits in a barrier for rank 0, and the previous checkpoint stays the pointed-to one."""
    save = str(tmp_path / "run")
    out = train("--train-iters", "2", "--save", save, "--save-interval", "1", *DP2, cache=cache, expect_ok=False,
                env=fault_env("mkdir:iter_0000002.tmp"), timeout=300)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "iter_0000002.tmp" in errors[0] and "Permission denied" in errors[0], errors[0]
    assert "nothing was written" in errors[0] and "iter_0000001 is intact" in errors[0], errors[0]
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read() == "1"


def test_a_crash_between_the_renames_of_a_resave_leaves_a_resumable_pointer(tmp_path, cache):
    """Re-saving iteration 4 moves the old iter_0000004 aside, then renames the new one into place; a kill between
    the two renames leaves the pointer naming iter_0000004 while it is missing. The next run resumes it."""
    save = str(tmp_path / "run")
    run = ["--train-iters", "6", "--save", save, "--save-interval", "2"]
    train(*run, "--exit-interval", "4", cache=cache)
    out = train(*run, "--exit-interval", "4", "--load", save, "--ckpt-step", "2", cache=cache, expect_ok=False,
                env=fault_env("crash-between-renames"))
    assert out.returncode != 0 and "InjectedCrash" in out.stderr, out.stderr[-3000:]
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read() == "4"
    assert not os.path.exists(os.path.join(save, "iter_0000004"))
    out = train(*run, "--load", save, cache=cache, expect_ok=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "restored the previous copy" in out.stdout
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read() == "6"
    assert os.path.isfile(os.path.join(save, "iter_0000004", "meta.json"))
    assert [r["iteration"] for r in metrics(save)] == [1, 2, 3, 4, 5, 6]


def test_a_real_sigkill_of_two_processes_in_the_middle_of_a_save_resumes_to_the_same_losses(tmp_path, cache,
                                                                                              uninterrupted):
    """``kill -9`` of the launcher and both ranks (the process group, as a node failure would) while torch_dist is
    writing iteration 4's files: the pointer still names iteration 2, the next run resumes it and logs the
    uninterrupted run's losses (the same processes and kernels as assert_same_run's other users: 1e-5)."""
    save, marker = str(tmp_path / "run"), str(tmp_path / "paused")
    flags = ["--train-iters", "4", "--save", save, "--save-interval", "2", *DP2, *REG]
    cmd = [sys.executable, "-m", "megatron_simreg.cli", "train", *TINY, "--data-cache-path", cache, *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **fault_env("pause-at-fsync:iter_0000004.tmp"),
           "MEGATRON_SIMREG_SAVE_FAULT_MARKER": marker}
    with open(tmp_path / "killed.log", "w") as log:  # not a pipe: nothing of the killed group may hold the test
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while not os.path.exists(marker) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # every process of the run, torch_dist's writer helpers included
            proc.wait(timeout=30)
    assert os.path.exists(marker), open(tmp_path / "killed.log").read()[-3000:]
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read() == "2"
    assert os.path.isdir(os.path.join(save, "iter_0000004.tmp"))
    train(*flags, "--load", save, cache=cache)
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read() == "4"
    assert_same_run(uninterrupted(*DP2, *REG), save)


def test_checkpoints_without_a_pointer_are_never_overwritten(tmp_path, cache):
    """A kill between a save's rename and its pointer write leaves iter_* but no pointer (issue 15, item 4)."""
    save = tmp_path / "run"
    (save / "iter_0000002").mkdir(parents=True)
    for flags in ([], ["--fresh-start"]):
        out = train("--train-iters", "2", "--save", str(save), "--load", str(save), *flags, cache=cache,
                    expect_ok=False)
        assert out.returncode == 2 and "latest_checkpointed_iteration.txt" in out.stderr, out.stderr[-2000:]
        assert "none of them is complete" in out.stderr  # an empty iter_ dir: no meta.json
    assert sorted(os.listdir(save)) == ["iter_0000002"]


def test_unwritable_save_fails_before_training(tmp_path, cache):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = train("--train-iters", "2", "--save", str(blocker / "run"), cache=cache, expect_ok=False)
    assert out.returncode == 2 and "is not writable" in out.stderr and "iteration 1" not in out.stdout, out.stderr


def test_bad_checkpoints_are_clear_errors(tmp_path, cache):
    save = str(tmp_path / "run")
    train("--train-iters", "2", "--save", save, cache=cache)
    out = train("--train-iters", "2", "--load", save, "--hidden-size", "64", cache=cache, expect_ok=False)
    assert out.returncode != 0 and "does not match" in out.stderr and "hidden_size: checkpoint=32 run=64" in out.stderr
    with open(os.path.join(save, "iter_0000002", "__0_0.distcp"), "r+b") as f:  # a torch_dist tensor file
        f.truncate(100)
    out = train("--train-iters", "2", "--load", save, cache=cache, expect_ok=False)
    error = [line for line in out.stderr.splitlines() if "cannot read checkpoint" in line]  # one line, no traceback
    assert out.returncode == 2 and len(error) == 1 and "corrupt" in error[0] and "iter_0000002" in error[0], \
        out.stderr[-3000:]
    missing = str(tmp_path / "nothing_here")
    out = train("--train-iters", "2", "--load", missing, cache=cache, expect_ok=False)
    assert out.returncode != 0 and "no checkpoint there" in out.stderr and "--fresh-start" in out.stderr
    train("--train-iters", "2", "--load", missing, "--fresh-start", cache=cache)


def test_nan_loss_stops_and_keeps_the_checkpoint(tmp_path, cache):
    save = str(tmp_path / "run")
    out = train("--train-iters", "6", "--save", save, "--save-interval", "1", "--lr", "1e30", "--clip-grad", "0",
                cache=cache, expect_ok=False)
    assert out.returncode == 3, out.stderr[-2000:]
    assert "(not finite)" in out.stderr
    last = int(open(os.path.join(save, "latest_checkpointed_iteration.txt")).read())
    assert os.path.isdir(os.path.join(save, f"iter_{last:07d}"))


def test_sigusr1_saves_at_the_next_step_and_exits_cleanly(tmp_path, cache):
    import signal
    import time

    save = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "megatron_simreg.cli", "train", *TINY, "--data-cache-path", cache,
           "--train-iters", "100000", "--lr-warmup-iters", "1", "--save", save]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 200
    while time.time() < deadline and not (os.path.exists(os.path.join(save, "metrics.jsonl"))
                                          and os.path.getsize(os.path.join(save, "metrics.jsonl")) > 0):
        time.sleep(0.5)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=200)
    assert proc.returncode == 0, err[-2000:]
    last = int(open(os.path.join(save, "latest_checkpointed_iteration.txt")).read())
    assert last == metrics(save)[-1]["iteration"] and last < 100000


def test_tokenizer_larger_than_the_checkpoint_vocabulary(tmp_path, cache):
    from megatron_simreg.data.default_corpus import prepare_default_corpus

    save = str(tmp_path / "run")
    train("--train-iters", "2", "--save", save, cache=cache)  # default tokenizer: 4096 tokens
    prefix, big_tokenizer = prepare_default_corpus(cache, vocab_size=8192)
    out = train("--train-iters", "4", "--load", save, "--data-path", prefix, "--tokenizer-model", big_tokenizer,
                cache=cache, expect_ok=False)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "the tokenizer has 8192 tokens but the model's vocabulary has only 4096" in out.stderr
