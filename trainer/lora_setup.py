"""The LoRA flags of train_lora.py turned into LoRA layers on the base model."""

import argparse

from torch import nn

from model.model_lora import apply_lora

DEFAULT_RANK = 16


def build_lora(model: nn.Module, args: argparse.Namespace) -> list[str]:
    """Put LoRA on `model` as the flags say; return the adapted module names (args.lora_rank gets the rank used)."""
    if args.lora_rank is None:
        args.lora_rank = DEFAULT_RANK
    return apply_lora(model, rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                      targets=args.lora_targets, use_rslora=args.use_rslora,
                      rank_pattern=args.lora_rank_pattern, alpha_pattern=args.lora_alpha_pattern)
