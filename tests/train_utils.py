"""Shared pieces of the trainer tests: a tiny MiniMind on disk, tiny chat data, in-process runs."""

import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from model.model_minimind import MiniMindConfig, MiniMindForCausalLM

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
TOKENIZER = FIXTURES / "tokenizers" / "minimind"

QUESTIONS = ["hello", "who", "are", "you", "what", "is", "this", "name", "please", "tell", "me"]
ANSWERS = ["I", "am", "a", "small", "model", "made", "to", "help", "with", "questions", "today"]


@contextlib.contextmanager
def small_disk(folder: Path, size: str, ran_before: str = "") -> Iterator[Path]:
    """A real nearly full disk: a tmpfs of `size` mounted at `folder` for the with-block (the test is skipped where
    mounting is not permitted; `ran_before` says what it checked before). Unmounted lazily after: a C++ compiler
    that Inductor started may outlive a run by a few seconds."""
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                      capture_output=True).returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here{ran_before}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


def tokenizer_dir() -> Path:
    """MiniMind's real tokenizer from the shared fixtures (skip the test without it)."""
    if not (TOKENIZER / "tokenizer.json").is_file():
        pytest.skip(f"fixtures not found at {TOKENIZER}")
    return TOKENIZER


def fill_random(params: Iterable[torch.Tensor], seed: int = 1, scale: float = 0.1) -> None:
    """Overwrite `params`, in order, with N(0, scale²) values from a generator seeded with `seed`: LoRA weights
    that are not zero (a fresh B is 0, which would hide every scale, key and gradient mistake)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def tiny_lm(family: str, vocab_size: int = 100) -> torch.nn.Module:
    """A random 2-layer causal LM (seed 0) in eval mode: transformers' Qwen3 ("qwen3") or MiniMind ("minimind")."""
    torch.manual_seed(0)
    if family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             head_dim=16, attn_implementation="sdpa"))
    else:
        model = MiniMindForCausalLM(MiniMindConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2))
    return model.eval()


def tiny_config(**over: object) -> MiniMindConfig:
    """A minimind-3 model small enough for 2 CPU cores, with MiniMind's 6400-token vocabulary."""
    kw = dict(generation=3, vocab_size=6400, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
    return MiniMindConfig(**{**kw, **over})


def save_tiny_minimind(path: Path, seed: int = 0, **over: object) -> Path:
    """A random tiny MiniMind saved as a plain state-dict .pth (MiniMind's own format)."""
    torch.manual_seed(seed)
    model = MiniMindForCausalLM(tiny_config(**over))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def write_chat_data(path: Path, n: int, seed: int = 0, max_words: int = 14) -> Path:
    """n MiniMind-format conversations of clearly different lengths."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            q = " ".join(rng.choice(QUESTIONS) for _ in range(rng.randint(1, max_words)))
            a = " ".join(rng.choice(ANSWERS) for _ in range(rng.randint(1, max_words)))
            f.write(json.dumps({"conversations": [{"role": "user", "content": q},
                                                  {"role": "assistant", "content": a}]}) + "\n")
    return path


def lora_args(tmp: Path, weight: Path, data: Path, **flags: object) -> list[str]:
    """Flags for a tiny CPU LoRA run writing into tmp/out."""
    base = {"from_weight": weight, "save_dir": tmp / "out", "data_path": data, "tokenizer_path": tokenizer_dir(),
            "device": "cpu", "num_workers": 0, "log_interval": 1, "lora_rank": 4, "seed": 1}
    argv = []
    for key, value in {**base, **flags}.items():
        argv += [f"--{key}", str(value)]
    return argv


def run_inprocess(main: object, argv: list[str]) -> int:
    """Run a job's main() exactly as the script's entry point does; return the exit status."""
    from trainer.job import run_job

    with pytest.raises(SystemExit) as exc:
        run_job(partial(main, argv))
    return exc.value.code


def python() -> str:
    """The interpreter running the tests (for subprocess runs)."""
    return sys.executable


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a job run as a subprocess: this checkout first on the path (an editable install
    may point at another copy of the repo) and one thread per process (several ranks share 2 cores)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


def torchrun(*args: str) -> list[str]:
    """`torchrun <args>` through this interpreter."""
    return [python(), "-m", "torch.distributed.run", *args]


def free_port() -> int:
    """A TCP port that nothing listens on right now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Finished:
    """A subprocess run to its end: exit status, merged output, seconds, and seconds from `mark` to exit."""

    returncode: int
    output: str
    seconds: float
    exit_lag: float | None  # None when no line started with the mark


def run_timed(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 240,
              mark: str = "done: ") -> Finished:
    """Run `cmd`, timestamping its output lines, so a test can say how fast it exits after the first line
    that starts with `mark` (by default, the line a finished run prints)."""
    timeout = scaled(timeout)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed = threading.Event()
    killer = threading.Timer(timeout, lambda: (killed.set(), proc.kill()))
    killer.start()
    lines, done_at = [], None
    for line in proc.stdout:
        lines.append(line)
        if done_at is None and line.startswith(mark):
            done_at = time.monotonic()
    proc.wait()
    killer.cancel()
    end = time.monotonic()
    if killed.is_set():
        fail_slow(cmd, timeout, "".join(lines))
    return Finished(proc.returncode, "".join(lines), end - start, None if done_at is None else end - done_at)


def scaled(timeout: float) -> float:
    """A test's time limit times $MINILORA_TEST_TIMEOUT_SCALE (default 1), for machines slower than 2 free cores."""
    return timeout * float(os.environ.get("MINILORA_TEST_TIMEOUT_SCALE", "1"))


def fail_slow(cmd: list[str], timeout: float, output: str) -> None:
    """Fail with a message that says the command was too slow, not that it was wrong."""
    pytest.fail(f"{' '.join(map(str, cmd))} did not finish within {timeout:.0f} s; on a slow or busy machine set "
                f"MINILORA_TEST_TIMEOUT_SCALE=3 (say). Output so far:\n{output[-3000:]}", pytrace=False)


def run_cli(cmd: list[str], timeout: float, **kwargs: object) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True)` whose time-out is a clear test failure."""
    timeout = scaled(timeout)
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"") + (err.stderr or b"")
        fail_slow(cmd, timeout, out.decode(errors="replace") if isinstance(out, bytes) else out)


# A job launcher for fault and data tests: runs trainer/train_lora.py's main() as its entry point does,
# after wrapping the engine's step so that rank 1 raises at step $FAIL_AT (and rank 0 is stuck for 5 minutes
# at step $STUCK_AT, as a rank waiting in an NCCL collective for a dead peer would be), and recording every
# sample key this rank loads into $KEYS_FILE.<rank>. Its pid goes to $PID_FILE.<rank>.
LAUNCHER = '''
import os
import sys
import time

import trainer.data
import trainer.train_lora as job
from trainer.job import run_job

rank = os.environ.get("RANK", "0")
if os.environ.get("PID_FILE"):
    with open(f"{os.environ['PID_FILE']}.{rank}", "w") as f:
        f.write(str(os.getpid()))

fail_at, stuck_at = int(os.environ.get("FAIL_AT", "0")), int(os.environ.get("STUCK_AT", "0"))
real_step, steps = job.train_step, 0


def train_step(*args, **kwargs):
    global steps
    steps += 1
    if rank == "1" and steps == fail_at:
        raise RuntimeError(f"injected failure in step call {steps}")
    if rank == "0" and steps == stuck_at:
        time.sleep(300)
    return real_step(*args, **kwargs)


job.train_step = train_step

if os.environ.get("KEYS_FILE"):
    real_getitem = trainer.data._Keyed.__getitem__
    keys = open(f"{os.environ['KEYS_FILE']}.{rank}", "w", buffering=1)

    def getitem(self, key):
        keys.write(f"{key[0]} {int(key[1])}\\n")
        return real_getitem(self, key)

    trainer.data._Keyed.__getitem__ = getitem

run_job(lambda: job.main(sys.argv[1:]))
'''


def write_launcher(folder: Path) -> Path:
    """LAUNCHER as a script file in `folder`."""
    path = folder / "launch_lora.py"
    path.write_text(LAUNCHER)
    return path


def read_keys(prefix: Path, rank: int) -> list[tuple[int, bool]]:
    """The (sample index, live) keys a LAUNCHER run's rank loaded, in order."""
    path = prefix.parent / f"{prefix.name}.{rank}"
    return [(int(i), live == "1") for i, live in (line.split() for line in path.read_text().splitlines())]


def alive(pid: int) -> bool:
    """True while process `pid` exists and is not a zombie (Linux /proc)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"
