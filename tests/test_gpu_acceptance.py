"""``tools/gpu_acceptance.sh`` stays runnable, and each of its checks can fail.

The smoke test runs every check on a tiny model on CPU (``--cpu-smoke``). This proves the script works, not that
the GPU path does: on CPU there is no TransformerEngine, NCCL or CUDA kernel. The GPU results go in
docs/gpu_acceptance.md.

Each planted-bug test runs one check (``--only N``) with one bug of that check's kind planted by
``tests/acceptance_plants/sitecustomize.py`` (put on ``PYTHONPATH`` with ``SIMREG_ACCEPTANCE_PLANT=N``; the product
has no hook for it) and asserts that the check says FAIL, for the planted reason. Checks 2-4 compare with run 1 of
the smoke run (``--reference``), so each planted run costs only its own check; a planted test first asserts that
the same check passed without the plant, so that a FAIL cannot come from elsewhere.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLANTS = Path(__file__).resolve().parent / "acceptance_plants"
VERDICT = re.compile(r"^(PASS|FAIL) (.*?) \(\d+ s\): (.*)$")
SUMMARY = re.compile(r"^\d+/\d+ checks passed")


def _acceptance(out, cache, *argv, plant=None, timeout=880):
    env = {k: v for k, v in os.environ.items() if k != "SIMREG_ACCEPTANCE_PLANT"}
    if plant is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(PLANTS), *filter(None, [env.get("PYTHONPATH")])])
        env["SIMREG_ACCEPTANCE_PLANT"] = str(plant)
    return subprocess.run([sys.executable, "tools/gpu_acceptance.py", "--cpu-smoke", "--out", str(out),
                           "--data-cache-path", cache, *argv],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _verdicts(completed) -> list:
    """``[(verdict, detail)]`` in check order; a detail runs on to the next verdict or the summary line."""
    out = []
    for line in completed.stdout.splitlines():
        m = VERDICT.match(line)
        if m:
            out.append([m.group(1), m.group(3)])
        elif SUMMARY.match(line):
            break
        elif out:
            out[-1][1] += "\n" + line
    return [tuple(v) for v in out]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("acceptance")
    return out, _acceptance(out, cache)


@pytest.mark.timeout(900)
def test_gpu_acceptance_cpu_smoke(smoke):
    _, out = smoke
    verdicts = _verdicts(out)
    assert out.returncode == 0 and len(verdicts) == 5 and all(v == "PASS" for v, _ in verdicts), \
        out.stdout[-4000:] + out.stderr[-4000:]


def _fails_for_its_reason_1(detail):
    m = re.search(r"validation loss \(the same \d+ held-out batches\) ([\d.]+) -> ([\d.]+)", detail)
    return m is not None and float(m.group(2)) >= float(m.group(1))  # the weights never change


def _fails_for_its_reason_2(detail):
    # the weights and data position are restored (the first resumed forward is bitwise equal), the Adam state not
    return "resumed vs uninterrupted (tolerance 0): max relative difference" in detail


def _fails_for_its_reason_3(detail):
    return "export-hf exited 1" in detail and "parity" in detail.lower()


def _fails_for_its_reason_4(detail):
    # the forward is unchanged (the logged JREG loss too); the gradient is not
    return "recompute vs none" in detail and "max relative difference" in detail


def _fails_for_its_reason_5(detail):
    return "decoder.final_layernorm.weight" in detail and "5 norm modules (expected 5" in detail


PLANTED = {
    1: ("the optimizer never applies the update", _fails_for_its_reason_1),
    2: ("a resume restores no optimizer state", _fails_for_its_reason_2),
    3: ("export-hf swaps layer 0's gate_proj and up_proj", _fails_for_its_reason_3),
    4: ("full recompute drops the deferred JREG gradient", _fails_for_its_reason_4),
    5: ("param_role misclassifies the final norm, which is initialized as a matrix", _fails_for_its_reason_5),
}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("check", sorted(PLANTED), ids=[f"check{n}" for n in sorted(PLANTED)])
def test_planted_bug_fails_its_check(check, smoke, tmp_path, cache):
    smoke_out, unplanted = smoke
    verdicts = _verdicts(unplanted)
    assert len(verdicts) == 5 and verdicts[0][0] == "PASS" and verdicts[check - 1][0] == "PASS", \
        f"check {check} must pass without the plant first:\n{unplanted.stdout[-3000:]}"
    argv = ["--only", str(check)]
    if check in (2, 3, 4):
        argv += ["--reference", str(smoke_out / "train")]
    out = _acceptance(tmp_path, cache, *argv, plant=check, timeout=580)
    got = _verdicts(out)
    why, reason = PLANTED[check]
    assert out.returncode == 1 and len(got) == 1 and got[0][0] == "FAIL", \
        f"planted ({why}) but not failed:\n{out.stdout[-3000:]}{out.stderr[-3000:]}"
    assert reason(got[0][1]), f"check {check} failed, but not for the planted bug ({why}): {got[0][1]}"


def test_gpu_acceptance_refuses_without_a_gpu():
    out = subprocess.run([sys.executable, "tools/gpu_acceptance.py"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "--cpu-smoke" in out.stderr
