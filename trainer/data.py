"""Which samples go into which optimizer step, on which rank: a shuffled, resumable, re-shardable order.

Each epoch has one global order (a permutation seeded by seed and epoch; with --group_by_length, sorted by
length within runs of steps: group_by_length). Optimizer steps take consecutive slices of it of
world_size × batch_size × accumulation_steps samples; inside a step, rank r takes every world_size-th
sample and cuts them into micro-batches. The position in the epoch is a single number (samples
consumed), so a resumed run, even on a different number of GPUs, continues with exactly the samples
not yet seen.
"""

import argparse
import atexit
import math
import multiprocessing
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from dataset.lm_dataset import PackedDataset, collate_packed, collate_padded
from trainer.args import FlagError
from trainer.distributed import DistInfo
from trainer.loss import IGNORE_INDEX, ROW_MULTIPLE, supervision

MicroBatch = list[tuple[int, bool]]  # (sample index, live); a dead sample only keeps ranks in step


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The epoch's global sample order: the same on every rank and after a resume."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


GROUP_STEPS = 50  # --group_by_length sorts runs of this many optimizer steps' samples (as transformers' Trainer)


def group_by_length(order: list[int], lengths: np.ndarray, group: int) -> list[int]:
    """`order` cut into runs of `group` samples, each sorted longest first: the samples of one step are then of
    about one length (little padding), and the runs keep the shuffled order between them. Ties keep their
    order, so the result depends on `order` alone, as a resume needs."""
    return [i for start in range(0, len(order), group)
            for i in sorted(order[start:start + group], key=lambda i: -lengths[i])]


def split_step(samples: list[int], rank: int, world_size: int, batch_size: int) -> list[MicroBatch]:
    """This rank's micro-batches for one optimizer step made of `samples` (all ranks' samples).

    Every rank gets the same number of micro-batches (DDP needs the same number of backward passes
    everywhere). When the epoch's last step runs short, a rank with nothing left gets a dead sample:
    its labels are all ignored, so it adds nothing but keeps the gradient all-reduce in step.
    """
    mine = samples[rank::world_size]
    n_micro = math.ceil(math.ceil(len(samples) / world_size) / batch_size)
    micro = [mine[i * batch_size:(i + 1) * batch_size] for i in range(n_micro)]
    return [[(i, True) for i in mb] if mb else [(samples[0], False)] for mb in micro]


class StepSampler:
    """A batch sampler for DataLoader that yields this rank's micro-batches, step after step.

    `set_epoch(epoch, start)` is DistributedSampler's set_epoch plus a start position (samples of
    the epoch already consumed), which is what resuming needs.
    """

    def __init__(self, n_samples: int, batch_size: int, accumulation_steps: int, rank: int, world_size: int,
                 seed: int, lengths: np.ndarray | None = None) -> None:
        self.n, self.batch_size, self.rank, self.world_size, self.seed = (
            n_samples, batch_size, rank, world_size, seed)
        self.global_batch = world_size * batch_size * accumulation_steps
        self.lengths = lengths  # given: each epoch's order is grouped by length (group_by_length)
        self.steps: list[list[MicroBatch]] = []
        self.step_sizes: list[int] = []  # global samples per step, to advance the epoch position

    def steps_in_epoch(self, start: int = 0) -> int:
        """Optimizer steps left in an epoch from position `start`."""
        return math.ceil(max(0, self.n - start) / self.global_batch)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Plan the rest of `epoch` from sample position `start`."""
        order = epoch_order(self.n, self.seed, epoch)
        if self.lengths is not None:  # runs of whole global steps: a resume (same samples per step) keeps them
            order = group_by_length(order, self.lengths, GROUP_STEPS * self.global_batch)
        order = order[start:]
        slices = [order[i:i + self.global_batch] for i in range(0, len(order), self.global_batch)]
        self.steps = [split_step(s, self.rank, self.world_size, self.batch_size) for s in slices]
        self.step_sizes = [len(s) for s in slices]

    def __iter__(self) -> Iterator[MicroBatch]:
        for step in self.steps:
            yield from step

    def __len__(self) -> int:
        return sum(len(step) for step in self.steps)


class _Keyed(Dataset):
    """Looks up (index, live) keys; a dead sample keeps its tokens but has every label ignored."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, bool]) -> tuple:
        index, live = key
        sample = self.dataset[index]  # (input_ids, labels) or, packed, (input_ids, labels, position_ids)
        if not live:
            input_ids, labels, *rest = sample
            sample = (input_ids, torch.full_like(labels, IGNORE_INDEX), *rest)
        return sample


def collate_supervised(samples: list[tuple], collate_fn: Callable[[list[tuple]], dict],
                       sup_slots: int | None = None) -> dict:
    """Collate, then add the supervised positions and token counts (on the CPU, in the worker), and
    `sup_slots` if given (see supervised_slots)."""
    batch = collate_fn(samples)
    batch["sup_index"], batch["sup_targets"] = supervision(batch["labels"])
    if sup_slots is not None:
        batch["sup_slots"] = sup_slots
    mask = batch.get("attention_mask")
    if "n_tokens" not in batch:  # packed rows count their own (pad segments excluded)
        batch["n_tokens"] = int(mask.sum()) if mask is not None else batch["input_ids"].numel()
    return batch


def bucket_width(width: int, multiple: int, cap: int) -> int:
    """`width` rounded up to a multiple of `multiple`, but not past `cap` (nor below `width`)."""
    return max(width, min(-(-width // multiple) * multiple, cap))


def collate_bucketed(samples: list[tuple], pad_id: int, multiple: int, cap: int) -> dict:
    """Right-padded batch whose width is rounded up to a bucket (bucket_width): GEMM shapes repeat from batch
    to batch, so cuBLAS picks its kernels once per bucket instead of once per new width (0.3-3.6 ms each)."""
    batch = collate_padded(samples, pad_id=pad_id)
    width = batch["input_ids"].shape[1]
    extra = bucket_width(width, multiple, cap) - width
    if extra:
        pad = {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": 0}
        batch = {k: torch.nn.functional.pad(v, (0, extra), value=pad[k]) for k, v in batch.items()}
    return batch


def packed_rows(batch_size: int, mean_length: float, row_length: int) -> int:
    """Packed rows per micro-batch that hold about `batch_size` samples of the data's mean length."""
    return max(1, int(batch_size * mean_length / row_length + 0.5))  # halves round up


def _quiet_worker(_: int) -> None:
    # Stop signals reach the whole process group (Ctrl-C; torchrun stops its workers with os.killpg): the
    # loader workers ignore them so that the main process can finish the step with them and save. They
    # exit with the main process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@atexit.register
def _end_workers() -> None:
    # Exiting, multiprocessing stops daemonic children with SIGTERM and then waits for them: workers that
    # ignore SIGTERM (above) would keep the finished run from exiting. They hold nothing to save: SIGKILL,
    # after putting back SIGCHLD, where the DataLoader would report each killed worker as a failure.
    children = [c for c in multiprocessing.active_children() if c.daemon]
    if children and hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()


def make_loader(dataset: Dataset, batch_sampler: StepSampler, collate_fn: Callable, num_workers: int,
                pin_memory: bool, sup_slots: int | None = None) -> DataLoader:
    """One DataLoader for the whole run; each iter() walks the sampler's current plan (set_epoch)."""
    # Workers outlive an epoch (no re-fork per epoch), except for packed rows: a worker holds its own copy of
    # the dataset, which must see set_epoch's new rows, so those workers are forked again each epoch.
    persistent = num_workers > 0 and not hasattr(dataset, "set_epoch")
    # Its own generator: creating a loader iterator draws a worker seed, which must not advance the
    # global RNG (dropout uses it), or a resumed run would drift from an uninterrupted one.
    return DataLoader(_Keyed(dataset), batch_sampler=batch_sampler,
                      collate_fn=partial(collate_supervised, collate_fn=collate_fn, sup_slots=sup_slots),
                      num_workers=num_workers, pin_memory=pin_memory, persistent_workers=persistent,
                      generator=torch.Generator().manual_seed(0),
                      worker_init_fn=_quiet_worker if num_workers > 0 else None)


def training_steps(dataset: Dataset, sampler: StepSampler, first_epoch: int, position: int, epochs: int,
                   loader: DataLoader) -> Iterator[tuple[int, list[dict], int]]:
    """(epoch, this rank's micro-batches of one optimizer step, samples in the step over all ranks),
    from `position` in `first_epoch` to the end of the last epoch."""
    for epoch in range(first_epoch, epochs):
        if hasattr(dataset, "set_epoch"):  # packed rows are re-drawn each epoch
            dataset.set_epoch(epoch)
        sampler.set_epoch(epoch, start=position if epoch == first_epoch else 0)
        batches = iter(loader)
        for step, size in zip(sampler.steps, sampler.step_sizes):
            yield epoch, [next(batches) for _ in step], size


def count_steps(sampler: StepSampler, epochs: int, epoch: int, position: int, done: int,
                max_steps: int | None) -> int:
    """Total optimizer steps of the run: those done, plus the rest of this epoch, plus later epochs; never fewer
    than those done (a resumed run given a --max_steps it has passed has nothing left to train)."""
    total = done + sampler.steps_in_epoch(position) + (epochs - epoch - 1) * sampler.steps_in_epoch(0)
    return max(done, min(total, max_steps)) if max_steps else total


def eval_loader(dataset: Dataset, batch_size: int, rank: int, world_size: int, collate_fn: Callable) -> DataLoader:
    """This rank's share of the validation set, in order."""
    keys = [(i, True) for i in range(rank, len(dataset), world_size)]
    batches = [keys[i:i + batch_size] for i in range(0, len(keys), batch_size)]
    return DataLoader(_Keyed(dataset), batch_sampler=batches,
                      collate_fn=partial(collate_supervised, collate_fn=collate_fn))


class _Part(Subset):
    """A Subset that keeps the sample lengths (packing needs them)."""

    def __init__(self, dataset: Dataset, indices: list[int]) -> None:
        super().__init__(dataset, indices)
        self.lengths = np.asarray(dataset.lengths)[indices]
        self.targets = np.asarray(dataset.targets)[indices]


def load_split(make: Callable[[str], Dataset], data_path: str, val_data_path: str | None, val_fraction: float,
               seed: int) -> tuple[Dataset, Dataset | None]:
    """(train, validation or None): a separate file, or a fixed seeded `val_fraction` held out of the data."""
    train = make(data_path)
    if val_data_path:
        return train, make(val_data_path)
    # At least one sample when a fraction is asked for (0.01 of 64 samples would otherwise turn validation off)
    n_val = max(int(len(train) * val_fraction), 1 if val_fraction > 0 else 0)
    if n_val == 0:
        return train, None
    if n_val >= len(train):
        raise FlagError(f"--val_fraction {val_fraction}: {data_path} holds {len(train)} sample(s); {n_val} held out "
                        f"for validation would leave {len(train) - n_val} to train on; pass a --val_data_path, or "
                        "leave out --val_fraction")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    return _Part(train, sorted(order[n_val:])), _Part(train, sorted(order[:n_val]))


def to_device(batch: dict, device: torch.device) -> dict:
    """Move a collated micro-batch's tensors (pinned on CUDA) without blocking the host."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@dataclass
class TrainData:
    """What the loop needs from the data: the training set, its step plan, loaders, validation batches."""

    train: Dataset
    sampler: StepSampler
    loader: DataLoader  # yields the sampler's current plan
    val_batches: DataLoader | None
    note: str = ""  # what one micro-batch and one optimizer step hold, for the start-up line

    def steps(self, epoch: int, position: int, epochs: int) -> Iterator[tuple[int, list[dict], int]]:
        """(epoch, this rank's micro-batches, global samples) for each optimizer step from `position` on."""
        return training_steps(self.train, self.sampler, epoch, position, epochs, self.loader)

    def total_steps(self, epochs: int, epoch: int, position: int, done: int, max_steps: int | None) -> int:
        """Optimizer steps of the whole run (see count_steps)."""
        return count_steps(self.sampler, epochs, epoch, position, done, max_steps)


BUCKET = 64  # padded widths on a GPU are multiples of this: at most 63 pad tokens more per row
SEGMENT_MULTIPLE = 8  # cu_seqlens holds a multiple of this many segments (+ 1 entries)


def first_epoch_micro_batches(packed: PackedDataset, rows: int, accumulation_steps: int, world_size: int,
                              seed: int) -> Iterator[list[int]]:
    """The packed rows of every micro-batch of `rows` rows in the first epoch's packing, on every rank."""
    for rank in range(world_size):
        plan = StepSampler(len(packed), rows, accumulation_steps, rank, world_size, seed)
        plan.set_epoch(0)
        for micro in plan:
            yield [i for i, live in micro if live]


def row_sums(packed: PackedDataset, per_sample: np.ndarray) -> np.ndarray:
    """A per-sample count summed over each packed row's samples."""
    sizes = np.array([len(row) for row in packed.rows], dtype=np.int64)
    if not sizes.size:
        return sizes
    samples = np.concatenate([np.asarray(row, dtype=np.int64) for row in packed.rows])
    return np.add.reduceat(np.asarray(per_sample, dtype=np.int64)[samples], np.cumsum(sizes) - sizes)


def fullest_micro_batch(per_row: np.ndarray, first_epoch: list[list[int]]) -> int:
    """The largest sum of a per-row count over the rows of one micro-batch of `first_epoch`."""
    return max((int(per_row[micro].sum()) for micro in first_epoch), default=0)


def segment_slots(packed: PackedDataset, first_epoch: list[list[int]]) -> int:
    """Sample boundaries a packed micro-batch sends (`cu_seqlens`): the most samples and pad segments that a
    micro-batch of the first epoch's packing has on any rank (`first_epoch`: first_epoch_micro_batches), plus a
    quarter (at least 2 × SEGMENT_MULTIPLE) for later epochs' packings, rounded up to SEGMENT_MULTIPLE. Fixed for
    the run, so that the compiled step keeps one shape; a later micro-batch with more gets a longer tensor (one
    recompile). Tight, because Flash's varlen kernel runs blocks for empty slots too (docs/PERF.md, "Fewer empty
    segments")."""
    pads = row_sums(packed, packed.dataset.lengths) < packed.max_length  # a row not full ends in a pad segment
    most = fullest_micro_batch(np.array([len(row) for row in packed.rows]) + pads, first_epoch)
    slots = most + max(2 * SEGMENT_MULTIPLE, most // 4)
    return slots + -slots % SEGMENT_MULTIPLE


def supervised_slots(packed: PackedDataset, first_epoch: list[list[int]]) -> int:
    """Supervised positions a packed micro-batch's CUDA graph holds (trainer/step_graphs.py): the most that one
    micro-batch of the first epoch's packing has on any rank (`first_epoch`), rounded up to ROW_MULTIPLE. Fixed
    for the run, so that packed steps keep one shape with the head's GEMMs on those rows, not on every position;
    a later micro-batch with more gets a graph of its own."""
    most = fullest_micro_batch(row_sums(packed, packed.dataset.targets), first_epoch)
    return most + -most % ROW_MULTIPLE


def _whole_data(step: int, held: int, what: str) -> str:
    """The start-up line's aside when one step's batch is larger than the whole data set."""
    return f" (all the data: it holds {held} {what}, fewer than a full step's {step})" if step > held else ""


def prepare_data(make: Callable[[str], Dataset], args: argparse.Namespace, info: DistInfo, pad_id: int,
                 segments: bool = False) -> TrainData:
    """Tokenized training (and validation) data from the flags, padded or packed, sharded for this rank.

    Packed, --batch_size keeps its meaning (samples per micro-batch): a micro-batch is `packed_rows` rows of
    --max_seq_len tokens, sized from the data's mean sample length, carrying `sup_slots` (supervised_slots). With
    `segments`, packed micro-batches also carry `cu_seqlens`, the samples' boundaries (for --attention varlen).
    """
    train, val = load_split(make, args.data_path, args.val_data_path, args.val_fraction, args.seed)
    samples = len(train)  # before packing: the validation note counts samples, not packed rows
    mean = float(np.mean(train.lengths)) if len(train) else 1.0
    multiple = BUCKET if info.device.type == "cuda" else 1  # on CPU a pad token costs as much as a real one
    collate = partial(collate_bucketed, pad_id=pad_id, multiple=multiple, cap=args.max_seq_len)
    per_step = info.world_size * args.accumulation_steps
    if args.packing:  # validation stays padded: the loss is the same, and it is simpler
        given = getattr(args, "packed_rows", None)
        rows = given or packed_rows(args.batch_size, mean, args.max_seq_len)
        train = PackedDataset(train, args.max_seq_len, args.seed)
        per_row = len(train.dataset) / max(len(train), 1)  # samples per packed row
        why = "--packed_rows" if given else f"--batch_size {args.batch_size} × mean sample {mean:.0f} tokens"
        step_rows = min(rows * per_step, len(train))  # a step cannot hold more than the data
        note = (f"packed: {rows} row(s) of {args.max_seq_len} tokens per micro-batch ({why}); one optimizer step ≈ "
                f"{step_rows * per_row:.0f} samples, {step_rows * args.max_seq_len:,} token slots"
                + _whole_data(rows * per_step, len(train), "packed rows"))
        first = list(first_epoch_micro_batches(train, rows, args.accumulation_steps, info.world_size, args.seed))
        slots = segment_slots(train, first) if segments else None
        train_collate = partial(collate_packed, pad_id=pad_id, width=args.max_seq_len, rows=rows, segments=slots)
        sup_slots = supervised_slots(train, first)
        lengths = None  # packed rows hold no padding to sort away (--group_by_length is refused with --packing)
    else:
        rows = args.batch_size
        note = (f"padded: {rows} samples per micro-batch" + (f", widths rounded up to multiples of {multiple}"
                if multiple > 1 else "") + (", grouped by length" if args.group_by_length else "") +
                f"; one optimizer step = {min(rows * per_step, len(train))} samples, "
                f"≈ {min(rows * per_step, len(train)) * mean:,.0f} tokens" + _whole_data(rows * per_step, len(train), "samples"))
        train_collate, sup_slots = collate, None
        lengths = np.asarray(train.lengths) if args.group_by_length else None
    sampler = StepSampler(len(train), rows, args.accumulation_steps, info.rank, info.world_size, args.seed,
                          lengths=lengths)
    loader = make_loader(train, sampler, train_collate, args.num_workers, info.device.type == "cuda", sup_slots)
    val_batches = eval_loader(val, args.batch_size, info.rank, info.world_size, collate) if val is not None else None
    if val is not None:
        note += f"; validation: {len(val)} sample(s)" + ("" if args.val_data_path else
                                                          f" held out of {samples + len(val)} (--val_fraction)")
    return TrainData(train, sampler, loader, val_batches, note)
