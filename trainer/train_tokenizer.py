"""Train the demo tokenizer: byte-level BPE with MiniMind's special tokens and a ChatML chat template.

    python dataset/make_demo_data.py        # writes the demo corpus first (dataset/*_demo.jsonl)
    python trainer/train_tokenizer.py       # -> out/tokenizer/ (tokenizer.json + tokenizer_config.json)
    python trainer/train_tokenizer.py --out_dir model/tokenizer    # rebuilds the repo's tokenizer, byte for byte
    python trainer/train_tokenizer.py --data_path my_pretrain.jsonl my_sft.jsonl --vocab_size 8000 \\
        --out_dir out/my_tokenizer

Special tokens keep MiniMind's ids, so models and data made for MiniMind line up with it:
0 <|endoftext|> (pad and unk), 1 <|im_start|> (bos), 2 <|im_end|> (eos). Byte-level BPE never meets an
unknown character: any UTF-8 text, Chinese or emoji, encodes and decodes back exactly. Unlike MiniMind's
tokenizer, each Chinese character is kept a token of its own (see train_bpe), so --vocab_size is a cap:
the demo corpus has ~3.4k tokens' worth of merges. The result loads offline with
`transformers.AutoTokenizer.from_pretrained(out_dir)`.
"""

import argparse
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from dataset.records import data_error, parse_line, read_conversations, read_lines, read_texts
from model.atomic import make_output_folder, refuse_empty_folder
from model.errors import UserError, print_error

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = [REPO_ROOT / "dataset" / "pretrain_demo.jsonl", REPO_ROOT / "dataset" / "sft_demo.jsonl"]
# Not model/tokenizer/: the demo base and the .pth fallback need that one as it is (MiniMind too trains into a
# folder of its own); the trainers' output folder, where $MINILORA_OUT_DIR moves it.
DEFAULT_OUT = Path(os.environ.get("MINILORA_OUT_DIR") or REPO_ROOT / "out") / "tokenizer"

# Order matters: the trainer gives special tokens the first ids, in this order (MiniMind's ids 0, 1, 2).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MIN_VOCAB = len(SPECIAL_TOKENS) + 256  # the specials plus one token per byte
# The BPE trainer reserves ~70 bytes per entry of --vocab_size up front and aborts the process when that fails
# (1e9: 70 GB); the largest vocabularies in use hold ~262k tokens.
MAX_VOCAB = 2**20

# ChatML, as MiniMind writes it, minus tools: `<|im_start|>{role}\n{content}<|im_end|>\n` per message
# (a system message is just the first message, if there is one). An assistant message with a non-empty
# `reasoning_content` gets MiniMind's think block before its content; without one, no block is written,
# so the generation prompt is only `<|im_start|>assistant\n`.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- set content = message.content if message.content is string else '' %}"
    "{%- if message.role == 'assistant' and message.reasoning_content is string and message.reasoning_content %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + message.reasoning_content.strip('\\n') + '\\n</think>\\n\\n'"
    " + content.lstrip('\\n') + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


class TokenizerError(UserError):
    """A tokenizer that cannot be trained as asked (the message names the flag and what to do)."""


def corpus_texts(path: str | Path, skip_invalid: bool = False) -> list[str]:
    """The training text of one jsonl file: pretraining {"text"} lines, or chats in any records.py format; bad lines
    stop it, or with `skip_invalid` are left out and counted."""
    path = Path(path)
    lines = read_lines(path)
    if not lines:
        return []
    for number, raw in lines:  # the first record that parses says which format the file is in
        try:
            first = parse_line(raw, number)
            break
        except UserError as e:
            if not skip_invalid:
                raise data_error(path, [(number, str(e))], len(lines)) from None
    else:
        raise TokenizerError(f"{path}: none of its {len(lines)} line(s) is a JSON record")
    if isinstance(first, dict) and "text" in first:
        texts, problems = read_texts(path)
    else:
        # Every turn's text counts, in chats a trainer would refuse too (no assistant turn: nothing to learn)
        conversations, problems = read_conversations(path, check_turns=False)
        # The role names go in too: they follow <|im_start|> in every rendered chat.
        texts = ["\n".join(f"{m['role']}\n{m.get('reasoning_content') or ''}{m.get('content') or ''}" for m in c.messages)
                 for c in conversations]
    if problems and not skip_invalid:
        raise data_error(path, problems, len(lines))
    if problems:
        line, why = problems[0]
        print(f"{path}: skipped {len(problems)} bad line(s) of {len(lines)} (--skip_bad_data), the first "
              f"{path}:{line}: {why}", flush=True)
    return texts


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE whose first ids are SPECIAL_TOKENS (0, 1, 2)."""
    check_vocab_size(vocab_size)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        # Each Chinese character is a word of its own. GPT-2's regex would glue a run of Chinese (and any
        # Latin letters touching it) into one word, and a small templated corpus then merges whole phrases
        # such as "我是MiniLoRA" into single tokens: the same characters in a new sentence (a LoRA's new
        # answer) would become tokens the model never trained. Split, a character is one token everywhere.
        pre_tokenizers.Split(Regex(r"\p{Han}"), behavior="isolated"),
        # Then GPT-2's byte-level words, without a prefix space (" cat" and "cat" differ, as in MiniMind's).
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even those the corpus lacks
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
    assert ids == [0, 1, 2], f"special tokens got ids {ids}"  # the trainer's contract; a library change would break it
    return tokenizer


def check_vocab_size(vocab_size: int) -> None:
    """--vocab_size must hold the special tokens and the 256 bytes, and not be so large that the trainer aborts."""
    if vocab_size < MIN_VOCAB:
        raise TokenizerError(f"--vocab_size {vocab_size} is too small: it must be at least {MIN_VOCAB} "
                             f"({len(SPECIAL_TOKENS)} special tokens + 256 bytes)")
    if vocab_size > MAX_VOCAB:
        raise TokenizerError(f"--vocab_size {vocab_size} is too large: it must be at most {MAX_VOCAB} (the largest "
                             "vocabularies in use hold ~262k tokens; BPE stops earlier anyway when the corpus has "
                             "nothing left to merge)")


def check_flags(args: argparse.Namespace) -> None:
    """Flag values that cannot work stop the run before the corpus is read."""
    check_vocab_size(args.vocab_size)
    if args.model_max_length < 1:
        raise TokenizerError(f"--model_max_length must be at least 1 (got {args.model_max_length}); it is the "
                             "longest sequence a model takes, e.g. 32768")
    refuse_empty_folder(args.out_dir, "--out_dir")
    check_out_dir(Path(args.out_dir))


def tokenizer_config(model_max_length: int) -> dict:
    """tokenizer_config.json: which special token is which, and the chat template."""
    pad = unk = SPECIAL_TOKENS[0]
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL_TOKENS[1],
        "eos_token": SPECIAL_TOKENS[2],
        "pad_token": pad,
        "unk_token": unk,
        "add_bos_token": False,  # the chat template writes <|im_start|> itself
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,  # decode must give back the exact text
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }


def save_tokenizer(tokenizer: Tokenizer, out_dir: str | Path, model_max_length: int = 32768) -> Path:
    """Write tokenizer.json and tokenizer_config.json into out_dir (created if needed); return it."""
    out_dir = Path(out_dir)
    make_output_folder(out_dir, "--out_dir")
    tokenizer.save(str(out_dir / "tokenizer.json"), pretty=False)  # one line: 330 KB instead of 580 KB
    config = json.dumps(tokenizer_config(model_max_length), ensure_ascii=False, indent=2)
    (out_dir / "tokenizer_config.json").write_text(config + "\n", encoding="utf-8")
    return out_dir


def check_out_dir(out_dir: Path) -> None:
    """Stop with one line if --out_dir is a file or cannot be made (without making it: a failed run leaves nothing)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise TokenizerError(f"--out_dir {out_dir} is a file; pass a folder")
    existing = next(p for p in (out_dir.absolute(), *out_dir.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise TokenizerError(f"--out_dir {out_dir}: cannot make or write this folder ({existing} is "
                             f"{'not a folder' if not existing.is_dir() else 'not writable'}); pass a folder you can "
                             "write to")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags: corpus, vocabulary size, output directory."""
    p = argparse.ArgumentParser(description="Train a byte-level BPE tokenizer with MiniMind's special tokens "
                                            "(0 <|endoftext|>, 1 <|im_start|>, 2 <|im_end|>) and a ChatML template.")
    p.add_argument("--data_path", nargs="+", type=Path, default=DEFAULT_DATA,
                   help="jsonl files to learn from: pretraining {\"text\"} lines and/or chats (MiniMind "
                        "conversations, OpenAI messages, ShareGPT, Alpaca) (default: dataset/pretrain_demo.jsonl "
                        "dataset/sft_demo.jsonl, written by dataset/make_demo_data.py)")
    p.add_argument("--vocab_size", type=int, default=6400,
                   help=f"most tokens in the vocabulary, special tokens included ({MIN_VOCAB} to {MAX_VOCAB}); BPE "
                        "stops earlier when the corpus has nothing left to merge (the demo corpus gives ~3.4k) "
                        "(default: 6400)")
    p.add_argument("--out_dir", default=DEFAULT_OUT,  # kept a string: Path("") would read as "."
                   help="directory to write tokenizer.json and tokenizer_config.json to (default: "
                        "$MINILORA_OUT_DIR/tokenizer or <repo>/out/tokenizer; model/tokenizer rebuilds the repo's)")
    p.add_argument("--skip_bad_data", action="store_true",
                   help="leave out lines that are not valid records, and count them, instead of stopping")
    p.add_argument("--model_max_length", type=int, default=32768,
                   help="longest sequence the tokenizer reports to transformers, in tokenizer_config.json "
                        "(default: 32768)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Train and save; return the exit status (2 for a user error, printed without a traceback)."""
    args = parse_args(argv)
    try:
        check_flags(args)  # before the training, not after it
        texts = []
        for path in args.data_path:
            if not Path(path).is_file() and Path(path).resolve() in DEFAULT_DATA:
                raise TokenizerError(f"{path}: not found; write the demo corpus first with "
                                     "`python dataset/make_demo_data.py`, or pass --data_path")
            texts += corpus_texts(path, args.skip_bad_data)
        tokenizer = train_bpe(texts, args.vocab_size)
        out = save_tokenizer(tokenizer, args.out_dir, args.model_max_length)
    except UserError as e:
        print_error(e)
        return 2
    size = tokenizer.get_vocab_size()
    print(f"trained on {len(texts)} texts from {len(args.data_path)} file(s): {size} tokens -> {out} (the jobs "
          f"take it with --tokenizer_path {out})")
    if size < args.vocab_size:
        print(f"note: the corpus only supports {size} tokens, fewer than --vocab_size {args.vocab_size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
