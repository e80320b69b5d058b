"""Faults and changed settings on resume (issue 15): a NaN step is never saved, the LR schedule follows the flags or
refuses, changed data settings are refused, ``--ckpt-step`` steps back. Each run is a ``train`` subprocess."""

import glob
import os

import pytest
import torch

from trainer_utils import metrics, train

POINTER = "latest_checkpointed_iteration.txt"


def pointer(save):
    return int(open(os.path.join(save, POINTER)).read())


def tensors_of(iteration_dir, tmp_path):
    """Every tensor a checkpoint holds: the torch_dist files (Megatron) or the DeepSpeed engine's files."""
    if os.path.isfile(os.path.join(iteration_dir, ".metadata")):
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        out = str(tmp_path / "flat.pt")
        dcp_to_torch_save(iteration_dir, out)
        states = [torch.load(out, weights_only=False)]
    else:
        states = [torch.load(f, weights_only=False) for f in glob.glob(f"{iteration_dir}/deepspeed/state/*.pt")]
    found = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            found.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(states)
    return [t for t in found if t.is_floating_point()]


@pytest.mark.parametrize("backend", [[], ["--deepspeed", "--zero-stage", "2"]], ids=["megatron", "deepspeed"])
def test_a_nan_gradient_is_never_saved_and_the_advice_works(tmp_path, cache, backend):
    save = str(tmp_path / "run")
    run = ["--train-iters", "4", "--save", save, "--save-interval", "1", *backend]
    out = train(*run, cache=cache, expect_ok=False, env={"MEGATRON_SIMREG_NAN_GRAD_AT": "3"})
    assert out.returncode == 3, out.stderr[-2000:]
    assert pointer(save) == 2 and not os.path.exists(os.path.join(save, "iter_0000003")), os.listdir(save)
    held = tensors_of(os.path.join(save, "iter_0000002"), tmp_path)
    assert held and all(bool(torch.isfinite(t).all()) for t in held)
    assert "iter_0000002" in out.stderr and "--override-opt_param-scheduler" in out.stderr, out.stderr[-2000:]
    # the advice: a lower --lr with the flags' schedule, from the kept checkpoint
    train(*run, "--load", save, "--lr", "3e-4", "--override-opt_param-scheduler", cache=cache)
    rows = metrics(save)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    assert all(r["lm_loss"] == r["lm_loss"] and r["grad_norm"] == r["grad_norm"] for r in rows)


def test_the_lr_schedule_on_resume_follows_the_flags_or_refuses(tmp_path, cache):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train("--train-iters", "4", "--save", full, "--lr", "1e-3", cache=cache)
    train("--train-iters", "4", "--save", part, "--lr", "3e-3", "--exit-interval", "2", cache=cache)
    # a different --lr: refused, naming both choices
    out = train("--train-iters", "4", "--save", part, "--load", part, "--lr", "1e-3", cache=cache, expect_ok=False)
    assert out.returncode == 2 and "--lr: checkpoint=0.003 run=0.001" in out.stderr, out.stderr[-2000:]
    assert "--override-opt_param-scheduler" in out.stderr and "--use-checkpoint-opt_param-scheduler" in out.stderr
    # overridden: iterations 3-4 run at the rates of a run that had --lr 1e-3 from the start
    train("--train-iters", "4", "--save", part, "--load", part, "--lr", "1e-3", "--override-opt_param-scheduler",
          cache=cache)
    assert [r["lr"] for r in metrics(part)[2:]] == pytest.approx([r["lr"] for r in metrics(full)[2:]], rel=1e-12)
    # --no-load-optim: the flags' schedule at the checkpoint's iteration, not restarted at its peak
    weights = str(tmp_path / "weights")
    train("--train-iters", "4", "--save", weights, "--load", part, "--ckpt-step", "2", "--no-load-optim",
          "--lr", "1e-3", cache=cache)
    assert metrics(weights)[0]["iteration"] == 3
    assert metrics(weights)[0]["lr"] == pytest.approx(metrics(full)[2]["lr"], rel=1e-12)


def test_extending_train_iters_is_refused_with_the_choices(tmp_path, cache):
    save = str(tmp_path / "run")
    train("--train-iters", "4", "--save", save, "--min-lr", "1e-4", cache=cache)
    out = train("--train-iters", "6", "--save", save, "--load", save, "--min-lr", "1e-4", cache=cache,
                expect_ok=False)
    assert out.returncode == 2 and "--train-iters: checkpoint=4 run=6" in out.stderr, out.stderr[-2000:]
    for flag, check in (("--use-checkpoint-opt_param-scheduler", lambda lr: lr == pytest.approx(1e-4)),
                        ("--override-opt_param-scheduler", lambda lr: lr > 1e-4)):
        ext = str(tmp_path / flag)
        train("--train-iters", "6", "--save", ext, "--load", save, "--min-lr", "1e-4", flag, cache=cache)
        rates = [r["lr"] for r in metrics(ext)]
        assert [r["iteration"] for r in metrics(ext)] == [5, 6] and all(map(check, rates)), (flag, rates)


@pytest.mark.parametrize("change,field", [
    (["--global-batch-size", "8"], "--global-batch-size: checkpoint=4 run=8"),
    (["--seed", "7"], "--seed: checkpoint=1234 run=7"),
    (["--split", "900,90,10"], "--split"),
    (["--simreg-weight", "0.1"], "--simreg-weight: checkpoint=0.0 run=0.1"),
    (["--data-path", "DEFAULT_PREFIX", "--tokenizer-model", "DEFAULT_TOKENIZER"], "--data-path: checkpoint=None"),
], ids=["global-batch", "seed", "split", "simreg-weight", "data-path"])
def test_changed_data_settings_on_resume_are_refused(tmp_path_factory, cache, change, field):
    from megatron_simreg.data.default_corpus import prepare_default_corpus

    save = str(tmp_path_factory.getbasetemp() / "data_settings_run")
    if not os.path.exists(os.path.join(save, POINTER)):  # one 2-iteration run serves every case
        train("--train-iters", "2", "--save", save, cache=cache)
    prefix, tokenizer = prepare_default_corpus(cache)
    change = [{"DEFAULT_PREFIX": prefix, "DEFAULT_TOKENIZER": tokenizer}.get(x, x) for x in change]
    out = train("--train-iters", "3", "--load", save, *change, cache=cache, expect_ok=False)
    assert out.returncode == 2 and field in out.stderr and "--allow-changed-on-resume" in out.stderr, \
        out.stderr[-2000:]


def test_an_allowed_batch_size_change_keeps_consumed_tokens_true(tmp_path, cache):
    save = str(tmp_path / "run")
    train("--train-iters", "3", "--save", save, "--exit-interval", "2", cache=cache)
    out = train("--train-iters", "3", "--save", save, "--load", save, "--global-batch-size", "8",
                "--allow-changed-on-resume", "global-batch-size", cache=cache)
    assert "--global-batch-size: checkpoint=4 run=8" in out.stdout
    # 2 iterations x 4 samples x 32 tokens, then one of 8 samples
    assert [r["consumed_tokens"] for r in metrics(save)] == [128, 256, 512]


def test_ckpt_step_steps_back_to_an_older_checkpoint(tmp_path, cache):
    save = str(tmp_path / "run")
    train("--train-iters", "4", "--save", save, "--save-interval", "1", cache=cache)
    first = metrics(save)
    train("--train-iters", "4", "--save", save, "--load", save, "--ckpt-step", "2", cache=cache)
    assert [r["iteration"] for r in metrics(save)] == [1, 2, 3, 4]
    assert [r["lm_loss"] for r in metrics(save)] == pytest.approx([r["lm_loss"] for r in first], rel=1e-6)
    out = train("--train-iters", "4", "--load", save, "--ckpt-step", "7", cache=cache, expect_ok=False)
    assert out.returncode == 2 and "iter_0000007 is not a complete checkpoint" in out.stderr \
        and "1, 2, 3, 4" in out.stderr.replace("[", "").replace("]", ""), out.stderr[-2000:]


def test_turning_the_distributed_optimizer_or_bf16_on_or_off_names_the_change_and_no_load_optim(tmp_path, cache):
    """megatron-core stores another optimizer state with each of --use-distributed-optimizer and --bf16 and cannot
    load one into the other; the resume says which flag changed and what to pass, not "corrupt checkpoint"."""
    plain, both = str(tmp_path / "plain"), str(tmp_path / "both")
    run = ["--train-iters", "2", "--exit-interval", "1"]
    train(*run, "--save", plain, cache=cache)
    train(*run, "--save", both, "--use-distributed-optimizer", "--bf16", cache=cache)
    for load, flags, changed in ((plain, ["--bf16"], ["--bf16: checkpoint=off run=on"]),
                                 (both, [], ["--use-distributed-optimizer: checkpoint=on run=off",
                                             "--bf16: checkpoint=on run=off"])):
        out = train(*run, "--load", load, *flags, cache=cache, expect_ok=False)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
        assert "corrupt" not in out.stderr and "--no-load-optim" in out.stderr, out.stderr[-3000:]
        assert all(line in out.stderr for line in changed), (changed, out.stderr[-3000:])
    # the advice works: the weights only, at the new settings
    out = train(*run, "--load", both, "--no-load-optim", "--save", str(tmp_path / "weights"), cache=cache)
    assert metrics(str(tmp_path / "weights"))[0]["iteration"] == 2
