"""Progress on rank 0: a tqdm bar on a terminal, plain lines in a log file, optional wandb, a loss plot."""

import math
import shutil
import sys
import threading
import time
from pathlib import Path

import torch

from model.atomic import atomic_write
from model.errors import UserError, first_line
from trainer.distributed import DistInfo, device_sum_


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def start_wandb(project: str, run_name: str, config: dict, run_id: str | None) -> object | None:
    """A wandb run (the same one again when `run_id` is given), or None with a warning if wandb is missing; a
    UserError if wandb cannot start one (no login, no network)."""
    try:
        import wandb  # lazy: GPU boxes often lack it, and importing it is slow
    except ImportError:
        print("warning: --use_wandb given but wandb is not installed (pip install wandb); continuing without it",
              flush=True)
        return None
    try:
        return wandb.init(project=project, name=run_name, config=config, id=run_id, resume="allow" if run_id else None)
    except wandb.errors.Error as err:  # no login, no network: said now, before any training
        raise UserError(f"--use_wandb: wandb could not start a run ({first_line(err)}); run `wandb login`, set "
                        "WANDB_MODE=offline to log to files, or leave out --use_wandb") from None


class RunLogger:
    """Collects per-step values on the device and reads them back once per log line (one host sync).

    Every rank calls `step` (the logged loss is all-reduced over ranks); only rank 0 prints.
    """

    WARMUP = 2  # steps that compile (first) and record CUDA graphs (second); always logged

    def __init__(self, info: DistInfo, total_steps: int, start_step: int, log_interval: int,
                 history: dict | None = None, wandb_run: object | None = None) -> None:
        self.info, self.total, self.log_interval, self.wandb = info, total_steps, log_interval, wandb_run
        # [(step, value)] lists, kept in the resume file so a resumed run plots its whole curve
        self.history = history or {"train": [], "val": [], "grad_norm": []}
        self.pending: list[tuple[int, int, float, torch.Tensor, torch.Tensor, int]] = []
        self.start_step, self.t0 = start_step, time.perf_counter()
        self.tokens_since, self.t_last = 0, self.t0
        # The first WARMUP steps compile and record CUDA graphs: ETA and tokens/s count from the end of them.
        self.steady_step = start_step + self.WARMUP
        self.marks: list[tuple[int, float]] = []  # (step, time) of each line from the end of the warm-up on
        self.bar = None
        if info.is_main and sys.stdout.isatty() and shutil.get_terminal_size((0, 0)).columns > 0:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True)

    def step(self, step: int, epoch: int, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float,
             n_tokens: int, force: bool = False) -> list[tuple[int, float, float]]:
        """Record optimizer step `step` (1-based); on a log line return [(step, loss, grad_norm)] read back."""
        self.pending.append((step, epoch, lr, loss.detach(), grad_norm.detach(), n_tokens))
        if step == self.steady_step and self.info.is_main:
            preload_plotting()
        self.tokens_since += n_tokens
        # The run's first step is always shown: it proves the setup works long before step log_interval.
        logged = not step % self.log_interval or force or step == self.total or step <= self.steady_step
        rows = self.flush() if logged else []
        if self.bar is not None:
            self.bar.update(1)  # after flush set the postfix: the count and the values shown are this step's
        return rows

    def flush(self) -> list[tuple[int, float, float]]:
        """Read back and log the steps recorded since the last log line (every rank must call it)."""
        if not self.pending:
            return []
        values = torch.stack([torch.stack([p[3].float(), p[4].float()]) for p in self.pending])
        losses = device_sum_(values[:, 0].contiguous(), self.info) / self.info.world_size
        rows = [(p[0], loss, float(norm)) for p, loss, norm in zip(self.pending, losses.tolist(), values[:, 1].tolist())]
        step, epoch, lr = self.pending[-1][:3]
        self.pending.clear()
        finite = [r[1] for r in rows if math.isfinite(r[1])]
        self.history["train"].extend((s, v) for s, v, _ in rows if math.isfinite(v))
        self.history.setdefault("grad_norm", []).extend((s, g) for s, _, g in rows)
        if self.info.is_main:
            self._print(step, epoch, lr, sum(finite) / len(finite) if finite else float("nan"), rows[-1][2])
        return rows

    def _print(self, step: int, epoch: int, lr: float, loss: float, grad_norm: float) -> None:
        now = time.perf_counter()
        tok_s = self.tokens_since / max(now - self.t_last, 1e-9)
        self.tokens_since, self.t_last = 0, now
        if step <= self.steady_step:  # warm-up: report its time, not a rate that would mislead the ETA
            eta_text = f"warm-up {now - self.t0:.1f} s"
            if step == self.steady_step:
                self.marks.append((step, now))
        else:
            if not self.marks:  # resumed or started past the warm-up window
                self.marks.append((self.start_step, self.t0))
            eta_text = f"eta {_duration(self._pace(step, now) * (self.total - step))}"
            self.marks.append((step, now))
        mem = f" | mem {torch.cuda.max_memory_allocated() / 2**30:.1f}GB" if self.info.device.type == "cuda" else ""
        fields = dict(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
        if self.bar is not None:
            self.bar.set_postfix(epoch=epoch, **fields, refresh=False)
        else:
            print(f"step {step}/{self.total} | epoch {epoch} | loss {loss:.4f} | lr {lr:.2e} | grad_norm "
                  f"{grad_norm:.3f} | {tok_s:,.0f} tok/s | {eta_text}{mem}", flush=True)
        if self.wandb is not None:
            self.wandb.log({"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm,
                            "train/tokens_per_s": tok_s, "train/epoch": epoch}, step=step)

    def _pace(self, step: int, now: float) -> float:
        """Seconds per step over the later half of the steps since the warm-up: as steady as the whole average
        on an even run, and it follows a run that speeds up (uncompiled steps while their CUDA graphs are
        recorded, one per new batch shape) instead of holding on to its slow start."""
        middle = (self.marks[0][0] + step) / 2
        mark_step, mark_time = next(m for m in reversed(self.marks) if m[0] <= middle)
        return (now - mark_time) / (step - mark_step)

    def val(self, step: int, loss: float) -> None:
        """Record and show a validation loss."""
        self.history["val"].append((step, loss))
        if self.info.is_main:
            self.write(f"step {step}/{self.total} | val_loss {loss:.4f}")
            if self.wandb is not None:
                self.wandb.log({"val/loss": loss}, step=step)

    def write(self, text: str) -> None:
        """Print a line on rank 0 without breaking the progress bar."""
        if not self.info.is_main:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        """Close the bar and the wandb run; on a GPU, say the run's peak memory."""
        if self.bar is not None:
            self.bar.close()
        if self.info.device.type == "cuda":
            # The step lines' `mem` counts tensors; the allocator's cache on top is what other processes lack.
            self.write(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB in tensors, "
                       f"{torch.cuda.max_memory_reserved() / 2**30:.1f} GiB reserved by PyTorch (nvidia-smi adds "
                       "CUDA's own)")
        if self.wandb is not None:
            self.wandb.finish()


def _import_pyplot() -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot  # noqa: F401


def _import_pyplot_in_short_gil_turns() -> None:
    """_import_pyplot with the interpreter's GIL switch interval at 0.2 ms (default 5 ms) while it runs: the
    training loop's thread needs the GIL only briefly between GPU calls, and with the default it waited up to
    5 ms each time for the import, which slowed the steps it overlapped (docs/PERF.md, "The steady step's
    kernels; FlexAttention's kernel options; the pyplot import")."""
    default = sys.getswitchinterval()
    sys.setswitchinterval(2e-4)
    try:
        _import_pyplot()
    finally:
        sys.setswitchinterval(default)


def preload_plotting() -> threading.Thread:
    """Import matplotlib's pyplot in a background thread while the GPU trains, so that the final loss plot does
    not wait for it at the end of the run (0.4 s; the first use on a machine also builds its font cache)."""
    thread = threading.Thread(target=_import_pyplot_in_short_gil_turns, name="preload-plotting", daemon=True)
    thread.start()
    return thread


def plot_losses(history: dict, path: Path, title: str) -> None:
    """Train (and validation) loss against the optimizer step, as a PNG."""
    _import_pyplot()
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if history["train"]:
        steps, losses = zip(*history["train"])
        ax.plot(steps, losses, label="train", linewidth=1)
    if history["val"]:
        steps, losses = zip(*history["val"])
        ax.plot(steps, losses, "o-", label="val")
    ax.set(xlabel="optimizer step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, dpi=100, format="png"))
    finally:
        plt.close(fig)


def shown_path(path: str | Path) -> str:
    """`path` as the user can type it: relative to the working directory when inside it, else absolute (a
    `../` path only works from here, and a log is read, and its paths copied, from anywhere)."""
    path, here = Path(path).resolve(), Path.cwd().resolve()
    return str(path.relative_to(here)) if path.is_relative_to(here) else str(path)
