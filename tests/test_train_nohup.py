"""MiniMind's own nohup line runs as written (with --device cpu) on a matching 1B-parameter base.

`--hidden_size 2048 --num_hidden_layers 20` is a ~1.06B-parameter MiniMind (4.2 GB in fp32), and the
line's data (400 identity chats, ~17k tokens) through it is hours of work on 2 CPU cores. So, honestly:
- the base is real and full size: random weights saved as `full_sft_2048.pth` (bf16, as MiniMind
  releases half-precision files) in a temporary save_dir ($MINILORA_OUT_DIR; the line has no --save_dir),
  with MiniMind's tokenizer beside it (the repo's own has another vocabulary, which the trainer refuses);
- the line runs as written, via bash + nohup, from a `trainer/` folder (the script symlinked from the
  repo) whose `../dataset/lora_identity.jsonl` holds 2 of the real identity chats, so one optimizer step
  is 2 samples, not 128 (batch 16 × accumulation 8);
- it is stopped with SIGTERM after its first optimizer step, and `--from_resume 1` (already in the line)
  must then pick up at the next step (the first step of a run is always logged, whatever --log_interval).
"""

import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from tests.train_utils import (
    REPO,
    lora_args,
    save_tiny_minimind,
    subprocess_env,
    tokenizer_dir,
    write_chat_data,
)

LINE = ('nohup python train_lora.py --epochs 20 --hidden_size 2048 --device "cuda:0" --batch_size 16 '
        '--learning_rate 1e-4 --accumulation_steps 8 --log_interval 10 --save_interval 100 '
        '--data_path ../dataset/lora_identity.jsonl --num_hidden_layers 20 --use_wandb --from_resume 1 '
        '--from_weight full_sft > train_lora.log 2>&1 &')


def _random_minimind_2048(path) -> int:
    """MiniMind 2048 × 20 with random N(0, 0.02) weights (tiled from one random block: generating 1B
    fresh normals costs more than the rest of the test) and unit norms; returns the parameter count."""
    config = MiniMindConfig(hidden_size=2048, num_hidden_layers=20, vocab_size=6400)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in MiniMindForCausalLM(config).state_dict().items()}
    block = torch.randn(1_000_003, generator=torch.Generator().manual_seed(0)).mul_(0.02).to(torch.bfloat16)
    state = {}
    for key, shape in shapes.items():
        if key == "lm_head.weight":
            continue
        n = math.prod(shape)
        state[key] = (block.repeat(n // block.numel() + 1)[:n].view(shape).clone() if len(shape) > 1
                      else torch.ones(shape, dtype=torch.bfloat16))
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied, like MiniMind's files
    torch.save(state, path)
    return sum(v.numel() for k, v in state.items() if k != "lm_head.weight")


def _run_line(workdir, env, stop_when: str, timeout: float = 900) -> str:
    """Run the line through bash; SIGTERM the training process once the log shows `stop_when`."""
    script = LINE.replace('"cuda:0"', "cpu") + "\necho $!\nwait $!\necho exit=$?\n"
    bash = subprocess.Popen(["bash", "-c", script], cwd=workdir, env=env, stdout=subprocess.PIPE, text=True)
    pid = int(bash.stdout.readline())
    log = workdir / "train_lora.log"
    deadline = time.monotonic() + timeout
    while not (log.is_file() and stop_when in log.read_text()):
        if bash.poll() is not None or time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL) if bash.poll() is None else None
            pytest.fail(f"never saw {stop_when!r}; log:\n{log.read_text()[-3000:] if log.is_file() else ''}")
        time.sleep(0.5)
    os.kill(pid, signal.SIGTERM)
    rest, _ = bash.communicate(timeout=timeout)
    text = log.read_text()
    assert "exit=0" in rest, text[-3000:]
    print(text)  # shown by pytest -s / on failure: the timings of a 1B model on this machine
    return text


@pytest.mark.slow
def test_minimind_nohup_line_runs_as_written(tmp_path):
    identity = REPO / "dataset" / "lora_identity.jsonl"
    if not identity.is_file() or not (REPO / "model" / "tokenizer" / "tokenizer.json").is_file():
        pytest.skip("needs dataset/lora_identity.jsonl and model/tokenizer/")
    out = tmp_path / "out"
    out.mkdir()
    n_params = _random_minimind_2048(out / "full_sft_2048.pth")
    assert 1.0e9 < n_params < 1.1e9
    for name in ("tokenizer.json", "tokenizer_config.json"):  # MiniMind's tokenizer beside its weights
        shutil.copyfile(tokenizer_dir() / name, out / name)
    work = tmp_path / "work"
    (work / "trainer").mkdir(parents=True)
    (work / "dataset").mkdir()
    (work / "trainer" / "train_lora.py").symlink_to(REPO / "trainer" / "train_lora.py")
    chats = sorted(identity.read_text().splitlines(), key=len)[:2]  # the two shortest real chats
    (work / "dataset" / "lora_identity.jsonl").write_text("\n".join(chats) + "\n")
    env = {**os.environ, "MINILORA_OUT_DIR": str(out), "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path),
           "WANDB_SILENT": "true"}
    resume_file = out / "lora_identity_2048_resume.pth"

    # First run: no resume file yet, so --from_resume 1 starts fresh. The first step is always logged;
    # SIGTERM then lands while the next step's data is fetched (stop at 1) or during step 2 (it finishes it).
    log = _run_line(work / "trainer", env, "step 1/20 | epoch 1")
    assert "--from_resume 1: no " in log and "starting a fresh run" in log
    assert "1059.2M parameters" in log and "warning: using the repo's tokenizer" not in log
    assert "SIGTERM received" in log
    first = int(re.search(r"stopped at step (\d+)/20; resume with:\n  (.+)", log).group(1))
    assert re.search(rf"^step {first}/20 \| epoch {first} \| loss \d+\.\d+", log, re.M)  # the final flush
    assert "--from_resume 1" in log.splitlines()[-1]
    resume = torch.load(resume_file, weights_only=False)
    assert resume["state"]["step"] == first and resume["state"]["epoch"] == first  # one step per epoch
    assert resume["trainable"] and all("lora_" in k for k in resume["trainable"])  # never the 4 GB base
    n_lora = sum(v.numel() for v in resume["trainable"].values())
    assert resume_file.stat().st_size < 3.2 * 4 * n_lora  # fp32 LoRA + two AdamW moments, nothing more
    assert resume["state"]["wandb_id"], "no wandb run was started: is wandb installed? (requirements-test.txt)"
    assert (out / "lora_identity_2048.pth").is_file() and (out / "lora_identity_2048" / "adapter_config.json").is_file()

    # The same line again: it resumes at the next step, in the same wandb run.
    log = _run_line(work / "trainer", env, f"step {first + 1}/20 | epoch {first + 1}")
    assert f"resuming from {resume_file}: step {first}, epoch {first + 1}" in log
    assert re.search(rf"^step {first + 1}/20 \| epoch {first + 1} \| loss \d+\.\d+", log, re.M)
    again = torch.load(resume_file, weights_only=False)["state"]
    assert again["step"] > first and again["wandb_id"] == resume["state"]["wandb_id"]
    assert [s for s, _ in again["history"]["train"]] == list(range(1, again["step"] + 1))


def _on_a_terminal(columns: int, save_dir) -> str:
    """The bare command on the demo, 3 steps, its output written to a pseudo-terminal `columns` wide."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen([sys.executable, str(REPO / "trainer" / "train_lora.py"), "--max_steps", "3",
                             "--log_interval", "1", "--max_seq_len", "128", "--data_cache", "none",
                             "--save_dir", str(save_dir)], stdout=slave, stderr=slave, cwd=REPO, env=env)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed its end
            break
        if not chunk:
            break
        out += chunk
    assert proc.wait(timeout=600) == 0, out.decode(errors="replace")[-2000:]
    os.close(master)
    return out.decode(errors="replace")


def test_a_terminal_gets_a_progress_bar_and_one_without_a_width_plain_lines(tmp_path):
    wide = _on_a_terminal(100, tmp_path / "a")
    assert "3/3 [" in wide and "\rstep " not in wide  # tqdm's bar, its postfix carrying the loss
    # Each count is shown with its own step's loss (log_interval 1), not the step before's. tqdm redraws at most
    # every 0.1 s, so on a fast machine a middle step may not be drawn at all; the last one always is.
    history = torch.load(tmp_path / "a" / "lora_identity_256_resume.pth", weights_only=False)["state"]["history"]
    shown = {int(k): loss for k, loss in re.findall(r"(\d)/3 \[[^\]]*?loss=([\d.]+)", wide)}
    losses = {step: f"{loss:.4f}" for step, loss in history["train"]}
    assert 3 in shown and shown.items() <= losses.items(), (shown, history["train"])
    # A pty that reports no width (`script -c`, some CI consoles): an empty bar would show nothing at all
    narrow = _on_a_terminal(0, tmp_path / "b")
    assert re.search(r"^step 3/3 \| epoch 1 \| loss \d", narrow, re.M), narrow[-2000:]


def test_a_background_run_says_how_to_stop_it(tmp_path):
    """`cmd &` in a script: bash ignores SIGINT for it, so Ctrl-C cannot stop it; the start-up line names the
    `kill <pid>` that does, and that SIGTERM saves and stops the run."""
    weight = save_tiny_minimind(tmp_path / "full_sft_64.pth")
    data = write_chat_data(tmp_path / "data.jsonl", 4)
    argv = lora_args(tmp_path, weight, data, epochs=1000, batch_size=2)
    log = tmp_path / "train.log"
    script = f"{shlex.join([sys.executable, str(REPO / 'trainer' / 'train_lora.py'), *argv])} > {log} 2>&1 &\n" \
             "echo $!\nwait $!\necho exit=$?\n"
    bash = subprocess.Popen(["bash", "-c", script], cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE,
                            text=True)
    pid = int(bash.stdout.readline())
    try:
        deadline = time.monotonic() + 120
        while not (log.is_file() and "step 1/" in log.read_text()):
            assert bash.poll() is None and time.monotonic() < deadline, log.read_text() if log.is_file() else ""
            time.sleep(0.5)
        text = log.read_text()
        assert f"per epoch); `kill {pid}` stops after the current step and saves" in text, text
        assert "Ctrl-C" not in text
        os.kill(pid, signal.SIGTERM)
        rest, _ = bash.communicate(timeout=120)
    finally:
        if bash.poll() is None:
            os.kill(pid, signal.SIGKILL)
    text = log.read_text()
    assert "exit=0" in rest and f"(a second `kill {pid}` aborts without saving)" in text, text[-2000:]
    assert re.search(r"^stopped at step \d+/", text, re.M), text[-2000:]
