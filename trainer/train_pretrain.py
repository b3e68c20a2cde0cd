"""Pretraining: next-token prediction on plain text, for a new MiniMind or one to continue (same engine as LoRA).

One GPU (or CPU with --device cpu), from the repo root or from inside trainer/:
    python trainer/train_pretrain.py --hidden_size 512 --num_hidden_layers 8 --data_path dataset/pretrain_demo.jsonl
Several GPUs of one machine:
    torchrun --nproc_per_node 4 trainer/train_pretrain.py --hidden_size 512 --num_hidden_layers 8
From scratch (the default, or --from_weight none as in MiniMind), or continue an earlier pretrain:
--from_weight pretrain (or a .pth / model directory).
Resume after a stop (Ctrl-C, kill, crash): the same command with --from_resume 1.

Writes, in --save_dir: pretrain_{hidden}{_moe}.pth (MiniMind's layout), pretrain_{...}/ (a model directory:
config, weights, tokenizer), {...}.json, {...}_loss.png and {...}_resume.pth.
"""

from trainer.frozen_imports import frozen_imports

# The garbage collector never scans what these imports build: 1-2 s less start-up.
with frozen_imports():
    from functools import partial

    from dataset.lm_dataset import PretrainDataset
    from dataset.token_cache import cache_from_flag
    from trainer.args import check_data_files, parse_args
    from trainer.checkpoint import seed_everything
    from trainer.distributed import setup_distributed
    from trainer.engine import pick_dtype
    from trainer.full_training import load_or_build, train_all_weights
    from trainer.job import run_job

JOB = "pretrain"


def main(argv: list[str] | None = None) -> int:
    """Pretrain a causal LM (flags from `argv`, default sys.argv); returns the exit status."""
    # ------------------------------------------------------------------ config
    args = parse_args(JOB, __doc__.splitlines()[0], argv)
    check_data_files(args)  # before the model: a missing file should not wait for a 60M-parameter init
    info = setup_distributed(args.device, args.ddp, args.dist_timeout)
    amp_dtype = pick_dtype(args.dtype, info.device)

    # ------------------------------------------------------------------ model (fp32: every weight trains)
    base = load_or_build(args, minimind_default=None)  # new and random unless --from_weight names one
    seed_everything(args.seed + info.rank)

    # ------------------------------------------------------------------ data: plain text, every token learned
    make_dataset = partial(PretrainDataset, tokenizer=base.tokenizer, max_length=args.max_seq_len,
                           skip_invalid=args.skip_bad_data, log=print if info.is_main else None,
                           cache=cache_from_flag(args.data_cache, write=info.local_rank == 0))

    # ------------------------------------------------------------------ train (trainer/full_training.py)
    return train_all_weights(args, info, amp_dtype, base, make_dataset, title="pretrain")


if __name__ == "__main__":
    run_job(main, teardown=False)
