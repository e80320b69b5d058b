"""The skip policy (tests/skip_policy.py, tests/expected_skips.txt): an unexpected skip fails the run, with and
without pytest-xdist, and prints its reason; allow-listed ones do not; ``local`` entries are refused on CI."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from skip_policy import load_allow_list

HERE = Path(__file__).resolve().parent

TESTS = '''
import pytest

def test_passes():
    pass

def test_opt_in():
    pytest.skip("opt-in: set FOO=1")

def test_gpu_only_here():
    pytest.skip("only here: no GPU")

@pytest.fixture(scope="module")
def broken():
    pytest.skip("surprise in a fixture")

def test_needs_fixture(broken):
    pass

@pytest.mark.xfail(reason="an xfail is not a skip", strict=True)
def test_xfail():
    assert False
'''
ALLOW = "# comment\nalways ^opt-in: set FOO=1  # opt-in\nlocal ^only here  # not on CI\n"


def run(tmp_path, files, ci, xdist):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # not the repository's ini: no testpaths, no addopts
    (tmp_path / "allow.txt").write_text(ALLOW)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS", "PYTEST_XDIST_WORKER")}
    env.update(PYTHONPATH=os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1",
               MEGATRON_SIMREG_EXPECTED_SKIPS=str(tmp_path / "allow.txt"), **({"CI": "true"} if ci else {}))
    cmd = [sys.executable, "-m", "pytest", "-p", "skip_policy", "-p", "no:cacheprovider", "-q", "-ra",
           *(["-p", "xdist.plugin", "-n", "2", "--dist", "loadfile"] if xdist else []), *files]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def unexpected(out):
    return sorted(line.split(": ", 1)[1] for line in out.stdout.splitlines() if line.startswith("UNEXPECTED SKIP"))


@pytest.mark.parametrize("xdist", [False, True], ids=["serial", "xdist"])
def test_an_unexpected_skip_fails_the_run_and_is_printed(tmp_path, xdist):
    files = {"test_a.py": TESTS,  # and a module skipped at collection, whose report reaches the xdist controller
             "test_b.py": 'import pytest\npytest.importorskip("no_such_module_xyz")\n\ndef test_x():\n    pass\n'}
    out = run(tmp_path, files, ci=True, xdist=xdist)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert "1 passed" in out.stdout and "1 xfailed" in out.stdout, out.stdout[-3000:]
    assert unexpected(out) == ["could not import 'no_such_module_xyz': No module named 'no_such_module_xyz'",
                               "only here: no GPU",  # a `local` entry: refused on CI
                               "surprise in a fixture"], out.stdout[-3000:]


def test_allow_listed_skips_pass(tmp_path):
    files = {"test_a.py": TESTS.split("@pytest.fixture")[0]}  # the passing test, the opt-in and the local skip
    out = run(tmp_path, files, ci=False, xdist=False)  # (under xdist, the test above sees the opt-in allowed)
    assert out.returncode == 0 and unexpected(out) == [], out.stdout[-3000:] + out.stderr[-3000:]
    assert "1 passed, 2 skipped" in out.stdout and "SKIPPED [1] test_a.py:11: only here: no GPU" in out.stdout


def test_the_allow_list_is_short_and_well_formed(tmp_path):
    entries = load_allow_list()
    assert 0 < len(entries) <= 10 and all(why for _, _, why in entries)
    # what must never be allowed: a package setup_env.sh installs, a broken import, a SLURM cluster on CI
    ci = [pattern for scope, pattern, _ in entries if scope == "always"]
    for reason in ["megatron-core is not installed (tools/setup_env.sh installs it)",
                   "could not import 'megatron.core': No module named 'megatron'",
                   "triton cannot be imported (pip install triton); the kernel cannot run, not even in the interpreter",
                   "lm-eval is not installed (pip install lm-eval accelerate)",
                   "the local SLURM cluster could not start: munged failed",
                   "the local SLURM cluster needs root (munged as user munge, slurmd as root)",
                   "needs the checkpoint of test_preprocess_ids_are_autotokenizers_and_train_runs"]:
        assert not any(p.search(reason) for p in ci), reason
    (tmp_path / "bad.txt").write_text("alwyas ^x  # typo\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        load_allow_list(tmp_path / "bad.txt")
