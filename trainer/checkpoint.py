"""Files a run writes: outputs named like MiniMind's, a separate resume file, all written atomically."""

import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from model.errors import UserError


class CheckpointError(UserError):
    """A resume file that cannot be used with these flags."""


def output_stem(save_dir: str | Path, name: str, hidden_size: int, use_moe: bool) -> Path:
    """`{save_dir}/{name}_{hidden_size}{_moe}`: MiniMind's naming, extended per file type."""
    return Path(save_dir) / f"{name}_{hidden_size}{'_moe' if use_moe else ''}"


def atomic_save(obj: object, path: Path) -> None:
    """torch.save to a temp file, then rename: a crash leaves the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json(path: Path, obj: dict) -> None:
    """Atomic JSON write (non-JSON values such as paths become strings)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def write_dir(path: Path, fill: Callable[[Path], None]) -> None:
    """Build a directory under a temp name, then swap it into place (directories cannot be os.replace'd
    over a non-empty one, so the old one is moved aside first and removed last)."""
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    fill(tmp)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def capture_rng() -> dict:
    """Every RNG a step can draw from (dropout, numpy-using data code), to continue bit-exactly."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Undo capture_rng()."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_resume(path: Path) -> dict | None:
    """The resume state at `path`, or None when there is none (a fresh run)."""
    if not path.is_file():
        return None
    try:
        # weights_only=False: the file holds RNG states (numpy arrays, tuples) that the safe loader rejects.
        # It is a file this trainer wrote into the user's own save_dir.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot read the resume file ({err}); delete it to start fresh") from err


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
    atomic_save({"trainable": trainable, "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None,
                 "state": asdict(state), "rng": rng, "config": config}, path)


def restore_resume(ckpt: dict, path: Path, load_trainable: Callable[[dict], None],
                   optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, rank: int,
                   world_size: int, seed: int) -> TrainState:
    """Load a resume file into the model, optimizer and scaler; return the position to continue from.

    Same number of processes: every rank restores its own RNG, so the run continues bit for bit.
    A different number: the step, epoch and samples consumed are kept and the rest of the epoch is
    re-sharded over the new ranks; RNG (only LoRA dropout uses it) is re-seeded from (seed, step, rank).
    """
    load_trainable(ckpt["trainable"])
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
        print(f"note: {path} was written by {state.world_size} process(es), this run has {world_size}: "
              f"continuing at step {state.step} with the unseen rest of epoch {state.epoch + 1} re-sharded; "
              "the data order of later steps differs from an uninterrupted run", flush=True)
        seed_everything(seed + 1000 * state.step + rank)
    state.world_size = world_size
    return state


def start_or_resume(path: Path, from_resume: bool, load_trainable: Callable[[dict], None],
                    optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, rank: int,
                    world_size: int, seed: int) -> TrainState:
    """A fresh TrainState, or the one in `path` (with everything loaded) when --from_resume 1 finds it."""
    ckpt = load_resume(path) if from_resume else None
    if ckpt is None:
        if from_resume and rank == 0:
            print(f"--from_resume 1: no {path} yet, starting a fresh run", flush=True)
        return TrainState(world_size=world_size)
    state = restore_resume(ckpt, path, load_trainable, optimizer, scaler, rank, world_size, seed)
    if rank == 0:
        print(f"resuming from {path}: step {state.step}, epoch {state.epoch + 1}", flush=True)
    return state


def save_full_model(model: torch.nn.Module, tokenizer: object, stem: Path, minimind: bool) -> None:
    """A fully trained model: MiniMind's `{stem}.pth` (fp16 state dict, as MiniMind saves) for MiniMind
    models, and a model directory `{stem}/` (config, safetensors, tokenizer) that --from_weight loads."""
    if minimind:
        atomic_save({k: v.detach().to("cpu", torch.float16) for k, v in model.state_dict().items()},
                    sibling(stem, ".pth"))

    from transformers.utils import logging

    logging.disable_progress_bar()  # its bar would litter nohup logs

    def fill(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    write_dir(stem, fill)
