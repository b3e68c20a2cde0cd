"""The LoRA flags of train_lora.py turned into LoRA layers on the base model (new, or from --init_lora)."""

import argparse
import re

import torch
from torch import nn

from model.model_lora import (
    apply_lora,
    check_lora_fits,
    find_targets,
    largest_useful_ranks,
    load_lora,
    read_lora_plan,
)
from model.nf4 import quantize_base
from trainer.args import FlagError

DEFAULT_RANK = 16


def build_lora(model: nn.Module, args: argparse.Namespace, device: torch.device) -> tuple[list[str], str]:
    """Put LoRA on `model` as the flags say (with --load_in_4bit, the frozen base goes to `device` in NF4).

    Returns the adapted module names and a note for the start-up line; args.lora_rank gets the rank used.
    """
    if args.load_in_4bit and args.fsdp:
        raise FlagError("--load_in_4bit does not work with --fsdp (FSDP shards bf16 weights); a 4-bit base is "
                        "small enough to be whole on each GPU: drop --fsdp")
    names = _from_file(model, args) if args.init_lora else _new(model, args)
    if not args.load_in_4bit:
        return names, ""
    count, held = quantize_base(model, device)
    size = f"{held / 2**30:.2f} GiB" if held >= 2**30 else f"{held / 2**20:.1f} MiB"  # small bases: not "0.00 GiB"
    return names, f"; {count} base linear layers in NF4 ({size})"


def _new(model: nn.Module, args: argparse.Namespace) -> list[str]:
    if args.lora_rank is None:
        args.lora_rank = DEFAULT_RANK
    _refuse_useless_ranks(model, args)
    return apply_lora(model, rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                      targets=args.lora_targets, use_rslora=args.use_rslora,
                      rank_pattern=args.lora_rank_pattern, alpha_pattern=args.lora_alpha_pattern,
                      use_dora=args.use_dora)


def _refuse_useless_ranks(model: nn.Module, args: argparse.Namespace) -> None:
    """A rank above min(in_features, out_features) of every layer it sets adds memory, never expressiveness (B·A
    has no higher rank); a huge one allocates until the process is killed. Refused before any factor exists."""
    for key, (useful, name) in largest_useful_ranks(model, args.lora_targets, args.lora_rank_pattern).items():
        rank = args.lora_rank if key is None else int(args.lora_rank_pattern[key])
        if rank > useful:
            flag = f"--lora_rank {rank}" if key is None else f"--lora_rank_pattern {key}={rank}"
            raise FlagError(f"{flag}: above the rank any layer it sets can use; B·A has rank "
                            f"at most min(in_features, out_features), largest {useful} ({name}); pass {useful} or less")


def _from_file(model: nn.Module, args: argparse.Namespace) -> list[str]:
    """LoRA on exactly the file's layers with its ranks, filled with its weights; contradicting flags refused."""
    path = args.init_lora
    plan, file_rslora, file_dora = read_lora_plan(path)
    names = list(plan)
    check_lora_fits(model, path, {n: n for n in names})  # before the flags: a LoRA of another base is the problem
    ranks = {r for r, _ in plan.values()}
    fix = "--init_lora takes it from the file; drop the flag"

    def refuse(flag: str, what: str) -> None:
        raise FlagError(f"{flag} contradicts --init_lora {path}: {what}; {fix}")

    if args.lora_rank is not None and ranks != {args.lora_rank}:
        refuse(f"--lora_rank {args.lora_rank}", f"its layers have rank {', '.join(map(str, sorted(ranks)))}")
    if args.lora_rank_pattern:
        refuse("--lora_rank_pattern", "the file sets each layer's rank")
    if args.lora_targets is not None:
        chosen = find_targets(model, args.lora_targets)
        if set(chosen) != set(names):
            refuse(f"--lora_targets {args.lora_targets}", f"that selects {len(chosen)} layers, the file adapts "
                   f"{len(names)} (e.g. {names[0]})")
    if args.use_dora and not file_dora:
        refuse("--use_dora", "the file is a plain LoRA, not DoRA")
    args.use_dora = file_dora
    alphas = {n: a for n, (_, a) in plan.items()}
    if None in alphas.values():
        # A MiniMind .pth folds its scale into B, so any alpha can continue it (load_lora rescales B).
        alpha, alpha_pattern, use_rslora = args.lora_alpha, args.lora_alpha_pattern, args.use_rslora
    else:
        if args.lora_alpha is not None and set(alphas.values()) != {args.lora_alpha}:
            refuse(f"--lora_alpha {args.lora_alpha:g}", f"its alphas are {sorted(set(alphas.values()))}")
        if args.lora_alpha_pattern:
            refuse("--lora_alpha_pattern", "the file sets each layer's alpha")
        if args.use_rslora and not file_rslora:
            refuse("--use_rslora", "the file was trained without rsLoRA")
        alpha, alpha_pattern, use_rslora = None, {re.escape(n): a for n, a in alphas.items()}, file_rslora
    args.lora_rank = max(ranks, key=[r for r, _ in plan.values()].count)
    apply_lora(model, rank=args.lora_rank, alpha=alpha, dropout=args.lora_dropout, targets=names,
               use_rslora=use_rslora, rank_pattern={re.escape(n): r for n, (r, _) in plan.items()},
               alpha_pattern=alpha_pattern, use_dora=file_dora)
    return load_lora(model, path)  # the file's weights; B rescaled where our scale differs from the file's

