"""Every run in the suite, in-process or in a subprocess, keeps its tokenized data in one temporary folder, not
in the user's ~/.cache (dataset/token_cache.py)."""

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def token_cache_in_a_temporary_folder(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["MINILORA_CACHE_DIR"] = str(tmp_path_factory.mktemp("token_cache"))
