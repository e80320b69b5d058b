"""Fixtures shared by the test modules."""

import pytest


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A data cache per test module: the default corpus and tokenizer are prepared once into it."""
    return str(tmp_path_factory.mktemp("data_cache"))
