"""Tokenized data kept on disk, so that the next run on the same data (a resume, a new learning rate) skips
tokenizing it.

An entry is found by a digest of everything its tokens depend on: the data file's bytes, the tokenizer (its
whole serialized form and special tokens), the chat template, the maximum length, whether bad lines are
skipped, the source of the tokenizing code, and the versions of the libraries that render and tokenize. Any
change gives another digest, so an entry is never stale. A damaged entry is tokenized again and replaced; a
cache that cannot be written (no permission, a nearly full disk) only costs the time it would have saved.
Each data file keeps its KEEP most recently used entries.
"""

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from model.atomic import SaveError, atomic_write

KEEP = 3  # entries per data file: e.g. two --max_seq_len values and the tokenizer of a second base
MIN_FREE = 2**30  # bytes a write leaves free on the cache's disk, for the run's own checkpoints
# The code that turns a line into tokens and a mask: an edit to any of them makes new entries.
SOURCES = ("lm_dataset.py", "chat_render.py", "records.py", "token_cache.py")


def minilora_cache(name: str) -> Path:
    """$XDG_CACHE_HOME/minilora/<name>, else ~/.cache/minilora/<name>: where this repo keeps what outlives a run."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minilora" / name


def default_cache_dir() -> Path:
    """$MINILORA_CACHE_DIR, else $XDG_CACHE_HOME/minilora/tokenized, else ~/.cache/minilora/tokenized."""
    if os.environ.get("MINILORA_CACHE_DIR"):
        return Path(os.environ["MINILORA_CACHE_DIR"])
    return minilora_cache("tokenized")


def cache_from_flag(flag: str | None, write: bool = True) -> "TokenCache | None":
    """--data_cache: a folder, `none` (no cache), or unset (default_cache_dir()). `write` False: read only."""
    if flag is not None and flag.strip().lower() in ("", "none", "off", "0"):
        return None
    return TokenCache(Path(flag).expanduser() if flag else default_cache_dir(), write)


def tokenizer_fingerprint(tokenizer: Any) -> dict:
    """What a tokenizer contributes to the tokens: its Rust tokenizer (vocabulary, merges, added tokens,
    normalizer), which tokens are special, and its own chat template."""
    return {"backend": tokenizer.backend_tokenizer.to_str(), "special": dict(tokenizer.special_tokens_map),
            "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
            "chat_template": getattr(tokenizer, "chat_template", None)}


def _code_and_versions() -> dict:
    here = Path(__file__).parent
    code = hashlib.sha256(b"".join((here / name).read_bytes() for name in SOURCES)).hexdigest()
    # transformers' jinja environment (its filters and extensions) renders the templates
    versions = {name: version(name) for name in ("tokenizers", "jinja2", "transformers", "numpy")}
    return {"code": code, "python": sys.version_info[:2], **versions}


def file_digest(path: Path) -> str | None:
    """sha256 of the file's bytes; None if it cannot be read (the reader then reports why)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


@dataclass
class Tokens:
    """A tokenized file: the flat arrays of TokenizedDataset and what was left out."""

    ids: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray
    skipped: int  # invalid lines (kept only with skip_invalid)
    dropped: int  # samples with nothing to learn after truncation
    unrendered: dict[str, int] = field(default_factory=dict)  # samples whose tools/reasoning the template drops
    crowded: int = 0  # of the dropped samples, those that the chat template's own prompt left nothing to learn


@dataclass
class TokenCache:
    """A folder of tokenized files. `write` False: read entries only (ranks other than the first)."""

    folder: Path
    write: bool = True

    def entry(self, data_path: str | os.PathLike, encoder: dict) -> Path | None:
        """Where the tokens of `data_path` under `encoder` (what the encoder depends on) live; None if the file
        cannot be read or a library's version is unknown."""
        data = file_digest(Path(data_path))
        if data is None:
            return None
        try:
            code = _code_and_versions()
        except PackageNotFoundError:  # a library run from a source folder: no version to key on, so no cache
            return None
        key = json.dumps({"data": data, "encoder": encoder, **code}, sort_keys=True, default=str)
        where = hashlib.sha256(str(Path(data_path).resolve()).encode()).hexdigest()[:16]
        return self.folder / f"{where}-{hashlib.sha256(key.encode()).hexdigest()[:32]}.npz"

    def load(self, entry: Path) -> Tokens | None:
        """The entry's tokens, or None if it is missing or damaged."""
        try:
            with np.load(entry, allow_pickle=False) as f:
                skipped, dropped, crowded = (int(n) for n in f["left_out"])
                unrendered = dict(zip(f["unrendered_kinds"].tolist(), f["unrendered"].tolist()))
                tokens = Tokens(f["ids"], f["mask"], f["lengths"], skipped, dropped, unrendered, crowded)
        except Exception:  # missing, truncated, not a zip, a key or dtype missing: tokenize again
            return None
        if not _consistent(tokens):
            return None
        try:
            os.utime(entry)  # most recently used, for the pruning
        except OSError:
            pass
        return tokens

    def save(self, entry: Path, tokens: Tokens) -> str:
        """Write the entry; returns why it was not written ("" when it was)."""
        size = tokens.ids.nbytes + tokens.mask.nbytes + tokens.lengths.nbytes
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(self.folder).free
        except OSError as err:
            return f"not cached: {self.folder} ({err.strerror or err})"
        if free < size + MIN_FREE:
            return f"not cached: {free / 2**20:,.0f} MiB free on {self.folder}"
        kinds = sorted(tokens.unrendered)
        arrays = dict(ids=tokens.ids, mask=tokens.mask, lengths=tokens.lengths,
                      left_out=np.array([tokens.skipped, tokens.dropped, tokens.crowded], dtype=np.int64),
                      unrendered_kinds=np.array(kinds, dtype=str),
                      unrendered=np.array([tokens.unrendered[k] for k in kinds], dtype=np.int64))
        try:
            atomic_write(entry, lambda f: np.savez(f, **arrays))
        except SaveError as err:
            return f"not cached: {err}"
        except OSError as err:  # e.g. a folder where the entry goes
            return f"not cached: {entry} ({err.strerror or err})"
        self._prune(entry)
        return ""

    def _prune(self, entry: Path) -> None:
        """Keep the KEEP most recently used entries of this entry's data file."""
        prefix = entry.name.split("-")[0]
        older = sorted(self.folder.glob(f"{prefix}-*.npz"), key=_mtime, reverse=True)[KEEP:]
        for path in older:
            try:
                path.unlink(missing_ok=True)
            except OSError:  # another user's entry in a shared folder, a folder of that name
                pass


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # removed by another run meanwhile
        return 0.0


def _consistent(t: Tokens) -> bool:
    """An entry whose arrays fit together (a file cut short or edited by hand does not)."""
    return (t.ids.dtype == np.int32 and t.mask.dtype == bool and t.lengths.dtype == np.int64
            and t.ids.ndim == t.mask.ndim == t.lengths.ndim == 1 and len(t.ids) == len(t.mask)
            and len(t.lengths) > 0 and int(t.lengths.min()) > 0 and int(t.lengths.sum()) == len(t.ids)
            and t.skipped >= 0 and 0 <= t.crowded <= t.dropped and all(n >= 0 for n in t.unrendered.values()))
