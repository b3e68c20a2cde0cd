"""Datasets that tokenize once, at construction, and the two ways to batch them: padded and packed.

A dataset stores every sample in flat numpy arrays (token ids, a supervised-token mask, offsets), which
are cheap to pickle to DataLoader workers. `ds[i]` returns `(input_ids, labels)`: labels are not shifted
(the model shifts) and hold -100 where nothing is learned. Samples left with nothing to learn after
truncation are dropped and counted, so no batch can produce a NaN loss.
"""

import bisect
import multiprocessing as mp
import os
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from dataset.chat_render import load_chat_format, supervised_spans, token_mask, unrendered
from dataset.records import (
    BadRecord,
    DataError,
    data_error,
    parse_conversation,
    parse_line,
    parse_text,
    read_lines,
)
from dataset.token_cache import TokenCache, Tokens, tokenizer_fingerprint
from model.varlen import cu_seqlens_of

IGNORE_INDEX = -100
CHUNK = 1000  # records per multiprocessing task: large enough for the batched Rust tokenizer to pay off
MIN_CHUNK = 100  # smaller tasks cost more in passing them around than they gain in balance
SKIPPED_SHOWN = 5  # skipped lines named under the data line (a file of bad lines would flood the log)
# Notes under the data line on the samples whose tools or reasoning the template drops (chat_render.unrendered)
UNRENDERED_NOTES = {
    "tools": "offer tools whose schemas the chat template does not render: the model learns their calls "
             "without seeing what the tools take (--chat_template with a template that renders `tools` shows them)",
    "reasoning": "have reasoning_content that the chat template does not render: the model learns their "
                 "replies without it (--chat_template with a template that renders `reasoning_content` learns it)",
}


# ---------------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------------
class TokenizedDataset(Dataset):
    """Samples stored flat: sample i is ids[offsets[i]:offsets[i+1]], learned where mask is True."""

    def __init__(self, ids: np.ndarray, mask: np.ndarray, lengths: np.ndarray) -> None:
        self.ids, self.mask = ids, mask
        self.lengths = lengths
        self.offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        # Per sample, the learned tokens after its first: the positions whose next token the loss predicts.
        learned = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
        self.targets = learned[self.offsets[1:]] - learned[np.minimum(self.offsets[:-1] + 1, self.offsets[1:])]

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.offsets[i], self.offsets[i + 1]
        input_ids = torch.from_numpy(self.ids[lo:hi].astype(np.int64))
        labels = torch.where(torch.from_numpy(self.mask[lo:hi]), input_ids, IGNORE_INDEX)
        return input_ids, labels


class _FileDataset(TokenizedDataset):
    """A jsonl file tokenized by `encode` on all cores, or read from `cache` when this file was tokenized the same
    way before (and then written to it; dataset/token_cache.py); `summary` says what was kept."""

    def __init__(self, data_path: str | Path, encode: Callable, max_length: int, skip_invalid: bool,
                 num_workers: int | None, cache: TokenCache | None, log: Callable[[str], None] | None) -> None:
        tokens, cache_note = _tokenize_file(data_path, encode, num_workers, skip_invalid, cache)
        super().__init__(tokens.ids, tokens.mask, tokens.lengths)
        self.skipped, self.dropped = tokens.skipped, tokens.dropped
        self.summary = _summary(data_path, len(self), self.dropped, self.skipped, max_length) + cache_note
        if tokens.crowded:
            self.summary += f"\n  note: {encode.crowded_note(tokens.crowded)}"
        for kind, note in UNRENDERED_NOTES.items():
            if tokens.unrendered.get(kind):
                self.summary += f"\n  note: {tokens.unrendered[kind]} sample(s) {note}"
        if log:
            log(self.summary)


class SFTDataset(_FileDataset):
    """Chat data (any format in dataset/records.py) rendered through the chat template, assistant turns learned;
    `cache` as for _FileDataset."""

    def __init__(
        self,
        data_path: str | Path,
        tokenizer: Any,
        max_length: int,
        skip_invalid: bool = False,
        num_workers: int | None = None,
        chat_template: str | None = None,
        log: Callable[[str], None] | None = print,
        template_name: str | None = None,
        cache: TokenCache | None = None,
    ) -> None:
        # The template is checked first: a tokenizer that cannot make a mask fails before any data is read.
        # template_name (e.g. the --chat_template path) names it in that message
        encode = _ChatEncoder(tokenizer, chat_template, max_length, template_name)
        super().__init__(data_path, encode, max_length, skip_invalid, num_workers, cache, log)


class PretrainDataset(_FileDataset):
    """Plain text {"text": ...} lines as bos + text + eos (as MiniMind does), every real token learned; `cache`
    as for _FileDataset."""

    def __init__(
        self,
        data_path: str | Path,
        tokenizer: Any,
        max_length: int,
        skip_invalid: bool = False,
        num_workers: int | None = None,
        log: Callable[[str], None] | None = print,
        cache: TokenCache | None = None,
    ) -> None:
        encode = _TextEncoder(tokenizer, max_length)
        super().__init__(data_path, encode, max_length, skip_invalid, num_workers, cache, log)


# ---------------------------------------------------------------------------------------------------------
# Tokenizing in chunks, on all cores
# ---------------------------------------------------------------------------------------------------------
@dataclass
class _Chunk:
    ids: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)
    problems: list[tuple[int, str]] = field(default_factory=list)
    dropped: int = 0
    crowded: int = 0  # of the dropped samples, those that the template's own prompt left nothing to learn
    unrendered: Counter = field(default_factory=Counter)  # samples whose tools or reasoning the template drops

    def add(self, ids: np.ndarray, mask: np.ndarray) -> bool:
        """Keep the sample if it learns something (returns whether it did), else count it as dropped."""
        # Labels are shifted by the model, so the first token's label is never used: it must learn something else
        if mask[1:].any():
            self.ids.append(ids)
            self.masks.append(mask)
            return True
        self.dropped += 1
        return False


class _ChatEncoder:
    """Renders and tokenizes a chunk of conversations (picklable: the template is compiled lazily)."""

    def __init__(self, tokenizer: Any, chat_template: str | None, max_length: int, name: str | None = None) -> None:
        self.tokenizer, self.chat_template, self.max_length, self.name = tokenizer, chat_template, max_length, name
        self._fmt = load_chat_format(tokenizer, chat_template, name)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fmt": None}  # compiled jinja templates do not pickle

    def fingerprint(self) -> dict:
        """What the tokens depend on besides the data and the code (dataset/token_cache.py)."""
        return {"kind": "chat", "tokenizer": tokenizer_fingerprint(self.tokenizer), "template": self.chat_template,
                "max_length": self.max_length}

    def __call__(self, lines: Sequence[tuple[int, bytes]]) -> _Chunk:
        if self._fmt is None:
            self._fmt = load_chat_format(self.tokenizer, self.chat_template, self.name)
        chunk, texts, spans, firsts = _Chunk(), [], [], []
        # Strings and the text are cut where they cannot reach the kept tokens: a 50 MB line costs max_length
        limit = self._fmt.char_limit(self.max_length)
        for line, raw in lines:
            try:
                messages, tools = parse_conversation(parse_line(raw, line))
                text, turn_spans = supervised_spans(self._fmt, messages, tools, limit=limit)
                chunk.unrendered.update(unrendered(self._fmt, messages, tools))
            except BadRecord as e:
                chunk.problems.append((line, str(e)))
                continue
            except RecursionError:  # JSON nested just under the parser's limit, deeper than a template's
                chunk.problems.append((line, "JSON nested too deeply"))
                continue
            texts.append(text)
            spans.append(turn_spans)
            firsts.append(messages[0]["role"])
        # The template already wrote bos/eos where it wants them, so no special tokens are added here
        encodings = self._fmt.backend.encode_batch(texts, add_special_tokens=False)
        for encoding, turn_spans, first in zip(encodings, spans, firsts):
            ids = np.asarray(encoding.ids[: self.max_length], dtype=np.int32)
            mask = token_mask(encoding, turn_spans)
            if not chunk.add(ids, mask[: self.max_length]):
                chunk.crowded += self._crowded_out(mask, first)
        return chunk

    def _crowded_out(self, mask: np.ndarray, first_role: str) -> bool:
        """Whether the template's own prompt (a long default system prompt) is what leaves a dropped sample nothing
        to learn: the sample gets it, and without its tokens the first learned token would lie inside the row."""
        prompt = self._fmt.own_prompt
        if not prompt.tokens or (prompt.replaced_by_system and first_role == "system"):
            return False
        learned = np.flatnonzero(mask[1:])  # over the text before the cut, which holds max_length tokens and more
        return prompt.tokens >= self.max_length or (
            len(learned) > 0 and learned[0] + 1 - prompt.tokens < self.max_length)

    def crowded_note(self, crowded: int) -> str:
        """The cause and the fix for `crowded` samples that the template's own prompt left nothing to learn."""
        prompt = self._fmt.own_prompt
        which = "a conversation without a system message" if prompt.replaced_by_system else "every conversation"
        fix = (f"pass a --max_seq_len that holds those {prompt.tokens} tokens and the conversation"
               if prompt.tokens >= self.max_length else "pass a larger --max_seq_len")
        if prompt.replaced_by_system:
            fix += ", or give them a system message of their own (the template writes it instead)"
        return (f"the chat template writes its own system prompt of {prompt.tokens} tokens before the first user "
                f"message of {which}, which leaves {crowded} sample(s) nothing to learn in a row of {self.max_length} "
                f"tokens (--max_seq_len): {fix}")


class _TextEncoder:
    """Tokenizes a chunk of pretraining texts as bos + text + eos, truncating the text so eos survives."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.backend = tokenizer.backend_tokenizer
        # A text is cut where it cannot reach the kept tokens (no token is longer than the longest in the vocabulary)
        longest = max(len(t) for t in self.backend.get_vocab())
        self.limit = (max_length + 64) * longest * (1 if self.backend.normalizer is None else 4)
        self.bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []  # Qwen3 has none
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.max_text = max_length - len(self.bos) - len(self.eos)

    def fingerprint(self) -> dict:
        """What the tokens depend on besides the data and the code (dataset/token_cache.py)."""
        return {"kind": "text", "backend": self.backend.to_str(), "bos": self.bos, "eos": self.eos,
                "max_text": self.max_text}

    def __call__(self, lines: Sequence[tuple[int, bytes]]) -> _Chunk:
        chunk, texts = _Chunk(), []
        for line, raw in lines:
            try:
                texts.append(parse_text(parse_line(raw, line))[: self.limit])
            except BadRecord as e:
                chunk.problems.append((line, str(e)))
        for encoding in self.backend.encode_batch(texts, add_special_tokens=False):
            ids = np.asarray(self.bos + encoding.ids[: self.max_text] + self.eos, dtype=np.int32)
            chunk.add(ids, np.ones(len(ids), dtype=bool))
        return chunk


# The encoder and items of a pool worker (inherited by fork, pickled once by spawn)
_worker: dict[str, Any] = {}


def _init_worker(encode: Callable, items: Sequence) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # N processes each running N Rust threads would thrash
    _worker.update(encode=encode, items=items)


def _run_chunk(bounds: tuple[int, int]) -> _Chunk:
    return _worker["encode"](_worker["items"][bounds[0] : bounds[1]])


def _tokenize_file(data_path: str | Path, encode: Callable, num_workers: int | None, skip_invalid: bool,
                   cache: TokenCache | None) -> tuple[Tokens, str]:
    """The file's tokens, from `cache` if it holds them, else tokenized (and written there); and a note on the
    cache for the data line."""
    entry = cache.entry(data_path, {**encode.fingerprint(), "skip_invalid": skip_invalid}) if cache else None
    tokens = cache.load(entry) if entry else None
    if tokens is not None:
        return tokens, f"; tokens read from the cache {cache.folder}"
    lines = read_lines(data_path)
    chunks = _map_chunks(encode, lines, num_workers)
    crowded = sum(c.crowded for c in chunks)  # only a chat template writes a prompt of its own
    problems, dropped = _check(data_path, chunks, len(lines), skip_invalid,
                               encode.crowded_note(crowded) if crowded else "")
    unrendered = dict(sum((c.unrendered for c in chunks), Counter()))
    tokens = Tokens(*_join(chunks), len(problems), dropped, unrendered, crowded)
    skipped = _skipped_lines(data_path, problems)
    if entry is None or not cache.write:
        return tokens, skipped
    problem = cache.save(entry, tokens)  # why it was not written, or ""
    return tokens, (f"; tokens {problem}" if problem else f"; tokens cached in {cache.folder} for the next run") + skipped


def _map_chunks(encode: Callable, items: Sequence, num_workers: int | None) -> list[_Chunk]:
    """encode(items[lo:hi]) for every chunk, in order, on num_workers processes (default: all cores)."""
    cores = num_workers or os.cpu_count() or 1
    # Two chunks per core at least, so that no core idles while others finish (12,000 chats on 16 cores)
    size = min(CHUNK, max(MIN_CHUNK, -(-len(items) // (2 * cores))))
    bounds = [(lo, min(lo + size, len(items))) for lo in range(0, len(items), size)]
    workers = min(cores, len(bounds))
    if workers <= 1:
        return [encode(items[lo:hi]) for lo, hi in bounds]
    # fork shares the items with the workers for free; elsewhere (macOS, Windows) spawn pickles them once
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(encode, items)) as pool:
        return pool.map(_run_chunk, bounds, chunksize=1)


def _check(path: Any, chunks: list[_Chunk], n_lines: int, skip_invalid: bool,
           crowded_note: str = "") -> tuple[list[tuple[int, str]], int]:
    """Raise one DataError for every bad line (or skip them with skip_invalid); return (skipped lines' problems,
    samples dropped). `crowded_note`: why the template's own prompt left samples nothing to learn, and the fix."""
    problems = [p for c in chunks for p in c.problems]  # chunks are in file order, so lines are sorted
    if problems and not skip_invalid:
        raise data_error(path, problems, n_lines)
    dropped = sum(c.dropped for c in chunks)
    if not any(c.ids for c in chunks):
        hint = "; a larger --max_seq_len keeps the answers that truncation cut off" if dropped else ""
        hint = f"; {crowded_note}" if crowded_note else hint
        raise DataError(f"{path}: no usable samples ({_invalid_lines(len(problems))} skipped, {dropped} with nothing "
                        f"to learn after truncation){hint}{_skipped_lines(path, problems)}")
    return problems, dropped


def _skipped_lines(path: Any, problems: list[tuple[int, str]]) -> str:
    """Lines under the data line naming the first skipped lines and why (--skip_bad_data)."""
    shown = [f"\n  skipped {path}:{line}: {problem}" for line, problem in problems[:SKIPPED_SHOWN]]
    more = f"\n  ... and {len(problems) - SKIPPED_SHOWN} more skipped" if len(problems) > SKIPPED_SHOWN else ""
    return "".join(shown) + more


def _join(chunks: list[_Chunk]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = [x for c in chunks for x in c.ids]
    masks = [m for c in chunks for m in c.masks]
    return np.concatenate(ids), np.concatenate(masks), np.array([len(x) for x in ids], dtype=np.int64)


def _summary(path: Any, kept: int, dropped: int, skipped: int, max_length: int) -> str:
    text = f"{path}: kept {kept} samples, dropped {dropped} with no supervised token after truncation to {max_length}"
    return text + (f", skipped {_invalid_lines(skipped)}" if skipped else "")


def _invalid_lines(n: int) -> str:
    """'1 invalid line', 'n invalid lines': how the data line counts the records --skip_bad_data skipped."""
    return f"{n} invalid line{'' if n == 1 else 's'}"


# ---------------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------------
def collate_padded(batch: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad samples to the longest of the batch: input_ids, labels, attention_mask (1 = token)."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(batch):
        input_ids[row, : len(ids)], labels[row, : len(ids)], attention_mask[row, : len(ids)] = ids, lab, 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def pack_indices(lengths: np.ndarray, max_length: int, seed: int, epoch: int) -> list[list[int]]:
    """Group whole samples into rows of at most max_length tokens (best-fit decreasing), in shuffled order."""
    lengths = np.asarray(lengths)
    if len(lengths) and lengths.max() > max_length:
        raise ValueError(f"a sample of {lengths.max()} tokens does not fit a packed row of {max_length}")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))  # equal lengths land in different rows each epoch
    order = order[np.argsort(-lengths[order], kind="stable")]
    rows: list[list[int]] = []
    free_rows: dict[int, list[int]] = {}  # free space -> rows with exactly that much space left
    # Sorted distinct keys of free_rows: at most max_length of them, so bisect and insert stay cheap
    spaces: list[int] = []
    for i in order.tolist():
        need = int(lengths[i])
        k = bisect.bisect_left(spaces, need)
        if k == len(spaces):
            row, space = len(rows), max_length
            rows.append([])
        else:  # best fit: the fullest row that still has room
            space = spaces[k]
            row = free_rows[space].pop()
            if not free_rows[space]:
                del free_rows[space], spaces[k]
        rows[row].append(i)
        left = space - need
        if left > 0:
            if left not in free_rows:
                free_rows[left] = []
                spaces.insert(bisect.bisect_left(spaces, left), left)
            free_rows[left].append(row)
    return [rows[r] for r in rng.permutation(len(rows)).tolist()]


class PackedDataset(Dataset):
    """Rows of whole samples concatenated; call set_epoch(e) before each epoch to repack deterministically."""

    def __init__(self, dataset: TokenizedDataset, max_length: int, seed: int = 0) -> None:
        self.dataset, self.max_length, self.seed = dataset, max_length, seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Repack for this epoch (same seed and epoch give the same rows on every rank)."""
        self.rows = pack_indices(self.dataset.lengths, self.max_length, self.seed, epoch)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        samples = [self.dataset[i] for i in self.rows[r]]
        labels = [lab.clone() for _, lab in samples]
        for lab in labels:
            lab[0] = IGNORE_INDEX  # would be predicted from the previous sample's last token
        position_ids = torch.cat([torch.arange(len(ids)) for ids, _ in samples])
        return torch.cat([ids for ids, _ in samples]), torch.cat(labels), position_ids


def collate_packed(
    batch: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], pad_id: int, width: int | None = None,
    rows: int | None = None, segments: int | None = None,
) -> dict[str, torch.Tensor | int]:
    """Stack packed rows: input_ids, labels, position_ids; short rows end in a pad segment of their own.

    `width` (default: the longest row) and `rows` (default: the rows given) fix the batch's shape, so that
    every step has the same one, which compiled graphs and CUDA graphs replay without recompiling; the
    epoch's last step, which runs short, gets rows of pads only (nothing supervised). Packed rows are nearly
    full anyway. `n_tokens` counts the real tokens (no pad segments), for an honest tokens/s. With
    `segments`, also `cu_seqlens`: where the samples and pad segments start, in `segments` + 1 entries
    (model.varlen.cu_seqlens_of).
    """
    width = max([len(ids) for ids, _, _ in batch] + [width or 0])
    n_rows = max(len(batch), rows or 0)
    input_ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    labels = torch.full((n_rows, width), IGNORE_INDEX, dtype=torch.long)
    # Pads get positions 0, 1, ...: a new segment, so no real token attends to them
    position_ids = torch.arange(width).repeat(n_rows, 1)
    for row, (ids, lab, pos) in enumerate(batch):
        n = len(ids)
        input_ids[row, :n], labels[row, :n], position_ids[row, :n] = ids, lab, pos
        position_ids[row, n:] = torch.arange(width - n)
    out = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
           "n_tokens": sum(len(ids) for ids, _, _ in batch)}
    if segments:
        out["cu_seqlens"] = cu_seqlens_of(position_ids, segments)
    return out
