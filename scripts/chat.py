"""Chat with a base model, the base plus a LoRA, or both side by side (MiniMind's eval_llm.py, for LoRA).

    # the demo base on the built-in prompts (greedy, so every run prints the same answers)
    python scripts/chat.py
    # base vs base+LoRA on the same prompts, answers one under the other
    python scripts/chat.py --lora_path out/lora_identity_64.pth --compare
    # your own prompts, one answer per model each
    python scripts/chat.py --lora_path out/lora_identity_64.pth --compare --prompt "who are you?" --prompt "hi"
    # a MiniMind release (.pth) with MiniMind's tokenizer, on GPU, talking with history
    python scripts/chat.py --from_weight out/full_sft_768.pth --tokenizer_path ~/minimind/model \\
        --lora_path out/lora_medical_768.pth --device cuda --interactive
    # any transformers model directory (e.g. a merged export), sampling instead of greedy
    python scripts/chat.py --from_weight out/merged_64_hf --temperature 0.8 --top_p 0.9

Replies stream token by token as they decode; each ends with its length and speed in tokens/s.
"""

import argparse
import copy
import time
from collections.abc import Callable

import torch
from torch import nn
from transformers.utils import logging as transformers_logging

from model.errors import UserError, exit_on_user_error
from model.model_lora import load_lora, merge_lora
from trainer.base_flags import add_base_flags, load_from_flags, resolve_device

PROMPTS = [
    "who are you?",
    "你好，请介绍一下你自己。",
    "What is LoRA fine-tuning, in one sentence?",
    "Why is the sky blue?",
    "Write a short poem about autumn.",
    "推荐一本适合初学者的编程书。",
]


# ----------------------------------------------------------------------------- decoding


def stop_token_ids(model: nn.Module, tokenizer: object) -> set[int]:
    """Token ids that end a reply: the tokenizer's eos, the model's eos and ChatML's <|im_end|>."""
    ids = {tokenizer.eos_token_id}
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos])
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if im_end != tokenizer.unk_token_id:  # a vocab without it maps it to unk (or None)
        ids.add(im_end)
    return {i for i in ids if i is not None}


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    """Pick the next token from 1-D `logits`: argmax when temperature is 0, else nucleus (top-p) sampling."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(descending=True)
    # Keep the smallest set of tokens whose mass reaches top_p (the most likely token always stays).
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    sorted_probs[outside] = 0
    pick = torch.multinomial(sorted_probs.cpu(), 1, generator=gen)
    return int(order[pick.to(order.device)])


@torch.no_grad()
def generate_reply(
    model: nn.Module,
    tokenizer: object,
    messages: list[dict],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    on_text: Callable[[str], None] | None = None,
    template_kwargs: dict | None = None,
    stats: dict | None = None,
) -> str:
    """Render `messages` with the chat template (add_generation_prompt) and decode the assistant's reply.

    Greedy when temperature is 0. Uses the model's KV cache: the prompt runs once, then one token per
    step. `on_text` receives the reply piece by piece as it decodes (for streaming to a terminal);
    `stats`, if given, gets the number of generated tokens under "tokens".
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise UserError(
            "the tokenizer has no chat template; give a --tokenizer_path whose "
            "tokenizer_config.json has one (or a chat_template.jinja)"
        )
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **(template_kwargs or {})
    )
    device = next(model.parameters()).device
    ids = torch.tensor([tokenizer(text, add_special_tokens=False).input_ids], device=device)
    stops = stop_token_ids(model, tokenizer)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    out: list[int] = []
    shown = ""
    cache = None
    for _ in range(max_new_tokens):
        step = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = step.past_key_values
        token = sample_next(step.logits[0, -1], temperature, top_p, gen)
        if token in stops:
            break
        out.append(token)
        ids = torch.tensor([[token]], device=device)
        if on_text is not None:
            # Decode the whole reply each step: a multi-byte character may span tokens, and until its
            # last byte arrives the text ends in U+FFFD, which we hold back.
            text = tokenizer.decode(out, skip_special_tokens=True)
            if not text.endswith("\ufffd") and len(text) > len(shown):
                on_text(text[len(shown) :])
                shown = text
    reply = tokenizer.decode(out, skip_special_tokens=True)
    if stats is not None:
        stats["tokens"] = len(out)
    if on_text is not None and len(reply) > len(shown):
        on_text(reply[len(shown) :])
    return reply


def stream_reply(
    label: str, model: nn.Module, tokenizer: object, messages: list[dict], args: argparse.Namespace
) -> str:
    """Print `label: <reply>` token by token, then the reply's length and speed; return the reply."""
    print(f"{label}: ", end="", flush=True)
    stats: dict = {}
    start = time.perf_counter()
    reply = generate_reply(
        model,
        tokenizer,
        messages,
        args.max_new_tokens,
        args.temperature,
        args.top_p,
        args.seed,
        on_text=lambda piece: print(piece, end="", flush=True),
        template_kwargs=args.template_kwargs,
        stats=stats,
    )
    elapsed = time.perf_counter() - start
    print(
        f"\n  [{stats['tokens']} tokens, {stats['tokens'] / max(elapsed, 1e-9):.1f} tokens/s]\n", flush=True
    )
    return reply


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """The chat flags, grouped by topic."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_base_flags(p)
    g = p.add_argument_group("LoRA")
    g.add_argument(
        "--lora_path",
        default=None,
        help="LoRA to chat with: a MiniMind .pth LoRA file or a PEFT adapter directory",
    )
    g.add_argument(
        "--compare",
        action="store_true",
        help="answer every prompt twice, with the base alone and with the LoRA (needs --lora_path)",
    )
    g = p.add_argument_group("decoding")
    g.add_argument("--max_new_tokens", type=int, default=256, help="longest reply, in tokens (default 256)")
    g.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 = greedy, reproducible (default); > 0 samples from softmax(logits / temperature)",
    )
    g.add_argument(
        "--top_p",
        type=float,
        default=1.0,
        help="nucleus sampling mass, used when temperature > 0 (default 1.0: off)",
    )
    g.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    g.add_argument(
        "--think",
        action="store_true",
        help="let the chat template open a <think> block (MiniMind/Qwen3 reasoning models)",
    )
    g = p.add_argument_group("conversation")
    g.add_argument(
        "--prompt",
        action="append",
        default=None,
        help="ask this instead of the built-in prompts (repeat the flag for several)",
    )
    g.add_argument(
        "--interactive",
        action="store_true",
        help="type your own prompts (multi-turn: the history is kept; empty line or Ctrl-D quits)",
    )
    g.add_argument(
        "--history_turns",
        type=int,
        default=8,
        help="in --interactive mode, how many past user/assistant turns to send along (default 8)",
    )
    g.add_argument(
        "--system", default=None, help="an optional system message at the start of every conversation"
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the chat flags."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.compare and not args.lora_path:
        p.error("--compare needs --lora_path")
    # MiniMind's template reads open_thinking, Qwen3's enable_thinking.
    args.template_kwargs = {"open_thinking": args.think, "enable_thinking": args.think}
    return args


def build_models(args: argparse.Namespace) -> tuple[list[tuple[str, nn.Module]], object]:
    """The (label, model) pairs to answer with, and the tokenizer."""
    device = resolve_device(args.device)
    base, tokenizer = load_from_flags(args, device)
    if not args.lora_path:
        return [("base", base)], tokenizer
    # --compare keeps an untouched copy of the base: exact base answers, no adapter toggling.
    tuned = copy.deepcopy(base) if args.compare else base
    load_lora(tuned, args.lora_path)
    tuned.to(device)
    merge_lora(tuned, unload=True)  # one matmul per layer again: as fast as the base
    models = [("base", base), ("lora", tuned)] if args.compare else [("lora", tuned)]
    return models, tokenizer


def chat(args: argparse.Namespace) -> None:
    """Answer the built-in prompts (or the user's) with each model, streaming the replies."""
    models, tokenizer = build_models(args)
    start = [{"role": "system", "content": args.system}] if args.system else []
    if not args.interactive:
        for prompt in args.prompt or PROMPTS:
            print(f"user: {prompt}")
            for label, model in models:
                stream_reply(label, model, tokenizer, start + [{"role": "user", "content": prompt}], args)
        return
    histories = {label: [] for label, _ in models}  # each model continues its own conversation
    while True:
        try:
            prompt = input("user: ").strip()
        except EOFError:
            break
        if not prompt:
            break
        for label, model in models:
            history = histories[label][-2 * args.history_turns :] if args.history_turns > 0 else []
            messages = start + history + [{"role": "user", "content": prompt}]
            reply = stream_reply(label, model, tokenizer, messages, args)
            histories[label] += [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors print one line and exit 2."""
    args = parse_args(argv)
    transformers_logging.disable_progress_bar()  # keep the terminal for the conversation
    exit_on_user_error(lambda: chat(args))


if __name__ == "__main__":
    main()
