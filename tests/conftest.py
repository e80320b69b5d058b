"""Fixtures shared by the test modules."""

import pytest


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """One data cache for the session: the default corpus and tokenizer are prepared once into it (~9 s)."""
    return str(tmp_path_factory.mktemp("data_cache"))


# No silent skips: a skip whose reason is not in tests/expected_skips.txt fails the run (see tests/skip_policy.py).
from skip_policy import (  # noqa: E402,F401  (pytest finds the hooks by name in this module)
    pytest_collectreport,
    pytest_runtest_logreport,
    pytest_sessionfinish,
    pytest_terminal_summary,
)
