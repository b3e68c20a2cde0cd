"""The one exception type for mistakes a user can fix (bad data, wrong flags, mismatched files), and how to
tell running out of memory from them."""

import sys
from collections.abc import Callable
from pathlib import Path

import torch

# How an allocation failure reads: CUDA's own type (in str for older torch), MPS's RuntimeError, and the CPU
# allocator's RuntimeError (torch has no type for the last two).
OUT_OF_MEMORY_TEXTS = ("CUDA out of memory", "MPS backend out of memory", "can't allocate memory")


class UserError(Exception):
    """A problem in the user's input. Scripts print its message without a traceback and exit 2."""


def print_error(message: object) -> None:
    """`error: <message>` on stderr in one write, so that the ranks of a torchrun job do not interleave theirs."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def exit_on_user_error(run: Callable[[], object]) -> None:
    """Call `run()`; a UserError prints `error: <message>` on stderr, with no traceback, and exits 2."""
    try:
        run()
    except UserError as err:
        print_error(err)
        sys.exit(2)


def is_out_of_memory(err: BaseException) -> bool:
    """Whether `err` is an allocation failure (GPU, MPS or CPU): never a sign of a damaged file or bad data."""
    return isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)) or any(
        text in str(err) for text in OUT_OF_MEMORY_TEXTS)


def first_line(err: BaseException) -> str:
    """The first line of `err`'s message (its type's name if it has none): enough for a one-line error."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def unreadable_checkpoint(path: Path, err: BaseException) -> str:
    """Why torch.load could not read `path`, in words a user can act on (not torch's advice to load it unsafely)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        head = b"PK\x03\x04"
    if not head:
        return "the file is empty"
    if path.name.endswith("_resume.pth"):
        stem = path.name.removesuffix("_resume.pth")
        return (f"a resume file (the LoRA with its optimizer and random-generator state), not a LoRA or model file; "
                f"the LoRA is beside it as {stem}.pth and {stem}/, and the run continues with --from_resume 1")
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save writes a zip archive (a pickle before 1.6)
        return "not a PyTorch checkpoint (torch.save writes a zip archive; this file starts otherwise)"
    if "Weights only load failed" in str(err):
        return "it holds Python objects besides tensors, which are not loaded for safety; it is no weights file"
    return f"not a whole PyTorch checkpoint ({first_line(err).split('. ')[0]}; a truncated download?)"
