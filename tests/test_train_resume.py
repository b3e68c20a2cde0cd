"""A run killed (SIGKILL) or stopped (SIGTERM) and resumed ends exactly where an uninterrupted run ends."""

import json
import random
import re
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.train_utils import (
    REPO,
    lora_args,
    python,
    run_cli,
    run_inprocess,
    save_tiny_minimind,
    subprocess_env,
    tokenizer_dir,
    write_chat_data,
)
from trainer.checkpoint import capture_rng, restore_rng
from trainer.train_lora import main

TOTAL = 24  # 24 samples, batch 2, 2 epochs -> 24 optimizer steps


def _wait_for(proc: subprocess.Popen, pattern: str, seen: list[str], timeout: float = 240) -> re.Match:
    """Read the run's output line by line until `pattern` matches a line."""
    deadline = time.monotonic() + timeout
    for line in proc.stdout:
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match
        if time.monotonic() > deadline:
            break
    proc.kill()
    pytest.fail(f"never saw {pattern!r}; output:\n{''.join(seen)[-3000:]}")


def _final(out):
    weights = load_file(out / "lora_identity_64" / "adapter_model.safetensors")
    resume = torch.load(out / "lora_identity_64_resume.pth", weights_only=False)
    return weights, torch.load(out / "lora_identity_64.pth", weights_only=True), resume["state"]


def killed_stopped_resumed(tmp_path, **device_flags: object) -> tuple[tuple, tuple]:
    """An uninterrupted run, and the same run SIGKILLed at a random step, resumed, SIGTERMed, resumed to the
    end: both runs' (PEFT weights, MiniMind .pth weights, final state)."""
    tokenizer_dir()
    weight = save_tiny_minimind(tmp_path / "full_sft_64.pth")
    data = write_chat_data(tmp_path / "data.jsonl", 24)
    # Dropout on: resuming must also restore the RNG, not just weights, optimizer and data position.
    flags = dict(batch_size=2, epochs=2, save_interval=3, lora_dropout=0.1, learning_rate=5e-3, warmup_iters=2,
                 **device_flags)
    assert run_inprocess(main, lora_args(tmp_path, weight, data, save_dir=tmp_path / "ref", **flags)) == 0

    out = tmp_path / "run"
    argv = [python(), str(REPO / "trainer" / "train_lora.py"), *lora_args(tmp_path, weight, data, save_dir=out, **flags)]
    popen = dict(cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []

    # 1. SIGKILL at a random step after the first save (step 3 is saved before step 4 is logged).
    kill_at = random.randint(4, 16)
    proc = subprocess.Popen(argv, **popen)
    _wait_for(proc, rf"^step {kill_at}/{TOTAL} ", seen)
    proc.kill()
    proc.wait()
    saved = torch.load(out / "lora_identity_64_resume.pth", weights_only=False)["state"]["step"]
    assert 3 <= saved <= kill_at + 3 and saved % 3 == 0, f"killed at {kill_at}, saved {saved}"

    # 2. Resume, then SIGTERM: it finishes the step, saves, prints how to resume, exits 0.
    proc = subprocess.Popen([*argv, "--from_resume", "1"], **popen)
    _wait_for(proc, rf"resuming from .*_resume\.pth: step {saved},", seen)
    _wait_for(proc, rf"^step {saved + 2}/{TOTAL} ", seen)
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, rest
    assert "SIGTERM received" in rest
    stopped = int(re.search(rf"stopped at step (\d+)/{TOTAL}; resume with:\n  (.+)", rest).group(1))
    command = re.search(r"resume with:\n  (.+)", rest).group(1)
    assert command.endswith("--from_resume 1") and command.count("--from_resume") == 1
    assert saved + 2 <= stopped < TOTAL
    assert torch.load(out / "lora_identity_64_resume.pth", weights_only=False)["state"]["step"] == stopped

    # 3. Resume to the end (in-process, through the same entry point).
    assert run_inprocess(main, lora_args(tmp_path, weight, data, save_dir=out, **flags) + ["--from_resume", "1"]) == 0
    return _final(tmp_path / "ref"), _final(out)


def assert_same_end(ref: tuple, got: tuple, atol: float) -> None:
    """The same final weights (both files) and loss curve, up to `atol`."""
    (ref_w, ref_pth, ref_state), (got_w, got_pth, got_state) = ref, got
    assert got_state["step"] == ref_state["step"] == TOTAL
    for key in ref_w:
        torch.testing.assert_close(got_w[key], ref_w[key], atol=atol, rtol=0)
    for key in ref_pth:
        torch.testing.assert_close(got_pth[key], ref_pth[key], atol=atol, rtol=0)
    # The loss curve survives the interruptions: one value per step, the same values.
    assert [s for s, _ in got_state["history"]["train"]] == list(range(1, TOTAL + 1))
    for (_, a), (_, b) in zip(got_state["history"]["train"], ref_state["history"]["train"]):
        assert a == pytest.approx(b, abs=atol)


@pytest.mark.slow
def test_sigkill_and_sigterm_then_resume_give_the_uninterrupted_result(tmp_path):
    assert_same_end(*killed_stopped_resumed(tmp_path), atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resume_on_a_gpu_with_cuda_graphs_gives_the_uninterrupted_result(tmp_path):
    """The same on a GPU, bf16, uncompiled padded micro-batches replaying their CUDA graphs: after a resume each
    shape runs eagerly once more and is recorded again, where the uninterrupted run replays."""
    ref, got = killed_stopped_resumed(tmp_path, device="cuda", packing=0, use_compile=0)
    diff = max((got[0][k].float() - ref[0][k].float()).abs().max().item() for k in ref[0])
    print(f"largest difference of a resumed LoRA weight from the uninterrupted run's: {diff:.3g}")
    assert_same_end(ref, got, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CPU-only torch never starts CUDA")
def test_a_cpu_run_on_a_gpu_machine_leaves_cuda_alone(tmp_path):
    """--device cpu where a GPU is visible: saving the RNG for the resume file starts no CUDA (a CPU run draws
    nothing from the GPU's generator, and starting CUDA takes host memory and time)."""
    weight = save_tiny_minimind(tmp_path / "full_sft_64.pth")
    data = write_chat_data(tmp_path / "data.jsonl", 8)
    argv = lora_args(tmp_path, weight, data, batch_size=2, max_steps=2, lora_dropout=0.1)
    script = (f"import torch; from trainer.train_lora import main; main({argv!r}); "
              "print('cuda started:', torch.cuda.is_initialized())")
    run = run_cli([python(), "-c", script], timeout=120, cwd=REPO, env=subprocess_env())
    assert run.returncode == 0, run.stdout + run.stderr
    assert "cuda started: False" in run.stdout, run.stdout[-2000:]
    rng = torch.load(tmp_path / "out" / "lora_identity_64_resume.pth", weights_only=False)["rng"]
    assert "cuda" not in rng[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_gpu_generator_is_restored_from_new_and_older_resume_files():
    """A resume file holds this device's CUDA generator; older ones held every visible GPU's (a list). Both
    give back the draws that followed the save."""
    torch.zeros(1, device="cuda")  # a GPU run has started CUDA by its first save
    torch.manual_seed(3)
    torch.rand(7, device="cuda")
    state = capture_rng()
    older = dict(state, cuda=torch.cuda.get_rng_state_all())
    want = torch.rand(5, device="cuda")
    assert isinstance(state["cuda"], torch.Tensor)
    for saved in (state, older):
        torch.rand(11, device="cuda")
        restore_rng(saved)
        assert torch.equal(torch.rand(5, device="cuda"), want)


def test_a_finished_run_resumed_says_its_epochs_are_done(tmp_path, capsys):
    # After its last epoch the state points at the next one; a 1-epoch run must not say it resumes in "epoch 2"
    weight = save_tiny_minimind(tmp_path / "full_sft_64.pth")
    data = write_chat_data(tmp_path / "data.jsonl", 4)
    argv = lora_args(tmp_path, weight, data, batch_size=2, epochs=1)
    assert run_inprocess(main, argv) == 0
    capsys.readouterr()
    assert run_inprocess(main, argv + ["--from_resume", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"resuming from \S+_resume\.pth: step 2, epoch 1 of 1 done\n", out), out
    assert "nothing to train: the run already reached step 2\n" in out
    # Asked for a second epoch, the same file continues into it
    assert run_inprocess(main, argv[:-2] + ["--epochs", "2", "--from_resume", "1"]) == 0
    assert re.search(r"resuming from \S+_resume\.pth: step 2, epoch 2\n", capsys.readouterr().out)


def test_a_resume_past_its_max_steps_trains_nothing_and_keeps_the_weights(tmp_path, capsys):
    weight = save_tiny_minimind(tmp_path / "full_sft_64.pth")
    data = write_chat_data(tmp_path / "data.jsonl", 12)
    argv = lora_args(tmp_path, weight, data, batch_size=2, max_steps=3)
    assert run_inprocess(main, argv) == 0
    before = _final(tmp_path / "out")
    capsys.readouterr()
    # The run reached step 3; asked for 2 on resume, it says step 3 and changes no weight.
    assert run_inprocess(main, argv[:-2] + ["--max_steps", "2", "--from_resume", "1"]) == 0
    out = capsys.readouterr().out
    assert "nothing to train: the run already reached step 3\n" in out and "(step 3/3)" in out
    after = _final(tmp_path / "out")
    assert after[2]["step"] == before[2]["step"] == 3
    for key, value in before[0].items():
        assert torch.equal(after[0][key], value), key


def test_a_finished_run_resumed_writes_and_evaluates_nothing_again(tmp_path, capsys):
    weight = save_tiny_minimind(tmp_path / "full_sft_64.pth")
    data = write_chat_data(tmp_path / "data.jsonl", 12)
    argv = lora_args(tmp_path, weight, data, batch_size=2, max_steps=3, val_fraction=0.01, eval_interval=2)
    assert run_inprocess(main, argv) == 0
    printed = capsys.readouterr().out
    # 0.01 of 12 samples rounds to none: one is held out all the same, and the data line says so
    assert "validation: 1 sample(s) held out of 12 (--val_fraction)" in printed
    files = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    history = json.loads((tmp_path / "out" / "lora_identity_64.json").read_text())["history"]["val"]
    assert [step for step, _ in history] == [2, 3]
    for _ in range(2):
        assert run_inprocess(main, argv + ["--from_resume", "1"]) == 0
        assert "val_loss" not in capsys.readouterr().out
    assert {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()} == files


def test_val_fraction_on_data_too_small_to_hold_any_out_is_refused(tmp_path, capsys):
    weight = save_tiny_minimind(tmp_path / "full_sft_64.pth")
    data = write_chat_data(tmp_path / "data.jsonl", 1)
    argv = lora_args(tmp_path, weight, data, batch_size=1, max_steps=1, val_fraction=0.5)
    assert run_inprocess(main, argv) == 2
    assert (f"error: --val_fraction 0.5: {data} holds 1 sample(s); 1 held out for validation would leave 0 to train "
            "on; pass a --val_data_path, or leave out --val_fraction") in capsys.readouterr().err


# Kills the run (os._exit: no cleanup, as SIGKILL) among a save's renames, just before the resume file of its
# save number $KILL_AT_SAVE would move in: the LoRA files are then a save ahead of the resume file.
KILL_AMONG_RENAMES = '''
import os
import sys

import trainer.checkpoint as checkpoint
import trainer.train_lora as job
from trainer.job import run_job

real_move_in, saves = checkpoint._move_in, 0


def move_in(new, path):
    global saves
    if path.name.endswith("_resume.pth"):
        saves += 1
        if saves == int(os.environ["KILL_AT_SAVE"]):
            os._exit(137)
    real_move_in(new, path)


checkpoint._move_in = move_in
run_job(lambda: job.main(sys.argv[1:]))
'''


def test_a_kill_among_a_saves_renames_resumes_to_the_uninterrupted_result(tmp_path):
    """The LoRA files moved in, the resume file not yet: they are a save ahead of it. A resume reads only the
    resume file (the LoRA inside it, not the files beside), redoes the steps since, and ends bit for bit
    where an uninterrupted run ends."""
    weight = save_tiny_minimind(tmp_path / "full_sft_64.pth")
    data = write_chat_data(tmp_path / "data.jsonl", 12)
    flags = dict(batch_size=2, epochs=1, save_interval=2, lora_dropout=0.1, learning_rate=5e-3)
    launcher = tmp_path / "kill_among_renames.py"
    launcher.write_text(KILL_AMONG_RENAMES)

    def run(save_dir: str, kill_at_save: int, *extra: str) -> subprocess.CompletedProcess:
        # Every part in a subprocess of one thread: the same float sums in each, as bit-exactness needs
        argv = [python(), str(launcher), *lora_args(tmp_path, weight, data, save_dir=tmp_path / save_dir, **flags)]
        return run_cli([*argv, *extra], timeout=240, cwd=tmp_path, env=subprocess_env(KILL_AT_SAVE=str(kill_at_save)))

    assert run("ref", 0).returncode == 0
    killed = run("run", 2)
    out = tmp_path / "run"
    assert killed.returncode == 137, killed.stdout[-2000:] + killed.stderr[-2000:]
    assert json.loads((out / "lora_identity_64.json").read_text())["step"] == 4  # the outputs: save 2
    assert torch.load(out / "lora_identity_64_resume.pth", weights_only=False)["state"]["step"] == 2

    resumed = run("run", 0, "--from_resume", "1")
    assert resumed.returncode == 0 and "resuming from " in resumed.stdout, resumed.stdout[-2000:] + resumed.stderr
    (ref_w, ref_pth, ref_state), (got_w, got_pth, got_state) = _final(tmp_path / "ref"), _final(out)
    assert got_state["step"] == ref_state["step"] == 6
    assert got_state["history"]["train"] == ref_state["history"]["train"]
    for ref, got in ((ref_w, got_w), (ref_pth, got_pth)):
        assert ref.keys() == got.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # the kill's staging folder is gone
