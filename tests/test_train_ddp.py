"""Two gloo ranks under a real torchrun (dense LoRA: one flat gradient all-reduce, with or without --fsdp;
MoE: DDP) give the same steps as one process with the whole batch; resume files move between one process
and two ranks."""

import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tests.train_utils import (
    REPO,
    lora_args,
    python,
    read_keys,
    run_inprocess,
    run_timed,
    save_tiny_minimind,
    subprocess_env,
    tokenizer_dir,
    torchrun,
    write_chat_data,
    write_launcher,
)
from trainer.fsdp import fsdp_supported
from trainer.train_lora import main

SCRIPT = str(REPO / "trainer" / "train_lora.py")
# 9 samples: step 1 takes 8 (4 per rank), step 2 takes the last one, so rank 1 runs a dead (all-ignored)
# sample to keep the gradient all-reduce in step.
FLAGS = dict(epochs=1, learning_rate=1e-2, lora_dropout=0.0)
PROMPT_EXIT_S = 10  # a finished run must not linger (e.g. a rank stuck leaving the process group)


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "lora_identity_64" / "adapter_model.safetensors")


def _resume(out: Path) -> dict:
    return torch.load(out / "lora_identity_64_resume.pth", weights_only=False)


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert type(got[key]) is torch.Tensor, f"{key} is a {type(got[key]).__name__}, not a plain tensor"
        torch.testing.assert_close(got[key], want[key], atol=atol, rtol=0)


def _two_ranks(tmp: Path, weight: Path, data: Path, out: Path, *extra: str, **flags: object):
    """torchrun --nproc_per_node 2 train_lora.py on CPU; the run must succeed and exit promptly."""
    cmd = torchrun("--standalone", "--nproc_per_node", "2", SCRIPT,
                   *lora_args(tmp, weight, data, save_dir=out, **flags), *extra)
    run = run_timed(cmd, cwd=tmp, env=subprocess_env())
    assert run.returncode == 0, run.output[-4000:]
    assert run.exit_lag is not None and run.exit_lag < PROMPT_EXIT_S, (run.exit_lag, run.output[-2000:])
    return run


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> SimpleNamespace:
    """One process × batch 8 and two DDP ranks × batch 4 on the same 9 samples, one epoch (2 steps)."""
    tokenizer_dir()
    tmp = tmp_path_factory.mktemp("ddp")
    weight = save_tiny_minimind(tmp / "full_sft_64.pth")
    data = write_chat_data(tmp / "data.jsonl", 9)
    assert run_inprocess(main, lora_args(tmp, weight, data, save_dir=tmp / "one", batch_size=8, **FLAGS)) == 0
    run = _two_ranks(tmp, weight, data, tmp / "two", batch_size=4, **FLAGS)
    # Kept before any test resumes (and so overwrites) these runs.
    return SimpleNamespace(tmp=tmp, weight=weight, data=data, run=run,
                           one=_adapter(tmp / "one"), one_resume=_resume(tmp / "one"),
                           two=_adapter(tmp / "two"), two_resume=_resume(tmp / "two"))


@pytest.mark.slow
def test_two_ranks_batch_4_equal_one_process_batch_8(ddp, capsys):
    assert "2 process(es) on cpu" in ddp.run.output
    assert ddp.run.output.count("step 1/2 | epoch 1") == 1  # only rank 0 logs
    _assert_same(ddp.two, ddp.one)
    # Adam is blind to a constant gradient factor (e.g. a missing ×world_size); the logged global loss and
    # the pre-clip gradient norm are not.
    h1, h2 = ddp.one_resume["state"]["history"], ddp.two_resume["state"]["history"]
    for name in ("train", "grad_norm"):
        assert [s for s, _ in h2[name]] == [1, 2]
        for (_, x), (_, y) in zip(h1[name], h2[name]):
            assert y == pytest.approx(x, rel=1e-5)

    # The 2-rank run's resume file continues on 1 process: same step and epoch, the next epoch planned for
    # the new world size (9 samples / global batch 8 -> 2 steps again), RNG re-seeded, and said so.
    out = ddp.tmp / "two_then_one"
    shutil.copytree(ddp.tmp / "two", out)
    argv = lora_args(ddp.tmp, ddp.weight, ddp.data, save_dir=out, batch_size=8, **{**FLAGS, "epochs": 2})
    capsys.readouterr()
    assert run_inprocess(main, argv + ["--from_resume", "1"]) == 0
    assert "was written by 2 process(es), this run has 1" in capsys.readouterr().out
    state = _resume(out)["state"]
    assert state["step"] == 4 and state["epoch"] == 2 and state["world_size"] == 1
    assert [s for s, _ in state["history"]["train"]] == [1, 2, 3, 4]


@pytest.mark.slow
def test_one_process_run_resumes_on_two_ranks(ddp, tmp_path, monkeypatch, capsys):
    """1 process stops mid-epoch; 2 ranks continue at the next step with exactly the epoch's unseen samples."""
    import trainer.data

    # Record every sample the one-process run loads (in-process, no DataLoader workers).
    first: list[tuple[int, bool]] = []
    real_getitem = trainer.data._Keyed.__getitem__

    def getitem(self, key):
        first.append(key)
        return real_getitem(self, key)

    monkeypatch.setattr(trainer.data._Keyed, "__getitem__", getitem)
    out = tmp_path / "run"
    flags = dict(FLAGS, learning_rate=1e-3)
    argv = lora_args(tmp_path, ddp.weight, ddp.data, save_dir=out, batch_size=2, max_steps=2, **flags)
    assert run_inprocess(main, argv) == 0
    monkeypatch.undo()
    # 2 steps × batch 2 trained (the loop fetched step 3's batch before it saw that --max_steps was reached).
    first = first[:4]
    assert all(live for _, live in first)

    # The same global batch of 2 on two ranks: the 5 unseen samples are steps 3, 4 and 5 (2 + 2 + 1; in the
    # last one rank 1 gets a dead sample).
    cmd = torchrun("--standalone", "--nproc_per_node", "2", str(write_launcher(tmp_path)),
                   *lora_args(tmp_path, ddp.weight, ddp.data, save_dir=out, batch_size=1, **flags),
                   "--from_resume", "1")
    run = run_timed(cmd, cwd=tmp_path, env=subprocess_env(KEYS_FILE=str(tmp_path / "keys")))
    assert run.returncode == 0, run.output[-4000:]
    note = "was written by 1 process(es), this run has 2: continuing at step 2; each later step takes the same samples"
    assert run.output.count(note) == 1, run.output[-4000:]  # said once, by rank 0
    assert "training steps 3..5 (" in run.output

    rank0, rank1 = (read_keys(tmp_path / "keys", r) for r in (0, 1))
    live0, live1 = [i for i, live in rank0 if live], [i for i, live in rank1 if live]
    assert (len(live0), len(live1), len(rank1) - len(live1)) == (3, 2, 1)
    seen = [i for i, _ in first] + live0 + live1
    assert sorted(seen) == list(range(9)), f"each sample of the epoch exactly once: {seen}"
    state = _resume(out)["state"]
    assert (state["step"], state["epoch"], state["position"], state["world_size"]) == (5, 1, 0, 2)
    assert [s for s, _ in state["history"]["train"]] == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_fsdp_equals_ddp_and_one_process_and_resumes(ddp, tmp_path, capsys):
    """--fsdp (frozen base sharded over 2 ranks) trains the same LoRA as DDP and one process, writes the
    same files, and continues from its resume file like a single process does."""
    argv = lora_args(tmp_path, ddp.weight, ddp.data, save_dir=tmp_path / "alone", batch_size=4, **FLAGS)
    assert run_inprocess(main, argv + ["--fsdp"]) == 2  # nothing to shard over: a clear error
    assert "--fsdp shards the base over several processes; start it with torchrun" in capsys.readouterr().err
    if not fsdp_supported():  # torch < 2.7: the ranks stop with a clear error instead
        cmd = torchrun("--standalone", "--nproc_per_node", "2", SCRIPT, *argv, "--fsdp")
        run = run_timed(cmd, cwd=tmp_path, env=subprocess_env())
        # found after the ranks joined: named by the rank that printed it, once
        assert run.returncode != 0 and len(re.findall(r"^error: rank \d: --fsdp needs torch >= 2\.7", run.output,
                                                      re.M)) == 1, run.output[-2000:]
        return

    out = tmp_path / "fsdp"
    run = _two_ranks(tmp_path, ddp.weight, ddp.data, out, "--fsdp", batch_size=4, **FLAGS)
    assert "2 process(es) on cpu, float32; --fsdp: each holds 50% of the base" in run.output, run.output[:2000]

    _assert_same(_adapter(out), ddp.two)
    _assert_same(_adapter(out), ddp.one)
    pth = torch.load(out / "lora_identity_64.pth", weights_only=True)
    _assert_same(pth, torch.load(ddp.tmp / "one" / "lora_identity_64.pth", weights_only=True), atol=1e-3)  # fp16
    # The resume file holds whole tensors, as DDP's does: LoRA weights and AdamW moments.
    resume = _resume(out)
    _assert_same(resume["trainable"], ddp.two_resume["trainable"])
    for key, moments in ddp.two_resume["optimizer"]["state"].items():
        _assert_same(resume["optimizer"]["state"][key], moments)

    # Resume for a second epoch with --fsdp == the one-process run resumed the same way.
    one = tmp_path / "one"
    shutil.copytree(ddp.tmp / "one", one)
    assert run_inprocess(main, lora_args(tmp_path, ddp.weight, ddp.data, save_dir=one, batch_size=8,
                                         **{**FLAGS, "epochs": 2}) + ["--from_resume", "1"]) == 0
    run = _two_ranks(tmp_path, ddp.weight, ddp.data, out, "--fsdp", "--from_resume", "1", batch_size=4,
                     **{**FLAGS, "epochs": 2})
    assert "resuming from" in run.output and "step 2, epoch 2" in run.output
    _assert_same(_adapter(out), _adapter(one))
    assert _resume(out)["state"]["step"] == 4


@pytest.mark.slow
def test_two_compiled_ranks_equal_one_eager_process_with_packing(ddp, tmp_path):
    """--use_compile 1 --packing on 2 ranks (on GPUs its steps are CUDA graphs, and the all-reduce of the flat
    gradient buffer runs after the compiled backward of the step's last micro-batch) with accumulation
    trains the one-process eager LoRA."""
    packed = dict(FLAGS, packing=True, max_seq_len=64, accumulation_steps=2)
    one, two = tmp_path / "one", tmp_path / "two"
    # --packed_rows: 2 ranks × 1 row per micro-batch are the one process's 2 rows
    assert run_inprocess(main, lora_args(tmp_path, ddp.weight, ddp.data, save_dir=one, packed_rows=2, **packed)) == 0
    run = _two_ranks(tmp_path, ddp.weight, ddp.data, two, use_compile=1, packed_rows=1, **packed)
    assert "2 process(es) on cpu, float32; compiled" in run.output, run.output[:2000]
    _assert_same(_adapter(two), _adapter(one))
    h1, h2 = _resume(one)["state"]["history"], _resume(two)["state"]["history"]
    assert [s for s, _ in h2["train"]] == [s for s, _ in h1["train"]] and len(h1["train"]) >= 2
    for (_, x), (_, y) in zip(h1["train"], h2["train"]):
        assert y == pytest.approx(x, rel=1e-5)


@pytest.mark.slow
def test_two_ranks_equal_one_process_with_group_by_length(ddp, tmp_path):
    """--group_by_length on 2 ranks × batch 4 trains the one-process batch-8 LoRA: the length-sorted order is
    made per global step, so the ranks share each step as one process would hold it (here: the 8 longest
    samples, then the last one), unlike the default order of the `ddp` runs."""
    one, two = tmp_path / "one", tmp_path / "two"
    argv = lora_args(tmp_path, ddp.weight, ddp.data, save_dir=one, batch_size=8, group_by_length=1, **FLAGS)
    assert run_inprocess(main, argv) == 0
    _two_ranks(tmp_path, ddp.weight, ddp.data, two, batch_size=4, group_by_length=1, **FLAGS)
    _assert_same(_adapter(two), _adapter(one))
    h1, h2 = _resume(one)["state"]["history"], _resume(two)["state"]["history"]
    for (_, x), (_, y) in zip(h1["train"], h2["train"]):
        assert y == pytest.approx(x, rel=1e-5)
    assert h1["train"][0][1] != pytest.approx(ddp.one_resume["state"]["history"]["train"][0][1], rel=1e-3)


@pytest.mark.slow
def test_two_moe_ranks_equal_one_process_with_accumulation(tmp_path):
    """MoE under DDP (find_unused_parameters; each rank routes its own tokens, so an expert can get tokens
    on one rank and none on the other): 2 ranks × 1 sample train the LoRA and log the losses of 1 process ×
    1 sample × accumulation 2. Batches of 1 give both runs the same micro-batches (rank r takes samples
    r::2, accumulation takes them in order), which the per-micro-batch aux loss needs."""
    weight = save_tiny_minimind(tmp_path / "full_sft_64_moe.pth", use_moe=True, num_experts=4)
    data = write_chat_data(tmp_path / "data.jsonl", 4, seed=3)
    flags = dict(FLAGS, batch_size=1, lora_name="moe")
    one, two = tmp_path / "one", tmp_path / "two"
    # One thread, as torchrun gives each rank (OMP_NUM_THREADS=1): the same float reduction order. Else the
    # runs differ by rounding, which Adam blows up to ~0.4% of an update on the few expert LoRA entries
    # whose gradient is ~eps (1e-8), and a loose tolerance would hide a real error in the same entries.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run_inprocess(main, lora_args(tmp_path, weight, data, save_dir=one, accumulation_steps=2,
                                             **flags)) == 0
    finally:
        torch.set_num_threads(threads)
    run = _two_ranks(tmp_path, weight, data, two, **flags)
    assert "2 process(es) on cpu" in run.output
    got, want = (load_file(d / "moe_64_moe" / "adapter_model.safetensors") for d in (two, one))
    assert any(".experts.3." in key for key in want), "LoRA on the experts' layers"
    _assert_same(got, want, atol=1e-7)
    h1, h2 = (torch.load(d / "moe_64_moe_resume.pth", weights_only=False)["state"]["history"] for d in (one, two))
    assert [s for s, _ in h2["train"]] == [1, 2]
    for name in ("train", "grad_norm"):
        for (_, x), (_, y) in zip(h1[name], h2[name]):
            assert y == pytest.approx(x, rel=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_gpus_over_nccl_train_the_one_gpu_lora_on_the_cuda_defaults(tmp_path):
    """The bare command's CUDA path (packed rows, each layer compiled, each micro-step one CUDA graph,
    FlexAttention at rows of 128, bf16 autocast) on 2 GPUs under torchrun (NCCL) trains what 1 GPU trains
    with the same global step: 2 ranks × 1 row against 1 process × 2 rows, both with accumulation 2. Their
    micro-batches have other shapes, so bf16 rounds them differently: equal within that rounding."""
    weight = save_tiny_minimind(tmp_path / "full_sft_64.pth")
    data = write_chat_data(tmp_path / "data.jsonl", 96)
    flags = dict(FLAGS, device="cuda", max_seq_len=128, accumulation_steps=2)
    one, two = tmp_path / "one", tmp_path / "two"
    run = run_timed([python(), SCRIPT, *lora_args(tmp_path, weight, data, save_dir=one, packed_rows=2, **flags)],
                    cwd=tmp_path, env=subprocess_env())
    assert run.returncode == 0, run.output[-4000:]
    run2 = _two_ranks(tmp_path, weight, data, two, packed_rows=1, **flags)
    assert "1 process(es) on cuda:0" in run.output and "2 process(es) on cuda:0" in run2.output, run2.output[:3000]
    for r in (run, run2):
        assert "compiled per layer, CUDA graphs" in r.output, r.output[:3000]
        assert "packed rows attend through FlexAttention" in r.output, r.output[:3000]

    h1, h2 = _resume(one)["state"]["history"]["train"], _resume(two)["state"]["history"]["train"]
    assert [s for s, _ in h2] == [s for s, _ in h1] and len(h1) >= 4, (h1, h2)
    for (_, x), (_, y) in zip(h1, h2):
        assert y == pytest.approx(x, rel=2e-3)
    got, want = _adapter(two), _adapter(one)
    assert got.keys() == want.keys()
    b_keys = [k for k in want if "lora_B" in k]  # B starts at zero: each B is what training wrote
    diff = torch.cat([(got[k].float() - want[k].float()).flatten() for k in b_keys]).norm()
    moved = torch.cat([want[k].float().flatten() for k in b_keys]).norm()
    assert moved > 0 and diff <= 0.05 * moved, (float(diff), float(moved))
