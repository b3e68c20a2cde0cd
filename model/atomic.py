"""Write a file so that a crash, a full disk or a second writer leaves the old file or the new one, never half.

The one way every checkpoint, config, adapter and plot of this repo reaches the disk: a temp file with a
unique name in the destination's folder (created exclusively, never through a symlink), fsynced, renamed
over the destination, and the folder fsynced so the rename survives a power loss.
"""

import errno
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from model.errors import UserError

# Errors that mean "no room": a full disk, a quota, a file-size limit (ulimit -f / RLIMIT_FSIZE).
NO_SPACE = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
# What a full disk looks like when the writer is C++ (torch.save's zip writer) rather than Python.
NO_SPACE_TEXT = ("unexpected pos", "iostream error", "No space left", "File too large", "file write failed",
                 "Disk quota")


class SaveError(UserError):
    """A file that could not be written (full disk, no permission); the message names the path and why."""


def temp_name(path: Path, kind: str = "tmp") -> Path:
    """A hidden name beside `path` that no other writer (run, rank, thread) picks: `.{name}.{random}.{kind}`."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.{kind}")


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems (e.g. some network mounts) refuse fsync on a folder
    finally:
        os.close(fd)


def free_space(folder: Path) -> str:
    """Free space on the file system holding `folder`, for messages ("12.3 MiB free")."""
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free"
    except OSError:
        return "free space unknown"


def error_chain(err: BaseException | None) -> Iterator[BaseException]:
    """`err` and what caused it: its cause or context, and the error torch's compiler wraps (`inner_exception`,
    raised `from None`)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = getattr(err, "inner_exception", None) or err.__cause__ or err.__context__


def no_space_cause(err: BaseException) -> OSError | None:
    """The OSError in `err`'s chain that says the disk, a quota or a file-size limit ran out (it names the file
    where the failing call had one)."""
    return next((e for e in error_chain(err) if isinstance(e, OSError) and e.errno in NO_SPACE), None)


def is_no_space(err: BaseException) -> bool:
    """Whether `err` (or what caused it) says the disk, a quota or a file-size limit ran out."""
    return no_space_cause(err) is not None or any(text in str(e) for e in error_chain(err)
                                                  for text in NO_SPACE_TEXT)


def no_space_error(what: str, doing: str, folder: Path, kept: str) -> SaveError:
    """The one line for a write that the disk, a quota or `ulimit -f` stopped: `what` failed while `doing`, in
    `folder`; `kept` says what is left as it was."""
    return SaveError(f"{what}: the disk is full or a file-size limit was hit while {doing} ({free_space(folder)} on "
                     f"{folder}); free space (or raise `ulimit -f`) or pass another --save_dir. {kept}")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object], mode: int = 0o644) -> None:
    """Call `write(f)` on a fresh temp file beside `path`, then rename it to `path`.

    `mode` (less the umask) is the new file's permission: 0644 lets other users of a shared save dir read it.
    A full disk or a denied write raises SaveError naming the path; the temp file is removed either way.
    """
    path = Path(path)
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SaveError(f"{path}: cannot create its folder {folder} ({err.strerror or err}); "
                        "pass a writable location") from err
    tmp = temp_name(path)
    try:
        # O_EXCL + O_NOFOLLOW: never write through a file or symlink someone else put at the temp name.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    except OSError as err:
        raise SaveError(f"{path}: cannot write in {folder} ({err.strerror or err}); "
                        "pass a folder you can write to") from err
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, Exception) and is_no_space(err):
            raise no_space_error(str(path), "writing it", folder,
                                 "The previous file at that name, if any, is unchanged") from err
        if isinstance(err, PermissionError):
            raise SaveError(f"{path}: permission denied ({err}); pass a folder you can write to") from err
        raise
    fsync_dir(folder)


def share_readable(folder: Path, mode: int = 0o644) -> None:
    """Give every file under `folder` `mode` less the umask: writers such as safetensors' save_file create
    0600 files, which other users of a shared save dir cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode & ~umask)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
    """atomic_write() of a bytes object."""
    atomic_write(path, lambda f: f.write(data), mode)


def atomic_write_text(path: str | os.PathLike, text: str, mode: int = 0o644) -> None:
    """atomic_write() of UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def refuse_empty_folder(folder: str | Path, flag: str) -> None:
    """An output folder flag given as "" would write into the working directory, wherever the command ran."""
    if not str(folder).strip():  # `flag` may end with the value ("--out_dir {folder}"): here only blanks
        raise UserError(f"{flag.strip()} is empty, which would write into the current directory; pass a folder (. for the "
                        "current one)")


def make_output_folder(folder: str | Path, flag: str) -> None:
    """Create a folder a script writes to before its work starts, or stop with one line naming `flag`."""
    refuse_empty_folder(folder, flag)
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{flag}: cannot make the folder {folder} ({err.strerror or err})") from None
