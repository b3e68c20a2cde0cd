"""The scripts' "base model" flags, read the way the trainer reads them (trainer/base_model.py loads).

`--from_weight` is a model directory (MiniMind or any transformers causal LM), a MiniMind `.pth`, a
MiniMind name looked up as `{save_dir}/{name}_{hidden_size}{_moe}.pth`, or nothing: the demo base.
"""

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from dataset.chat_render import LORA_TEMPLATE
from model.errors import UserError
from model.model_lora import lora_folder
from trainer.args import check_template_file, default_save_dir, str2bool
from trainer.base_model import BaseModelError, is_moe, load_base, resolve_weight


def add_base_flags(p: argparse.ArgumentParser, device: bool = True) -> None:
    """The "base model" flag group shared by chat.py and merge_lora.py (with or without --device)."""
    g = p.add_argument_group("base model")
    g.add_argument(
        "--from_weight",
        "--weight",
        dest="from_weight",
        default=None,
        help="a model directory (MiniMind or transformers), a MiniMind .pth file, or a MiniMind name "
        "resolved as {save_dir}/{name}_{hidden_size}{_moe}.pth, e.g. full_sft (default: the base the LoRA's "
        "adapter_config.json names, where it exists; else with --hidden_size {save_dir}/full_sft_{hidden_size}.pth "
        "where it exists, as MiniMind's eval_llm.py; else the demo base model/demo/)",
    )
    g.add_argument(
        "--save_dir",
        "--out_dir",
        dest="save_dir",
        default=str(default_save_dir()),
        help="folder of MiniMind checkpoints: --from_weight and --lora_path names are looked up there "
        "(merge_lora.py also writes its outputs there) (default: $MINILORA_OUT_DIR or <repo>/out)",
    )
    g.add_argument(
        "--hidden_size",
        "--dim",
        dest="hidden_size",
        type=int,
        default=None,
        help="MiniMind hidden size: picks the file for a name and must match it (default: from the file)",
    )
    g.add_argument(
        "--num_hidden_layers",
        "--n_layers",
        dest="num_hidden_layers",
        type=int,
        default=None,
        help="MiniMind layer count; must match the file (default: from the file)",
    )
    g.add_argument(
        "--use_moe",
        type=str2bool,
        default=None,
        help="0/1: the MiniMind MoE file ({name}_{hidden_size}_moe.pth) for a name; must match the file "
        "(default: from the file)",
    )
    g.add_argument(
        "--tokenizer_path",
        default=None,
        help="tokenizer directory (default: the model directory's, else one beside the .pth, "
        "else the repo's model/tokenizer/)",
    )
    if device:
        g.add_argument("--device", default=None, help="cuda, cuda:0, cpu, mps (default: cuda if available)")


def load_from_flags(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype | None = None
) -> tuple[nn.Module, object]:
    """The base model (eval mode, on `device`; dtype None: bf16 on GPU, fp32 on CPU) and its tokenizer."""
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = load_base(
        base_for(args),
        args.save_dir,
        dtype,
        args.hidden_size,
        args.num_hidden_layers,
        args.use_moe,
        args.tokenizer_path,
        minimind_default="full_sft",
        training=False,
    )
    return base.model.to(device).eval(), base.tokenizer


def base_for(args: argparse.Namespace) -> str | None:
    """--from_weight, else the base the LoRA recorded in its adapter_config.json (this repo's trainer writes one
    beside a .pth LoRA too) where that path exists, as PEFT's AutoPeftModel loads it; else None (the default base).
    Also fills an absent --tokenizer_path from the LoRA's run config. Says what it took from where."""
    if args.from_weight or not args.lora_path:
        return args.from_weight
    lora = _lora_without_model(args)
    if lora is None:
        return None
    folder = lora_folder(lora)
    recorded = _read_json(folder / "adapter_config.json").get("base_model_name_or_path")
    if args.tokenizer_path is None:
        tokenizer = (_read_json(folder.with_name(folder.name + ".json")).get("paths") or {}).get("tokenizer_path")
        if tokenizer and Path(tokenizer).is_dir():
            args.tokenizer_path = tokenizer
            print(f"tokenizer: {tokenizer} (the LoRA's run trained with it; --tokenizer_path picks another)", flush=True)
    if not recorded:
        return None
    if not Path(recorded).exists():
        print(f"note: {folder / 'adapter_config.json'} names the base {recorded}, which is not here; loading the "
              "default base instead (--from_weight names the right one)", flush=True)
        return None
    print(f"base model: {recorded} (named by {folder / 'adapter_config.json'}; --from_weight picks another)",
          flush=True)
    return recorded


def _lora_without_model(args: argparse.Namespace) -> Path | None:
    """--lora_path as a path, or a MiniMind name looked up in --save_dir as --from_weight names are (unique, or
    picked by --hidden_size / --use_moe); None when there is no such file yet (lora_file then says so)."""
    path = Path(args.lora_path).expanduser()
    if path.exists():
        return path
    try:
        return resolve_weight(args.lora_path, args.save_dir, args.hidden_size, args.use_moe)
    except BaseModelError:
        return None


def _read_json(path: Path) -> dict:
    """A JSON object from `path`, or {} where there is none (missing, unreadable, not an object)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def is_minimind(model: nn.Module) -> bool:
    """True for this repo's MiniMind model (exportable as a .pth and as a transformers architecture)."""
    return getattr(getattr(model, "config", None), "model_type", None) == "minimind"


def script_parser(
    doc: str, group: str, lora_help: str, device: bool = True, lora_required: bool = False
) -> tuple[argparse.ArgumentParser, argparse._ArgumentGroup]:
    """A script's parser: its docstring (with the commands) as --help text, the base-model flags, and the
    flag group `group` holding --lora_path, returned for the script's own flags."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_base_flags(p, device=device)
    g = p.add_argument_group(group)
    g.add_argument("--chat_template", default=None,
                   help="a Jinja chat template file to render chats with (default: the one the LoRA was trained "
                   "with, which the trainer saves with it, else the tokenizer's own)")
    g.add_argument("--lora_path", "--lora_weight", dest="lora_path", default=None, required=lora_required,
                   type=lambda value: None if value == "None" else value,  # MiniMind's eval_llm.py: None = no LoRA
                   help=f"{lora_help}: a MiniMind .pth LoRA file, a PEFT adapter directory, or a MiniMind name "
                   "resolved as {save_dir}/{name}_{hidden_size}{_moe}.pth, e.g. lora_identity")
    return p, g


def lora_file(flag: str, save_dir: str, model: nn.Module) -> Path:
    """--lora_path as a path, or a MiniMind name (eval_llm.py's --lora_weight) looked up in --save_dir by the
    model's size, as MiniMind names its LoRA files."""
    path = Path(flag).expanduser()
    if path.exists() or path.suffix or len(path.parts) > 1:
        return path
    # named as the trainer names it: experts counted, not only MiniMind's use_moe key (a Qwen3-MoE directory)
    named = Path(save_dir) / f"{flag}_{model.config.hidden_size}{'_moe' if is_moe(model) else ''}.pth"
    if not named.is_file():
        raise UserError(f"--lora_path {flag}: no such file, and no {named} for it as a MiniMind name in --save_dir")
    return named


def use_chat_template(tokenizer: object, flag: str | None, lora: Path | None) -> Path | None:
    """Make `tokenizer` render chats as the LoRA learned them: --chat_template (`flag`), else the template the trainer
    saved with the LoRA (LORA_TEMPLATE in its folder); returns the file used, or None when the tokenizer's own
    stays."""
    if flag:  # one line for a missing, empty or broken file, as the trainer says it
        tokenizer.chat_template = check_template_file(Path(flag))
        return Path(flag)
    path = lora_folder(lora) / LORA_TEMPLATE if lora is not None else None
    if path is None or not path.is_file():
        return None
    try:
        tokenizer.chat_template = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}, the chat template saved with the LoRA: cannot read it as UTF-8 text "
                        f"({getattr(err, 'strerror', None) or err})") from None
    return path

