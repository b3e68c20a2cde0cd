"""Files a run writes: outputs named like MiniMind's, a separate resume file, all written atomically."""

import json
import os
import random
import shutil
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from model.atomic import (
    atomic_write,
    atomic_write_text,
    fsync_dir,
    is_no_space,
    no_space_error,
    share_readable,
    temp_name,
)
from model.errors import UserError, first_line, is_out_of_memory


class CheckpointError(UserError):
    """A resume file that cannot be used with these flags."""


def output_stem(save_dir: str | Path, name: str, hidden_size: int, use_moe: bool) -> Path:
    """`{save_dir}/{name}_{hidden_size}{_moe}`: MiniMind's naming, extended per file type."""
    return Path(save_dir) / f"{name}_{hidden_size}{'_moe' if use_moe else ''}"


def atomic_save(obj: object, path: Path) -> None:
    """torch.save through atomic_write: a crash leaves the old file or the new one, never half."""
    atomic_write(path, lambda f: torch.save(obj, f))


def write_json(path: Path, obj: dict) -> None:
    """Atomic JSON write (non-JSON values such as paths become strings)."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_dir(path: Path, fill: Callable[[Path], None]) -> None:
    """Build a directory under a unique temp name, then swap it into place (_move_in). Only names this call made up
    are ever deleted: a user's own `<name>.old/` or `<name>.tmp/` is left alone."""
    tmp = temp_name(path)
    try:
        fill(tmp)
        share_readable(tmp)
        _move_in(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)


def write_together(stem: Path, fill: Callable[[Path], None]) -> None:
    """Write a checkpoint's files as one set: `fill(staged)` writes each of them, named as beside `stem`, into a
    hidden folder next to them, and only once all are written are they moved into place (renames, which a full
    disk does not stop). A full disk, a file-size limit or a kill while writing leaves the previous set whole."""
    staging = temp_name(stem)  # a leftover of a kill is removed at the next start (save_dir.remove_leftovers)
    staging.mkdir()
    try:
        fill(staging / stem.name)
        share_readable(staging)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, Exception) and is_no_space(err):  # name the save dir, not a temp folder now gone
            raise no_space_error(str(stem.parent), f"saving {stem.name}'s files", stem.parent,
                                 "The files of the previous save are unchanged") from err
        raise
    # The resume file last: a kill among these renames leaves it at the previous save, which a resume redoes.
    for item in sorted(staging.iterdir(), key=lambda p: p.name.endswith("_resume.pth")):
        _move_in(item, stem.parent / item.name)
    fsync_dir(stem.parent)
    staging.rmdir()


def _move_in(new: Path, path: Path) -> None:
    """Rename `new` to `path`. A folder cannot be renamed over a non-empty one, so an old folder is moved aside
    first and removed last (save_dir.remove_leftovers puts it back if a kill comes between)."""
    old = temp_name(path, "old")
    if new.is_dir() and path.is_dir() and not path.is_symlink():
        os.replace(path, old)
    os.replace(new, path)
    if old.exists():
        fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)


def capture_rng() -> dict:
    """Every RNG a step can draw from (dropout, numpy-using data code), to continue bit-exactly. On a GPU that
    is this process's device's generator; a run that never started CUDA (on the CPU) leaves CUDA alone."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device's (setup_distributed sets it per rank)
    return state


def restore_rng(state: dict) -> None:
    """Undo capture_rng(), in a process whose device (and CUDA) is already set up."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or not torch.cuda.is_initialized():
        return
    if isinstance(cuda, list):  # older resume files hold every visible GPU's generator: take this device's
        index = torch.cuda.current_device()
        if index >= len(cuda):
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


RESUME_KEYS = ("trainable", "optimizer", "state", "rng", "config")


def digest(obj: object) -> str:
    """A CRC-32 over a resume file's contents (tensors by their bytes, containers in order): its checksum.

    It catches damage (a flipped bit, a torn copy), not tampering; CRC-32 runs at ~2 GB/s where SHA-256
    manages ~0.6, which matters for a full model's resume file (weights and two AdamW moments).
    """
    crc = 0

    def feed(x: object) -> None:
        nonlocal crc
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            crc = zlib.crc32(f"T{t.dtype}{tuple(t.shape)}".encode(), crc)
            crc = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy(), crc)  # the tensor's memory, no copy
        elif isinstance(x, np.ndarray):
            crc = zlib.crc32(f"N{x.dtype}{x.shape}".encode(), crc)
            crc = zlib.crc32(np.ascontiguousarray(x).view(np.uint8), crc)
        elif isinstance(x, dict):
            crc = zlib.crc32(b"{", crc)
            for k in sorted(x, key=str):
                feed(str(k))
                feed(x[k])
            crc = zlib.crc32(b"}", crc)
        elif isinstance(x, (list, tuple)):
            crc = zlib.crc32(b"[", crc)
            for v in x:
                feed(v)
            crc = zlib.crc32(b"]", crc)
        else:
            crc = zlib.crc32(f"{type(x).__name__}:{x!r};".encode(), crc)

    feed(obj)
    return f"crc32:{crc:08x}"


def read_resume_file(path: Path, what: str, fresh: str) -> object:
    """torch.load of a resume file (`what`) in the user's own folder, with weights_only=False: it holds RNG states
    (numpy arrays, tuples) or a GradScaler's state that the safe loader rejects. A file torch cannot read is a
    CheckpointError that ends with `fresh`; running out of memory is raised as it is (run_job says so)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        if is_out_of_memory(err):  # not a damaged file: keep it
            raise
        raise CheckpointError(f"{path}: cannot read {what} ({type(err).__name__}: {first_line(err)}); it is "
                              f"truncated or not a torch file; {fresh}") from err


def load_resume(path: Path) -> dict | None:
    """The resume state at `path`, checked (layout and checksum), or None when there is none (a fresh run)."""
    if not path.is_file():
        if path.exists():
            raise CheckpointError(f"{path}: is not a file; move it away to start fresh")
        return None
    fresh = "delete it (or pass another --save_dir) to start fresh"
    ckpt = read_resume_file(path, "the resume file", fresh)
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in RESUME_KEYS):
        raise CheckpointError(f"{path}: is not a resume file written by this trainer ({_looks_like(ckpt)}); "
                              f"{fresh}")
    saved = ckpt.pop("checksum", None)
    if saved is not None and digest(ckpt) != saved:
        raise CheckpointError(f"{path}: its checksum does not match its contents (the file was damaged after "
                              f"it was written); {fresh}")
    return ckpt


def _looks_like(obj: object) -> str:
    """What a file that is not our resume file seems to be, for the error message."""
    if not isinstance(obj, dict):
        return f"it holds a {type(obj).__name__}"
    keys = list(obj)
    if {"model", "optimizer", "epoch", "step"} <= set(keys):
        return "it is MiniMind's own resume checkpoint, which --from_resume 1 continues where MiniMind keeps it: " \
               "in checkpoints/ beside a --save_dir that holds no resume file of this repo"
    if keys and all(isinstance(k, str) and (".lora." in k or "lora_" in k) for k in keys):
        return "it holds only LoRA weights, as the run's LoRA .pth does"
    if any(isinstance(k, str) and k.endswith(".weight") for k in keys):
        return "it holds model weights, as a base .pth does"
    return f"its keys are {keys[:5]}"


def sibling(stem: Path, suffix: str) -> Path:
    """`{stem}{suffix}` (not Path.with_suffix, which would eat a dot inside a name like lora_v1.5)."""
    return stem.parent / (stem.name + suffix)


@dataclass
class TrainState:
    """Where a run is: everything besides weights, optimizer and RNG that resuming needs."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    position: int = 0  # samples (packed rows) of `epoch` already consumed, summed over all ranks
    world_size: int = 1
    history: dict = field(default_factory=lambda: {"train": [], "val": [], "grad_norm": []})
    wandb_id: str | None = None

    def advance(self, epoch: int, n_samples: int, epoch_len: int) -> None:
        """Count one optimizer step that consumed `n_samples` of `epoch`."""
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0
        self.step += 1
        self.position += n_samples
        if self.position >= epoch_len:
            self.epoch, self.position = epoch + 1, 0


def save_resume(path: Path, trainable: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler | None, state: TrainState, rng: list[dict], config: dict) -> None:
    """The resume file: trained weights only (never a frozen base), optimizer, scaler, position, RNG per rank."""
    ckpt = {"trainable": trainable, "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "state": asdict(state), "rng": rng, "config": config}
    ckpt["checksum"] = digest(ckpt)  # checked by load_resume: a damaged file is refused, not trained on
    atomic_save(ckpt, path)


def restore_resume(ckpt: dict, path: Path, load_trainable: Callable[[dict], None],
                   optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, rank: int,
                   world_size: int, seed: int) -> TrainState:
    """Load a resume file into the model, optimizer and scaler; return the position to continue from.

    Same number of processes: every rank restores its own RNG, so the run continues bit for bit.
    A different number: the step, epoch and samples consumed are kept and the rest of the epoch is
    re-sharded over the new ranks; RNG (only LoRA dropout uses it) is re-seeded from (seed, step, rank).
    """
    try:
        load_trainable(ckpt["trainable"])
    except UserError as err:
        raise CheckpointError(f"{err}; the flags differ from the run that wrote it, or delete it to start "
                              "fresh") from err
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except ValueError as err:
        raise CheckpointError(f"{path}: its optimizer state does not fit this model ({err}); "
                              "the flags differ from the run that wrote it, or delete it to start fresh") from err
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    state = TrainState(**ckpt["state"])
    if state.world_size == world_size:
        restore_rng(ckpt["rng"][rank])
    else:
        if rank == 0:  # the samples per step are the same (check_resume_flags refuses another global batch)
            print(f"note: {path} was written by {state.world_size} process(es), this run has {world_size}: "
                  f"continuing at step {state.step}; each later step takes the same samples, split over "
                  f"{world_size} process(es), and LoRA dropout draws new random numbers", flush=True)
        seed_everything(seed + 1000 * state.step + rank)
    state.world_size = world_size
    return state


# Flags that change what a step computes or which samples it sees: a resumed run must keep them.
SAME_ON_RESUME = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "lora_rank_pattern",
                  "lora_alpha_pattern", "use_rslora", "use_dora", "load_in_4bit", "max_seq_len", "packing",
                  "packed_rows", "group_by_length", "seed", "val_fraction", "val_data_path", "chat_template")
# Flags a resumed run may change on purpose (e.g. a lower learning rate after a spike); it says so.
NOTED_ON_RESUME = ("learning_rate", "warmup_iters", "weight_decay", "grad_clip", "epochs", "max_steps")


# What a base's config.json must keep for a LoRA to continue on it (not its path, dtype or library version)
BASE_SHAPE = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "intermediate_size")


def _as_run_sees_it(key: str, flags: dict, targets: list[str] | None) -> object:
    """A flag's value as it acts: alpha None is the rank, --lora_targets the layers it adapted (`targets`)."""
    if key == "lora_alpha" and flags.get(key) is None:
        return float(flags.get("lora_rank") or 0)
    if key == "lora_targets" and targets is not None:
        return sorted(targets)
    return flags.get(key)


def check_resume_flags(config: dict, path: Path, args: object, world_size: int, n_train: int,
                       model: torch.nn.Module | None = None, source: str | None = None,
                       targets: list[str] | None = None) -> list[str]:
    """Raise CheckpointError if this run's flags, data or base (`model`, loaded from `source`, with LoRA on
    `targets`) change the math or the data position of the run that wrote `path` (its saved `config`);
    return notes on what it may change."""
    saved = config.get("args") or {}
    now = vars(args)
    name_flag = "--lora_name" if "lora_name" in now else "--save_weight"
    saved_paths = config.get("paths") or {}
    saved_targets = config.get("lora_targets") if targets is not None else None  # older files: the flag as given
    changed = []
    for k in SAME_ON_RESUME:
        if k not in saved or k not in now:
            continue
        before = _as_run_sees_it(k, saved, saved_targets)
        after = _as_run_sees_it(k, now, targets if saved_targets is not None else None)
        if k in saved_paths and after and Path(after).exists():  # the same file named from another folder
            before, after = saved_paths[k], str(Path(after).resolve())
        follows_rank = k == "lora_alpha" and saved[k] is None and now[k] is None  # the rank's change is listed
        if str(before) != str(after) and not follows_rank:
            changed.append(f"--{k} {saved[k]} -> {now[k]}")
    saved_cfg, now_cfg = config.get("model_config") or {}, getattr(getattr(model, "config", None), "to_dict", dict)()
    shape = [f"{k} {saved_cfg[k]} -> {now_cfg[k]}" for k in BASE_SHAPE
             if k in saved_cfg and k in now_cfg and saved_cfg[k] != now_cfg[k]]
    if shape:
        changed.append(f"the base model (--from_weight {source}) is another one: {', '.join(shape)}")
    if {"batch_size", "accumulation_steps"} <= saved.keys() and "world_size" in config:
        before = saved["batch_size"] * saved["accumulation_steps"] * config["world_size"]
        after = now["batch_size"] * now["accumulation_steps"] * world_size
        if before != after:
            changed.append(f"samples per optimizer step (--batch_size x --accumulation_steps x processes) "
                           f"{before} -> {after}")
    if config.get("train_samples") not in (None, n_train):
        changed.append(f"--data_path {now.get('data_path')} has {n_train} training samples, the run had "
                       f"{config['train_samples']}, so its saved position no longer points into the same data")
    if changed:
        raise CheckpointError(f"{path}: cannot continue this run with changed settings: {'; '.join(changed)}. "
                              f"Put them back as they were, or start a new run (another {name_flag} or "
                              "--save_dir, or without --from_resume)")
    notes = [f"note: --{k} was {saved[k]} in the run that wrote {path.name}, now {now[k]}; continuing with the "
             "new value" for k in NOTED_ON_RESUME if k in saved and k in now and str(saved[k]) != str(now[k])]
    base_then = saved_paths.get("base_model")
    if source and base_then and Path(source).exists() and str(Path(source).resolve()) != base_then:
        if now.get("from_weight") is None:  # a default picked it (the demo, or MiniMind's full_sft_{hidden}.pth)
            raise CheckpointError(f"{path}: the run that wrote it trained on {base_then}; without --from_weight this "
                                  f"command would continue on {source}. Pass --from_weight {base_then}")
        notes.append(f"note: the run that wrote {path.name} trained on {base_then}; it continues on {source}, a base "
                     "of the same shape: it must hold the same weights, or the LoRA no longer fits it")
    return notes


def start_or_resume(path: Path, from_resume: bool, load_trainable: Callable[[dict], None],
                    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, rank: int,
                    world_size: int, seed: int,
                    check: Callable[[dict, Path], list[str]] | None = None, epochs: int | None = None) -> TrainState:
    """A fresh TrainState, or the one in `path` (with everything loaded) when --from_resume 1 finds it.
    `check(config, path)` may refuse the file's saved config (check_resume_flags) before anything is loaded;
    `epochs` (this run's --epochs) tells a finished run from one that continues into its next epoch."""
    ckpt = load_resume(path) if from_resume else None
    if ckpt is not None and check is not None:
        for note in check(ckpt["config"], path):
            if rank == 0:
                print(note, flush=True)
    if ckpt is None:
        if from_resume and rank == 0:
            print(f"--from_resume 1: no {path} yet, starting a fresh run", flush=True)
        elif rank == 0 and path.is_file():  # a rerun of the command that forgot --from_resume 1
            saved = datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
            print(f"note: {path} holds an earlier run (saved {saved}); this fresh run replaces it at its first "
                  "save. To continue that run instead, stop this one and add --from_resume 1", flush=True)
        return TrainState(world_size=world_size)
    state = restore_resume(ckpt, path, load_trainable, optimizer, scaler, rank, world_size, seed)
    if rank == 0:
        done = epochs is not None and state.epoch >= epochs  # past the last epoch: not an "epoch 11" of 10
        where = f"epoch {epochs} of {epochs} done" if done else f"epoch {state.epoch + 1}"
        print(f"resuming from {path}: step {state.step}, {where}", flush=True)
    return state


def save_full_model(model: torch.nn.Module, tokenizer: object, stem: Path, minimind: bool,
                    dtype: torch.dtype = torch.float32) -> None:
    """A fully trained model: MiniMind's `{stem}.pth` (fp16 state dict, as MiniMind saves) for MiniMind
    models, and a model directory `{stem}/` (config, safetensors, tokenizer) in `dtype` that --from_weight loads."""
    if minimind:
        atomic_save({k: v.detach().to("cpu", torch.float16) for k, v in model.state_dict().items()},
                    sibling(stem, ".pth"))

    from transformers.utils import logging

    logging.disable_progress_bar()  # its bar would litter nohup logs

    def fill(folder: Path) -> None:
        model.save_pretrained(folder, state_dict=state_dict_in(model, dtype))
        training_dtype = model.config.dtype
        model.config.dtype = str(dtype).removeprefix("torch.")  # save_pretrained wrote the training model's
        try:
            model.config.save_pretrained(folder)
        finally:
            model.config.dtype = training_dtype
        tokenizer.save_pretrained(folder)

    write_dir(stem, fill)


def state_dict_in(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's state dict with floating tensors cast to `dtype`; a tensor shared by two names (a tied head)
    stays one tensor, which save_pretrained writes once."""
    cast: dict[int, torch.Tensor] = {}
    def convert(t: torch.Tensor) -> torch.Tensor:
        if not t.is_floating_point():
            return t
        return cast.setdefault(id(t), t.detach().to(dtype))
    return {k: convert(v) for k, v in model.state_dict(keep_vars=True).items()}


def minimind_loader_note(model: torch.nn.Module, targets: list[str], path: Path) -> str | None:
    """A line for when MiniMind's own `load_lora` would not read the `.pth` LoRA file at `path` in full.

    MiniMind's loader fills the LoRA of every square linear layer (its `apply_lora` rule) and nothing else:
    a file adapting other layers loses them there, and one missing a square layer fails to load.
    """
    if getattr(getattr(model, "config", None), "model_type", None) != "minimind":
        return None
    # By in/out features, not by the weight: --load_in_4bit holds it in NF4 (model/nf4.py), with no `weight` tensor
    square = {n for n, m in model.named_modules()
              if (type(m) is torch.nn.Linear or hasattr(m, "lora_A") or hasattr(m, "weight_nf4"))
              and m.in_features == m.out_features}
    if set(targets) == square:
        return None
    def leaves(names: set[str]) -> str:
        return ", ".join(sorted({n.rsplit(".", 1)[-1] for n in names}))

    what = f"ignores this file's {leaves(set(targets) - square)}" if set(targets) - square else ""
    if square - set(targets):
        what += (" and " if what else "") + f"fails on it (no {leaves(square - set(targets))} factors)"
    return (f"note: {path.name}: MiniMind's own load_lora reads only the square layers ({leaves(square)}) and "
            f"{what}; this repo's loaders read it all (--lora_targets square: a file MiniMind reads in full)")
