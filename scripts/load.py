"""Load a base model and its tokenizer for the scripts: a MiniMind `.pth`, a MiniMind name, or a model dir.

`--from_weight` is read like the trainer reads it:
- a model directory (config.json + weights): a MiniMind directory (model_type "minimind") or any
  transformers causal LM, opened with `AutoModelForCausalLM.from_pretrained`;
- a `.pth` file: a MiniMind state dict, opened with `load_minimind`;
- a bare name such as `full_sft`: the MiniMind file `{save_dir}/{name}_{hidden_size}{_moe}.pth`;
- nothing: the demo base `model/demo/`.
"""

import argparse
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

import model.model_minimind  # noqa: F401  (registers "minimind" with AutoModelForCausalLM)
from model.errors import UserError
from model.model_minimind import load_minimind

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_BASE = REPO_ROOT / "model" / "demo"
REPO_TOKENIZER = REPO_ROOT / "model" / "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class BaseModelError(UserError):
    """A base model or tokenizer path that cannot be opened."""


def add_base_flags(p: argparse.ArgumentParser, device: bool = True) -> None:
    """The "base model" flag group shared by chat.py and merge_lora.py (with or without --device)."""
    g = p.add_argument_group("base model")
    g.add_argument(
        "--from_weight",
        default=None,
        help="a model directory (MiniMind or transformers), a MiniMind .pth file, or a MiniMind "
        "name resolved as {save_dir}/{name}_{hidden_size}{_moe}.pth (default: the demo base "
        "model/demo/)",
    )
    g.add_argument(
        "--save_dir",
        default=str(REPO_ROOT / "out"),
        help="where MiniMind names are looked up (default <repo>/out)",
    )
    g.add_argument(
        "--hidden_size",
        type=int,
        default=None,
        help="MiniMind hidden size: picks the file for a name; must match a .pth (default: from the file)",
    )
    g.add_argument(
        "--use_moe",
        type=int,
        choices=[0, 1],
        default=0,
        help="1 = the MiniMind MoE file ({name}_{hidden_size}_moe.pth) for a name",
    )
    g.add_argument(
        "--num_attention_heads",
        type=int,
        default=None,
        help="minimind2 .pth files cannot tell their head count (default 8, as in all releases)",
    )
    g.add_argument(
        "--num_experts_per_tok",
        type=int,
        default=None,
        help="MiniMind MoE top-k, which a .pth cannot tell (default: 2 for minimind2, 1 for minimind-3)",
    )
    g.add_argument(
        "--tokenizer_path",
        default=None,
        help="tokenizer directory (default: the model directory's, else one beside the .pth, "
        "else the repo's model/tokenizer/)",
    )
    if device:
        g.add_argument("--device", default=None, help="cuda, cuda:0, cpu, mps (default: cuda if available)")


def resolve_device(name: str | None) -> torch.device:
    """The requested device, or cuda when there is one and cpu otherwise."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BaseModelError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return device


def resolve_weight(args: argparse.Namespace) -> Path:
    """The path that --from_weight means (a directory or a .pth file), checked to exist."""
    if args.from_weight is None:
        if not (DEMO_BASE / "config.json").is_file():
            raise BaseModelError(f"the demo base {DEMO_BASE} is not there; pass --from_weight")
        return DEMO_BASE
    path = Path(args.from_weight)
    if path.exists():
        return path
    if path.suffix == ".pth" or "/" in args.from_weight:
        raise BaseModelError(f"--from_weight {args.from_weight}: no such file or directory")
    if args.hidden_size is None:
        raise BaseModelError(
            f"--from_weight {args.from_weight} is a MiniMind name: also give --hidden_size "
            f"(e.g. 768) to pick {args.save_dir}/{args.from_weight}_<hidden_size>.pth"
        )
    path = Path(args.save_dir) / f"{args.from_weight}_{args.hidden_size}{'_moe' if args.use_moe else ''}.pth"
    if not path.is_file():
        raise BaseModelError(f"--from_weight {args.from_weight}: {path} does not exist")
    return path


def find_tokenizer_dir(args: argparse.Namespace, weight: Path) -> Path:
    """--tokenizer_path, else the model directory, else the .pth's folder, else the repo's tokenizer."""
    if args.tokenizer_path:
        candidates = [Path(args.tokenizer_path)]
    else:
        candidates = [weight if weight.is_dir() else weight.parent, REPO_TOKENIZER]
    for folder in candidates:
        if any((folder / f).is_file() for f in TOKENIZER_FILES):
            return folder
    raise BaseModelError(
        f"no tokenizer found in {', '.join(map(str, candidates))}; pass --tokenizer_path "
        f"(a folder with tokenizer.json / tokenizer_config.json)"
    )


def load_base(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype | None = None
) -> tuple[nn.Module, object, Path]:
    """Load the base model (eval mode, on `device`) and its tokenizer; return them and the tokenizer's folder.

    dtype None: bfloat16 on GPU, float32 on CPU.
    """
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    weight = resolve_weight(args)
    if weight.is_dir():
        if not (weight / "config.json").is_file():
            raise BaseModelError(f"{weight}: a model directory needs a config.json")
        try:
            model = AutoModelForCausalLM.from_pretrained(weight, dtype=dtype)
        except (OSError, ValueError) as e:
            raise BaseModelError(f"{weight}: transformers cannot open it ({e})") from e
    else:
        overrides = {
            k: getattr(args, k)
            for k in ("hidden_size", "num_attention_heads", "num_experts_per_tok")
            if getattr(args, k, None) is not None
        }
        model = load_minimind(weight, dtype=dtype, **overrides)
    tokenizer_dir = find_tokenizer_dir(args, weight)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return model.to(device).eval(), tokenizer, tokenizer_dir


def is_minimind(model: nn.Module) -> bool:
    """True for this repo's MiniMind model (exportable as .pth and as a transformers architecture)."""
    return getattr(getattr(model, "config", None), "model_type", None) == "minimind"
