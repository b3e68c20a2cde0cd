"""Command-line flags shared by the training jobs, grouped by topic (MiniMind's spellings accepted)."""

import argparse
import os
from pathlib import Path

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


def _switch(group: argparse._ArgumentGroup, *names: str, help: str) -> None:
    """A flag usable bare (`--use_wandb`) or with a value (`--use_wandb 1`)."""
    group.add_argument(*names, type=str2bool, nargs="?", const=True, default=False, help=help)


def default_save_dir() -> Path:
    """`<repo>/out`, unless $MINILORA_OUT_DIR points elsewhere (keeps big test files out of the repo)."""
    return Path(os.environ.get("MINILORA_OUT_DIR") or REPO_ROOT / "out")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a flag's default only when it says something (not None/False, not already in the text)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


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
    g.add_argument("--save_interval", type=int, default=1000, help="save a checkpoint every N optimizer steps")
    g.add_argument("--log_interval", type=int, default=10, help="print/log every N optimizer steps")
    _switch(g, "--use_wandb", help="log to Weights & Biases (WANDB_MODE=offline works)")
    g.add_argument("--wandb_project", default="MiniLoRA", help="wandb project name")

    g = p.add_argument_group("base model")
    g.add_argument("--from_weight", default=None,
                   help="a MiniMind name resolved as {save_dir}/{name}_{hidden_size}{_moe}.pth (e.g. full_sft), "
                        "a .pth path, or a model directory (config.json + weights + tokenizer). default: "
                        + ("a new random MiniMind model (also: none)" if job == "pretrain" else "the demo base model/demo/"))
    g.add_argument("--hidden_size", "--dim", dest="hidden_size", type=int, default=None,
                   help="MiniMind hidden size: picks the file and must match it (default: from the file)")
    g.add_argument("--num_hidden_layers", "--n_layers", dest="num_hidden_layers", type=int, default=None,
                   help="MiniMind layer count; must match the file (default: from the file)")
    g.add_argument("--use_moe", type=str2bool, default=None,
                   help="MiniMind MoE variant (0/1); picks the file name suffix _moe and must match it")
    g.add_argument("--tokenizer_path", default=None,
                   help="tokenizer directory (default: the model directory's, else one beside the .pth, "
                        "else the repo's model/tokenizer/)")

    if job == "lora":
        g = p.add_argument_group("LoRA")
        g.add_argument("--lora_rank", type=int, default=16, help="rank r of the update B·A")
        g.add_argument("--lora_alpha", type=float, default=None,
                       help="scale = alpha / r (default: alpha = r, scale 1, as in MiniMind)")
        g.add_argument("--lora_dropout", type=float, default=0.0, help="dropout on the LoRA branch input")
        g.add_argument("--lora_targets", default=None,
                       help="comma-separated module names to adapt, e.g. q_proj,v_proj; 'square' = MiniMind's "
                            "choice (q_proj,o_proj) (default: every linear layer but lm_head and MoE routers)")

    g = p.add_argument_group("data")
    g.add_argument("--data_path", default=str(d["data_path"]), help="training jsonl")
    g.add_argument("--max_seq_len", type=int, default=512, help="samples are truncated to this many tokens")
    g.add_argument("--val_data_path", default=None, help="validation jsonl")
    g.add_argument("--val_fraction", type=float, default=0.0,
                   help="hold out this fraction of the training data for validation (if no --val_data_path)")
    g.add_argument("--eval_interval", type=int, default=None,
                   help="evaluate every N optimizer steps, and at the end (default: --save_interval)")
    if job != "pretrain":
        g.add_argument("--chat_template", default=None,
                       help="a jinja chat template file to render conversations with (default: the tokenizer's)")
    _switch(g, "--packing", help="pack several samples per row (position_ids restart per sample; no padding)")
    _switch(g, "--skip_bad_data", "--skip_invalid", help="skip malformed jsonl lines with a warning instead of stopping")
    g.add_argument("--num_workers", type=int, default=2, help="DataLoader worker processes")

    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=d["epochs"], help="passes over the training data")
    g.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps")
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
    g.add_argument("--use_compile", type=str2bool, default=False,
                   help="torch.compile the decoder (0/1); with --packing on GPUs (one, or DDP) also replay it as CUDA "
                        "graphs (the fastest steps; the first step compiles for a minute or two)")
    g.add_argument("--attention", default="auto", choices=["auto", "flex", "sdpa"],
                   help="how packed rows attend in the compiled decoder: flex = FlexAttention, which skips the "
                        "masked tiles (needs --packing, --use_compile 1, a CUDA device, a MiniMind model); sdpa = "
                        "a dense block-diagonal mask (e.g. if Flex's kernels do not fit your GPU); auto (default) = "
                        "flex where it applies")
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
    args.save_dir = str(Path(args.save_dir) if args.save_dir else default_save_dir())
    if args.eval_interval is None:
        args.eval_interval = args.save_interval
    for flag in ("batch_size", "accumulation_steps", "epochs", "save_interval", "log_interval", "eval_interval"):
        if getattr(args, flag) < 1:
            raise FlagError(f"--{flag} must be at least 1 (got {getattr(args, flag)})")
    if not 0.0 <= args.val_fraction < 1.0:
        raise FlagError(f"--val_fraction must be in [0, 1) (got {args.val_fraction})")
    if args.max_steps is not None and args.max_steps < 1:
        raise FlagError(f"--max_steps must be at least 1 (got {args.max_steps})")
    return args


def check_data_files(args: argparse.Namespace) -> None:
    """Stop before any model is built when --data_path / --val_data_path is missing (the demo data says how to make it)."""
    for flag, path in (("--data_path", args.data_path), ("--val_data_path", args.val_data_path)):
        if path is None or Path(path).is_file():
            continue
        if Path(path).resolve().parent == REPO_ROOT / "dataset" and Path(path).name.endswith("_demo.jsonl"):
            raise FlagError(f"{flag} {path}: no such file; the demo pretraining and SFT data are generated, not "
                            "committed: run `python dataset/make_demo_data.py` first")
        raise FlagError(f"{flag} {path}: no such file")


def from_scratch(from_weight: str | None) -> bool:
    """--from_weight absent or `none` (MiniMind's spelling): build a new model instead of loading one."""
    return from_weight is None or from_weight.lower() == "none"
