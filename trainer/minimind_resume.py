"""Continuing a run that MiniMind's own trainer checkpointed: `--from_resume 1` after switching to this repo.

MiniMind's trainers pass `lm_checkpoint` the folder `../checkpoints`, from where they run (its `trainer/`), whatever
their `--save_dir`; with its default `--save_dir ../out` that is beside it. The resume file,
`../checkpoints/{name}_{hidden}{_moe}_resume.pth`, is a dict of
- `model`: the whole model's state dict in fp16 (for a LoRA run, the `<module>.lora.A.weight` keys too);
- `optimizer`: torch AdamW's state_dict over its parameter list: every parameter for a full run, the ones whose
  name holds `lora` for a LoRA run, in `named_parameters` order, which is the order of those keys in `model`;
- `epoch` (0-based) and `step`: micro-batches of this rank done in that epoch (MiniMind counts micro-batches;
  an optimizer step every --accumulation_steps of them, and at the epoch's end);
- `world_size`, `wandb_id` and, from its LoRA and SFT trainers, `scaler` (a GradScaler state dict).
"""

import argparse
from pathlib import Path

import torch
from torch import nn

from dataset.lm_dataset import PackedDataset
from model.model_lora import minimind_lora_key
from trainer.checkpoint import CheckpointError, TrainState, read_resume_file, seed_everything
from trainer.data import TrainData
from trainer.distributed import DistInfo

MINIMIND_KEYS = ("model", "optimizer", "epoch", "step")


def minimind_resume_paths(save_dir: str | Path, stem_name: str) -> list[Path]:
    """Where MiniMind's trainer keeps the resume file of `{name}_{hidden}{_moe}`: beside this --save_dir (MiniMind's
    default), else `../checkpoints` from the working directory (a MiniMind run with another --save_dir)."""
    folders = (Path(save_dir).resolve().parent, Path.cwd().resolve().parent)
    return list(dict.fromkeys(folder / "checkpoints" / f"{stem_name}_resume.pth" for folder in folders))


def minimind_file_to_continue(save_dir: str | Path, stem: Path, own: Path, from_resume: bool,
                              is_main: bool) -> Path | None:
    """MiniMind's resume file for this run's name, when --from_resume 1 finds none of this repo's at `own`; with both
    there, this repo's own is the later one of a run that already switched (a note names the one left unused)."""
    if not from_resume:
        return None
    found = [p for p in minimind_resume_paths(save_dir, stem.name) if p.is_file() and p != own.resolve()]
    if not found:
        return None
    theirs = found[0]
    if own.exists():
        if is_main:
            print(f"note: {theirs} (MiniMind's resume file) is not used: this --save_dir holds this repo's own, "
                  f"{own}", flush=True)
        return None
    return theirs


def _our_name(key: str, lora: bool) -> str | None:
    """This repo's parameter name for a key of MiniMind's state dict that its optimizer holds (None: not held).
    MiniMind's LoRA is a child module `lora` with Linear layers A and B; ours are `lora_A` / `lora_B` tensors."""
    if not lora:
        return key
    if "lora" not in key:  # MiniMind's own rule for what its LoRA optimizer holds
        return None
    parsed = minimind_lora_key(key)
    if parsed is not None:
        module, factor = parsed
        return f"{module}.lora_{factor}"
    return key  # a key no LoRA of ours has: refused by the name check


def _refuse(path: Path, why: str, fix: str) -> CheckpointError:
    return CheckpointError(f"{path} (MiniMind's resume file) does not fit this run: {why}; {fix}, or start a new "
                           "run without --from_resume 1")


def _load(path: Path) -> dict:
    ckpt = read_resume_file(path, "MiniMind's resume file", "move it away to start fresh")
    if not isinstance(ckpt, dict) or not all(k in ckpt for k in MINIMIND_KEYS):
        raise CheckpointError(f"{path}: is not a MiniMind resume file (it lacks {', '.join(MINIMIND_KEYS)}); "
                              "move it away to start fresh")
    return ckpt


def _check_model(path: Path, weights: dict, model: nn.Module, lora: bool, flag: str) -> None:
    """Refuse a file whose model is not this run's: another shape, LoRA on other layers or of another rank, a LoRA
    file for a full job or the other way round."""
    lora_keys = [k for k in weights if "lora" in k]
    if lora and not lora_keys:
        raise _refuse(path, "it holds a full training run (no LoRA weights)", "continue it with the full job "
                      "(trainer/train_full_sft.py or train_pretrain.py), or pass another --lora_name")
    if not lora and lora_keys:
        raise _refuse(path, f"it holds a LoRA run ({lora_keys[0]})", f"continue it with trainer/train_lora.py, "
                      f"or pass another {flag}")
    own = {k: tuple(v.shape) for k, v in {**model.state_dict(), **dict(model.named_parameters())}.items()}
    # --load_in_4bit holds a frozen weight as `<layer>.weight_nf4` (model/nf4.py), which keeps the weight's shape
    own |= {n.removesuffix("_nf4"): m.shape for n, m in model.named_modules() if n.endswith(".weight_nf4")}
    theirs = {_our_name(k, lora) or k: v for k, v in weights.items()}
    ours_lora = sorted(k for k in own if k.endswith((".lora_A", ".lora_B")))
    if lora and sorted(k for k in theirs if "lora" in k) != ours_lora:
        layers = sorted({k.split(".lora")[0].rsplit(".", 1)[-1] for k in lora_keys})
        raise _refuse(path, f"its LoRA adapts {', '.join(layers)} ({len(lora_keys) // 2} layers), this run's "
                      f"{len(ours_lora) // 2} layers", "pass --lora_targets " + ("square" if layers == ["o_proj", "q_proj"]
                                                                                else ",".join(layers)))
    for key, value in theirs.items():
        if key not in own or own[key] != tuple(value.shape):
            if key.endswith(".lora_A") and key in own:
                raise _refuse(path, f"its LoRA rank is {value.shape[0]}, this run's {own[key][0]}",
                              f"pass --lora_rank {value.shape[0]}")
            shape = f"shape {list(own[key])}" if key in own else "no such weight"
            raise _refuse(path, f"its {key} has shape {list(value.shape)}, this model {shape} (another "
                          "--hidden_size, --num_hidden_layers, --use_moe or base)",
                          "pass the model flags of the MiniMind run")
    missing = [k for k in model.state_dict() if k not in theirs]
    if not lora and missing:
        raise _refuse(path, f"it has no {missing[0]}", "pass the model flags of the MiniMind run")
    scales = {getattr(m, "scale", 1.0) for m in model.modules() if hasattr(m, "lora_A")}
    if scales - {1.0}:
        raise _refuse(path, f"MiniMind's LoRA runs at scale 1 (alpha = rank), this run at {max(scales - {1.0}):g}",
                      "leave out --lora_alpha and --use_rslora")


def _optimizer_state(path: Path, ckpt: dict, model: nn.Module, params: list[nn.Parameter],
                     optimizer: torch.optim.Optimizer, lora: bool) -> dict:
    """MiniMind's AdamW moments and step counts, re-indexed by parameter name into this optimizer's order, with
    this run's hyperparameters (its betas, weight decay, fused kernel) kept."""
    named = dict(model.named_parameters(remove_duplicate=False))  # tied weights: both names, one Parameter
    held, seen = [], set()
    for key in ckpt["model"]:  # MiniMind's parameter order: its named_parameters order, a tied weight once
        name = _our_name(key, lora)
        if name in named and id(named[name]) not in seen:
            seen.add(id(named[name]))
            held.append(id(named[name]))
    theirs = ckpt["optimizer"]
    indices = [i for group in theirs["param_groups"] for i in group["params"]]
    if len(indices) != len(held) or {id(p) for p in params} != set(held):
        raise _refuse(path, f"its optimizer holds {len(indices)} tensors, this run trains {len(params)}",
                      "pass the flags of the MiniMind run")
    index_of = dict(zip(held, indices))
    state = {i: theirs["state"][index_of[id(p)]] for i, p in enumerate(params) if index_of[id(p)] in theirs["state"]}
    ours = optimizer.state_dict()
    return {"state": state, "param_groups": ours["param_groups"]}


def continue_minimind_run(path: Path, model: nn.Module, params: list[nn.Parameter],
                          optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                          args: argparse.Namespace, info: DistInfo, data: TrainData, lora: bool) -> TrainState:
    """Load MiniMind's resume file at `path` into `model` (LoRA weights, or all weights) and `optimizer`; return the
    position to continue from, converted from MiniMind's micro-batches to this repo's optimizer steps and samples."""
    if getattr(args, "fsdp", False):
        raise _refuse(path, "--fsdp shards the model it would load into", "leave out --fsdp")
    ckpt = _load(path)
    flag = "--lora_name" if lora else "--save_weight"
    saved_ws = int(ckpt.get("world_size") or 1)
    if saved_ws != info.world_size:
        # Its step counts one rank's micro-batches; on another number of processes the samples per step differ
        raise _refuse(path, f"MiniMind ran it on {saved_ws} process(es), this run has {info.world_size}",
                      f"run it on {saved_ws} (torchrun --nproc_per_node {saved_ws})")
    _check_model(path, ckpt["model"], model, lora, flag)
    with torch.no_grad():
        own = dict(model.named_parameters())
        for key, value in ckpt["model"].items():
            name = _our_name(key, lora)
            if name in own:  # a LoRA run's frozen base comes from --from_weight, not from this fp16 copy
                own[name].copy_(value)
    try:
        optimizer.load_state_dict(_optimizer_state(path, ckpt, model, params, optimizer, lora))
    except (ValueError, KeyError, RuntimeError) as err:
        raise _refuse(path, f"its optimizer state does not fit this model ({err})", "pass the flags of the MiniMind "
                      "run") from err
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])

    state = _position(int(ckpt["epoch"]), int(ckpt["step"]), args, info.world_size, data)
    state.wandb_id = ckpt.get("wandb_id")
    seed_everything(args.seed + 1000 * state.step + info.rank)  # MiniMind's file holds no RNG state
    if info.is_main:
        print(_note(path, int(ckpt["epoch"]), int(ckpt["step"]), state, args, data), flush=True)
    return state


def _position(epoch: int, micro: int, args: argparse.Namespace, world_size: int, data: TrainData) -> TrainState:
    """MiniMind's (epoch, micro-batches done in it) as optimizer steps done and samples consumed, for this run's
    --batch_size and --accumulation_steps (MiniMind's own, when its command is run again). An optimizer step every
    --accumulation_steps micro-batches: those after its last step never reached the weights, so they are redone."""
    per_epoch = data.sampler.steps_in_epoch(0)
    # Packed, positions count rows of several samples; MiniMind's micro-batches count samples
    n_samples = len(data.train.dataset) if isinstance(data.train, PackedDataset) else len(data.train)
    finished = micro * args.batch_size * world_size >= n_samples  # MiniMind also steps at the epoch's end
    steps_in = micro // args.accumulation_steps
    position = steps_in * data.sampler.global_batch
    if finished or position >= len(data.train):
        return TrainState(step=(epoch + 1) * per_epoch, epoch=epoch + 1, position=0, world_size=world_size)
    return TrainState(step=epoch * per_epoch + steps_in, epoch=epoch, position=position, world_size=world_size)


def _note(path: Path, epoch: int, micro: int, state: TrainState, args: argparse.Namespace, data: TrainData) -> str:
    where = f"epoch {epoch + 1}, micro-batch {micro}"
    if state.position == 0:
        return (f"note: continuing MiniMind's run from {path} ({where}, the epoch's end) at step {state.step}, epoch "
                f"{state.epoch + 1}; this repo shuffles each epoch in its own order")
    later = "; each is seen in the next epoch" if state.epoch + 1 < args.epochs else "; this is the last epoch"
    return (f"note: continuing MiniMind's run from {path} ({where}) at step {state.step}, epoch {state.epoch + 1}, "
            f"after {state.position} of its {len(data.train)} samples; this repo shuffles in another order than "
            f"MiniMind, so the rest of the epoch is this repo's order after its first {state.position}: samples "
            f"MiniMind already trained on in this epoch come again and as many it had not reached are skipped{later}")

