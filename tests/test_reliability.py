"""The trainer under attack: divergence, kills during saves, a full disk, hazardous save dirs, corrupt and
mismatched files, nonsense flags, concurrent runs, and an exit with loader workers alive.

Every bad input must end in a one-line `error:` naming the file or flag, exit status 2 and no traceback;
no attack may change or lose a good file. Runs go through the scripts' own entry point in this process
(tiny model, tiny data); only kills and the exit check use child processes. The module ends by printing
one line: kills survived, bad inputs tried, tracebacks, files lost.
"""

import contextlib
import hashlib
import json
import math
import os
import random
import re
import resource
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from model.atomic import SaveError, atomic_write_bytes
from model.model_lora import apply_lora, load_lora, lora_parameters, save_lora
from model.model_minimind import MiniMindForCausalLM
from tests.test_dataset_errors import FORMATS, TOOL_FORMATS, mutated
from tests.train_utils import (
    REPO,
    lora_args,
    python,
    run_cli,
    run_inprocess,
    run_timed,
    save_tiny_minimind,
    small_disk,
    subprocess_env,
    tiny_config,
    tokenizer_dir,
    torchrun,
    write_chat_data,
)
from trainer.checkpoint import (
    TrainState,
    atomic_save,
    load_resume,
    save_resume,
    write_dir,
    write_json,
    write_together,
)
from trainer.guard import DivergenceGuard, TrainingDiverged
from trainer.save_dir import LORA_OUTPUTS, SaveDirError, lock_run, release_locks, remove_leftovers
from trainer.train_lora import main

TALLY = {"kills survived": 0, "bad inputs tried": 0, "tracebacks": 0, "files lost": 0}
STEM = "lora_identity_64"


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    """Print the module's one summary line, whatever the capture mode."""
    yield
    line = "reliability: " + ", ".join(f"{k} {v}" for k, v in TALLY.items())
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        print(f"\n{line}", flush=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny base, data, and a finished good run (2 epochs of 2 steps) whose files the attacks must keep."""
    tokenizer_dir()
    tmp = tmp_path_factory.mktemp("reliability")
    weight = save_tiny_minimind(tmp / "full_sft_64.pth")
    data = write_chat_data(tmp / "data.jsonl", 8)
    good = tmp / "good"
    flags = dict(batch_size=4, epochs=2, learning_rate=2e-2, lora_targets="q_proj,v_proj")
    assert run_inprocess(main, lora_args(tmp, weight, data, save_dir=good, **flags)) == 0
    assert not (good / f"{STEM}.lock").exists()  # let go when main() returned: a later run may start at once
    return tmp, weight, data, good, flags


def snapshot(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under `folder` (the lock file aside), by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


def copy_run(good: Path, to: Path) -> Path:
    """A copy of the good run's save dir to attack."""
    shutil.copytree(good, to)
    return to


def refused(argv: list[str], capsys, *needles: str) -> str:
    """Run the trainer on a bad input: exit 2, one `error:` line naming `needles`, no traceback, no training."""
    TALLY["bad inputs tried"] += 1
    code = run_inprocess(main, argv)
    out, err = capsys.readouterr()
    TALLY["tracebacks"] += "Traceback" in out + err
    assert code == 2, out[-2000:] + err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not any(line.startswith("step ") for line in out.splitlines()), "it trained before refusing"
    return lines[0]


def kept(before: dict[str, str], folder: Path) -> None:
    """Every file of `before` is still in `folder`, byte for byte."""
    after = snapshot(folder)
    lost = [name for name, digest in before.items() if after.get(name) != digest]
    TALLY["files lost"] += len(lost)
    assert not lost, lost


# ------------------------------------------------------------------------- divergence

def test_divergence_never_replaces_the_good_checkpoint(run, tmp_path, capsys):
    tmp, weight, data, good, flags = run
    out = copy_run(good, tmp_path / "out")
    before = snapshot(out)
    # Resumed at a learning rate of 1e4 (weight decay off, or the flag check stops it first), saving every step.
    argv = lora_args(tmp, weight, data, save_dir=out, **{**flags, "epochs": 5, "learning_rate": 1e4,
                                                         "weight_decay": 0, "save_interval": 1})
    TALLY["bad inputs tried"] += 1
    assert run_inprocess(main, argv + ["--from_resume", "1"]) == 2
    printed, err = capsys.readouterr()
    assert "note: --learning_rate was 0.02" in printed
    assert "not saving" in err and f"{out / STEM}_resume.pth (step 4)" in err and "Traceback" not in err, err
    kept(before, out)
    # ... and the checkpoint it points at is good: the run continues from it at a sane rate.
    assert run_inprocess(main, lora_args(tmp, weight, data, save_dir=out, **{**flags, "epochs": 3})
                         + ["--from_resume", "1"]) == 0
    assert "resuming from" in capsys.readouterr().out


def test_guard_spots_a_collapse_and_vets_saves(tmp_path):
    params = [torch.nn.Parameter(torch.ones(4, 4))]
    guard = DivergenceGuard(6400, params, [(s, 2.0 - 0.01 * s) for s in range(1, 21)], tmp_path / "r.pth", step=20)
    lines: list[str] = []
    guard.check([(21, 1.7, 0.5)], lines.append, check_grads=True)
    assert guard.vet_save(21, params) is None
    guard.saved(21, params)
    # One high batch is noise; a loss that stays far above the last good save's skips the save, the run goes on
    guard.check([(22, 9.0, 0.5)], lines.append, check_grads=True)
    assert guard.vet_save(22, params) is None
    guard.check([(s, 6.0, 0.5) for s in range(23, 43)], lines.append, check_grads=True)
    assert "the mean loss of the last 20 logged steps, 6.0000, is far above" in guard.vet_save(42, params)
    # Uniform output with a zero gradient: a collapse, whatever the loss's finiteness.
    with pytest.raises(TrainingDiverged, match=r"collapsed.*ln\(vocab\) = 8.7641.*r.pth \(step 21\)"):
        guard.check([(43, math.log(6400), 0.0)], lines.append, check_grads=True)
    for bad in (float("nan"), 7e4):  # non-finite, and beyond float16 (the .pth would hold inf)
        with torch.no_grad():
            params[0][0, 0] = bad
        with pytest.raises(TrainingDiverged, match=r"not saving.*step 21"):
            guard.vet_save(44, params)


class _Log:
    """What allow_save needs of RunLogger: the rows not yet shown, and a line to write."""

    def __init__(self, rows: list[tuple[int, float, float]]) -> None:
        self.rows, self.lines = rows, []

    def flush(self) -> list[tuple[int, float, float]]:
        rows, self.rows = self.rows, []
        return rows

    def write(self, line: str) -> None:
        self.lines.append(line)


def test_a_healthy_run_whose_first_batch_was_easy_is_saved():
    # The first batch one the base already knows (loss 0.0002), the rest the usual noise of batches of one sample
    params = [torch.nn.Parameter(torch.ones(4, 4))]
    losses = [0.0002, 8.3] + [3.0 + (s % 5) * 0.5 for s in range(3, 401)]
    guard = DivergenceGuard(6400, params, [], None)
    log = _Log([(s, loss, 1.0) for s, loss in enumerate(losses, 1)])
    assert guard.allow_save(400, params, log, final=True, check_grads=True) and log.lines == []
    # A fresh run that really did climb: its final save is kept, with a warning, when no earlier one exists
    guard = DivergenceGuard(6400, params, [], None)
    log = _Log([(s, 1.0 if s <= 20 else 9.0, 1.0) for s in range(1, 61)])
    assert guard.allow_save(60, params, log, final=True, check_grads=True)
    assert "saved all the same, as no earlier checkpoint of this run exists" in log.lines[0]
    # ... and refused, keeping the earlier one, when there is one
    log.rows = [(s, 25.0, 1.0) for s in range(61, 81)]
    with pytest.raises(TrainingDiverged, match="far above the 9.0000 of the last good save"):
        guard.allow_save(80, params, log, final=True, check_grads=True)


# ------------------------------------------------------------------------- kills during saves

def _save_forever(folder: Path, seed: int) -> None:
    """Child process: write a run's files over and over (each time with new weights), as fast as it can."""
    torch.manual_seed(seed)
    model = MiniMindForCausalLM(tiny_config())
    apply_lora(model, rank=4, targets="q_proj,v_proj")
    params = lora_parameters(model)
    opt = torch.optim.AdamW(params)
    stem = folder / STEM
    folder.mkdir(parents=True, exist_ok=True)
    step = 0

    def write_files(out: Path) -> None:  # as the trainer's save() does
        save_lora(model, out.with_name(STEM + ".pth"))
        save_lora(model, out)
        write_json(out.with_name(STEM + ".json"), {"step": step})
        save_resume(out.with_name(STEM + "_resume.pth"), {n: p.detach() for n, p in model.named_parameters()
                                                          if p.requires_grad}, opt, None, TrainState(step=step), [], {})

    while True:
        step += 1
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
        write_together(stem, write_files)


def test_sigkill_during_saves_leaves_only_whole_files(tmp_path):
    folder = tmp_path / "out"
    rng = random.Random(0)
    for kill in range(12):
        pid = os.fork()
        if pid == 0:  # the child never returns to pytest
            try:
                torch.set_num_threads(1)
                _save_forever(folder, kill)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.2, 0.8))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if not (folder / f"{STEM}_resume.pth").is_file():
            continue  # killed before its first whole round of saves
        # What a kill left half-written is hidden under unique names; the next run (lock, then clean up)
        # removes it, and puts back a PEFT folder the kill caught moved aside.
        lock = lock_run(folder / STEM)
        remove_leftovers(folder / STEM, LORA_OUTPUTS)
        lock.release()
        assert not [p for p in folder.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]
        # Every file at its final name is whole: it loads (and the resume file's checksum matches). The set is one
        # save's, or, where the kill came among the renames, the resume file is the older one (a resume redoes it).
        resume = load_resume(folder / f"{STEM}_resume.pth")
        assert resume["trainable"]
        for path in (folder / f"{STEM}.pth", folder / STEM):
            assert load_lora(MiniMindForCausalLM(tiny_config()), path)
        assert json.loads((folder / f"{STEM}.json").read_text())["step"] in (resume["state"]["step"],
                                                                             resume["state"]["step"] + 1)
        TALLY["kills survived"] += 1
    assert TALLY["kills survived"] >= 6


# ------------------------------------------------------------------------- the disk and the save dir

def test_full_disk_says_so_and_keeps_the_old_file(run, tmp_path, capsys):
    tmp, weight, data, good, flags = run
    target = tmp_path / "x.pth"
    atomic_save({"old": torch.zeros(3)}, target)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, hard))  # python ignores SIGXFSZ: writes fail EFBIG
    try:
        with pytest.raises(SaveError, match=rf"{target}: the disk is full or a file-size limit.*MiB free"):
            atomic_save({"new": torch.zeros(100_000)}, target)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    TALLY["bad inputs tried"] += 1
    assert torch.equal(torch.load(target)["old"], torch.zeros(3)) and os.listdir(tmp_path) == ["x.pth"]

    # A whole run into a small tmpfs: the resume file does not fit.
    with small_disk(tmp_path / "small", "32k", " (the RLIMIT_FSIZE part above ran)") as mnt:
        try:
            argv = lora_args(tmp, weight, data, save_dir=mnt, **{**flags, "epochs": 1})
            TALLY["bad inputs tried"] += 1
            assert run_inprocess(main, argv) == 2
            out, err = capsys.readouterr()
            assert "the disk is full" in err and "Traceback" not in err, err
            assert not [p for p in mnt.iterdir() if p.name.startswith(".")]  # no partial temp file
            load_resume(mnt / f"{STEM}_resume.pth")  # none, or a whole one: --from_resume 1 works either way
        finally:
            release_locks()  # the run's lock file is open on the mount


def test_a_save_the_disk_cannot_hold_leaves_the_previous_save_whole(run, tmp_path, capsys):
    """The first save (about 72 KiB in all) fits a 112 KiB tmpfs, the second does not (its files are written beside
    the first's until all are there): the first set stays, every file of it from step 1, and the error names the
    save dir."""
    tmp, weight, data, _, flags = run
    with small_disk(tmp_path / "small", "112k") as mnt:
        try:
            argv = lora_args(tmp, weight, data, save_dir=mnt, **{**flags, "epochs": 1, "save_interval": 1})
            assert run_inprocess(main, argv) == 2
            err = capsys.readouterr().err
            assert f"error: {mnt}: the disk is full or a file-size limit was hit while saving {STEM}'s files" in err
            assert "The files of the previous save are unchanged" in err and "Traceback" not in err
            resume = load_resume(mnt / f"{STEM}_resume.pth")
            assert resume["state"]["step"] == 1
            assert json.loads((mnt / f"{STEM}.json").read_text())["step"] == 1
            trained = {k: v.half() * 1 for k, v in resume["trainable"].items()}
            model = MiniMindForCausalLM(tiny_config())
            for path in (mnt / f"{STEM}.pth", mnt / STEM):  # both hold step 1's factors
                load_lora(model, path)
                for key, value in trained.items():
                    torch.testing.assert_close(dict(model.named_parameters())[key].detach().half(), value,
                                               atol=1e-3, rtol=1e-3)
            assert not [p for p in mnt.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")]
        finally:
            release_locks()


def test_generated_malformed_data_stops_or_skips_by_file_line(run, tmp_path, capsys):
    """200 generated records (every data format, tool calls), each with one value broken, fed to the trainer:
    without --skip_bad_data it stops before training with file:line errors; with it, the bad lines are
    counted and the run trains on the rest. Never a traceback."""
    tmp, weight, data, _, flags = run
    rng = random.Random(1)
    records = [*FORMATS.values(), *TOOL_FORMATS.values()]
    variants = [json.dumps(mutated(rng.choice(records), rng)) for _ in range(200)]
    path = tmp_path / "variants.jsonl"
    path.write_text("\n".join([*data.read_text().splitlines(), *variants]) + "\n")
    TALLY["bad inputs tried"] += len(variants)
    argv = lora_args(tmp, weight, path, save_dir=tmp_path / "out", **{**flags, "epochs": 1})
    code = run_inprocess(main, argv)
    out, err = capsys.readouterr()
    TALLY["tracebacks"] += "Traceback" in out + err
    assert code == 2 and f"{path}:" in err and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "out" / f"{STEM}.pth").exists()
    code = run_inprocess(main, [*argv, "--skip_bad_data", "1"])
    out, err = capsys.readouterr()
    TALLY["tracebacks"] += "Traceback" in out + err
    assert code == 0 and "Traceback" not in out + err, (out + err)[-2000:]
    assert (tmp_path / "out" / f"{STEM}.pth").is_file()


def test_hazardous_save_dirs_are_refused_before_training(run, tmp_path, capsys):
    tmp, weight, data, good, flags = run

    def argv(**over: object) -> list[str]:
        return lora_args(tmp, weight, data, **{**flags, "epochs": 1, **over})

    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    refused(argv(save_dir=a_file), capsys, "--save_dir", "is a file")
    refused(argv(save_dir=a_file / "sub"), capsys, "--save_dir")
    refused(argv(save_dir=tmp_path / "o", lora_name="../../x"), capsys, "--lora_name", "plain file name")
    clash = tmp_path / "clash"
    (clash / f"{STEM}.pth").mkdir(parents=True)
    refused(argv(save_dir=clash), capsys, f"{STEM}.pth exists as a folder")
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", str(ro)],
                      capture_output=True).returncode == 0:
        try:
            refused(argv(save_dir=ro), capsys, f"--save_dir {ro} is not writable")
        finally:
            release_locks()
            subprocess.run(["umount", str(ro)], check=True)

    # A planted symlink at the old fixed temp name, and a user's own `<stem>.old/` and `<stem>.tmp/`, are
    # never written through or deleted; the files are readable by other users (0644 under umask 022).
    out = tmp_path / "planted"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (out / f"{STEM}.pth.tmp").symlink_to(victim)
    for name in (f"{STEM}.old", f"{STEM}.tmp"):
        (out / name).mkdir()
        (out / name / "mine.txt").write_text("mine")
    old_umask = os.umask(0o022)
    try:
        assert run_inprocess(main, argv(save_dir=out)) == 0
    finally:
        os.umask(old_umask)
    capsys.readouterr()
    assert victim.read_text() == "keep me" and (out / f"{STEM}.old" / "mine.txt").is_file()
    assert (out / f"{STEM}.tmp" / "mine.txt").is_file()
    for path in (out / f"{STEM}.pth", out / STEM / "adapter_model.safetensors", out / f"{STEM}_resume.pth"):
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_two_runs_on_one_save_dir(run, tmp_path, capsys):
    tmp, weight, data, good, flags = run
    out = copy_run(good, tmp_path / "out")
    before = snapshot(out)
    holder = subprocess.Popen([python(), "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(out / (STEM + '.lock'))!r}, os.O_RDWR | os.O_CREAT)\n"
                               "fcntl.lockf(fd, fcntl.LOCK_EX)\nos.write(fd, b'pid 4242 on elsewhere')\n"
                               "print('locked', flush=True)\ntime.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        refused(lora_args(tmp, weight, data, save_dir=out, **flags) + ["--from_resume", "1"], capsys,
                "another run (pid 4242 on elsewhere)", "--lora_name or --save_dir")
    finally:
        holder.kill()
        holder.wait()
    kept(before, out)
    # The holder died: its lock went with it (a killed run never blocks the next) ...
    held = lock_run(out / STEM)
    pid = os.fork()
    if pid == 0:  # ... and now this process holds it: another one is refused
        try:
            lock_run(out / STEM)
            os._exit(0)
        except SaveDirError:
            os._exit(3)
        finally:
            os._exit(1)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 3
    held.release()
    assert not (out / f"{STEM}.lock").exists()  # a finished run leaves no lock file


_KILLED_HOLDER = """
import os, signal, sys, time
from pathlib import Path
from trainer.save_dir import lock_run

lock = lock_run(Path(sys.argv[1]))
if os.fork() == 0:  # a DataLoader worker: forked after the lock, still alive for a while after its parent dies
    Path(sys.argv[2]).write_text(str(os.getpid()))
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    time.sleep(60)
    os._exit(0)
while not Path(sys.argv[2]).exists():
    time.sleep(0.01)
print("locked", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_runs_lock_is_free_at_once_though_its_workers_live_on(tmp_path):
    # kill -9 of a run, then its resume at once: the orphaned loader workers must not keep the run locked
    worker = tmp_path / "worker.pid"
    holder = subprocess.run([python(), "-c", _KILLED_HOLDER, str(tmp_path / STEM), str(worker)],
                            capture_output=True, text=True, timeout=60)
    orphan = int(worker.read_text())
    try:
        assert holder.stdout.strip() == "locked" and holder.returncode == -signal.SIGKILL, holder.stderr
        os.kill(orphan, 0)  # still alive
        lock_run(tmp_path / STEM).release()
    finally:
        os.kill(orphan, signal.SIGKILL)


# ------------------------------------------------------------------------- corrupt and mismatched files

def test_corrupt_resume_files_are_refused(run, tmp_path, capsys):
    tmp, weight, data, good, flags = run
    resume = good / f"{STEM}_resume.pth"
    raw = resume.read_bytes()
    flipped = bytearray(raw)
    ckpt = torch.load(resume, weights_only=False)
    # Flip bytes inside a tensor's data: the zip still reads, only the checksum notices.
    first = next(iter(ckpt["trainable"].values()))
    needle = first.reshape(-1)[:4].numpy().tobytes()
    at = raw.index(needle)
    flipped[at:at + 4] = bytes(b ^ 0xFF for b in flipped[at:at + 4])
    cases = {
        "truncated": (raw[: len(raw) // 2], "cannot read the resume file"),
        "text": (b"hello\n", "cannot read the resume file"),
        "a LoRA .pth": ((good / f"{STEM}.pth").read_bytes(), "only LoRA weights"),
        "MiniMind's resume": (None, "MiniMind's own resume checkpoint"),
        "a list": (None, "holds a list"),
        "bit flips": (bytes(flipped), "checksum does not match"),
    }
    for name, (content, needle) in cases.items():
        out = tmp_path / name.replace(" ", "_").replace("'", "")
        out.mkdir()
        if name == "MiniMind's resume":
            torch.save({"model": {}, "optimizer": {}, "epoch": 0, "step": 3, "world_size": 1}, out / resume.name)
        elif name == "a list":
            torch.save([1, 2], out / resume.name)
        else:
            (out / resume.name).write_bytes(content)
        line = refused(lora_args(tmp, weight, data, save_dir=out, **flags) + ["--from_resume", "1"], capsys,
                       needle)
        assert str(out / resume.name) in line


def test_corrupt_base_and_wrong_tokenizer_are_refused(run, tmp_path, capsys):
    tmp, weight, data, good, flags = run
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(weight.read_bytes()[:5000])
    text = tmp_path / "text.pth"
    text.write_text("this is not a checkpoint\n")
    for bad in (truncated, text):
        refused(lora_args(tmp, bad, data, save_dir=tmp_path / "o", **flags), capsys, str(bad),
                "cannot be read as a PyTorch state dict")
    # A 6400-token MiniMind without --tokenizer_path: the repo's own tokenizer has another vocabulary.
    argv = lora_args(tmp, weight, data, save_dir=tmp_path / "o", **flags)
    at = argv.index("--tokenizer_path")
    refused(argv[:at] + argv[at + 2:], capsys, "vocabulary has 6400 tokens", "--tokenizer_path")


def test_files_that_are_no_base_lora_or_tokenizer_say_what_they_are(run, tmp_path, capsys):
    tmp, weight, data, good, flags = run
    out = tmp_path / "o"
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"x")  # never read: as a .pth it would load as MiniMind with guessed sizes
    resume, adapter = good / f"{STEM}_resume.pth", good / STEM
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    resume_words = f"a resume file (the LoRA with its optimizer and random-generator state), not a LoRA or model " \
                   f"file; the LoRA is beside it as {STEM}.pth and {STEM}/"
    for argv, needles in [
        (lora_args(tmp, hf / "model.safetensors", data, save_dir=out, **flags), [f"a file of the model directory {hf}"]),
        (lora_args(tmp, hf / "config.json", data, save_dir=out, **flags), ["pass the directory"]),
        (lora_args(tmp, adapter, data, save_dir=out, **flags), ["a LoRA adapter, not a base model", "--lora_path"]),
        (lora_args(tmp, resume, data, save_dir=out, **flags), [str(resume), resume_words]),
        (lora_args(tmp, weight, data, save_dir=out, init_lora=resume, **flags), [resume_words]),
        (lora_args(tmp, weight, data, save_dir=out, init_lora=adapter / "adapter_model.safetensors", **flags),
         [f"not a file of one: pass the folder {adapter}"]),
        (lora_args(tmp, weight, data, save_dir=out, init_lora=empty, **flags), [f"{empty}: ", "the file is empty"]),
        (lora_args(tmp, weight, data, save_dir=out, **{**flags, "tokenizer_path": tokenizer_dir() / "tokenizer.json"}),
         ["a file; --tokenizer_path takes a folder", f"pass {tokenizer_dir()}"]),
        (lora_args(tmp, weight, data, save_dir=out, **{**flags, "tokenizer_path": tmp_path}), ["holds no tokenizer"]),
    ]:
        line = refused(argv, capsys, *needles)
        assert "weights_only" not in line and "Traceback" not in line
    assert not out.exists()


def test_a_fresh_run_over_an_earlier_one_says_so_at_start(run, tmp_path, capsys):
    # The command run again without --from_resume 1: the earlier run's files are replaced at the first save
    tmp, weight, data, good, flags = run
    out = copy_run(good, tmp_path / "out")
    assert run_inprocess(main, lora_args(tmp, weight, data, save_dir=out, **{**flags, "max_steps": 1})) == 0
    printed = capsys.readouterr().out
    note = next(line for line in printed.splitlines() if line.startswith("note: ") and "earlier run" in line)
    assert f"{out / STEM}_resume.pth holds an earlier run (saved " in note and "add --from_resume 1" in note
    assert printed.index(note) < printed.index("step 1/1")

def test_resume_takes_the_same_settings_spelled_otherwise_and_refuses_another_base(run, tmp_path, capsys):
    tmp, weight, data, good, flags = run
    out = copy_run(good, tmp_path / "out")
    # alpha left to its default (the rank) and the same layers in another order: the same run
    same = {**flags, "lora_alpha": 4, "lora_targets": "v_proj,q_proj", "epochs": 3}
    assert run_inprocess(main, lora_args(tmp, weight, data, save_dir=out, **same) + ["--from_resume", "1"]) == 0
    assert "resuming from" in capsys.readouterr().out
    # The same base by another path: a note; a base of another shape (3 layers, not 2): refused
    alias = tmp_path / "alias.pth"
    alias.symlink_to(weight)
    copy_run(good, tmp_path / "out2")
    assert run_inprocess(main, lora_args(tmp, alias, data, save_dir=tmp_path / "out2", **{**flags, "epochs": 3})
                         + ["--from_resume", "1"]) == 0
    assert "note: the run that wrote" not in capsys.readouterr().out  # the same file by another name
    copied = tmp_path / "copy" / weight.name
    copied.parent.mkdir()
    shutil.copy(weight, copied)
    assert run_inprocess(main, lora_args(tmp, copied, data, save_dir=copy_run(good, tmp_path / "out4"),
                                         **{**flags, "epochs": 3}) + ["--from_resume", "1"]) == 0
    assert f"trained on {weight.resolve()}; it continues on {copied}, a base of the same shape" in \
        capsys.readouterr().out
    other = save_tiny_minimind(tmp_path / "other" / weight.name, num_hidden_layers=3)
    argv = lora_args(tmp, other, data, save_dir=copy_run(good, tmp_path / "out3"), **flags) + ["--from_resume", "1"]
    refused(argv, capsys, "the base model (--from_weight", "is another one: num_hidden_layers 2 -> 3")


def test_resume_without_from_weight_refuses_a_default_base_other_than_the_runs(run, tmp_path, capsys):
    """The run trained on a named base; the same command without --from_weight would take MiniMind's default
    {save_dir}/full_sft_64.pth, a file of the same shape: refused, with the base to name."""
    tmp, weight, data, good, flags = run
    out = copy_run(good, tmp_path / "out")
    shutil.copy(weight, out / "full_sft_64.pth")
    argv = lora_args(tmp, weight, data, save_dir=out, **flags)
    i = argv.index("--from_weight")
    argv = argv[:i] + argv[i + 2:] + ["--hidden_size", "64", "--from_resume", "1"]
    refused(argv, capsys, f"the run that wrote it trained on {weight.resolve()}; without --from_weight this command "
                          f"would continue on {out / 'full_sft_64.pth'}. Pass --from_weight {weight.resolve()}")


def test_a_symlinked_output_folder_is_refused_before_training(run, tmp_path, capsys):
    tmp, weight, data, _, flags = run
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (out / STEM).symlink_to(tmp_path / "elsewhere")
    refused(lora_args(tmp, weight, data, save_dir=out, **flags), capsys,
            f"{out / STEM} is a symbolic link, and each save replaces this folder whole")


def test_resume_refuses_changed_math_or_data(run, tmp_path, capsys):
    tmp, weight, data, good, flags = run
    shorter = write_chat_data(tmp_path / "short.jsonl", 3)
    for change, needle in ((dict(lora_alpha=64), "--lora_alpha"), (dict(lora_dropout=0.1), "--lora_dropout"),
                           (dict(batch_size=2), "samples per optimizer step"), (dict(max_seq_len=64), "--max_seq_len"),
                           (dict(lora_targets="q_proj"), "--lora_targets"), (dict(data_path=shorter), "3 training samples"),
                           (dict(group_by_length=1), "--group_by_length")):
        argv = lora_args(tmp, weight, data, save_dir=good, **{**flags, **change}) + ["--from_resume", "1"]
        refused(argv, capsys, needle, "cannot continue this run with changed settings")
    # alpha left to the rank: the rank's change is the one named
    line = refused(lora_args(tmp, weight, data, save_dir=good, **{**flags, "lora_rank": 8}) + ["--from_resume", "1"],
                   capsys, "changed settings: --lora_rank 4 -> 8. Put them back")
    assert "--lora_alpha" not in line


# ------------------------------------------------------------------------- flags

BAD_FLAGS = [
    ("num_workers", -1), ("device", "tpu9"), ("device", "cuda:x"), ("learning_rate", "nan"), ("learning_rate", -1),
    ("learning_rate", "inf"), ("weight_decay", 1e10), ("weight_decay", "nan"),
    ("weight_decay", -0.1), ("grad_clip", "inf"), ("max_seq_len", -5), ("max_seq_len", 1), ("warmup_iters", -3),
    ("dist_timeout", "inf"), ("dist_timeout", 0), ("batch_size", 0), ("epochs", -2), ("val_fraction", 1.5),
    ("val_fraction", "nan"), ("max_steps", 0), ("lora_name", ".."), ("lora_name", "a/b"), ("chat_template", "missing"),
    ("chat_template", "broken"), ("chat_template", "empty"), ("chat_template", "binary"), ("chat_template", "json"),
    ("cuda_graphs", 1),
]


def test_nonsense_flags_name_the_flag_and_exit_2(run, tmp_path, capsys):
    tmp, weight, data, good, flags = run
    templates = {"missing": tmp_path / "none.jinja", "broken": tmp_path / "broken.jinja",
                 "empty": tmp_path / "empty.jinja", "binary": tmp_path / "binary.jinja",
                 "json": tmp_path / "tokenizer_config.json"}
    templates["broken"].write_text("{% for m in messages %}\n{{ m.content }\n")
    templates["empty"].write_text("  \n")
    templates["binary"].write_bytes(b"\xff\xfe\x00bad")
    templates["json"].write_text(json.dumps({"chat_template": "{{ messages[0].content }}"}))
    for flag, value in BAD_FLAGS:
        value = templates.get(value, value) if flag == "chat_template" else value
        line = refused(lora_args(tmp, weight, data, save_dir=tmp_path / "o", **{**flags, flag: value}), capsys,
                       f"--{flag}")
        if value == templates["broken"]:
            assert f"{value}:2:" in line  # the template's line
        if value == templates["json"]:
            assert 'a JSON file (its "chat_template" is the template), not a jinja template' in line
    # Values argparse itself rejects (wrong type) also exit 2 with a usage line, no traceback.
    for flag, value in (("batch_size", "four"), ("learning_rate", "fast"), ("packing", "maybe")):
        TALLY["bad inputs tried"] += 1
        assert run_inprocess(main, lora_args(tmp, weight, data, **{**flags, flag: value})) == 2
        err = capsys.readouterr().err
        TALLY["tracebacks"] += "Traceback" in err
        assert f"--{flag}" in err and "Traceback" not in err


# ------------------------------------------------------------------------- exit with loader workers

EXIT_SCRIPT = """
import torch
from trainer.data import StepSampler, make_loader

sampler = StepSampler(64, 2, 1, 0, 1, 0)
sampler.set_epoch(0)
samples = [(torch.arange(5), torch.arange(5))] * 64
loader = make_loader(samples, sampler, lambda b: {"input_ids": torch.stack([x for x, _ in b]),
                                                  "labels": torch.stack([y for _, y in b])}, 2, False)
batches = iter(loader)  # alive at exit, its workers mid-epoch: they ignore SIGTERM
next(batches)
print("done: one batch", flush=True)
"""


def test_process_exits_promptly_with_loader_workers_alive(tmp_path):
    script = tmp_path / "exit.py"
    script.write_text(EXIT_SCRIPT)
    run = run_timed([python(), str(script)], cwd=tmp_path, env=subprocess_env(), timeout=120)
    assert run.returncode == 0 and "Traceback" not in run.output, run.output[-2000:]
    assert run.exit_lag is not None and run.exit_lag < 20, run.exit_lag  # before: no exit at all


def test_written_files_are_readable_by_others_and_leave_no_litter(tmp_path):
    from safetensors.torch import save_file

    old_umask = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.json", json.dumps({"x": 1}).encode())
        # safetensors' own writer makes 0600 files (a model directory's weights): write_dir opens them up.
        write_dir(tmp_path / "model", lambda d: (d.mkdir(), save_file({"w": torch.ones(2)}, d / "model.safetensors")))
    finally:
        os.umask(old_umask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "model" / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert sorted(os.listdir(tmp_path)) == ["a.json", "model"]


# ------------------------------------------------------------------------- running out of memory

# Runs the main() of the job module argv[1] (trainer.train_lora) as its entry point does, with little memory:
# a real allocation failure. On a GPU (--device cuda) PyTorch's allocator may hold argv[2] GiB; on a CPU the
# address space is limited to what the process has mapped after its imports plus argv[2] GiB.
LIMITED_MEMORY = """
import importlib, re, resource, sys
import torch
from trainer.job import run_job
job = importlib.import_module(sys.argv.pop(1))
spare = float(sys.argv.pop(1)) * 2**30
if "cuda" in sys.argv:
    torch.cuda.set_per_process_memory_fraction(spare / torch.cuda.get_device_properties(0).total_memory)
else:
    # A CUDA build counts the GPUs at the first backward, and under the limit that fails with a warning on
    # stderr; counted now (is_available, not device_count, which asks NVML), the count is cached.
    torch.cuda.is_available()
    mapped = int(re.search(r"VmSize:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (mapped + int(spare), resource.RLIM_INFINITY))
sys.argv = [job.__file__, *sys.argv[1:]]
run_job(job.main, teardown=False)
"""
HEAVY_BATCH = 32  # step 3 of heavy_step_data: 32 samples of 2,000 tokens


def heavy_step_data(path: Path, n: int = 128) -> Path:
    """n chats of a few tokens, but those of step 3 (--batch_size 32, --seed 1) have 2,000-token answers."""
    from trainer.data import epoch_order

    heavy = set(epoch_order(n, 1, 0)[2 * HEAVY_BATCH:3 * HEAVY_BATCH])
    with open(path, "w") as f:
        for i in range(n):
            answer = " ".join(["model"] * (2000 if i in heavy else 5))
            f.write(json.dumps({"conversations": [{"role": "user", "content": "who are you"},
                                                  {"role": "assistant", "content": answer}]}) + "\n")
    return path


def out_of_memory(spare_gib: float, argv: list[str], first_line: str, job: str = "trainer.train_lora",
                  ) -> tuple[str, str]:
    """Run `job` with `argv` and `spare_gib` of memory: exit 2, no traceback, stderr starting with `error: ` and then
    what the regular expression `first_line` matches; return the error and the command it says to continue
    with."""
    env = subprocess_env(MALLOC_ARENA_MAX="2")  # few malloc arenas: the threads reserve little address space
    limited = run_cli([python(), "-c", LIMITED_MEMORY, job, str(spare_gib), *argv], 300, cwd=REPO, env=env)
    TALLY["bad inputs tried"] += 1
    TALLY["tracebacks"] += "Traceback" in limited.stderr
    assert limited.returncode == 2 and "Traceback" not in limited.stderr, limited.stdout[-2000:] + limited.stderr
    assert re.match(f"error: {first_line}", limited.stderr), limited.stderr
    return limited.stderr, limited.stderr.split("\n  ", 1)[-1].splitlines()[0]


def continue_with(command: str, from_step: int) -> None:
    """Run the command an out-of-memory error printed (no memory limit): it trains from `from_step` + 1 on."""
    argv = shlex.split(command)
    assert argv[0] == "python"
    resumed = run_cli([python(), *argv[1:]], 300, cwd=REPO, env=subprocess_env())
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"training steps {from_step + 1}..4" in resumed.stdout and "step 4/4" in resumed.stdout


def test_out_of_memory_keeps_the_last_step_and_says_how_to_continue(tmp_path):
    """Step 3 needs 2-3 GiB, the other steps less than 0.4; the process has 1 GiB to spare. The run stops at
    step 3 with the error, no traceback and exit 2; its resume file holds step 2 exactly as a run that
    stopped there (weights, AdamW, and the RNG that LoRA dropout draws from); the command it prints
    continues in micro-batches of 16."""
    weight = save_tiny_minimind(tmp_path / "full_sft_64.pth")
    data = heavy_step_data(tmp_path / "data.jsonl")
    # Warm-up covers steps 1-2, so their learning rates do not depend on the run's length.
    flags = dict(batch_size=HEAVY_BATCH, max_seq_len=2064, epochs=1, warmup_iters=4, lora_dropout=0.1)
    _, command = out_of_memory(1, lora_args(tmp_path, weight, data, **flags),
                            "out of memory on cpu at step 3, in a micro-batch of 32 × 2024 tokens. Step 2 is "
                            f"saved in {re.escape(str(tmp_path / 'out' / STEM))}_resume.pth: nothing is lost.")
    ref_dir = tmp_path / "ref"  # a process like the one above: the same threads, so the same sums, bit for bit
    ref = run_cli([python(), str(REPO / "trainer" / "train_lora.py"),
                   *lora_args(tmp_path, weight, data, save_dir=ref_dir, max_steps=2, **flags)],
                  300, cwd=REPO, env=subprocess_env())
    assert ref.returncode == 0, ref.stdout[-2000:] + ref.stderr[-2000:]
    got, want = (load_resume(d / f"{STEM}_resume.pth") for d in (tmp_path / "out", ref_dir))
    assert got["state"]["step"] == want["state"]["step"] == 2
    for key, tensor in want["trainable"].items():
        assert torch.equal(got["trainable"][key], tensor), key
    assert torch.equal(got["optimizer"]["state"][0]["exp_avg"], want["optimizer"]["state"][0]["exp_avg"])
    assert torch.equal(got["rng"][0]["torch"], want["rng"][0]["torch"])  # the state before step 3's dropout
    assert command.endswith("--batch_size 16 --accumulation_steps 2 --from_resume 1"), command
    continue_with(command, from_step=2)

    # No memory to spare: the base's weights cannot be read. That is no damaged file (the message used to
    # say it was, and to delete the resume file): it says what ran out. A base of 130 MB: the tiny one can fit
    # in memory that malloc already holds (on a GPU machine its run got to step 1).
    big = save_tiny_minimind(tmp_path / "big" / "full_sft_1024.pth", hidden_size=1024)
    error, _ = out_of_memory(0, lora_args(tmp_path, big, data, **flags), r"out of memory \(")
    assert "--load_in_4bit" in error and "cannot be read" not in error, error


def test_out_of_memory_in_full_sft_keeps_the_last_step(tmp_path):
    """The full-SFT job (every weight trains) on the same data: the same error, step 2 kept."""
    weight = save_tiny_minimind(tmp_path / "pretrain_64.pth")
    data = heavy_step_data(tmp_path / "data.jsonl")
    argv = lora_args(tmp_path, weight, data, batch_size=HEAVY_BATCH, max_seq_len=2064, epochs=1)
    argv = argv[:argv.index("--lora_rank")] + argv[argv.index("--lora_rank") + 2:]
    _, command = out_of_memory(1, argv, "out of memory on cpu at step 3, in a micro-batch of 32 × 2024 tokens. "
                               f"Step 2 is saved in {re.escape(str(tmp_path / 'out'))}/full_sft_64_resume.pth",
                               job="trainer.train_full_sft")
    assert load_resume(tmp_path / "out" / "full_sft_64_resume.pth")["state"]["step"] == 2
    assert command.endswith("--batch_size 16 --accumulation_steps 2 --from_resume 1"), command


def test_out_of_memory_advice_keeps_what_a_resumed_run_must_keep():
    """The flags to continue with keep the samples per optimizer step and --packed_rows (a resumed run must);
    where halving cannot, activation checkpointing is the change; a full-weights job gets no QLoRA advice."""
    from trainer.args import parse_args
    from trainer.out_of_memory import lighter_flags

    def advice(job: str, *argv: str, graphs: bool = False) -> tuple[dict, str]:
        changes, others = lighter_flags(parse_args(job, "", list(argv)), graphs)
        return changes, "; ".join(others)

    assert advice("lora", "--batch_size", "8", "--accumulation_steps", "3")[0] == {"batch_size": "4",
                                                                                  "accumulation_steps": "6"}
    for argv in (["--batch_size", "7"], ["--packed_rows", "6"]):
        changes, others = advice("lora", *argv)
        assert changes == {"gradient_checkpointing": "1"} and "--gradient_checkpointing" not in others, argv
    changes, others = advice("lora", "--batch_size", "1", "--gradient_checkpointing")
    assert changes == {} and "--load_in_4bit" in others and "--cuda_graphs" not in others
    changes, others = advice("full_sft", "--batch_size", "1", graphs=True)
    assert "--load_in_4bit" not in others and "--cuda_graphs 0" in others


@pytest.mark.slow
def test_out_of_memory_under_torchrun_stops_every_rank_and_keeps_the_checkpoint(tmp_path):
    """Two gloo ranks under a real torchrun, each with 1 GiB to spare: step 3 (16 samples of 2,000 tokens per
    rank) runs out of memory. A rank cannot save alone (its peer waits in a collective), so the error says the
    last checkpoint (step 2, --save_interval 2) is kept; no traceback; every process gone within seconds of
    it; and the torchrun command it prints continues from that checkpoint."""
    weight = save_tiny_minimind(tmp_path / "full_sft_64.pth")
    data = heavy_step_data(tmp_path / "data.jsonl")
    launcher = tmp_path / "limited.py"
    launcher.write_text(LIMITED_MEMORY)
    flags = dict(batch_size=HEAVY_BATCH // 2, max_seq_len=2064, epochs=1, warmup_iters=4, save_interval=2)
    cmd = torchrun("--standalone", "--nproc_per_node", "2", str(launcher), "trainer.train_lora", "1",
                   *lora_args(tmp_path, weight, data, **flags))
    failed = run_timed(cmd, cwd=REPO, env=subprocess_env(MALLOC_ARENA_MAX="2"), timeout=240,
                       mark="error: rank ")
    # torchrun itself ends with a traceback of its own (ChildFailedError) whenever a worker exits non-zero.
    ranks_said = failed.output.split("ChildFailedError")[0].rsplit("Traceback", 1)[0]
    TALLY["bad inputs tried"] += 1
    TALLY["tracebacks"] += "Traceback" in ranks_said
    assert failed.returncode != 0 and "Traceback" not in ranks_said, failed.output[-4000:]
    errors = re.findall(r"^error: rank [01]: out of memory on cpu at step 3, in a micro-batch of 16 × 2024 tokens\. "
                        r"The last checkpoint is kept as it was\.$", failed.output, re.M)
    assert len(errors) == 1, failed.output[-4000:]  # said once, whole, by a rank that ran out
    assert failed.exit_lag < 20, (failed.exit_lag, failed.output[-3000:])
    assert load_resume(tmp_path / "out" / f"{STEM}_resume.pth")["state"]["step"] == 2
    command = re.search(r"^  (torchrun --nproc_per_node=2 .*)$", failed.output, re.M).group(1)
    assert command.endswith("--batch_size 8 --accumulation_steps 2 --from_resume 1"), command
    argv = shlex.split(command)[2:]
    assert argv[0].endswith("train_lora.py")
    resumed = run_timed(torchrun("--standalone", "--nproc_per_node", "2", *argv), cwd=REPO, env=subprocess_env())
    assert resumed.returncode == 0, resumed.output[-4000:]
    assert "training steps 3..4" in resumed.output and "step 4/4" in resumed.output, resumed.output[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_out_of_memory_on_a_gpu(tmp_path):
    """On a GPU with 1 GiB for PyTorch (hidden size 512): the uncompiled padded path with its CUDA graphs
    fails at step 3 and keeps step 2, as on a CPU; the default path (packed, compiled) with micro-batches
    far too big fails at step 1, where nothing is lost and the command starts afresh."""
    weight = save_tiny_minimind(tmp_path / "full_sft_512.pth", hidden_size=512)
    data = heavy_step_data(tmp_path / "data.jsonl")
    flags = dict(device="cuda", batch_size=HEAVY_BATCH, max_seq_len=2064, epochs=1)
    argv = lora_args(tmp_path, weight, data, **flags, packing=0, use_compile=0)
    error, command = out_of_memory(1, argv, r"out of memory on cuda(:0)? at step 3, in a micro-batch of 32 × 2048 "
                                        r"tokens; this run held up to [\d.]+ GiB of the GPU's [\d.]+ GiB(, [\d.]+ GiB held by "
                                        r"other processes and CUDA itself)?\. Step 2 is saved")
    assert load_resume(tmp_path / "out" / "lora_identity_512_resume.pth")["state"]["step"] == 2
    assert "--cuda_graphs 0" in error and "nvidia-smi" in error, error  # graphs: their pool beside the eager runs
    continue_with(command, from_step=2)

    argv = lora_args(tmp_path, weight, data, save_dir=tmp_path / "compiled", **{**flags, "batch_size": 512})
    error, command = out_of_memory(1, argv, r"out of memory on cuda(:0)? at step 1, in a micro-batch of \d+ × 2064 ")
    assert "No step had finished, so nothing is lost." in error and "--from_resume" not in command, error
    assert command.endswith("--batch_size 256 --accumulation_steps 2"), command


# ------------------------------------------------------------------------- a peer rank dies

def test_rank_that_sees_a_peer_die_prints_one_line(capsys, monkeypatch):
    """A collective failing because another rank is gone is reported in one line, not a traceback (the
    rank that really failed prints its own); the job's own bugs keep their traceback."""
    import torch.distributed as dist

    from trainer.job import run_job

    monkeypatch.delenv("MASTER_ADDR", raising=False)  # no torchrun store to announce to
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)

    def peer_gone() -> None:
        raise RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29500")

    with pytest.raises(SystemExit) as exc:
        run_job(peer_gone)
    err = capsys.readouterr().err
    TALLY["bad inputs tried"] += 1
    TALLY["tracebacks"] += "Traceback" in err
    assert exc.value.code == 1 and "Traceback" not in err, err
    assert err.strip().splitlines() == ["rank 0 failed: RuntimeError: [gloo/transport/tcp/pair.cc:534] Connection "
                                        "closed by peer [127.0.0.1]:29500 (a collective failed: another rank "
                                        "probably failed first; see its message, or, where it left none (killed, "
                                        "out of host memory), torchrun's summary of the failed ranks)"]
    assert not dist.is_initialized()  # run_job left the group
