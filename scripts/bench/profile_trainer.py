"""Profile a few optimizer steps of train_lora.py as it really runs (any flags; alone or under torchrun).

    python scripts/bench/profile_trainer.py --steps 30-32 --out out/profile -- --use_compile 1 --packing
    torchrun --nproc_per_node 2 scripts/bench/profile_trainer.py --steps 30-32 --out $OUT -- --from_weight ...

Everything after `--` goes to train_lora.py; unless given there, the run saves under `<--out>/run` (not over the
quick start's out/) and stops after the window's last step (`--max_steps`). The profiler covers whole loop iterations: from the start of
step A's forward/backward to the start of step B+1's (steps counted from 1 in this run), so the host work
between steps (logging, the token-count all-reduce, fetching the next batch) is inside the window. Each rank
writes `profile_rank<R>.txt` (window wall time, device time summed over kernels, top operators) and
`trace_rank<R>.json.gz` (open in https://ui.perfetto.dev, or read its GPU idle gaps with
scripts/bench/trace_gaps.py). A device busy for much less than the window's
wall time means the host (Python, kernel launches) or waiting on a peer sets the pace, not the GPU. The log
lines right after the window show lower tokens/s: the trace is being written.
"""

import argparse
import gzip
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(our flags, train_lora.py's flags): the two sides of `--`."""
    ours, train = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", default="30-32", help="first-last optimizer step to profile, counted from 1 in this "
                                                    "run (default 30-32: after compilation and warm-up)")
    p.add_argument("--out", default="out/profile", help="folder for profile_rank<R>.txt and trace_rank<R>.json.gz (default: out/profile)")
    p.add_argument("--rows", type=int, default=20, help="operators listed in each summary (default 20)")
    p.add_argument("--with-stack", action="store_true", help="record Python frames too (slower steps; "
                                                             "scripts/bench/trace_gaps.py then names the lines)")
    args = p.parse_args(ours)
    first, _, last = args.steps.partition("-")
    args.first, args.last = int(first), int(last or first)
    if not 1 <= args.first <= args.last:
        p.error(f"--steps {args.steps}: give first-last with 1 <= first <= last")
    return args, train


class StepWindow:
    """Starts the profiler when step `first` begins and stops it when step `last + 1` begins (or at exit)."""

    def __init__(self, first: int, last: int, out: Path, rows: int, with_stack: bool = False) -> None:
        self.first, self.last, self.out, self.rows, self.with_stack = first, last, out, rows, with_stack
        self.calls, self.prof, self.started, self.on_gpu = 0, None, 0.0, False
        self.rank = int(os.environ.get("RANK", 0))

    def before_step(self) -> None:
        """Called at the start of every train_step."""
        self.calls += 1
        if self.calls == self.first:
            # The run's own device: only a run that trains on a GPU starts CUDA (a --device cpu run on a GPU
            # machine does not), so its window traces the device and ranks operators by device time.
            self.on_gpu = torch.cuda.is_initialized()
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.on_gpu else [])
            self.prof = profile(activities=activities, with_stack=self.with_stack)
            self.prof.start()
            self.started = time.perf_counter()
        elif self.calls == self.last + 1:
            self.finish(complete=True)

    def finish(self, complete: bool) -> None:
        """Stop, then write this rank's summary and trace (no-op if the window never opened or is closed)."""
        if self.prof is None:
            return
        if self.on_gpu:
            torch.cuda.synchronize()  # the window's kernels finish inside it
        seconds = time.perf_counter() - self.started
        prof, self.prof = self.prof, None
        prof.stop()
        steps = self.last - self.first + 1 if complete else self.calls - self.first + 1
        events = prof.key_averages()
        sort = "self_device_time_total" if self.on_gpu else "self_cpu_time_total"
        device_s = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e6 if self.on_gpu else None
        head = (f"rank {self.rank}: steps {self.first}-{self.first + steps - 1} ({steps} loop iterations"
                f"{'' if complete else ', the run ended inside the window'}), {seconds * 1e3:.1f} ms wall, "
                f"{seconds * 1e3 / steps:.1f} ms per step")
        if device_s is not None:
            head += f"; device time summed over kernels {device_s * 1e3:.1f} ms ({device_s / seconds:.0%} of the wall time)"
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"profile_rank{self.rank}.txt").write_text(
            head + "\n\n" + events.table(sort_by=sort, row_limit=self.rows) + "\n")
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(raw))
            with open(raw, "rb") as src, gzip.open(self.out / f"trace_rank{self.rank}.json.gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
        print(head, flush=True)


def main(argv: list[str] | None = None) -> None:
    """Run train_lora.py's main() with its train_step wrapped by the profiling window."""
    args, train_argv = parse(sys.argv[1:] if argv is None else argv)
    given = {a.split("=", 1)[0] for a in train_argv if a.startswith("--")}
    if not given & {"--save_dir", "--out_dir"}:
        train_argv += ["--save_dir", str(Path(args.out) / "run")]
    if "--max_steps" not in given:
        train_argv += ["--max_steps", str(args.last + 1)]  # the window closes as step last + 1 begins
    import trainer.train_lora as job
    from trainer.job import run_job

    window, real_step = StepWindow(args.first, args.last, Path(args.out), args.rows, args.with_stack), job.train_step

    def train_step(*a: object, **k: object) -> object:
        window.before_step()
        return real_step(*a, **k)

    job.train_step = train_step
    try:
        run_job(lambda: job.main(train_argv))
    finally:
        window.finish(complete=False)


if __name__ == "__main__":
    main()
