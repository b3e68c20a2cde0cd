"""Where a GPU waited for its host, read from a torch profiler trace (profile_trainer.py's trace_rank<R>.json.gz).

    python scripts/bench/trace_gaps.py out/profile/trace_rank0.json.gz --gaps 8

Prints how long the GPU was busy (kernels, copies and memsets on any stream, overlaps counted once) in
the traced window, then its longest idle gaps. For each gap: the host call that launched the work which
ended it, with the operators (and, for a trace taken with --with-stack, the Python frames) around that
call; and the host calls that blocked during the gap (a synchronize, a copy that waits for the device).
A gap that ends at a launch made long after the previous kernel finished means the host was late; a
blocking call inside the gap says why it was late. Last, the host calls that blocked longest overall.
"""

import argparse
import bisect
import gzip
import json
from dataclasses import dataclass
from pathlib import Path

DEVICE_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
HOST_CALL_CATEGORIES = {"cuda_runtime", "cuda_driver"}
HOST_SPAN_CATEGORIES = {"cpu_op", "python_function", "user_annotation"}


def blocks(name: str) -> bool:
    """Runtime calls that return only when the device has caught up. (An async copy to or from pageable
    memory can wait too, but it is named like any copy: it shows up by its duration instead.)"""
    return "Synchronize" in name or name == "cudaMemcpy"


@dataclass
class Event:
    """One complete ("X") event of the trace; times in microseconds."""

    name: str
    category: str
    start: float
    duration: float
    thread: object
    correlation: int | None

    @property
    def end(self) -> float:
        return self.start + self.duration


def load_events(path: Path) -> list[Event]:
    """The trace's complete events (gzip or plain JSON, as torch.profiler's export_chrome_trace writes it)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [Event(e.get("name", ""), e.get("cat", ""), float(e["ts"]), float(e.get("dur", 0)),
                  (e.get("pid"), e.get("tid")), (e.get("args") or {}).get("correlation"))
            for e in events if e.get("ph") == "X" and "ts" in e]


def busy_intervals(device_events: list[Event]) -> list[tuple[float, float]]:
    """The union of the device events' intervals, sorted and merged."""
    merged: list[list[float]] = []
    for e in sorted(device_events, key=lambda e: e.start):
        if merged and e.start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e.end)
        else:
            merged.append([e.start, e.end])
    return [(a, b) for a, b in merged]


class HostSpans:
    """The operators and Python frames of each host thread, to ask which of them enclose a moment."""

    def __init__(self, events: list[Event]) -> None:
        self.by_thread: dict[object, list[Event]] = {}
        for e in sorted((e for e in events if e.category in HOST_SPAN_CATEGORIES), key=lambda e: e.start):
            self.by_thread.setdefault(e.thread, []).append(e)
        self.starts = {t: [e.start for e in spans] for t, spans in self.by_thread.items()}

    def around(self, thread: object, moment: float) -> list[str]:
        """Names of the spans on `thread` that contain `moment`, outermost first."""
        spans = self.by_thread.get(thread, [])
        last = bisect.bisect_right(self.starts.get(thread, []), moment)
        return [e.name for e in spans[:last] if e.end >= moment]


def describe(call: Event, spans: HostSpans, depth: int) -> str:
    """`call` (a runtime call) with the innermost `depth` spans around it."""
    stack = spans.around(call.thread, call.start)[-depth:]
    return f"{call.name} ({call.duration / 1e3:.2f} ms) in " + (" > ".join(stack) if stack else "(no operator)")


def report(events: list[Event], n_gaps: int, depth: int, min_gap_ms: float) -> str:
    """The text described in the module docstring."""
    device = [e for e in events if e.category in DEVICE_CATEGORIES]
    if not device:
        return "no device events in this trace (a CPU run, or a profiler without CUDA activity)"
    calls = [e for e in events if e.category in HOST_CALL_CATEGORIES]
    launch_of = {c.correlation: c for c in calls if c.correlation is not None}
    spans = HostSpans(events)
    busy = busy_intervals(device)
    window = (min(e.start for e in events), max(e.end for e in events))
    busy_us = sum(b - a for a, b in busy)
    span_us = window[1] - window[0]
    lines = [f"window {span_us / 1e3:.1f} ms; device busy {busy_us / 1e3:.1f} ms ({busy_us / span_us:.0%}), "
             f"idle {(span_us - busy_us) / 1e3:.1f} ms"]
    gaps = sorted(((b[0] - a[1], a[1], b[0]) for a, b in zip(busy, busy[1:])), reverse=True)
    gaps = [g for g in gaps if g[0] >= min_gap_ms * 1e3][:n_gaps]
    first_after = sorted(device, key=lambda e: e.start)
    starts = [e.start for e in first_after]
    for length, begin, end in gaps:
        resumed = first_after[bisect.bisect_left(starts, end)]
        lines.append(f"\ngap of {length / 1e3:.2f} ms at +{(begin - window[0]) / 1e3:.1f} ms, ended by {resumed.name[:60]}")
        launch = launch_of.get(resumed.correlation)
        if launch is not None:
            lines.append(f"  launched {(launch.start - begin) / 1e3:+.2f} ms after the gap began, by "
                         + describe(launch, spans, depth))
        blocked = [c for c in calls if c.start < end and c.end > begin and (
            blocks(c.name) or c.duration >= 0.25 * length)]
        for c in sorted(blocked, key=lambda c: -c.duration)[:3]:
            lines.append("  host blocked: " + describe(c, spans, depth))
    longest = sorted((c for c in calls if blocks(c.name) or c.duration >= 1e3),
                     key=lambda c: -c.duration)[:n_gaps]
    if longest:
        lines.append("\nlongest blocking host calls:")
        lines += ["  " + describe(c, spans, depth) for c in longest]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Print the report for each trace given."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("traces", nargs="+", type=Path, help="trace files (.json or .json.gz)")
    p.add_argument("--gaps", type=int, default=8, help="how many of the longest gaps to explain (default 8)")
    p.add_argument("--depth", type=int, default=6, help="enclosing spans shown per host call (default 6)")
    p.add_argument("--min-gap-ms", type=float, default=0.2, help="ignore gaps shorter than this (default 0.2)")
    args = p.parse_args(argv)
    for path in args.traces:
        print(f"== {path}\n{report(load_events(path), args.gaps, args.depth, args.min_gap_ms)}\n", flush=True)


if __name__ == "__main__":
    main()
