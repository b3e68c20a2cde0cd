"""Decode a chat reply token by token with the KV cache: greedy or top-p sampling, with a repetition penalty.

scripts/chat.py and scripts/eval_lora.py answer with this code and offer the same flags
(`add_generation_flags`), so a setting means the same thing in both.
"""

import argparse
from collections.abc import Callable, Collection

import torch
from torch import nn

from dataset.chat_render import TemplateError, load_chat_format
from model.errors import UserError
from model.hf_compat import cache_kwargs, cache_of


def add_generation_flags(p: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    """The "decoding" flag group: --max_new_tokens, --temperature, --top_p, --repetition_penalty, --seed."""
    g = p.add_argument_group("decoding")
    g.add_argument(
        "--max_new_tokens",
        type=int,
        default=max_new_tokens,
        help=f"longest reply, in tokens (default {max_new_tokens})",
    )
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
    g.add_argument(
        "--repetition_penalty",
        type=float,
        default=1.1,
        help="divide the positive logits (multiply the negative ones) of tokens already in the prompt or "
        "reply by this, as transformers does; 1.0 = off (default 1.1: stops greedy loops on small models)",
    )
    g.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")


def check_generation_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Stop on values that cannot decode (argparse's own exit 2 with a message naming the flag)."""
    if args.max_new_tokens < 1:
        p.error(f"--max_new_tokens must be at least 1 (got {args.max_new_tokens})")
    if args.temperature < 0:
        p.error(f"--temperature must be 0 (greedy) or more (got {args.temperature})")
    if not 0 < args.top_p <= 1:
        p.error(f"--top_p must be in (0, 1] (got {args.top_p})")
    if args.repetition_penalty <= 0:
        p.error(f"--repetition_penalty must be positive, 1.0 = off (got {args.repetition_penalty})")


def stop_token_ids(model: nn.Module, tokenizer: object) -> list[int]:
    """Token ids that end a reply, the model's own eos first: its eos, the tokenizer's eos and the token the chat
    template ends an assistant turn with (`<|im_end|>`, `<|eot_id|>`, ...), which is what training taught the model
    to write. merge_lora.py writes the same ids into the export's generation_config.json, so transformers'
    generate() and vLLM stop where chat.py does."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [*(eos if isinstance(eos, list) else [eos]), tokenizer.eos_token_id]
    try:
        ids.append(tokenizer.convert_tokens_to_ids(load_chat_format(tokenizer).reply_end))
    except TemplateError:  # a template no LoRA can be trained with (a slow tokenizer...): eos is all there is
        pass
    return list(dict.fromkeys(i for i in ids if i is not None))


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty on 1-D `logits`: seen tokens' logits > 0 are divided, < 0 multiplied."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    logits = logits.clone()
    picked = logits[seen]
    logits[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


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


def render_prompt(tokenizer: object, messages: list[dict], template_kwargs: dict | None = None) -> list[int]:
    """The token ids of `messages` through the chat template, ending with the assistant's turn opened."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise UserError(
            "the tokenizer has no chat template; pass a template file with --chat_template, or a "
            "--tokenizer_path whose tokenizer_config.json has one (or a chat_template.jinja)"
        )
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **(template_kwargs or {})
    )
    return tokenizer(text, add_special_tokens=False).input_ids


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
    repetition_penalty: float = 1.0,
    stops: Collection[int] | None = None,
) -> str:
    """Render `messages` with the chat template (add_generation_prompt) and decode the assistant's reply.

    Greedy when temperature is 0. Uses the model's KV cache: the prompt runs once, then one token per
    step. `on_text` receives the reply piece by piece as it decodes (for streaming to a terminal);
    `stats`, if given, gets the number of generated tokens under "tokens". `stops`: the ids that end the reply,
    stop_token_ids(model, tokenizer) unless given (a conversation of many replies finds them once).
    """
    prompt = render_prompt(tokenizer, messages, template_kwargs)
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    seen = torch.tensor(sorted(set(prompt)), dtype=torch.long, device=device)
    stops = set(stop_token_ids(model, tokenizer) if stops is None else stops)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    out: list[int] = []
    shown = ""
    cache = None
    for _ in range(max_new_tokens):
        step = model(ids, use_cache=True, logits_to_keep=1, **cache_kwargs(cache))
        cache = cache_of(step)
        logits = penalize_repeats(step.logits[0, -1], seen, repetition_penalty)
        token = sample_next(logits, temperature, top_p, gen)
        if token in stops:
            break
        out.append(token)
        ids = torch.tensor([[token]], device=device)
        seen = torch.cat([seen, ids[0]])  # a repeat in `seen` changes nothing: it is penalised once
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


def reply_with_flags(
    model: nn.Module,
    tokenizer: object,
    messages: list[dict],
    args: argparse.Namespace,
    on_text: Callable[[str], None] | None = None,
    stats: dict | None = None,
    stops: Collection[int] | None = None,
) -> str:
    """generate_reply with the settings of add_generation_flags' flags (and `args.template_kwargs`, if any)."""
    return generate_reply(
        model,
        tokenizer,
        messages,
        args.max_new_tokens,
        args.temperature,
        args.top_p,
        args.seed,
        on_text=on_text,
        template_kwargs=getattr(args, "template_kwargs", None),
        stats=stats,
        repetition_penalty=args.repetition_penalty,
        stops=stops,
    )
