"""Where the compiled decoder is kept between runs: a folder that outlives a reboot, so that a new run's first
step loads its kernels instead of compiling them (3-4 s instead of 11-16 s at the Qwen3-0.6B shape on one
H200; docs/PERF.md).

PyTorch keeps Inductor's cache, and the Triton kernels it builds, in a folder of the temp directory, which a
reboot, a container or a batch job's private /tmp starts empty. The trainer keeps them beside its tokenized data
instead, unless the user chose a folder: `--compile_cache`, or $TORCHINDUCTOR_CACHE_DIR.
"""

import os
import sys
import warnings
from pathlib import Path

from dataset.token_cache import minilora_cache
from model.atomic import error_chain, free_space, is_no_space, no_space_cause
from model.errors import UserError, first_line, print_error

ENV = "TORCHINDUCTOR_CACHE_DIR"  # Inductor reads it whenever it opens its cache; Triton's cache lies inside
# How the errors of a run stopped by its compile cache end: Inductor's files are not the run's checkpoints.
KEPT = "The files this run saved before are unchanged"


def torch_default() -> Path | None:
    """PyTorch's own folder for the cache (in the temp directory), where this torch says which it is."""
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:
        return None
    return Path(default_cache_dir())


def compile_cache_dir(flag: str | None) -> tuple[Path, str | None]:
    """(folder, who chose it): --compile_cache, else $TORCHINDUCTOR_CACHE_DIR where the user set it, else
    ~/.cache/minilora/compile (chosen by no one).

    Importing torch._dynamo sets the variable to PyTorch's default when it is unset, so that value counts as
    unset."""
    if flag:
        return Path(flag).expanduser(), f"--compile_cache {flag}"
    chosen = os.environ.get(ENV)
    if chosen and Path(chosen) != torch_default():
        return Path(chosen), f"${ENV}={chosen}"
    return minilora_cache("compile"), None


def _writable_folder(folder: Path) -> bool:
    """Whether `folder` exists or can be made, and a file can be made in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK)


def _unwritable(chooser: str) -> UserError:
    return UserError(f"{chooser}: cannot write the compile cache there; give a folder you can write, or leave it unset")


def exit_if_variable_unwritable() -> None:
    """Exit 2 with one `error:` line when the user's $TORCHINDUCTOR_CACHE_DIR cannot be written.
    Scripts call it (through trainer/frozen_imports.py) before their imports: importing torch._dynamo creates that
    folder, and fails there with a traceback (torch 2.11, 2.13 and 2.15; not 2.6)."""
    chosen = os.environ.get(ENV)
    if chosen and not _writable_folder(Path(chosen)):
        print_error(_unwritable(f"${ENV}={chosen}"))
        sys.exit(2)


def use_compile_cache(flag: str | None) -> Path:
    """Point Inductor at compile_cache_dir(flag) for this process and its children; returns the folder used.

    A folder the user chose and that cannot be written is an error that names the choice; the default one
    gives way to PyTorch's own, so a read-only home costs only the warm starts."""
    folder, chooser = compile_cache_dir(flag)
    if not _writable_folder(folder):
        if chooser:
            raise _unwritable(chooser)
        return Path(os.environ.get(ENV) or torch_default() or folder)  # PyTorch's own choice stands
    os.environ[ENV] = str(folder.resolve())
    return folder


def compile_cache_for_run(flag: str | None, use_compile: bool, device_type: str) -> Path | None:
    """use_compile_cache(flag) for a run that compiles anything: a compiled decoder, or any GPU run (its loss
    compiles even with --use_compile 0; trainer/loss.py). None for an eager CPU run, which compiles nothing."""
    return use_compile_cache(flag) if use_compile or device_type == "cuda" else None


def stopped_by_cache(err: BaseException) -> UserError | None:
    """The one-line error for a run that a full disk (full_disk_error) or a damaged compile cache
    (damaged_cache_error) stopped; None for any other error."""
    return full_disk_error(err) or damaged_cache_error(err)


def _compiling(err: BaseException) -> bool:
    """Whether `err` came out of torch's compiler (its own exception types wrap what went wrong)."""
    return any(type(e).__module__.startswith(("torch._inductor", "torch._dynamo")) for e in error_chain(err))


def _cache_folder() -> Path:
    """The compile cache in use: the folder Inductor reads from the variable, else PyTorch's default."""
    return Path(os.environ.get(ENV) or torch_default() or minilora_cache("compile")).resolve()


def _damaged(module: Path) -> bool:
    """Whether a kernel module of the cache is empty or does not parse (cut short)."""
    try:
        source = module.read_bytes()
        with warnings.catch_warnings():  # e.g. an escape sequence Python warns of is not damage
            warnings.simplefilter("ignore")
            compile(source, str(module), "exec")
    except (SyntaxError, ValueError, OSError):
        return True
    return not source.strip()


def damaged_cache_error(err: BaseException) -> UserError | None:
    """For a failed compile: the error that names a kernel module of the compile cache that is empty or cut
    short, as a crash while Inductor wrote it can leave one (Inductor would load it and fail with an
    unrelated-looking traceback). None if the compile did not fail or no such module is there."""
    if not _compiling(err):
        return None
    cache = _cache_folder()
    damaged = next((m for m in sorted(cache.rglob("*.py")) if _damaged(m)), None) if cache.is_dir() else None
    if damaged is None:
        return None
    return UserError(f"the compile cache {cache} holds a damaged file ({damaged} is empty or cut short, as a crash "
                     f"while it was written can leave it); remove that folder (the next run compiles anew) or "
                     f"point --compile_cache elsewhere. {KEPT}")


def full_disk_error(err: BaseException) -> UserError | None:
    """The one-line error for a run stopped by a full disk outside the checkpoint writes (those say so themselves,
    model/atomic.py): in practice the compile cache, which Inductor writes while it compiles. None for any other
    error."""
    if not is_no_space(err):
        return None
    cause = no_space_cause(err)
    file = Path(cause.filename).resolve() if cause is not None and cause.filename else None
    cache = _cache_folder()
    # Inductor's writes fail as the file is closed, with no file name; the compiler's own exception wraps them.
    in_cache = file.is_relative_to(cache) if file else _compiling(err)
    if in_cache:
        detail = f"; {first_line(cause)}" if cause else ""  # a C++ compiler that failed says only that
        return UserError(f"the disk holding the compile cache {cache} is full ({free_space(cache)}{detail}); free "
                         f"space there, or point --compile_cache at a folder on another disk. {KEPT}")
    where = f"{file} could not be written ({free_space(file.parent)})" if file else first_line(err)
    return UserError(f"the disk is full: {where}; free space and run again. {KEPT}")
