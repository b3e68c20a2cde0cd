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
    from pathlib import Path

    import torch

    from dataset.lm_dataset import PretrainDataset
    from dataset.token_cache import cache_from_flag
    from trainer.args import check_data_files, from_scratch, parse_args
    from trainer.base_model import REPO_TOKENIZER, load_base, load_tokenizer, new_minimind
    from trainer.checkpoint import seed_everything
    from trainer.distributed import setup_distributed
    from trainer.engine import pick_dtype
    from trainer.full_training import train_all_weights
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
    if from_scratch(args.from_weight):
        seed_everything(args.seed)  # the same random init on every rank
        tokenizer = load_tokenizer(Path(args.tokenizer_path) if args.tokenizer_path else REPO_TOKENIZER)
        base = new_minimind(tokenizer, args.hidden_size, args.num_hidden_layers, args.use_moe)
    else:
        base = load_base(args.from_weight, args.save_dir, torch.float32, args.hidden_size, args.num_hidden_layers,
                         args.use_moe, args.tokenizer_path, args.max_seq_len)
    seed_everything(args.seed + info.rank)

    # ------------------------------------------------------------------ data: plain text, every token learned
    make_dataset = partial(PretrainDataset, tokenizer=base.tokenizer, max_length=args.max_seq_len,
                           skip_invalid=args.skip_bad_data, log=print if info.is_main else None,
                           cache=cache_from_flag(args.data_cache, write=info.local_rank == 0))

    # ------------------------------------------------------------------ train (trainer/full_training.py)
    return train_all_weights(args, info, amp_dtype, base, make_dataset, JOB, title="pretrain")


if __name__ == "__main__":
    run_job(main, teardown=False)
