"""Speed defaults: which path a device gets, how packed micro-batches are sized, bucketed padded widths."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.train_utils import REPO, python, run_cli, subprocess_env, tiny_lm
from trainer.args import FlagError, parse_args, pick_speed_defaults
from trainer.data import bucket_width, collate_bucketed, collate_supervised, packed_rows, prepare_data
from trainer.distributed import DistInfo
from trainer.loss import SupervisedLoss


def flags(**over: object) -> SimpleNamespace:
    """The two speed flags as parse_args leaves them when not given (None)."""
    return SimpleNamespace(**{"packing": None, "use_compile": None, "group_by_length": False, **over})


def test_cuda_defaults_to_packed_and_compiled_cpu_stays_eager_and_padded():
    args = flags()
    why = pick_speed_defaults(args, "cuda", triton=True)
    assert (args.packing, args.use_compile) == (True, True)
    assert "--packing 0" in why and "--use_compile 0" in why
    args = flags()
    pick_speed_defaults(args, "cpu")
    assert (args.packing, args.use_compile) == (False, False)
    args = flags()
    assert "Triton is missing" in pick_speed_defaults(args, "cuda", triton=False)
    assert (args.packing, args.use_compile) == (True, False)


def test_explicit_flags_win_over_the_device_defaults():
    args = flags(packing=False, use_compile=False)
    assert pick_speed_defaults(args, "cuda", triton=True) == ""
    assert (args.packing, args.use_compile) == (False, False)
    args = flags(packing=True, use_compile=True)
    pick_speed_defaults(args, "cpu")
    assert (args.packing, args.use_compile) == (True, True)


def test_group_by_length_asks_for_padded_batches():
    """--group_by_length sorts padded batches: on CUDA it turns the packing default off (and says so), and with
    an explicit --packing it is refused, naming both flags (exit 2 through run_job)."""
    args = flags(group_by_length=True)
    why = pick_speed_defaults(args, "cuda", triton=True)
    assert (args.packing, args.use_compile) == (False, True) and "padded batches (--group_by_length)" in why
    with pytest.raises(FlagError, match="--group_by_length sorts padded batches.*--packing"):
        parse_args("lora", "", ["--group_by_length", "--packing", "1"])
    assert parse_args("lora", "", ["--group_by_length"]).packing is None
    assert parse_args("full_sft", "", ["--group_by_length"]).group_by_length is True


def test_flags_parse_to_none_for_lora_and_to_off_for_full_training():
    lora = parse_args("lora", "", [])
    assert (lora.packing, lora.use_compile, lora.compile_scope) == (None, None, "auto")
    assert parse_args("lora", "", ["--packing", "0", "--use_compile", "0"]).packing is False
    assert parse_args("lora", "", ["--packing"]).packing is True
    full = parse_args("full_sft", "", [])
    assert (full.packing, full.use_compile) == (False, False)


def test_packed_rows_hold_about_batch_size_samples():
    assert packed_rows(16, 240.0, 512) == 8  # MiniMind's --batch_size 16: 7.5 rows of 512 -> 8
    assert packed_rows(8, 240.0, 1024) == 2
    assert packed_rows(2, 30.0, 1024) == 1  # never zero rows


def test_bucket_width_rounds_up_and_never_past_the_cap():
    assert [bucket_width(w, 64, 512) for w in (1, 64, 65, 500, 512)] == [64, 64, 128, 512, 512]
    assert bucket_width(490, 64, 500) == 500
    assert bucket_width(37, 1, 512) == 37  # multiple 1: unchanged (CPU)


@pytest.mark.parametrize("family", ["minimind", "qwen3"])
def test_bucketed_widths_give_the_same_loss_as_unbucketed(family):
    """Extra right padding up to the bucket must not move the summed loss nor the supervised positions."""
    model = tiny_lm(family)
    loss = SupervisedLoss(model)
    samples = []
    for n in (5, 23, 41, 9):
        labels = torch.randint(3, 100, (n,))
        labels[: n // 3] = -100  # a prompt
        samples.append((torch.randint(3, 100, (n,)), labels))

    def summed(multiple: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        b = collate_supervised(samples, lambda s: collate_bucketed(s, pad_id=0, multiple=multiple, cap=128))
        with torch.no_grad():
            ce, _ = loss(b["input_ids"], b["sup_index"], b["sup_targets"], attention_mask=b["attention_mask"])
        return ce, b["sup_targets"], b["input_ids"].shape[1]

    plain, plain_targets, width = summed(1)
    bucketed, bucketed_targets, bucket = summed(64)
    assert (width, bucket) == (41, 64)
    assert torch.equal(plain_targets, bucketed_targets)
    torch.testing.assert_close(bucketed, plain, rtol=1e-5, atol=1e-5)


class _Lengths(torch.utils.data.Dataset):
    """Samples of the given lengths (all tokens supervised but the first)."""

    def __init__(self, lengths: list[int]) -> None:
        self.lengths = np.asarray(lengths)
        self.targets = self.lengths - 1

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.arange(3, 3 + int(self.lengths[i]))
        return ids, ids.clone()


def test_packed_micro_batches_are_sized_from_the_mean_sample_length():
    lengths = [20, 40, 60] * 20  # mean 40
    args = SimpleNamespace(data_path="x", val_data_path=None, val_fraction=0.0, seed=0, max_seq_len=128,
                           packing=True, batch_size=8, accumulation_steps=2, num_workers=0)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    data = prepare_data(lambda _: _Lengths(lengths), args, info, pad_id=0)
    _, micro_batches, _ = next(iter(data.steps(0, 0, 1)))
    assert len(micro_batches) == 2
    assert micro_batches[0]["input_ids"].shape == (3, 128)  # 8 × 40 / 128 = 2.5 -> 3 rows
    assert "micro-batch" in data.note and "optimizer step" in data.note


def test_packed_rows_flag_sets_the_rows_directly():
    args = SimpleNamespace(data_path="x", val_data_path=None, val_fraction=0.0, seed=0, max_seq_len=128,
                           packing=True, batch_size=8, accumulation_steps=1, num_workers=0, packed_rows=5)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    data = prepare_data(lambda _: _Lengths([20, 40, 60] * 20), args, info, pad_id=0)
    _, micro_batches, _ = next(iter(data.steps(0, 0, 1)))
    assert micro_batches[0]["input_ids"].shape == (5, 128) and "(--packed_rows)" in data.note


def test_a_step_larger_than_the_data_says_it_holds_all_of_it():
    """12 samples, 16 per micro-batch × 2 micro-batches: the one step per epoch holds the 12, not 32."""
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    args = SimpleNamespace(data_path="x", val_data_path=None, val_fraction=0.0, seed=0, max_seq_len=128,
                           packing=False, batch_size=16, accumulation_steps=2, num_workers=0, group_by_length=False)
    padded = prepare_data(lambda _: _Lengths([20, 40, 60] * 4), args, info, pad_id=0)
    assert "one optimizer step = 12 samples, ≈ 480 tokens (all the data: it holds 12 samples, fewer than a " \
           "full step's 32)" in padded.note
    assert sum(n for _, _, n in padded.steps(0, 0, 1)) == 12
    packed = prepare_data(lambda _: _Lengths([20, 40, 60] * 4), SimpleNamespace(**{**vars(args), "packing": True}),
                          info, pad_id=0)
    rows = len(packed.train)  # 480 tokens in rows of 128
    assert f"one optimizer step ≈ 12 samples, {rows * 128:,} token slots (all the data: it holds {rows} packed rows" \
           in packed.note
    fits = prepare_data(lambda _: _Lengths([20, 40, 60] * 20), SimpleNamespace(**{**vars(args), "batch_size": 4}),
                        info, pad_id=0)
    assert "one optimizer step = 8 samples, ≈ 320 tokens" in fits.note and "all the data" not in fits.note


def test_eta_and_tokens_per_second_leave_the_warm_up_steps_out(monkeypatch, capsys):
    """A 100 s first step (compiling) and a 1 s second one (graph recording), then 1 s per step: the ETA at
    step 4 of 10 is 6 s (the steady pace), not 154 s (the average since the start)."""
    from trainer import logger

    now = [0.0]
    monkeypatch.setattr(logger.time, "perf_counter", lambda: now[0])
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    log = logger.RunLogger(info, total_steps=10, start_step=0, log_interval=1)
    for step, t in ((1, 100.0), (2, 101.0), (3, 102.0), (4, 103.0)):
        now[0] = t
        log.step(step, 1, torch.tensor(1.0), torch.tensor(0.5), 1e-4, n_tokens=1000)
    lines = capsys.readouterr().out.splitlines()
    assert "warm-up 100.0 s" in lines[0] and "warm-up 101.0 s" in lines[1]
    assert lines[3].endswith("1,000 tok/s | eta 0:00:06")


def test_eta_follows_a_run_that_speeds_up(monkeypatch, capsys):
    """After the warm-up, 2 s per step up to step 12, then 0.5 s per step (uncompiled steps once their CUDA
    graphs are recorded): at step 40 of 100 the ETA is 60 × 0.5 s = 30 s, the pace of the later half of the
    steps since the warm-up, not the 54 s of the average since then (10 × 2 s + 28 × 0.5 s over 38 steps)."""
    from trainer import logger

    now = [0.0]
    monkeypatch.setattr(logger.time, "perf_counter", lambda: now[0])
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    log = logger.RunLogger(info, total_steps=100, start_step=0, log_interval=2)
    for step in range(1, 41):
        now[0] += 2.0 if step <= 12 else 0.5
        log.step(step, 1, torch.tensor(1.0), torch.tensor(0.5), 1e-4, n_tokens=1000)
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("step 40/100") and last.endswith("eta 0:00:30"), last


SCRIPTS = ("trainer.train_lora", "trainer.train_full_sft", "trainer.train_pretrain", "scripts.chat",
           "scripts.eval_lora", "scripts.merge_lora", "scripts.visualize_lora")


def test_scripts_import_with_the_collector_off_and_leave_it_on():
    """The training scripts and the scripts that load a model import with the garbage collector off, then freeze
    what the imports built and turn the collector back on (a script that left it off would never free a
    reference cycle in a whole run). The first import brings torch and transformers: hundreds of thousands of
    objects, and no full collection among them; each later one freezes its own."""
    probe = f"""
import gc, importlib
for name in {SCRIPTS!r}:
    before = gc.get_freeze_count()
    collections = gc.get_stats()[2]["collections"]
    importlib.import_module(name)
    print(name, gc.isenabled(), gc.get_freeze_count() - before, gc.get_stats()[2]["collections"] - collections)
"""
    out = run_cli([python(), "-c", probe], 120, cwd=REPO, env=subprocess_env())
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line.split() for line in out.stdout.splitlines()]
    assert tuple(row[0] for row in rows) == SCRIPTS
    assert int(rows[0][2]) > 100_000, rows[0]
    assert all(enabled == "True" and int(frozen) > 0 and full == "0" for _, enabled, frozen, full in rows), rows


def test_frozen_imports_leaves_a_collector_that_was_off_off():
    """A caller that had turned the collector off finds it off after the block, and what the block built
    frozen."""
    probe = """
import gc
from trainer.frozen_imports import frozen_imports
gc.disable()
before = gc.get_freeze_count()
with frozen_imports():
    import json, decimal
print(gc.isenabled(), gc.get_freeze_count() > before)
"""
    out = run_cli([python(), "-c", probe], 60, cwd=REPO, env=subprocess_env())
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "True"]
