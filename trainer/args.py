"""Command-line flags shared by the training jobs, grouped by topic (MiniMind's spellings accepted)."""

import argparse
import json
import math
import os
from pathlib import Path

import torch

from model.atomic import refuse_empty_folder
from model.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]

# Per-job defaults; everything else is shared. Paths are absolute so a job runs from any directory.
JOB_DEFAULTS = {
    "lora": dict(learning_rate=1e-4, epochs=10, data_path=REPO_ROOT / "dataset" / "lora_identity.jsonl"),
    "full_sft": dict(learning_rate=1e-5, epochs=2, data_path=REPO_ROOT / "dataset" / "sft_demo.jsonl"),
    "pretrain": dict(learning_rate=5e-4, epochs=1, data_path=REPO_ROOT / "dataset" / "pretrain_demo.jsonl"),
}


class FlagError(UserError):
    """A flag value that cannot work (the message names the flag and what to do)."""


def str2bool(value: str | bool) -> bool:
    """Parse MiniMind-style switches: 0/1, true/false, yes/no."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "y", "on"):
        return True
    if text in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected 0/1 or true/false, got {value!r}")


def pattern_dict(value: str) -> dict[str, float]:
    """Parse `mlp=32,self_attn=8` into {"mlp": 32, "self_attn": 8} (ints stay ints)."""
    out = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        key, sep, number = item.partition("=")
        try:
            out[key.strip()] = int(number)
        except ValueError:
            try:
                out[key.strip()] = float(number)
            except ValueError:
                sep = ""
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"expected name=number pairs like mlp=32,self_attn=8, got {item!r}")
    if not out:
        raise argparse.ArgumentTypeError("expected name=number pairs like mlp=32,self_attn=8")
    return out


def _switch(group: argparse._ArgumentGroup, *names: str, help: str) -> None:
    """A flag usable bare (`--use_wandb`) or with a value (`--use_wandb 1`)."""
    group.add_argument(*names, type=str2bool, nargs="?", const=True, default=False, help=help)


def default_save_dir() -> Path:
    """`<repo>/out`, unless $MINILORA_OUT_DIR points elsewhere (keeps big test files out of the repo)."""
    return Path(os.environ.get("MINILORA_OUT_DIR") or REPO_ROOT / "out")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a flag's default only when it says something (not None/False, not already in the text)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


# The base MiniMind's own scripts load when --from_weight is not given (train_lora.py, train_full_sft.py).
MINIMIND_BASE = {"lora": "full_sft", "full_sft": "pretrain"}


def build_parser(job: str, description: str) -> argparse.ArgumentParser:
    """The parser for one job ("lora", "full_sft" or "pretrain")."""
    d = JOB_DEFAULTS[job]
    p = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)

    g = p.add_argument_group("output")
    g.add_argument("--save_dir", "--out_dir", dest="save_dir", default=None,
                   help="where weights, resume files, config JSON and loss plot go "
                        "(default: $MINILORA_OUT_DIR or <repo>/out)")
    if job == "lora":
        g.add_argument("--lora_name", default="lora_identity",
                       help="output name: {save_dir}/{lora_name}_{hidden_size}{_moe}.pth")
    else:
        g.add_argument("--save_weight", default=job,
                       help="output name: {save_dir}/{save_weight}_{hidden_size}{_moe}.pth and the model directory "
                            "{save_weight}_{hidden_size}{_moe}/")
        g.add_argument("--save_dtype", default=None, choices=["bfloat16", "float16", "float32"],
                       help="dtype of the saved model directory's weights (training and the resume file stay "
                            "float32; default: the base's own, a directory's config.json dtype or a .pth's tensors' "
                            "dtype; else float32)")
    g.add_argument("--save_interval", type=int, default=1000, help="save a checkpoint every N optimizer steps")
    g.add_argument("--log_interval", type=int, default=10, help="print/log every N optimizer steps")
    _switch(g, "--use_wandb", help="log to Weights & Biases (WANDB_MODE=offline works)")
    g.add_argument("--wandb_project", default="MiniLoRA", help="wandb project name")

    g = p.add_argument_group("base model")
    g.add_argument("--from_weight", default=None,
                   help="a MiniMind name resolved as {save_dir}/{name}_{hidden_size}{_moe}.pth (e.g. full_sft), "
                        "a .pth path, or a model directory (config.json + weights + tokenizer). default: "
                        + ("a new random MiniMind model (also: none)" if job == "pretrain" else
                           f"with --hidden_size, {{save_dir}}/{MINIMIND_BASE[job]}_{{hidden_size}}{{_moe}}.pth where it "
                           "exists (MiniMind's default), else the demo base model/demo/"
                           + ("; none: a new random MiniMind model" if job == "full_sft" else "")))
    g.add_argument("--hidden_size", "--dim", dest="hidden_size", type=int, default=None,
                   help="MiniMind hidden size: picks the file and must match it (default: from the file"
                        + ("; a new model: 768)" if job == "pretrain" else ")"))
    g.add_argument("--num_hidden_layers", "--n_layers", dest="num_hidden_layers", type=int, default=None,
                   help="MiniMind layer count; must match the file (default: from the file"
                        + ("; a new model: 8)" if job == "pretrain" else ")"))
    g.add_argument("--use_moe", type=str2bool, default=None,
                   help="MiniMind MoE variant (0/1); picks the file name suffix _moe and must match it "
                        "(default: from the file)")
    g.add_argument("--tokenizer_path", default=None,
                   help="tokenizer directory (default: the model directory's, else one beside the .pth, "
                        "else the repo's model/tokenizer/)")

    if job == "lora":
        g = p.add_argument_group("LoRA")
        g.add_argument("--lora_rank", type=int, default=None, help="rank r of the update B·A (default: 16)")
        g.add_argument("--lora_alpha", type=float, default=None,
                       help="scale = alpha / r (default: alpha = r, scale 1, as in MiniMind)")
        g.add_argument("--lora_dropout", type=float, default=0.0,
                       help="dropout on the LoRA branch input (a training choice: with --init_lora too, this flag "
                            "sets it, not the file's lora_dropout)")
        g.add_argument("--lora_targets", default=None,
                       help="comma-separated module names to adapt, e.g. q_proj,v_proj; 'square' = MiniMind's "
                            "choice (q_proj,o_proj) (default: every linear layer but lm_head and MoE routers)")
        g.add_argument("--lora_rank_pattern", type=pattern_dict, default=None,
                       help="per-module ranks, e.g. mlp=32,self_attn=8 (a name regex matched on the end of the "
                            "module path, or a parent module; first match wins)")
        g.add_argument("--lora_alpha_pattern", type=pattern_dict, default=None,
                       help="per-module alphas, same form as --lora_rank_pattern, e.g. mlp=64")
        _switch(g, "--use_rslora", help="rank-stabilised LoRA: scale = alpha / sqrt(r) instead of alpha / r")
        _switch(g, "--use_dora", help="DoRA: a trainable magnitude per output row on top of LoRA's direction "
                                      "update (PEFT's use_dora; saved as a PEFT directory only, MiniMind's .pth "
                                      "layout has no place for it)")
        _switch(g, "--load_in_4bit", help="QLoRA: hold the frozen base's linear layers in 4-bit NF4 (blocks of 64, "
                                          "double-quantized scales), dequantized on the fly; LoRA weights and "
                                          "AdamW state stay fp32; not with --fsdp")
        g.add_argument("--init_lora", default=None,
                       help="start from this LoRA (a MiniMind .pth or a PEFT adapter directory): its layers and "
                            "ranks (and a PEFT file's alphas and rsLoRA) are used; a new run with a fresh "
                            "optimizer and LR schedule. Flags that contradict the file are refused")

    g = p.add_argument_group("data")
    g.add_argument("--data_path", default=str(d["data_path"]), help="training jsonl")
    g.add_argument("--max_seq_len", type=int, default=512, help="samples are truncated to this many tokens")
    g.add_argument("--val_data_path", default=None, help="validation jsonl")
    g.add_argument("--val_fraction", type=float, default=0.0,
                   help="hold out this fraction of the training data for validation, at most 0.5 (if no "
                        "--val_data_path)")
    g.add_argument("--eval_interval", type=int, default=None,
                   help="evaluate every N optimizer steps, and at the end (default: --save_interval)")
    if job != "pretrain":
        g.add_argument("--chat_template", default=None,
                       help="a jinja chat template file to render conversations with; saved with the outputs, so "
                            "that chat, eval and merge render as the run learned (default: the tokenizer's)")
    g.add_argument("--packing", type=str2bool, nargs="?", const=True, default=None,
                   help="pack several samples per row of --max_seq_len tokens (position_ids restart per sample; no "
                        "padding); --batch_size still counts samples: a micro-batch holds about that many"
                        + (" (default: on with a CUDA device, off on CPU; --packing 0 turns it off)" if job == "lora"
                           else " (default: off)"))
    g.add_argument("--packed_rows", type=int, default=None,
                   help="packed rows per micro-batch (default: as many as hold about --batch_size samples of the "
                        "data's mean length)")
    _switch(g, "--group_by_length", help="padded batches (--packing 0): each optimizer step takes samples of about one "
                                         "length, so less padding and, on a CPU, shorter steps (the shuffled order, "
                                         "sorted longest first within runs of 50 steps' samples, as transformers' "
                                         "Trainer does); a run resumes in the same order" + (
                                             "; with it, --packing defaults to off on CUDA too" if job == "lora" else ""))
    g.add_argument("--data_cache", default=None,
                   help="folder that keeps the tokenized data, so that the next run on the same file, tokenizer, "
                        "chat template and --max_seq_len starts without tokenizing (none: off; default: "
                        "$MINILORA_CACHE_DIR, else ~/.cache/minilora/tokenized; each file keeps its 3 latest)")
    _switch(g, "--skip_bad_data", "--skip_invalid", help="skip malformed jsonl lines with a warning instead of stopping")
    g.add_argument("--num_workers", type=int, default=2, help="DataLoader worker processes")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d["epochs"], help="passes over the training data")
    g.add_argument("--max_steps", type=int, default=None, help="stop after at most this many optimizer steps (the --epochs end the run "
                   "first if they hold fewer) (default: none, the --epochs decide)")
    g.add_argument("--batch_size", type=int, default=16, help="samples per micro-batch per GPU")
    g.add_argument("--accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--learning_rate", type=float, default=d["learning_rate"], help="peak learning rate")
    g.add_argument("--warmup_iters", type=int, default=0, help="linear warmup steps, then cosine to lr/10")
    g.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay")
    g.add_argument("--grad_clip", type=float, default=1.0, help="clip the gradient norm to this (0: off)")
    g.add_argument("--seed", type=int, default=42, help="seed for init, data order and dropout")

    g = p.add_argument_group("hardware")
    g.add_argument("--device", default=None, help="cuda, cuda:0, cpu, mps (default: cuda if available)")
    g.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="autocast dtype (default: bfloat16 on GPU, float32 on CPU); float16 uses a GradScaler")
    g.add_argument("--use_compile", type=str2bool, default=None,
                   help="torch.compile the decoder (0/1)" + (
                       "; with --packing on GPUs (one, or DDP) each micro-step then replays as a CUDA graph, the "
                       "fastest steps (default: on with a CUDA device and Triton, off on CPU)" if job == "lora"
                       else " (default: off)"))
    g.add_argument("--compile_cache", default=None,
                   help="folder that keeps the compiled decoder's kernels for the next run, whose first step then "
                        "loads them instead of compiling (default: $TORCHINDUCTOR_CACHE_DIR where set, else "
                        "~/.cache/minilora/compile, which a reboot keeps; PyTorch's own default lies in the temp "
                        "directory)")
    if job == "lora":
        g.add_argument("--cuda_graphs", type=str2bool, default=None,
                       help="replay each step's kernels as CUDA graphs (0/1), so a slow host no longer stalls the GPU: "
                            "one graph per micro-batch shape of the whole forward and backward, compiled or not "
                            "(packed rows: one shape; padded widths come in multiples of 64); compiled with float16 "
                            "or transformers' own classes, the compiled decoder's graphs instead; default: wherever "
                            "they apply (a CUDA device, a dense model, no --fsdp or --gradient_checkpointing; "
                            "compiled: --packing; uncompiled: MiniMind's decoder and no float16)")
        g.add_argument("--compile_scope", default="auto", choices=["auto", "model", "layer"],
                       help="what one compiled graph holds: model = the whole decoder (fewest graph launches; a first "
                            "step of about 2 minutes at 0.6B with an empty cache), layer = one decoder layer, reused "
                            "by every layer (a first step of about 12-15 s, 4 s with a warm cache, on one H200); auto "
                            "(default) = layer")
    g.add_argument("--attention", default="auto", choices=["auto", "varlen", "flex", "sdpa"],
                   help="how packed rows attend: varlen = Flash attention's varlen kernel, only the pairs inside each "
                        "sample (needs --packing, a CUDA device, bf16 or fp16, a MiniMind model or a directory on its "
                        "decoder); flex = FlexAttention, which skips the masked tiles (needs --packing, --use_compile 1, "
                        "a CUDA device, a MiniMind model, and --compile_scope model or CUDA graphs of whole "
                        "micro-steps); sdpa = a dense block-diagonal mask (e.g. if the other kernels do not fit your "
                        "GPU); auto (default) = flex where each layer is compiled, whole micro-steps are CUDA graphs and "
                        "--max_seq_len is a multiple of 128, else the first of varlen, flex that applies, else sdpa")
    _switch(g, "--gradient_checkpointing", help="recompute activations in backward to save memory")
    _switch(g, "--ddp", help="multi-GPU run; needs torchrun (detected from the environment anyway)")
    if job == "lora":
        _switch(g, "--fsdp", help="under torchrun: shard the frozen base over the GPUs (FSDP2) instead of a "
                                  "whole copy per GPU; LoRA weights and checkpoints stay as with DDP")
    g.add_argument("--dist_timeout", type=float, default=600,
                   help="seconds a rank waits in a collective for the others before it fails (a dead or hung "
                        "peer ends the run instead of hanging it)")
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=-1,
                   help="set by old launchers; torchrun's LOCAL_RANK takes precedence")

    g = p.add_argument_group("resume")
    g.add_argument("--from_resume", type=str2bool, default=False,
                   help="1: continue from {save_dir}/{name}_resume.pth if it exists (same data order, LR, RNG)")
    return p


def parse_args(job: str, description: str, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the flags; relative user paths stay relative to the working directory."""
    args = build_parser(job, description).parse_args(argv)
    if args.save_dir is not None:  # "" is not "the default" but a path: the working directory
        refuse_empty_folder(args.save_dir, "--save_dir")
    args.save_dir = str(Path(args.save_dir) if args.save_dir else default_save_dir())
    if args.eval_interval is None:
        args.eval_interval = args.save_interval
    for flag in ("batch_size", "accumulation_steps", "epochs", "save_interval", "log_interval", "eval_interval"):
        if getattr(args, flag) < 1:
            raise FlagError(f"--{flag} must be at least 1 (got {getattr(args, flag)})")
    if not 0.0 <= args.val_fraction <= 0.5:  # more would train on less than it evaluates (nan fails too)
        raise FlagError(f"--val_fraction must be in [0, 0.5] (got {args.val_fraction}): more than half held out "
                        "leaves less to train on than to evaluate; a larger validation set goes in --val_data_path")
    if args.packing and args.group_by_length:
        raise FlagError("--group_by_length sorts padded batches, and packed rows (--packing) hold no padding to "
                        "save: drop one of the two")
    if job != "lora":  # the fast-path defaults on CUDA are measured for LoRA; full training opts in
        args.packing, args.use_compile = bool(args.packing), bool(args.use_compile)
    check_values(args)
    return args


def has_triton() -> bool:
    """Whether torch.compile can generate GPU kernels here (Inductor needs Triton on CUDA)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def pick_speed_defaults(args: argparse.Namespace, device_type: str, triton: bool | None = None) -> str:
    """Fill --packing and --use_compile left unset (None) for this device; return why, for the start-up line.

    On a CUDA device the fast path is the default: packed rows (one shape per step, no pad tokens) and the
    compiled decoder (CUDA graphs where they apply). On other devices the plain eager, padded path stays.
    """
    cuda = device_type == "cuda"
    triton = has_triton() if triton is None and cuda else bool(triton)
    why = []
    if args.packing is None:
        args.packing = cuda and not args.group_by_length
        why.append("packed rows (default on CUDA; --packing 0 to pad)" if args.packing else
                   "padded batches (" + ("--group_by_length" if cuda else "default off CUDA") + ")")
    if args.use_compile is None:
        args.use_compile = cuda and triton
        why.append("compiled decoder (default on CUDA; --use_compile 0 for eager)" if args.use_compile else
                   "eager (" + ("Triton is missing" if cuda else "default off CUDA") + ")")
    return ", ".join(why)


def check_values(args: argparse.Namespace) -> None:
    """Flag values that cannot work stop the run before any model is loaded (FlagError names the flag)."""
    # None: left to the default. A model of no width or depth fails deep in torch, or trains no layer at all
    for flag, low in (("num_workers", 0), ("warmup_iters", 0), ("max_seq_len", 2), ("packed_rows", 1),
                      ("max_steps", 1), ("hidden_size", 1), ("num_hidden_layers", 1)):
        if getattr(args, flag) is not None and getattr(args, flag) < low:
            raise FlagError(f"--{flag} must be at least {low} (got {getattr(args, flag)})")
    if hasattr(args, "lora_rank"):
        _check_lora_values(args)
    if not (math.isfinite(args.learning_rate) and args.learning_rate >= 0):   # 0: a run that checks its start
        raise FlagError(f"--learning_rate must be a finite number >= 0 such as 1e-4 (got {args.learning_rate})")
    for flag in ("weight_decay", "grad_clip"):
        if not (math.isfinite(getattr(args, flag)) and getattr(args, flag) >= 0):
            raise FlagError(f"--{flag} must be a finite number >= 0 (got {getattr(args, flag)})")
    if args.learning_rate * args.weight_decay >= 0.5:
        # Decoupled weight decay multiplies every weight by (1 - lr * wd) each step.
        raise FlagError(f"--weight_decay {args.weight_decay} with --learning_rate {args.learning_rate}: AdamW would "
                        f"multiply every weight by {1 - args.learning_rate * args.weight_decay:g} each step; keep "
                        "learning_rate x weight_decay far below 1 (e.g. --weight_decay 0.01)")
    if not (math.isfinite(args.dist_timeout) and args.dist_timeout > 0):
        raise FlagError(f"--dist_timeout must be a positive number of seconds (got {args.dist_timeout})")
    _check_device(args.device)
    save_dir = Path(args.save_dir)
    if save_dir.exists() and not save_dir.is_dir():
        raise FlagError(f"--save_dir {save_dir} is a file, not a folder; pass a folder")
    flag = "lora_name" if hasattr(args, "lora_name") else "save_weight"
    name = getattr(args, flag, None)
    if name is not None and (not name or name in (".", "..") or "/" in name or "\\" in name or name.startswith(".")):
        raise FlagError(f"--{flag} {name!r} must be a plain file name (no folders, no leading dot): the files go "
                        "into --save_dir; pass --save_dir for another folder")
    if getattr(args, "chat_template", None):
        check_template_file(Path(args.chat_template))


def _check_lora_values(args: argparse.Namespace) -> None:
    """Rank, alpha, dropout and the patterns' numbers: nan or inf would train nothing and save nan factors."""
    if args.lora_rank is not None and args.lora_rank < 1:
        raise FlagError(f"--lora_rank must be at least 1 (got {args.lora_rank})")
    if args.lora_alpha is not None and not (math.isfinite(args.lora_alpha) and args.lora_alpha > 0):
        raise FlagError(f"--lora_alpha must be a positive number (got {args.lora_alpha}); leave it out for alpha = rank")
    if not 0 <= args.lora_dropout < 1:
        raise FlagError(f"--lora_dropout must be at least 0 and below 1 (got {args.lora_dropout})")
    for flag in ("lora_rank_pattern", "lora_alpha_pattern"):
        for name, value in (getattr(args, flag) or {}).items():
            whole = flag == "lora_rank_pattern"
            if not (math.isfinite(value) and value > 0) or (whole and value != int(value)):
                raise FlagError(f"--{flag} {name}={value}: a positive {'whole number' if whole else 'number'} is needed")


def _check_device(flag: str | None) -> None:
    """--device must name a device type torch knows (cuda, cuda:N, cpu, mps, xpu)."""
    if flag is None:
        return
    try:
        device = torch.device(flag)
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise FlagError(f"--device {flag}: not a device this trainer runs on; use cuda, cuda:N, cpu or mps")


def check_template_file(path: Path) -> str:
    """--chat_template must be a readable jinja file that compiles (a syntax error names its line); returns it."""
    if path.is_dir():  # a model folder, most likely: its template is the tokenizer's own
        raise FlagError(f"--chat_template {path}: a folder, not a .jinja file; a model folder's own template comes "
                        f"with --tokenizer_path {path}")
    try:
        # utf-8-sig: a byte-order mark (Windows Notepad writes one) would otherwise open every rendered chat
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise FlagError(f"--chat_template {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise FlagError(f"--chat_template {path}: cannot read it as UTF-8 text ({err})") from None
    if not text.strip():
        raise FlagError(f"--chat_template {path}: the file is empty; pass a jinja chat template")
    if text.lstrip().startswith("{") and (config := _json_object(text)) is not None:
        holds = " (its \"chat_template\" is the template)" if "chat_template" in config else ""
        raise FlagError(f"--chat_template {path}: a JSON file{holds}, not a jinja template; a tokenizer's own template "
                        "comes with --tokenizer_path FOLDER, and another one is passed as a .jinja file")
    from jinja2 import TemplateError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(text)
    except TemplateError as err:
        line = getattr(err, "lineno", None)
        raise FlagError(f"--chat_template {path}{f':{line}' if line else ''}: not a valid jinja template "
                        f"({getattr(err, 'message', None) or err})") from None
    return text


def _json_object(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def check_data_files(args: argparse.Namespace) -> None:
    """Stop before any model is built when --data_path / --val_data_path is missing (the demo data says how to make it)."""
    for flag, path in (("--data_path", args.data_path), ("--val_data_path", args.val_data_path)):
        if path is None or Path(path).is_file():
            continue
        if Path(path).is_dir():
            raise FlagError(f"{flag} {path} is a folder; pass the .jsonl file in it")
        if Path(path).resolve().parent == REPO_ROOT / "dataset" and Path(path).name.endswith("_demo.jsonl"):
            raise FlagError(f"{flag} {path}: no such file; the demo pretraining and SFT data are generated, not "
                            "committed: run `python dataset/make_demo_data.py` first")
        raise FlagError(f"{flag} {path}: no such file")

