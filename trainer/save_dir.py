"""The save dir, checked before training (a run must not train for hours and then fail to save) and locked
(two runs writing the same files would overwrite each other's checkpoints)."""

import atexit
import contextlib
import errno
import fcntl
import os
import re
import shutil
import socket
from pathlib import Path

from model.atomic import atomic_write_bytes, temp_name
from model.errors import UserError
from trainer.distributed import DistInfo, gather_objects


class SaveDirError(UserError):
    """A --save_dir that cannot take this run's files, or one another run is writing to."""


# What each job writes beside {stem}: suffix -> "file" or "dir" (checked before training).
LORA_OUTPUTS = {".pth": "file", "": "dir", ".json": "file", "_resume.pth": "file", "_loss.png": "file"}
FULL_OUTPUTS = {"": "dir", ".json": "file", "_resume.pth": "file", "_loss.png": "file"}

_held: dict[str, int] = {}  # lock file -> open descriptor, for the run(s) of this process


def check_save_dir(stem: Path, outputs: dict[str, str]) -> None:
    """Raise SaveDirError unless `stem`'s folder can take this run's files: a writable folder, and no
    `outputs` path ({suffix: "file" | "dir"}) that exists as the other kind."""
    folder = stem.parent
    if folder.exists() and not folder.is_dir():
        raise SaveDirError(f"--save_dir {folder} is a file, not a folder; pass a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SaveDirError(f"--save_dir {folder}: cannot create it ({err.strerror or err}); "
                           "pass a folder you can write to") from err
    probe = temp_name(stem, "probe")
    try:
        atomic_write_bytes(probe, b"minilora write test\n")
    except UserError as err:
        why = getattr(err.__cause__, "strerror", None) or err
        raise SaveDirError(f"--save_dir {folder} is not writable ({why}); pass a folder you can write to") from err
    probe.unlink(missing_ok=True)
    for suffix, kind in outputs.items():
        path = stem.parent / (stem.name + suffix)
        wrong = path.is_file() if kind == "dir" else path.is_dir()
        if path.exists() and wrong:
            raise SaveDirError(f"{path} exists as a {'file' if kind == 'dir' else 'folder'}, where this run "
                               f"writes its {kind}; move it away or pass another --save_dir/--lora_name")


def lock_run(stem: Path) -> Path:
    """Hold `{stem}.lock` (flock) until this process exits or locks it again; raise SaveDirError if another
    process holds it. The kernel drops the lock when its holder dies, so a killed run never blocks the next."""
    path = stem.parent / (stem.name + ".lock")
    key = str(path.resolve())
    old = _held.pop(key, None)
    if old is not None:  # this process's earlier run (runs in one process are sequential)
        os.close(old)
    for _ in range(3):  # the file may be unlinked by its holder between our open and our flock
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as err:
            raise SaveDirError(f"{path}: cannot create the run's lock file ({err.strerror or err}); "
                               "pass a --save_dir you can write to") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read_holder(fd)
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise SaveDirError(f"{path}: cannot lock it ({err.strerror or err})") from err
            raise SaveDirError(f"another run ({holder}) is writing {stem.name}.* in {stem.parent}; wait for it "
                               "to end, or pass another --lora_name or --save_dir") from None
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)
    else:
        raise SaveDirError(f"{path}: the lock file keeps changing under this run; is another run starting?")
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    _held[key] = fd
    return path


def _read_holder(fd: int) -> str:
    with contextlib.suppress(OSError):
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if text:
            return text
    return "pid unknown"


@atexit.register
def release_locks() -> None:
    """Remove this process's lock files (while still holding them) and let them go (also run at exit)."""
    for key, fd in list(_held.items()):
        with contextlib.suppress(OSError):
            os.unlink(key)
        with contextlib.suppress(OSError):
            os.close(fd)
        _held.pop(key, None)


def remove_leftovers(stem: Path, outputs: dict[str, str]) -> list[Path]:
    """Delete the temp files and folders a killed run left for `stem`'s outputs (call while holding the
    lock, so none of them is being written), putting back a folder it had moved aside; returns what it
    removed."""
    names = "|".join(re.escape(stem.name + suffix) for suffix in outputs)
    pattern = re.compile(rf"\.(?:{names})\.\d+-[0-9a-f]{{8}}\.(?:tmp|old|probe)")
    removed = []
    for path in sorted(stem.parent.iterdir()):
        if pattern.fullmatch(path.name) and path.name.endswith(".old") and "" in outputs and not stem.exists():
            # Killed inside write_dir between moving the old folder aside and moving the new one in: the old
            # one is whole, so it goes back.
            os.replace(path, stem)
            continue
        if pattern.fullmatch(path.name):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def prepare_save_dir(stem: Path, outputs: dict[str, str], info: DistInfo) -> None:
    """check_save_dir + lock_run on rank 0 (the one that writes), before training, then removes what a
    killed run left half-written; every rank raises the same SaveDirError if that fails, so a bad
    --save_dir ends the whole job at once."""
    problem = None
    if info.is_main:
        try:
            check_save_dir(stem, outputs)
            lock_run(stem)
            remove_leftovers(stem, outputs)
        except SaveDirError as err:
            problem = str(err)
    problems = gather_objects(problem, info)
    if problems[0] is not None:
        raise SaveDirError(problems[0])
