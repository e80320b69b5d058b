"""Fixtures shared by the test modules."""

import shutil
import tempfile

import pytest

from trainer_utils import train


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """One data cache for the session: the default corpus and tokenizer are prepared once into it (~9 s)."""
    return str(tmp_path_factory.mktemp("data_cache"))


def _trained_once(tmp_path_factory, cache, *run):
    """``get(*flags)``: the save directory of ``train(*run, *flags)``, trained once per flags in this module."""
    runs = {}

    def get(*flags):
        if flags not in runs:
            runs[flags] = str(tmp_path_factory.mktemp("run") / "save")
            train("--train-iters", "4", "--save", runs[flags], *run, *flags, cache=cache)
        return runs[flags]

    return get


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache):
    """The uninterrupted 4-iteration runs the resumed ones are compared with."""
    return _trained_once(tmp_path_factory, cache)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, cache):
    """A copy of a 4-iteration run stopped after iteration 2 (``--exit-interval 2``), trained once per flags: tests
    that resume it, or are refused, share the run."""
    trained = _trained_once(tmp_path_factory, cache, "--exit-interval", "2")

    def get(*flags):
        copy = tempfile.mkdtemp(prefix="resume-", dir=tmp_path_factory.getbasetemp())
        shutil.copytree(trained(*flags), copy, dirs_exist_ok=True)
        return copy

    return get


# No silent skips: a skip whose reason is not in tests/expected_skips.txt fails the run (see tests/skip_policy.py).
from skip_policy import (  # noqa: E402,F401  (pytest finds the hooks by name in this module)
    pytest_collectreport,
    pytest_runtest_logreport,
    pytest_sessionfinish,
    pytest_terminal_summary,
)
