"""Merge a LoRA into its base and export: a MiniMind `.pth` and a model directory plain transformers opens.

    # the demo base + the LoRA `python trainer/train_lora.py` trains → out/merged_256.pth and out/merged_256_hf/
    python scripts/merge_lora.py --lora_path out/lora_identity_256.pth
    # with MiniMind's released weights in out/: MiniMind's tokenizer is copied into the transformers directory
    python scripts/merge_lora.py --from_weight out/full_sft_768.pth --tokenizer_path ~/minimind/model \\
        --lora_path out/lora_medical_768.pth --save_weight full_sft_medical
    # a transformers base (e.g. Qwen3, a LoRA trained with --from_weight ~/models/Qwen3-0.6B --lora_name lora_qwen
    # saved as out/lora_qwen_1024/): merged and written back as the same architecture, in the base's dtype
    python scripts/merge_lora.py --from_weight ~/models/Qwen3-0.6B --lora_path out/lora_qwen_1024 --save_weight qwen_merged

    # then, with no MiniLoRA code at all:
    python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('out/merged_256_hf')"

A MiniMind base is written as `{save_dir}/{save_weight}_{hidden}{_moe}.pth` (MiniMind's own state-dict
layout and naming, as its eval_llm.py loads them; load_minimind opens it too) and as `{save_dir}/{save_weight}_{hidden}{_moe}_hf/`, a transformers
architecture that computes the same function: minimind-3 → Qwen3ForCausalLM / Qwen3MoeForCausalLM,
minimind2 → LlamaForCausalLM / Qwen2MoeForCausalLM (see model/hf_export.py). A transformers base is
written as `{save_dir}/{save_weight}_hf/` in its own architecture. The merge runs in float32; the files
are then written in the base's own dtype, or in --dtype.
"""

from trainer.frozen_imports import frozen_imports

# The garbage collector never scans what these imports build: 1-2 s less start-up.
with frozen_imports():
    import argparse
    import shutil
    from pathlib import Path

    import torch
    from torch import nn
    from transformers.utils import logging as transformers_logging

    from dataset.chat_render import LORA_TEMPLATE
    from model.atomic import atomic_write, make_output_folder
    from model.errors import UserError, exit_on_user_error
    from model.generate import stop_token_ids
    from model.hf_export import ExportError, export_minimind
    from model.model_lora import load_lora, lora_folder, merge_lora
    from trainer.base_flags import base_for, is_minimind, lora_file, script_parser, use_chat_template
    from trainer.base_model import TOKENIZER_FILES, load_base
    from trainer.checkpoint import write_dir
    from trainer.engine import DTYPES
    from trainer.logger import shown_path
    from trainer.save_dir import refuse_writing_over_inputs, remove_leftovers


def merged_model(args: argparse.Namespace) -> tuple[nn.Module, object, torch.dtype, Path | None]:
    """The base with the LoRA folded into its weights in float32 (CPU, plain nn.Linear layers back), its
    tokenizer, the dtype the base was stored in, and the chat template the LoRA learned where it is not the
    tokenizer's own (use_chat_template). Stops before the merge if an output would replace the base or the LoRA."""
    base = load_base(base_for(args), args.save_dir, None, args.hidden_size, args.num_hidden_layers, args.use_moe,
                     args.tokenizer_path, minimind_default="full_sft", training=False)  # dtype None: as stored
    lora = lora_file(args.lora_path, args.save_dir, base.model)
    pth, hf_dir = output_paths(base.model, args)
    # The tokenizer and --chat_template are not inputs to protect: the export holds a copy of each. The LoRA is: in
    # both forms the trainer writes it, a .pth and the adapter folder of the same name beside it
    other_form = lora.with_name(lora.name + ".pth") if lora.is_dir() else lora_folder(lora)
    refuse_writing_over_inputs(hf_dir.with_name(hf_dir.name.removesuffix("_hf")), output_kinds(pth),
                               {"--from_weight": base.source, "--lora_path": str(lora),
                                "LoRA beside --lora_path": str(other_form)}, "--save_weight")
    for out in (pth, hf_dir):
        if out is not None and out.is_dir() and out.is_symlink():
            raise UserError(f"{out} is a symbolic link, and the merge replaces this folder whole; move the link "
                            "away, or pass another --save_weight or --save_dir")
    stored = next(base.model.parameters()).dtype
    model = base.model.float().eval()
    template = use_chat_template(base.tokenizer, args.chat_template, lora)
    load_lora(model, lora)
    merge_lora(model, unload=True)
    return model, base.tokenizer, stored, template


def output_paths(model: nn.Module, args: argparse.Namespace) -> tuple[Path | None, Path]:
    """Where the merge writes: MiniMind's .pth (None for a transformers base) and the transformers directory."""
    save_dir = Path(args.save_dir)
    if is_minimind(model):
        cfg = model.config
        stem = f"{args.save_weight}_{cfg.hidden_size}{'_moe' if cfg.use_moe else ''}"
        return save_dir / f"{stem}.pth", save_dir / f"{stem}_hf"
    return None, save_dir / f"{args.save_weight}_hf"


def output_kinds(pth: Path | None) -> dict[str, str]:
    """The merge's outputs as save_dir's helpers name them: suffix of the output stem -> "file" or "dir"."""
    return {".pth": "file", "_hf": "dir"} if pth is not None else {"_hf": "dir"}


def copy_tokenizer(tokenizer: object, dst: Path) -> list[str]:
    """Copy the tokenizer's own files into `dst` (byte for byte); return their names."""
    src = Path(tokenizer.name_or_path)
    copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
    for name in copied:
        if not ((dst / name).exists() and (dst / name).samefile(src / name)):  # --tokenizer_path into the output
            shutil.copyfile(src / name, dst / name)  # contents only, not the source's (maybe read-only) mode
    if not copied:  # not loaded from a folder we can see: let transformers write it
        copied = [Path(f).name for f in tokenizer.save_pretrained(dst)]
    return copied


def save_minimind_pth(model: nn.Module, path: Path, dtype: torch.dtype) -> None:
    """The merged model as MiniMind's own checkpoint: a plain state dict (tied head included), in `dtype`."""
    state = {k: v.detach().to(dtype).clone() for k, v in model.state_dict().items()}
    atomic_write(path, lambda f: torch.save(state, f))  # never a half-written checkpoint


def export(args: argparse.Namespace) -> list[Path]:
    """Merge and write every output for the base's kind; print and return the paths written."""
    model, tokenizer, stored, template = merged_model(args)
    # transformers' generate(), vLLM and others stop at generation_config.json's eos_token_id: write every id chat.py
    # stops at, the chat template's turn end too (a base's eos is often another token: Qwen's <|endoftext|>)
    stops = stop_token_ids(model, tokenizer)
    model.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops
    dtype = DTYPES[args.dtype] if args.dtype else stored
    dtype_name = str(dtype).removeprefix("torch.")
    make_output_folder(args.save_dir, f"--save_dir {args.save_dir}")
    print(f"merged {args.lora_path} into the base")
    outputs = []
    pth, hf_dir = output_paths(model, args)
    # What a killed merge left under hidden temp names (a whole model each), and an earlier export it had moved aside
    remove_leftovers(hf_dir.with_name(hf_dir.name.removesuffix("_hf")), {".pth": "file", "_hf": "dir"})
    if pth is not None:
        save_minimind_pth(model, pth, dtype)
        outputs.append(pth)
        print(f"MiniMind checkpoint ({dtype_name}): {shown_path(pth)}")
    earlier = hf_dir.is_dir()
    written: dict[str, object] = {}

    def fill(folder: Path) -> None:  # the whole directory, built aside: no file of an earlier export survives
        if pth is not None:
            written["arch"] = export_minimind(model.state_dict(), model.config, folder, dtype, model.generation_config)
        else:
            model.to(dtype).save_pretrained(folder)
            written["arch"] = getattr(model, "original_class", type(model).__name__)  # the fast decoder's original
        written["tokenizer"] = copy_tokenizer(tokenizer, folder)
        if template is not None:  # the merged model chats as it learned to; transformers prefers this file
            # The text as read (a byte-order mark left out), not the file's bytes: transformers would render the mark
            (folder / LORA_TEMPLATE).write_text(tokenizer.chat_template, encoding="utf-8")
            written["tokenizer"] = sorted({*written["tokenizer"], LORA_TEMPLATE})

    try:
        write_dir(hf_dir, fill)
    except ExportError as e:  # the .pth is still a complete result
        stale = f"; the earlier {shown_path(hf_dir)} is left as it was, and is not this merge" if earlier else ""
        print(f"no transformers model directory: {e}{stale}")
        return outputs
    outputs.append(hf_dir)
    print(f"transformers model directory ({written['arch']}, {dtype_name}, tokenizer: "
          f"{', '.join(written['tokenizer'])}): {shown_path(hf_dir)}" + (" (replaces the earlier one)" if earlier else ""))
    return outputs


def build_parser() -> argparse.ArgumentParser:
    """The merge flags: the base, the LoRA and the outputs."""
    # no --device: merging is cheap, always on CPU, in float32
    p, g = script_parser(__doc__, "LoRA and outputs", "the LoRA to merge", device=False, lora_required=True)
    g.add_argument(
        "--save_weight",
        default="merged",
        help="output name: {save_dir}/{save_weight}_{hidden}{_moe}.pth and ..._hf/ (default merged)",
    )
    g.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="dtype of the written weights (default: the base's own, e.g. float16 for MiniMind's releases "
        "and the demo base, bfloat16 for a bf16 Qwen3)",
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the merge flags."""
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors print one line and exit 2."""
    args = parse_args(argv)
    transformers_logging.disable_progress_bar()  # one-line-per-output report instead of loading bars
    exit_on_user_error(lambda: export(args))


if __name__ == "__main__":
    main()
