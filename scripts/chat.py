"""Chat with a base model, the base plus a LoRA, or both side by side (MiniMind's eval_llm.py, for LoRA).

    # the demo base on the built-in prompts (greedy, so every run prints the same answers)
    python scripts/chat.py
    # base vs base+LoRA on the same prompts, one answer under the other (after `python trainer/train_lora.py`)
    python scripts/chat.py --lora_path out/lora_identity_256.pth --compare
    # your own prompts, shorter replies, no repetition penalty
    python scripts/chat.py --lora_path out/lora_identity_256.pth --compare --prompt "who are you?" --prompt "hi" \\
        --max_new_tokens 32 --repetition_penalty 1.0
    # type your own prompts, history kept (arrow keys edit the line; an empty line or Ctrl-D quits)
    python scripts/chat.py --lora_path out/lora_identity_256 --interactive
    # the merged export of `python scripts/merge_lora.py --lora_path out/lora_identity_256.pth`, sampling
    python scripts/chat.py --from_weight out/merged_256_hf --temperature 0.8 --top_p 0.9
    # with MiniMind's released weights in out/ and its tokenizer: on GPU, talking with history
    python scripts/chat.py --from_weight out/full_sft_768.pth --tokenizer_path ~/minimind/model \\
        --lora_path out/lora_medical_768.pth --device cuda --interactive

Replies stream token by token as they decode; each ends with its length and speed in tokens/s.
"""

from trainer.frozen_imports import frozen_imports

# The garbage collector never scans what these imports build: 1-2 s less start-up.
with frozen_imports():
    import argparse
    import copy
    import time

    from torch import nn
    from transformers.utils import logging as transformers_logging

    from model.errors import UserError, exit_on_user_error
    from model.generate import add_generation_flags, check_generation_flags, reply_with_flags, stop_token_ids
    from model.model_lora import LoRAError, load_lora, merge_lora
    from trainer.args import str2bool
    from trainer.base_flags import load_from_flags, lora_file, script_parser, use_chat_template
    from trainer.distributed import pick_device
    from trainer.logger import shown_path


# Two questions the demo LoRA changes the answer to, and two it should leave alone.
PROMPTS = ["who are you?", "你是谁？", "What is 3 + 4?", "How many legs does a cat have?"]


def stream_reply(
    label: str, model: nn.Module, tokenizer: object, messages: list[dict], args: argparse.Namespace,
    stops: list[int],
) -> str:
    """Print `label: <reply>` token by token (ending at one of `stops`), then the reply's length and speed; return
    the reply."""
    print(f"{label}: ", end="", flush=True)
    stats: dict = {}
    start = time.perf_counter()
    reply = reply_with_flags(model, tokenizer, messages, args, lambda piece: print(piece, end="", flush=True), stats,
                             stops)
    elapsed = time.perf_counter() - start
    print(
        f"\n  [{stats['tokens']} tokens, {stats['tokens'] / max(elapsed, 1e-9):.1f} tokens/s]\n", flush=True
    )
    return reply


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """The chat flags, grouped by topic."""
    p, g = script_parser(__doc__, "LoRA", "the LoRA to chat with")
    g.add_argument(
        "--compare",
        action="store_true",
        help="answer every prompt twice, with the base alone and with the LoRA (needs --lora_path)",
    )
    add_generation_flags(p)
    g = p.add_argument_group("conversation")
    g.add_argument(
        "--think",
        action="store_true",
        help="let the chat template open a <think> block (MiniMind/Qwen3 reasoning models)",
    )
    g.add_argument(
        "--open_thinking",
        dest="think",
        type=str2bool,
        help="MiniMind eval_llm.py's spelling of --think (0/1)",
    )
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
        "--historys",
        type=int,
        default=None,
        help="MiniMind eval_llm.py's spelling: past messages to send along (an even number; 0: none), "
        "i.e. --history_turns of half as many",
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
    if args.historys is not None:
        if args.historys < 0 or args.historys % 2:
            p.error(f"--historys counts past messages, a user and an assistant one per turn: an even number, 0 or "
                    f"more (got {args.historys})")
        args.history_turns = args.historys // 2
    if args.history_turns < 0:
        p.error(f"--history_turns must be 0 or more (got {args.history_turns})")
    check_generation_flags(p, args)
    # MiniMind's template reads open_thinking, Qwen3's enable_thinking.
    args.template_kwargs = {"open_thinking": args.think, "enable_thinking": args.think}
    return args


def build_models(args: argparse.Namespace) -> tuple[list[tuple[str, nn.Module]], object]:
    """The (label, model) pairs to answer with, and the tokenizer."""
    device = pick_device(args.device)
    base, tokenizer = load_from_flags(args, device)
    lora = lora_file(args.lora_path, args.save_dir, base) if args.lora_path else None
    template = use_chat_template(tokenizer, args.chat_template, lora)
    if template is not None:
        print(f"chat template: {shown_path(template)}")
    elif getattr(tokenizer, "chat_template", None) is None:  # said now, not after the first prompt
        raise UserError(f"{tokenizer.name_or_path} has no chat template: pass a template file with --chat_template")
    if lora is None:
        return [("base", base)], tokenizer
    # --compare keeps an untouched copy of the base: exact base answers, no adapter toggling.
    tuned = copy.deepcopy(base) if args.compare else base
    load_lora(tuned, lora)
    tuned.to(device)
    try:
        merge_lora(tuned, unload=True)  # one matmul per layer again: as fast as the base
    except LoRAError:  # a LoRA on a weight shared by two modules (a tied lm_head) answers unmerged
        pass
    models = [("base", base), ("lora", tuned)] if args.compare else [("lora", tuned)]
    return models, tokenizer


def chat(args: argparse.Namespace) -> None:
    """Answer the built-in prompts (or the user's) with each model, streaming the replies."""
    models, tokenizer = build_models(args)
    # Found once per model, not per reply: they come from a render of the chat template
    stops = {label: stop_token_ids(model, tokenizer) for label, model in models}
    start = [{"role": "system", "content": args.system}] if args.system else []
    if not args.interactive:
        for prompt in args.prompt or PROMPTS:
            print(f"user: {prompt}")
            for label, model in models:
                stream_reply(label, model, tokenizer, start + [{"role": "user", "content": prompt}], args, stops[label])
        return
    try:
        import readline  # noqa: F401  (input() gets line editing and history: arrow keys move, not ^[[D)
    except ImportError:  # Windows has no readline; input() still works
        pass
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
            reply = stream_reply(label, model, tokenizer, messages, args, stops[label])
            histories[label] += [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors print one line and exit 2."""
    args = parse_args(argv)
    transformers_logging.disable_progress_bar()  # keep the terminal for the conversation
    exit_on_user_error(lambda: chat(args))


if __name__ == "__main__":
    main()
