"""Fixtures shared by the test modules."""

import pytest


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """One data cache for the session: the default corpus and tokenizer are prepared once into it (~9 s)."""
    return str(tmp_path_factory.mktemp("data_cache"))
