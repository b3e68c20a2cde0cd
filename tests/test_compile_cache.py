"""Where compiled kernels are kept between runs: --compile_cache, else the user's $TORCHINDUCTOR_CACHE_DIR, else
~/.cache/minilora/compile (trainer/compile_cache.py)."""

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from model.errors import UserError
from tests.train_utils import (
    REPO,
    lora_args,
    python,
    run_cli,
    save_tiny_minimind,
    small_disk,
    subprocess_env,
    write_chat_data,
)
from trainer.compile_cache import (
    ENV,
    compile_cache_dir,
    compile_cache_for_run,
    full_disk_error,
    torch_default,
    use_compile_cache,
)


@pytest.fixture
def home_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$XDG_CACHE_HOME in tmp_path, and the variable as importing torch._dynamo leaves it: PyTorch's default."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv(ENV, str(torch_default()))
    return tmp_path / "xdg" / "minilora" / "compile"


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    """A file: no folder can be made under it."""
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    return path


def test_the_flag_then_the_users_variable_then_the_minilora_cache(home_cache, tmp_path, monkeypatch):
    assert torch_default() is not None  # every supported torch names its default
    assert compile_cache_dir(None) == (home_cache, None)  # PyTorch's own default counts as unset
    monkeypatch.delenv(ENV)
    assert compile_cache_dir(None) == (home_cache, None)
    monkeypatch.setenv(ENV, str(tmp_path / "mine"))
    assert compile_cache_dir(None) == (tmp_path / "mine", f"${ENV}={tmp_path / 'mine'}")
    assert compile_cache_dir(str(tmp_path / "flag")) == (tmp_path / "flag", f"--compile_cache {tmp_path / 'flag'}")


def test_using_a_folder_creates_it_and_points_inductor_there(home_cache):
    assert use_compile_cache(None) == home_cache
    assert home_cache.is_dir() and os.environ[ENV] == str(home_cache.resolve())
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert cache_dir() == str(home_cache.resolve())  # what Inductor itself will open


def test_only_a_run_that_compiles_uses_the_folder(home_cache):
    """An eager CPU run compiles nothing and makes no folder; a GPU run compiles its loss even uncompiled."""
    assert compile_cache_for_run(None, use_compile=False, device_type="cpu") is None
    assert not home_cache.exists()
    assert compile_cache_for_run(None, use_compile=False, device_type="cuda") == home_cache
    assert compile_cache_for_run(None, use_compile=True, device_type="cpu") == home_cache


def test_a_folder_that_cannot_be_written(home_cache, a_file, monkeypatch):
    """One the user chose (the flag, the variable) is a clear error naming the choice; the default one gives way
    to PyTorch's own folder."""
    with pytest.raises(UserError, match=r"--compile_cache .*a_file/cache: cannot write the compile cache there"):
        use_compile_cache(str(a_file / "cache"))
    monkeypatch.setenv(ENV, str(a_file / "cache"))
    with pytest.raises(UserError, match=rf"\${ENV}=.*a_file/cache: cannot write the compile cache there"):
        use_compile_cache(None)
    monkeypatch.setenv(ENV, str(torch_default()))
    monkeypatch.setenv("XDG_CACHE_HOME", str(a_file))  # ~/.cache/minilora/compile cannot be made
    assert use_compile_cache(None) == torch_default()
    assert os.environ[ENV] == str(torch_default())


@pytest.mark.parametrize("script", ["trainer/train_lora.py", "scripts/chat.py"])
def test_an_unwritable_variable_stops_a_script_before_torch_fails_on_it(script, a_file):
    """Importing torch._dynamo creates $TORCHINDUCTOR_CACHE_DIR (torch 2.11, 2.13, 2.15) and raises if it cannot:
    every script checks the variable first, so the user gets one line that names it, and exit 2."""
    bad = a_file / "cache"
    run = run_cli([python(), script, "--help"], 120, cwd=REPO, env=subprocess_env(**{ENV: str(bad)}))
    assert run.returncode == 2, run.stderr
    assert run.stderr == f"error: ${ENV}={bad}: cannot write the compile cache there; give a folder you can write, " \
                         "or leave it unset\n"
    assert run.stdout == ""


def test_a_compiled_run_keeps_its_kernels_in_the_minilora_cache(tmp_path):
    """The trainer's default where the user set no $TORCHINDUCTOR_CACHE_DIR: a compiled run writes Inductor's
    cache under ~/.cache/minilora/compile (here under $XDG_CACHE_HOME), and its `compiling...` line names that
    folder. In a subprocess: Inductor keeps paths into its folder for the rest of a process (the header that its
    C++ kernels include), so a run in the test's own process would leave later tests' compiles depending on this
    test's temporary folder."""
    weight = save_tiny_minimind(tmp_path / "base.pth")
    data = write_chat_data(tmp_path / "chats.jsonl", 8)
    argv = lora_args(tmp_path, weight, data, packing=1, use_compile=1, batch_size=4, max_seq_len=64, max_steps=2)
    env = subprocess_env(XDG_CACHE_HOME=str(tmp_path / "xdg"))
    env.pop(ENV, None)  # as in a shell where the user never set it
    run = run_cli([python(), "trainer/train_lora.py", *argv], 600, cwd=REPO, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    home_cache = tmp_path / "xdg" / "minilora" / "compile"
    assert f"seconds with a warm cache in {home_cache.resolve()}, longer" in run.stdout
    assert any(p.is_file() for p in home_cache.rglob("*")), "Inductor wrote nothing into the folder"


def test_a_full_disk_under_the_compile_cache_stops_with_one_line_and_keeps_the_checkpoint(tmp_path):
    """A real full disk (a 256 KiB tmpfs, where mounting is permitted) holds the compile cache of a resumed
    compiled run: Inductor cannot write its kernels there. The run stops at its first step with one `error:` line
    that names the folder and the fix, exit 2, and the checkpoint it resumed from is unchanged."""
    with small_disk(tmp_path / "small", "256k") as small:
        weight = save_tiny_minimind(tmp_path / "base.pth")
        data = write_chat_data(tmp_path / "chats.jsonl", 8)
        flags = dict(packing=1, batch_size=4, max_seq_len=64)
        eager = run_cli([python(), "trainer/train_lora.py", *lora_args(tmp_path, weight, data, max_steps=1, **flags)],
                        300, cwd=REPO, env=subprocess_env())
        assert eager.returncode == 0, eager.stderr[-3000:]
        saved = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
        assert any(p.name.endswith("_resume.pth") for p in saved)

        argv = lora_args(tmp_path, weight, data, max_steps=2, use_compile=1, from_resume=1,
                         compile_cache=small / "compile", **flags)
        run = run_cli([python(), "trainer/train_lora.py", *argv], 600, cwd=REPO, env=subprocess_env())
        assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-3000:]
        assert "Traceback" not in run.stderr, run.stderr[-3000:]
        line = run.stderr.strip().splitlines()[-1]
        folder = (small / "compile").resolve()
        assert line.startswith(f"error: the disk holding the compile cache {folder} is full ("), line
        assert " MiB free" in line and "point --compile_cache at a folder on another disk" in line, line
        assert {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()} == saved


def test_a_full_disk_elsewhere_names_the_file_and_other_errors_pass_through(home_cache, tmp_path):
    use_compile_cache(None)
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "plot.png"))
    assert str(full_disk_error(full)).startswith(f"the disk is full: {(tmp_path / 'plot.png').resolve()} could not "
                                                 "be written (")
    inside = OSError(errno.EDQUOT, "Disk quota exceeded", str(home_cache / "fx" / "kernel.py"))
    assert str(full_disk_error(inside)).startswith(f"the disk holding the compile cache {home_cache.resolve()} is full")
    assert full_disk_error(ValueError("bad value")) is None
    assert full_disk_error(OSError(errno.EACCES, "Permission denied", str(tmp_path))) is None


def test_a_damaged_compile_cache_stops_with_one_line_naming_it(tmp_path):
    """Kernel modules of the compile cache cut short, then empty (as a crash while Inductor wrote them leaves
    them): the next compiled run stops with one `error:` line naming the cache, exit 2; the folder removed, as
    that line says, the run after it trains."""
    weight = save_tiny_minimind(tmp_path / "base.pth")
    data = write_chat_data(tmp_path / "chats.jsonl", 8)
    cache = tmp_path / "compile"
    argv = lora_args(tmp_path, weight, data, packing=1, use_compile=1, batch_size=4, max_seq_len=64, max_steps=1,
                     compile_cache=cache)

    def train() -> subprocess.CompletedProcess:
        return run_cli([python(), "trainer/train_lora.py", *argv], 600, cwd=REPO, env=subprocess_env())

    assert (first := train()).returncode == 0, first.stderr[-3000:]
    modules = sorted(cache.rglob("*.py"))
    assert modules, "Inductor wrote no kernel module"
    for damage in (lambda source: source[:100], lambda source: b""):
        for module in modules:
            module.write_bytes(damage(module.read_bytes()))
        run = train()
        assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
        line = run.stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: the compile cache {cache.resolve()} holds a damaged file ("), line
        assert "remove that folder" in line, line
    shutil.rmtree(cache)
    assert (again := train()).returncode == 0, again.stderr[-3000:]
