"""Measure a LoRA without training: loss and perplexity of the base and of base+LoRA on a held-out jsonl.

    # the demo base vs the demo LoRA on the held-out identity questions (after `python trainer/train_lora.py`)
    python scripts/eval_lora.py --lora_path out/lora_identity_256.pth
    # the same, sampled generations for your own prompts, and the figures as JSON
    python scripts/eval_lora.py --lora_path out/lora_identity_256.pth --temperature 0.8 --top_p 0.9 \\
        --prompt "who are you?" --prompt "What is 3 + 4?" --json out/eval_identity.json
    # with MiniMind's released weights in out/, a LoRA of yours (a PEFT adapter directory works too) and your
    # own held-out chats, on GPU
    python scripts/eval_lora.py --from_weight out/full_sft_768.pth --tokenizer_path ~/minimind/model \\
        --lora_path out/lora_medical_768.pth --data_path dataset/lora_medical_val.jsonl --device cuda

Every conversation is rendered through the chat template and scored where training learns (the assistant
turns, end-of-turn marker included): loss is the mean cross-entropy over those tokens, perplexity its exp.
The table has one row per sample (the jsonl line); the totals weight every supervised token equally. Then a
few prompts (by default the first user turns of the data) are answered by both models, with the same
decoding flags as scripts/chat.py (greedy by default).
"""

from trainer.frozen_imports import frozen_imports

# The garbage collector never scans what these imports build: 1-2 s less start-up.
with frozen_imports():
    import argparse
    import json
    import math
    import time
    from dataclasses import dataclass
    from pathlib import Path

    import torch
    import torch.nn.functional as F
    from torch import nn
    from transformers.utils import logging as transformers_logging

    from dataset.chat_render import load_chat_format, supervised_spans, token_mask
    from dataset.records import BadRecord, data_error, read_conversations
    from model.atomic import make_output_folder
    from model.errors import UserError, exit_on_user_error
    from model.generate import add_generation_flags, check_generation_flags, reply_with_flags, stop_token_ids
    from model.model_lora import check_lora, load_lora
    from trainer.args import REPO_ROOT
    from trainer.base_flags import load_from_flags, lora_file, script_parser, use_chat_template
    from trainer.distributed import pick_device
    from trainer.engine import DTYPES
    from trainer.logger import shown_path


DEFAULT_DATA = REPO_ROOT / "dataset" / "lora_identity_val.jsonl"


@dataclass
class Sample:
    """One conversation to score: its jsonl line, token ids, learned-token mask and the first user turn."""

    line: int
    ids: list[int]
    mask: list[bool]
    prompt: str
    reference: str


# ----------------------------------------------------------------------------- data


def read_samples(path: str | Path, tokenizer: object, max_seq_len: int) -> tuple[list[Sample], int]:
    """The conversations of `path` as Samples (truncated to max_seq_len); also how many had nothing to score."""
    conversations, problems = read_conversations(path)
    fmt = load_chat_format(tokenizer)
    samples, empty = [], 0
    for conv in conversations:
        try:
            text, spans = supervised_spans(fmt, conv.messages, conv.tools)
        except BadRecord as e:
            problems.append((conv.line, str(e)))
            continue
        encoding = fmt.backend.encode(text, add_special_tokens=False)
        ids = list(encoding.ids[:max_seq_len])
        mask = token_mask(encoding, spans)[:max_seq_len].tolist()
        if not any(mask[1:]):  # the first token is never predicted
            empty += 1
            continue
        user = next((m["content"] for m in conv.messages if m["role"] == "user"), "")
        answer = next((m["content"] for m in conv.messages if m["role"] == "assistant"), "")
        samples.append(Sample(conv.line, ids, mask, str(user), str(answer)))
    if problems:
        raise data_error(path, sorted(problems), len(conversations) + len(problems))
    if not samples:
        raise UserError(f"{path}: no sample has a supervised token within --max_seq_len {max_seq_len}")
    return samples, empty


# ----------------------------------------------------------------------------- scoring


@torch.no_grad()
def sample_nll(model: nn.Module, sample: Sample) -> tuple[float, int]:
    """Summed cross-entropy (nats, accumulated in float32) of the sample's supervised tokens, and their count."""
    device = next(model.parameters()).device
    ids = torch.tensor([sample.ids], device=device)
    logits = model(ids).logits[0, :-1].float()  # position t predicts token t + 1
    targets = ids[0, 1:]
    learned = torch.tensor(sample.mask[1:], device=device)
    nll = F.cross_entropy(logits[learned], targets[learned], reduction="sum")
    return float(nll), int(learned.sum())


def score(model: nn.Module, samples: list[Sample]) -> dict:
    """Per-sample and token-weighted total loss and perplexity of `model` on `samples`."""
    rows, total_nll, total_tokens = [], 0.0, 0
    for s in samples:
        nll, n = sample_nll(model, s)
        rows.append({"line": s.line, "tokens": n, "loss": nll / n, "ppl": math.exp(nll / n)})
        total_nll, total_tokens = total_nll + nll, total_tokens + n
    loss = total_nll / total_tokens
    return {"loss": loss, "ppl": math.exp(loss), "tokens": total_tokens, "samples": rows}


# ----------------------------------------------------------------------------- report


def clip(text: str, width: int) -> str:
    """One line of at most `width` characters (newlines shown as ⏎)."""
    text = text.replace("\n", "⏎")
    return text if len(text) <= width else text[: width - 1] + "…"


def print_table(samples: list[Sample], results: dict[str, dict]) -> None:
    """One row per sample (line, tokens, loss and ppl per model, the first user turn), then the totals."""
    names = list(results)
    head = f"{'line':>5} {'tokens':>6} " + " ".join(f"{n + ' loss':>10} {n + ' ppl':>9}" for n in names)
    print(head + "  prompt")
    for i, s in enumerate(samples):
        cells = " ".join(
            f"{results[n]['samples'][i]['loss']:>10.4f} {results[n]['samples'][i]['ppl']:>9.2f}" for n in names
        )
        print(f"{s.line:>5} {results[names[0]]['samples'][i]['tokens']:>6} {cells}  {clip(s.prompt, 40)}")
    cells = " ".join(f"{results[n]['loss']:>10.4f} {results[n]['ppl']:>9.2f}" for n in names)
    print(f"{'all':>5} {results[names[0]]['tokens']:>6} {cells}  ({len(samples)} samples)")


# ----------------------------------------------------------------------------- main


def evaluate(args: argparse.Namespace) -> dict:
    """Score the base, then base+LoRA (same weights, LoRA added in place); print the report; return it."""
    device = pick_device(args.device)
    if args.json:  # before the scoring, not after it
        make_output_folder(Path(args.json).parent, f"--json {args.json}")
    model, tokenizer = load_from_flags(args, device, DTYPES[args.dtype])
    lora = lora_file(args.lora_path, args.save_dir, model) if args.lora_path else None
    if lora is not None:  # a LoRA of another base is said now, not after the base has been scored
        check_lora(model, lora)
    template = use_chat_template(tokenizer, args.chat_template, lora)  # scored as the LoRA learned its chats
    if template is not None:
        print(f"chat template: {shown_path(template)}")
    samples, empty = read_samples(args.data_path, tokenizer, args.max_seq_len)
    samples = samples[: args.max_samples] if args.max_samples else samples
    if args.prompt:
        prompts = [(p, None) for p in args.prompt]
    else:
        prompts = [(s.prompt, s.reference) for s in samples[: args.n_prompts]]
    print(f"{shown_path(args.data_path)}: {len(samples)} samples scored" + (f", {empty} with nothing to score" if empty else ""))

    results, replies = {}, {}
    stops = stop_token_ids(model, tokenizer)  # once, not per reply: from a render of the chat template
    start = time.perf_counter()
    results["base"] = score(model, samples)
    replies["base"] = [reply_with_flags(model, tokenizer, [{"role": "user", "content": p}], args, stops=stops)
                       for p, _ in prompts]
    if lora is not None:
        load_lora(model, lora)  # unmerged: the base weights stay exactly as scored above
        model.to(device).eval()
        results["lora"] = score(model, samples)
        replies["lora"] = [reply_with_flags(model, tokenizer, [{"role": "user", "content": p}], args, stops=stops)
                           for p, _ in prompts]
    print_table(samples, results)
    print(f"({time.perf_counter() - start:.1f} s)\n")
    for i, (prompt, reference) in enumerate(prompts):
        print(f"user: {prompt}")
        if reference is not None:
            print(f"reference: {reference}")
        for name in replies:
            print(f"{name}: {replies[name][i]}")
        print()

    report = {
        "data_path": str(args.data_path),
        "from_weight": args.from_weight,
        "lora_path": args.lora_path,
        "dtype": args.dtype,
        "max_seq_len": args.max_seq_len,
        "decoding": {k: getattr(args, k) for k in ("max_new_tokens", "temperature", "top_p", "repetition_penalty",
                                                    "seed")},
        **{name: {k: r[k] for k in ("loss", "ppl", "tokens")} for name, r in results.items()},
        "samples": [
            {"line": s.line, "tokens": results["base"]["samples"][i]["tokens"], "prompt": s.prompt,
             **{f"{n}_{k}": results[n]["samples"][i][k] for n in results for k in ("loss", "ppl")}}
            for i, s in enumerate(samples)
        ],
        "generations": [
            {"prompt": p, "reference": ref, **{n: replies[n][i] for n in replies}} for i, (p, ref) in enumerate(prompts)
        ],
    }
    if args.json:
        path = Path(args.json)
        try:
            path.write_text(json.dumps(report, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        except OSError as err:
            raise UserError(f"--json {path}: cannot write it ({err.strerror or err})") from None
        print(f"wrote {path}")
    return report


def build_parser() -> argparse.ArgumentParser:
    """The eval flags: base model, LoRA, data, decoding."""
    p, g = script_parser(__doc__, "LoRA and data", "the LoRA to score beside the base (without it: the base alone)")
    g.add_argument(
        "--data_path",
        default=str(DEFAULT_DATA),
        help="chat jsonl to score, any format training reads (default: dataset/lora_identity_val.jsonl)",
    )
    g.add_argument("--max_seq_len", type=int, default=512, help="truncate samples as training does (default 512)")
    g.add_argument("--max_samples", type=int, default=None, help="score only the first N samples (default: all)")
    g.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default="float32",
        help="weights and matmuls in this dtype; the loss sums in float32 (default float32)",
    )
    g.add_argument("--json", default=None, help="also write the figures, rows and replies to this JSON file")
    add_generation_flags(p, max_new_tokens=64)
    g = p.add_argument_group("generations")
    g.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="answer this prompt with each model (repeat for several; default: the first user turns of the data)",
    )
    g.add_argument(
        "--n_prompts",
        type=int,
        default=3,
        help="without --prompt, how many of the data's first user turns to answer (0: none; default 3)",
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the eval flags."""
    p = build_parser()
    args = p.parse_args(argv)
    check_generation_flags(p, args)
    if args.max_seq_len < 2:
        p.error(f"--max_seq_len must be at least 2 (got {args.max_seq_len})")
    if args.max_samples is not None and args.max_samples < 1:
        p.error(f"--max_samples must be at least 1 (got {args.max_samples})")
    if args.n_prompts < 0:
        p.error(f"--n_prompts must be 0 or more (got {args.n_prompts})")
    if args.json and Path(args.json).is_dir():
        p.error(f"--json {args.json} is a folder; pass a file name, e.g. {Path(args.json) / 'eval.json'}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors print one line and exit 2."""
    args = parse_args(argv)
    transformers_logging.disable_progress_bar()
    exit_on_user_error(lambda: evaluate(args))


if __name__ == "__main__":
    main()
