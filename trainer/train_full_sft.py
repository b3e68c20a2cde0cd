"""Full supervised fine-tuning: every parameter of a causal LM trained on chat data (the same engine as LoRA).

One GPU (or CPU with --device cpu), from the repo root or from inside trainer/:
    python trainer/train_full_sft.py --from_weight pretrain --hidden_size 512 --data_path dataset/sft_demo.jsonl
Several GPUs of one machine:
    torchrun --nproc_per_node 4 trainer/train_full_sft.py --from_weight pretrain --hidden_size 512
Resume after a stop (Ctrl-C, kill, crash): the same command with --from_resume 1.

Writes, in --save_dir: full_sft_{hidden}{_moe}.pth (MiniMind's layout, for MiniMind models), full_sft_{...}/
(a model directory: config, weights, tokenizer), {...}.json, {...}_loss.png and {...}_resume.pth.
"""

from trainer.frozen_imports import frozen_imports

# The garbage collector never scans what these imports build: 1-2 s less start-up.
with frozen_imports():
    from functools import partial
    from pathlib import Path

    from dataset.lm_dataset import SFTDataset
    from dataset.token_cache import cache_from_flag
    from trainer.args import MINIMIND_BASE, check_data_files, check_template_file, parse_args
    from trainer.checkpoint import seed_everything
    from trainer.distributed import setup_distributed
    from trainer.engine import pick_dtype
    from trainer.full_training import load_or_build, train_all_weights
    from trainer.job import run_job

JOB = "full_sft"


def main(argv: list[str] | None = None) -> int:
    """Fine-tune all weights (flags from `argv`, default sys.argv); returns the exit status."""
    # ------------------------------------------------------------------ config
    args = parse_args(JOB, __doc__.splitlines()[0], argv)
    check_data_files(args)
    info = setup_distributed(args.device, args.ddp, args.dist_timeout)
    amp_dtype = pick_dtype(args.dtype, info.device)

    # ------------------------------------------------------------------ model (fp32: every weight trains)
    base = load_or_build(args, minimind_default=MINIMIND_BASE[JOB])  # --from_weight none: a new random model
    seed_everything(args.seed + info.rank)

    # ------------------------------------------------------------------ data: chats, assistant turns learned
    # Read as the flag check reads it: UTF-8, without a byte-order mark that would open every rendered chat
    template = check_template_file(Path(args.chat_template)) if args.chat_template else None
    if template is not None:  # the saved model directory then chats as it learned to
        base.tokenizer.chat_template = template
    make_dataset = partial(SFTDataset, tokenizer=base.tokenizer, max_length=args.max_seq_len,
                           skip_invalid=args.skip_bad_data, chat_template=template,
                           template_name=args.chat_template, log=print if info.is_main else None,
                           cache=cache_from_flag(args.data_cache, write=info.local_rank == 0))

    # ------------------------------------------------------------------ train (trainer/full_training.py)
    return train_all_weights(args, info, amp_dtype, base, make_dataset, title="full SFT")


if __name__ == "__main__":
    run_job(main, teardown=False)
