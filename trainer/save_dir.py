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
import weakref
from pathlib import Path

from model.atomic import atomic_write_bytes, temp_name
from model.errors import UserError
from trainer.distributed import DistInfo, gather_objects
from trainer.logger import shown_path


class SaveDirError(UserError):
    """A --save_dir that cannot take this run's files, or one another run is writing to."""


# What each job writes beside {stem}: suffix -> "file" or "dir" (checked before training).
LORA_OUTPUTS = {".pth": "file", "": "dir", ".json": "file", "_resume.pth": "file", "_loss.png": "file"}
FULL_OUTPUTS = {".pth": "file", "": "dir", ".json": "file", "_resume.pth": "file", "_loss.png": "file"}

_held: dict[str, int] = {}  # lock file -> open descriptor, for the run(s) of this process


def check_save_dir(stem: Path, outputs: dict[str, str], name_flag: str = "--lora_name") -> None:
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
        if kind == "dir" and path.is_symlink():
            raise SaveDirError(f"{path} is a symbolic link, and each save replaces this folder whole; move the link "
                               f"away, or pass another --save_dir/{name_flag}")
        wrong = path.is_file() if kind == "dir" else path.is_dir()
        if path.exists() and wrong:
            raise SaveDirError(f"{path} exists as a {'file' if kind == 'dir' else 'folder'}, where this run "
                               f"writes its {kind}; move it away or pass another --save_dir/{name_flag}")


class RunLock:
    """A held `{stem}.lock`. Let go by release(), when the object is dropped (the job's main() returned or
    raised), or at exit; the kernel also drops it when the process dies, so a killed run never blocks the next."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd, self.pid = path, fd, os.getpid()

    def release(self) -> None:
        """Remove the lock file (while still holding it) and unlock it; in a forked child, only close it."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        if os.getpid() != self.pid:  # a forked copy must not unlock its parent's lock
            with contextlib.suppress(OSError):
                os.close(fd)
            return
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                os.unlink(self.path)
        with contextlib.suppress(OSError):
            fcntl.lockf(fd, fcntl.LOCK_UN)
        with contextlib.suppress(OSError):
            os.close(fd)

    def __del__(self) -> None:
        self.release()


_held: "weakref.WeakValueDictionary[str, RunLock]" = weakref.WeakValueDictionary()


def lock_run(stem: Path, name_flag: str = "--lora_name") -> RunLock:
    """Hold `{stem}.lock` while the returned RunLock lives; raise SaveDirError if another process holds it. An
    earlier lock of this process on the same files is let go first (its run has ended).

    A POSIX record lock (lockf), not flock: it belongs to this process alone, so forked loader workers do not
    share it, and a killed run's lock is gone at once even while its orphaned workers are still exiting."""
    path = stem.parent / (stem.name + ".lock")
    key = str(path.resolve())
    old = _held.pop(key, None)
    if old is not None:
        old.release()
    for _ in range(3):  # the file may be unlinked by its holder between our open and our lock
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as err:
            raise SaveDirError(f"{path}: cannot create the run's lock file ({err.strerror or err}); "
                               "pass a --save_dir you can write to") from err
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read_holder(fd)
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise SaveDirError(f"{path}: cannot lock it ({err.strerror or err})") from err
            raise SaveDirError(f"another run ({holder}) is writing {stem.name}.* in {stem.parent}; wait for it "
                               f"to end, or pass another {name_flag} or --save_dir") from None
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)
    else:
        raise SaveDirError(f"{path}: the lock file keeps changing under this run; is another run starting?")
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    lock = RunLock(path, fd)
    _held[key] = lock
    return lock


def _read_holder(fd: int) -> str:
    with contextlib.suppress(OSError):
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if text:
            return text
    return "pid unknown"


@atexit.register
def release_locks() -> None:
    """Let go of every lock this process still holds (also run at exit)."""
    for lock in list(_held.values()):
        lock.release()
    _held.clear()


def remove_leftovers(stem: Path, outputs: dict[str, str]) -> list[Path]:
    """Delete the temp files and folders a killed run left for `stem`'s outputs (call while holding the
    lock, so none of them is being written), putting back an output folder it had moved aside; returns what it
    removed."""
    names = "|".join(re.escape(stem.name + suffix) for suffix in outputs)
    pattern = re.compile(rf"\.({names})\.\d+-[0-9a-f]{{8}}\.(tmp|old|probe)")
    removed = []
    for path in sorted(stem.parent.iterdir()):
        match = pattern.fullmatch(path.name)
        if not match:
            continue
        output = stem.parent / match.group(1)
        if match.group(2) == "old" and path.is_dir() and not output.exists():
            # Killed between moving the old folder aside and moving the new one in: the old one is whole.
            os.replace(path, output)
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def refuse_writing_over_inputs(stem: Path, outputs: dict[str, str], inputs: dict[str, str | None],
                               name_flag: str) -> None:
    """Raise SaveDirError if one of the run's outputs would replace one of its `inputs` ({flag: path}): the
    first save would destroy the model or LoRA the run started from."""
    for flag, given in inputs.items():
        if not given or not Path(given).exists():
            continue
        source = Path(given).resolve()
        for suffix, kind in outputs.items():
            out = (stem.parent / (stem.name + suffix)).resolve()
            if source == out or (kind == "dir" and out in source.parents):
                raise SaveDirError(f"{shown_path(out)} is where this run writes, and it holds the run's own {flag} "
                                   f"{given}: writing there would replace it. Pass another {name_flag} or "
                                   "--save_dir")


def prepare_save_dir(stem: Path, outputs: dict[str, str], info: DistInfo, inputs: dict[str, str | None] | None = None,
                     name_flag: str = "--lora_name") -> RunLock | None:
    """check_save_dir + lock_run on rank 0 (the one that writes), before training, then removes what a
    killed run left half-written; every rank raises the same SaveDirError if that fails, so a bad
    --save_dir, or one where the outputs would replace the run's `inputs`, ends the whole job at once. Keep the
    returned lock (rank 0's) while the run writes."""
    problem, lock = None, None
    if info.is_main:
        try:
            refuse_writing_over_inputs(stem, outputs, inputs or {}, name_flag)
            check_save_dir(stem, outputs, name_flag)
            lock = lock_run(stem, name_flag)
            remove_leftovers(stem, outputs)
        except SaveDirError as err:
            problem = str(err)
    problems = gather_objects(problem, info)
    if problems[0] is not None:
        if lock is not None:
            lock.release()
        raise SaveDirError(problems[0])
    return lock
