"""Every run in the suite, in-process or in a subprocess, keeps its tokenized data in one temporary folder and
its compiled kernels in a folder of the temp directory, not in the user's ~/.cache (dataset/token_cache.py,
trainer/compile_cache.py)."""

import os
import tempfile

import pytest


@pytest.fixture(autouse=True, scope="session")
def token_cache_in_a_temporary_folder(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["MINILORA_CACHE_DIR"] = str(tmp_path_factory.mktemp("token_cache"))


@pytest.fixture(autouse=True, scope="session")
def compile_cache_in_the_temp_directory() -> None:
    # Kept across sessions, as PyTorch's own default folder is: later sessions compile less.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), "minilora-tests-compile")
