"""Multi-GPU check, run once on a 2-GPU machine: DDP matches one GPU and scales, --fsdp shards, failures end.

    python scripts/multi_gpu_check.py --parts acd   # 2 GPUs, about 5 minutes; writes out/multi_gpu_check/
    python scripts/multi_gpu_check.py --parts be    # about 3 minutes (4 compiles)
    python scripts/multi_gpu_check.py --cpu-smoke --out /tmp/check             # the same logic, tiny, CPU + gloo

(All parts in one call, `--parts acdbe`: about 5 + 3 minutes, one 10-minute device call.)

(a) minimind-3 64M shape, 200 steps: `train_lora.py` on 1 GPU (batch B × accumulation 2) against `torchrun
    --nproc_per_node 2` (batch B per GPU): the same global batch, so the same loss curve up to bf16
    rounding. Reports max |loss difference| over the curve and the tokens/s ratio.
(b) the same on a Qwen3-0.6B shape with the trainer's CUDA defaults (`--use_compile 1`: each layer compiled,
    each micro-step one CUDA graph, FlexAttention), as the README advises for several GPUs: eager, this step
    is bound by the CPU that launches its kernels.
(c) an 8B shape (Qwen3-8B dims; MiniMind ties the head, so 7.6B parameters), random bf16 weights made on the
    GPUs (meta device, then to_empty): peak memory per GPU of a few LoRA steps with --fsdp and without
    ("ddp": the whole base on each GPU, as train_lora.py runs it without --fsdp).
(d) rank 1 raises at step 5 of a 2-GPU run: the exit status, the seconds until every process is gone and
    whether our own `rank 1 failed at step 5` line was printed; (a)/(b) give the clean-exit lag.
(e) (b) again, on a transformers Qwen3 directory holding the same weights (config.json + safetensors): the
    path a Qwen/Llama user's `--from_weight ~/models/Qwen3-0.6B` takes.

Random bases (MiniMind .pth files, and for (e) the same tensors as a Qwen3 directory) and synthetic chat
data go to a temporary folder. Results: --out gets summary.txt (the table printed at the end), results.json
and one log per part.
"""

import argparse
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from scripts.bench_lora import SHAPES as BENCH_SHAPES

REPO = Path(__file__).resolve().parents[1]
SHAPES = {  # the benchmark's shapes (minimind-3 layout, exactly Qwen3's architecture at these sizes) plus two
    **{name: BENCH_SHAPES[name] for name in ("minimind3-64m", "qwen3-0.6b")},
    "qwen3-8b": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, intermediate_size=12288, vocab_size=151936),
    "tiny": dict(BENCH_SHAPES["tiny"], vocab_size=6400),  # every id of the repo tokenizer fits
}
# What each part runs: on 2 GPUs, and in --cpu-smoke (tiny, to check the logic end to end in < 60 s).
PLAN = {
    "gpu": dict(a=dict(shape="minimind3-64m", steps=200, batch=16, seq=1024, samples=3000),
                b=dict(shape="qwen3-0.6b", steps=200, batch=8, seq=1024, samples=3000, flags=("--use_compile", "1")),
                c=dict(shape="qwen3-8b", steps=4, batch=4, seq=512),
                d=dict(shape="minimind3-64m", fail_at=5, batch=8, seq=1024),
                e=dict(shape="qwen3-0.6b", steps=200, batch=8, seq=1024, samples=3000,
                       flags=("--use_compile", "1"), qwen3_dir=True)),
    "cpu": dict(a=dict(shape="tiny", steps=4, batch=2, seq=128, samples=40),
                b=None,  # the same code as (a) with another shape: not worth another 20 s here
                c=dict(shape="tiny", steps=2, batch=2, seq=64),
                d=dict(shape="tiny", fail_at=2, batch=2, seq=128),
                e=dict(shape="tiny", steps=4, batch=2, seq=128, samples=40, qwen3_dir=True)),
}
WORDS = ("the model learns to answer short questions about numbers colours animals and places with clear "
         "sentences that are easy to check while the data stays synthetic random and free of any license").split()


def build_parser() -> argparse.ArgumentParser:
    """Flags of the check (and of its worker modes, which it starts itself under torchrun)."""
    # allow_abbrev=False: a fail worker passes train_lora.py's flags through (parse_known_args).
    p = argparse.ArgumentParser(description=__doc__, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "out" / "multi_gpu_check"),
                   help="folder for summary.txt, results.json and the logs (default: $OUT, else out/multi_gpu_check)")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU with gloo: checks the script itself")
    p.add_argument("--parts", default="acdbe", help="which parts to run, in this order (default: acdbe, the "
                                                   "parts that compile last; see --budget)")
    p.add_argument("--train-flags", default="", help="more train_lora.py flags for parts (a), (b) and (e), "
                                                    "e.g. '--use_compile 1' for (a) too")
    p.add_argument("--repeats", type=int, default=1,
                   help="alternating 1-/2-GPU run pairs in (a), (b) and (e), whose tokens/s is then the "
                        "median over all of them (default 1)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole check; a part that cannot start with 30 s left is skipped "
                        "(default: 540 on GPUs, to fit one 10-minute device call; 120 with --cpu-smoke)")
    p.add_argument("--worker", choices=["memory", "fail"], default=None,
                   help="internal: run one rank of part (c) or (d) (started by this script under torchrun)")
    p.add_argument("--json", default=None, help="internal: where a memory worker writes its result")
    return p


# ----------------------------------------------------------------------------------------------- helpers

def child_env(cpu: bool) -> dict[str, str]:
    """Environment for every run: this checkout importable, no network services, NVLink multicast off."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    for key, value in dict(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1",
                           WANDB_MODE="disabled", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false").items():
        env.setdefault(key, value)
    if cpu:
        env["OMP_NUM_THREADS"] = "1"  # two ranks share the cores
    return env


def launcher(nproc: int) -> list[str]:
    """python, or torchrun with `nproc` processes on this machine."""
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]


def run_logged(cmd: list[str], env: dict[str, str], log: Path, timeout: float, marks: tuple[str, ...] = ()) -> dict:
    """Run `cmd` to its end (killed after `timeout` s), appending its output to `log`. Returns the exit
    status, output, seconds, and for each mark the seconds from the first line containing it to the exit."""
    start = time.monotonic()
    seen: dict[str, float] = {}
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        # torchrun starts each worker in a session of its own, so a SIGKILL to torchrun's group would orphan
        # the workers, which keep our pipe open: the read below would never end. SIGTERM first: torchrun
        # passes it on (our trainer then saves and exits), and whatever is left is killed 30 s later.
        expired, ended = threading.Event(), threading.Event()

        def stop() -> None:
            expired.set()
            _stop(proc.pid, ended, grace=30)

        killer = threading.Timer(max(timeout, 1), stop)
        killer.start()
        lines = []
        for line in proc.stdout:
            lines.append(line)
            f.write(line)
            for mark in marks:
                if mark in line and mark not in seen:
                    seen[mark] = time.monotonic()
        proc.wait()
        ended.set()
        killer.cancel()
        timed_out = expired.is_set()
    end = time.monotonic()
    return dict(returncode=proc.returncode, output="".join(lines), seconds=end - start, timed_out=timed_out,
                after={m: end - t for m, t in seen.items()})


def _stop(pgid: int, ended: threading.Event, grace: float) -> None:
    """SIGTERM to a process group, then SIGKILL if it has not `ended` within `grace` seconds."""
    try:
        os.killpg(pgid, signal.SIGTERM)
        if not ended.wait(grace):
            os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:  # already gone
        pass


def write_random_base(path: Path, shape: dict) -> Path:
    """A MiniMind .pth with N(0, 0.02) weights (tiled from one random block: fast for any size), unit norms."""
    import torch

    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in MiniMindForCausalLM(MiniMindConfig(generation=3, **shape)).state_dict().items()}
    block = torch.randn(1_000_003, generator=torch.Generator().manual_seed(0)).mul_(0.02).to(torch.bfloat16)
    state = {}
    for key, size in shapes.items():
        if key == "lm_head.weight":
            continue
        n = math.prod(size)
        state[key] = (block.repeat(n // block.numel() + 1)[:n].view(size).clone() if len(size) > 1
                      else torch.ones(size, dtype=torch.bfloat16))
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied, as MiniMind saves it
    torch.save(state, path)
    return path


def write_chat_data(path: Path, n: int, long: bool) -> Path:
    """n synthetic chats of random words (a few hundred tokens each when `long`, a few dozen otherwise)."""
    import random

    rng = random.Random(0)
    q_len, a_len = ((20, 60), (150, 400)) if long else ((3, 10), (5, 30))
    with open(path, "w") as f:
        for _ in range(n):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*q_len)))
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*a_len)))
            f.write(json.dumps({"conversations": [{"role": "user", "content": q},
                                                  {"role": "assistant", "content": a}]}) + "\n")
    return path


def lora_flags(base: Path, data: Path, save_dir: Path, cpu: bool, **flags: object) -> list[str]:
    """train_lora.py flags shared by every run (packed rows, so every step has the same token count)."""
    common = dict(from_weight=base, data_path=data, tokenizer_path=REPO / "model" / "tokenizer", save_dir=save_dir,
                  epochs=1000, learning_rate=1e-4, warmup_iters=10, log_interval=10, save_interval=100_000,
                  lora_rank=16, device="cpu" if cpu else "cuda", num_workers=0 if cpu else 2,
                  use_compile=0)  # eager unless a part passes --use_compile 1 (later wins)
    argv = ["--packing"]
    if "batch_size" in flags:  # its tables count packed rows per micro-batch
        flags = {**flags, "packed_rows": flags["batch_size"]}
    for key, value in {**common, **flags}.items():
        argv += [f"--{key}", str(value)]
    return argv


def read_history(save_dir: Path) -> dict[int, float]:
    """{step: global loss} from the run's config JSON (train_lora.py writes it next to the LoRA)."""
    (config,) = [p for p in save_dir.glob("*.json")]
    return {int(s): float(v) for s, v in json.loads(config.read_text())["history"]["train"]}


def window_rates(output: str, skip_steps: int) -> list[float]:
    """tokens/s of each log line (a window of log_interval steps) after `skip_steps` (warm-up: allocator,
    CE kernel compile)."""
    return [float(m.group(2).replace(",", "")) for m in re.finditer(r"^step (\d+)/\d+ \|.*\| ([\d,.]+) tok/s",
                                                                    output, re.M) if int(m.group(1)) > skip_steps]


# ----------------------------------------------------------------------------------------------- parts

def compare_one_and_two(name: str, spec: dict, work: Path, out: Path, cpu: bool, deadline: float,
                        repeats: int = 1, extra_flags: tuple[str, ...] = ()) -> dict:
    """(a)/(b)/(e): the same global batch on 1 device (accumulation 2) and on 2 ranks; loss curves, tokens/s.

    With `repeats` > 1 the pair runs that many times, alternating 1, 2, 1, 2, ...: a GPU shared with other
    work (or a clock that drifts) then slows both sides alike, and tokens/s is the median over all runs.
    """
    base = write_random_base(work / f"{name}.pth", SHAPES[spec["shape"]])
    if spec.get("qwen3_dir"):
        from scripts.bench_e2e import write_qwen3_dir

        base = write_qwen3_dir(base, work / f"{name}_qwen3", SHAPES[spec["shape"]])
    data = write_chat_data(work / f"{name}.jsonl", spec["samples"], long=not cpu)
    log, env = out / f"{name}.log", child_env(cpu)
    runs: dict[int, dict] = {}
    rates: dict[int, list[float]] = {1: [], 2: []}
    for repeat in range(repeats):
        for nproc, accum in ((1, 2), (2, 1)):
            save_dir = work / f"{name}_{nproc}_{repeat}"
            flags = lora_flags(base, data, save_dir, cpu, max_steps=spec["steps"], batch_size=spec["batch"],
                               accumulation_steps=accum, max_seq_len=spec["seq"], lora_name=name,
                               log_interval=1 if cpu else 10) + [*spec.get("flags", ()), *extra_flags]
            run = run_logged([*launcher(nproc), str(REPO / "trainer" / "train_lora.py"), *flags], env, log,
                             timeout=deadline - time.monotonic(), marks=("done: ",))
            rates[nproc] += window_rates(run["output"], skip_steps=1 if cpu else 20)
            if repeat == 0:
                runs[nproc] = dict(returncode=run["returncode"], seconds=round(run["seconds"], 1),
                                   timed_out=run["timed_out"], exit_after_done_s=_seconds(run["after"].get("done: ")))
                if run["returncode"] == 0:
                    runs[nproc]["history"] = read_history(save_dir)
    for nproc in (1, 2):
        runs[nproc]["tokens_per_s"] = statistics.median(rates[nproc]) if rates[nproc] else None
        runs[nproc]["window_rates"] = rates[nproc]
    kind = "transformers Qwen3 directory" if spec.get("qwen3_dir") else "MiniMind .pth"
    result = dict(shape=spec["shape"], base=kind, steps=spec["steps"],
                  per_device_batch=f"{spec['batch']} x {spec['seq']}",
                  flags=" ".join([*spec.get("flags", ()), *extra_flags]), repeats=repeats, one=runs[1], two=runs[2])
    if "history" in runs[1] and "history" in runs[2]:
        h1, h2 = runs[1].pop("history"), runs[2].pop("history")
        common = sorted(set(h1) & set(h2))
        result["steps_compared"] = len(common)
        result["max_abs_loss_diff"] = max(abs(h1[s] - h2[s]) for s in common) if common else None
        result["loss_first_last"] = [h1[common[0]], h1[common[-1]]] if common else None
    if runs[1]["tokens_per_s"] and runs[2]["tokens_per_s"]:
        result["speedup"] = runs[2]["tokens_per_s"] / runs[1]["tokens_per_s"]
    return result


def memory(spec: dict, out: Path, cpu: bool, deadline: float) -> dict:
    """(c): one torchrun job of 2 ranks measures --fsdp, then DDP, on the same shape (see memory_worker)."""
    result_file = out / "c_memory.json"
    cmd = [*launcher(2), str(Path(__file__).resolve()), "--worker", "memory", "--json", str(result_file)]
    cmd += ["--cpu-smoke"] if cpu else []
    env = child_env(cpu) | {"CHECK_SPEC": json.dumps(spec)}
    run = run_logged(cmd, env, out / "c_memory.log", timeout=deadline - time.monotonic())
    result = dict(shape=spec["shape"], returncode=run["returncode"], seconds=round(run["seconds"], 1),
                  timed_out=run["timed_out"])
    if result_file.is_file():
        result.update(json.loads(result_file.read_text()))
        result_file.unlink()  # folded into results.json
    return result


def failure(spec: dict, work: Path, out: Path, cpu: bool, deadline: float) -> dict:
    """(d): rank 1 raises at step `fail_at` (the engine's step function wrapped, see fail_worker)."""
    base, data = work / "d.pth", work / "d.jsonl"
    write_random_base(base, SHAPES[spec["shape"]])
    write_chat_data(data, 200, long=not cpu)
    flags = lora_flags(base, data, work / "d_run", cpu, batch_size=spec["batch"], max_seq_len=spec["seq"],
                       max_steps=spec["fail_at"] + 20, log_interval=1, lora_name="d")
    pid_file = work / "d_pid"
    cmd = [*launcher(2), str(Path(__file__).resolve()), "--worker", "fail", *flags]
    env = child_env(cpu) | {"CHECK_FAIL_AT": str(spec["fail_at"]), "CHECK_PID_FILE": str(pid_file)}
    ours = f"rank 1 failed at step {spec['fail_at']}"
    run = run_logged(cmd, env, out / "d_failure.log", timeout=min(120, deadline - time.monotonic()), marks=(ours,))
    pids = [int(p.read_text()) for p in work.glob("d_pid.*")]
    return dict(fail_at=spec["fail_at"], returncode=run["returncode"], seconds=round(run["seconds"], 1),
                timed_out=run["timed_out"], our_line=ours in run["output"],
                exit_after_failure_s=_seconds(run["after"].get(ours)),
                processes_left=sum(_alive(pid) for pid in pids), ranks_seen=len(pids))


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------- workers

def memory_worker(result_file: str, cpu: bool) -> None:
    """One rank of part (c): build the shape on the meta device, materialise it on this rank's device
    (--fsdp: only its shards), run a few LoRA steps through the trainer's own step, report peak memory."""
    import gc

    import torch

    from model.model_lora import apply_lora, lora_parameters
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
    from trainer.distributed import (
        FlatGradients,
        broadcast_from_rank0_,
        cleanup_distributed,
        gather_objects,
        setup_distributed,
    )
    from trainer.engine import make_optimizer, train_step
    from trainer.fsdp import parameters_held, shard_frozen_base
    from trainer.loss import SupervisedLoss, supervision

    spec = json.loads(os.environ["CHECK_SPEC"])
    info = setup_distributed("cpu" if cpu else "cuda", True, timeout_s=180)
    dtype = torch.float32 if cpu else torch.bfloat16
    shape = SHAPES[spec["shape"]]
    results = {}
    for mode in ("fsdp", "ddp"):
        gc.collect()
        if not cpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if not cpu else 0
        row: dict = {}
        try:
            with torch.device("meta"):
                model = MiniMindForCausalLM(MiniMindConfig(generation=3, **shape)).to(dtype)
            apply_lora(model, rank=16)
            model.train()
            loss_module = SupervisedLoss(model)
            step_module = shard_frozen_base(loss_module, info) if mode == "fsdp" else loss_module
            loss_module.to_empty(device=info.device)
            if mode == "ddp":  # to_empty gave the tied head a tensor of its own; FSDP's swap kept the tie
                model.lm_head.weight = model.model.embed_tokens.weight
            row["head_tied"] = model.lm_head.weight is model.model.embed_tokens.weight
            _init_random_(loss_module, seed=info.rank)
            if mode == "ddp":  # as train_lora.py does: every rank starts from rank 0's weights
                broadcast_from_rank0_([*loss_module.parameters(), *loss_module.buffers()], info)
            params = lora_parameters(model)
            flat_grads = FlatGradients(params)  # as train_lora.py: one gradient buffer, AdamW over one flat tensor
            optimizer = make_optimizer(params, 1e-4, 0.0, flat_grads)
            row["params_held"], row["lora_params"] = parameters_held(model), sum(p.numel() for p in params)
            row["weights_gib"] = round((torch.cuda.memory_allocated() - before) / 2**30, 2) if not cpu else None
            g = torch.Generator().manual_seed(100 + info.rank)
            ids = torch.randint(0, shape["vocab_size"], (spec["batch"], spec["seq"]), generator=g)
            labels = ids.clone()
            labels[:, : spec["seq"] // 2] = -100  # first half is prompt
            sup_index, sup_targets = supervision(labels)
            batch = dict(input_ids=ids, sup_index=sup_index, sup_targets=sup_targets, n_tokens=ids.numel())
            times, losses = [], []
            for _ in range(spec["steps"]):
                t0 = time.perf_counter()
                loss, _ = train_step(step_module, [batch], sup_targets.numel() * info.world_size, info, optimizer,
                                     None, params, 1e-4, 1.0, dtype, flat_grads=flat_grads)
                losses.append(float(loss))  # a host sync: the step is done
                times.append(time.perf_counter() - t0)
            row["loss"] = [round(v, 4) for v in losses]
            row["step_s"] = round(statistics.median(times[1:] or times), 3)
            row["peak_gib"] = round((torch.cuda.max_memory_allocated() - before) / 2**30, 2) if not cpu else None
            del step_module, loss_module, model, optimizer, params, flat_grads
        except torch.OutOfMemoryError as err:
            row["error"] = f"OOM: {str(err).splitlines()[0]}"
        results[mode] = gather_objects(row, info)
    if info.is_main:
        Path(result_file).write_text(json.dumps(results, indent=2))
    # Leave together: tearing gloo down while the peer may still be finishing the last gather aborted a rank
    # ("terminate called without an active exception") in about 1 of 25 CPU runs; 0 of 40 with the barrier.
    torch.distributed.barrier()
    cleanup_distributed()


def _init_random_(module: object, seed: int) -> None:
    """Random weights in place (each rank its own shards): N(0, 0.02) matrices, unit norms, LoRA B = 0."""
    import torch
    from torch.distributed.tensor import DTensor

    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            if "lora_B" in name:
                local.zero_()
            elif local.dim() == 1:
                local.fill_(1.0)
            else:  # generated on the CPU in chunks would be slow for 8B: draw on the device
                local.normal_(0.0, 0.02, generator=g if local.device.type == "cpu" else None)


def fail_worker(argv: list[str]) -> None:
    """One rank of part (d): train_lora.py's main(), with the step function raising on rank 1 at step N."""
    import trainer.train_lora as job
    from trainer.job import run_job

    rank, fail_at = os.environ.get("RANK", "0"), int(os.environ["CHECK_FAIL_AT"])
    Path(f"{os.environ['CHECK_PID_FILE']}.{rank}").write_text(str(os.getpid()))
    real_step, calls = job.train_step, [0]

    def train_step(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        if rank == "1" and calls[0] == fail_at:
            raise RuntimeError(f"injected failure (multi_gpu_check) in step call {calls[0]}")
        return real_step(*args, **kwargs)

    job.train_step = train_step
    run_job(lambda: job.main(argv))


# ----------------------------------------------------------------------------------------------- report

def _memory_cell(r: dict) -> str:
    memory = "" if r["peak_gib"] is None else f"peak {r['peak_gib']} GiB (weights {r['weights_gib']}), "
    return f"{memory}{r['params_held'] / 1e6:,.1f}M params held, {r['step_s']} s/step"


def table(results: dict) -> str:
    """The summary table (plain text)."""
    rows = [f"multi_gpu_check on {results['device']} (torch {results['torch']}), {results['seconds']:.0f} s"]
    for part in ("a", "b", "e"):
        r = results.get(part)
        if r is None:
            continue
        if "skipped" in r:
            rows.append(f"({part}) {r['skipped']}")
            continue
        one, two = r["one"], r["two"]
        speed = f"{r['speedup']:.2f}x" if r.get("speedup") else "n/a"
        diff = f"{r['max_abs_loss_diff']:.2e}" if r.get("max_abs_loss_diff") is not None else "n/a"
        repeats = "" if r.get("repeats", 1) == 1 else f", median of {r['repeats']} alternating runs each"
        flags = f", {r['flags']}" if r.get("flags") else ""
        rows.append(f"({part}) {r['shape']} ({r['base']}){flags}, {r['steps']} steps, "
                    f"{r['per_device_batch']} per device{repeats}: "
                    f"1 dev {one['tokens_per_s'] or 0:,.0f} tok/s (rc {one['returncode']}), "
                    f"2 dev {two['tokens_per_s'] or 0:,.0f} tok/s (rc {two['returncode']}): {speed}; "
                    f"max |loss diff| {diff} over {r.get('steps_compared', 0)} steps; "
                    f"2-dev exit {two['exit_after_done_s']} s after done")
    for part in ("c", "d"):
        if "skipped" in results.get(part, {}):
            rows.append(f"({part}) {results[part]['skipped']}")
    c = results.get("c")
    if c is not None and "skipped" not in c:
        cells = []
        for mode in ("fsdp", "ddp"):
            per_rank = c.get(mode)
            if not per_rank:
                cells.append(f"{mode}: no result (rc {c['returncode']})")
                continue
            cells.append(f"{mode}: " + " / ".join(r.get("error") or _memory_cell(r) for r in per_rank))
        rows.append(f"(c) {c['shape']} per GPU: " + "; ".join(cells))
    d = results.get("d")
    if d is not None and "skipped" not in d:
        rows.append(f"(d) rank 1 raises at step {d['fail_at']}: exit status {d['returncode']} after {d['seconds']} s "
                    f"({d['exit_after_failure_s']} s after our line; our line printed: {d['our_line']}; "
                    f"processes left: {d['processes_left']} of {d['ranks_seen']})")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the parts, write summary.txt and results.json, print the table."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.worker is None and (not args.parts or set(args.parts) - set("abcde")):
        parser.error(f"--parts {args.parts!r}: give letters from abcde, e.g. --parts be")
    if args.worker == "memory":
        from trainer.job import run_job

        # run_job leaves without the interpreter's teardown under torchrun, which could abort a finished rank.
        run_job(lambda: memory_worker(args.json, args.cpu_smoke))
        return 0  # not reached: run_job exits
    if args.worker == "fail":
        fail_worker(rest)
        return 0
    import torch

    from trainer.fsdp import fsdp_supported

    cpu = args.cpu_smoke
    if not cpu and torch.cuda.device_count() < 2:
        print("needs 2 GPUs (or --cpu-smoke)", file=sys.stderr)
        return 2
    plan, out, start = PLAN["cpu" if cpu else "gpu"], Path(args.out), time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    results: dict = dict(device="cpu (gloo)", torch=torch.__version__)
    # The whole check must fit one 10-minute device call: each run gets the time left, a part that cannot
    # start with 30 s left is skipped (and says so).
    budget = args.budget or (120 if cpu else 540)
    deadline = start + budget
    with tempfile.TemporaryDirectory(prefix="multi_gpu_check_") as tmp:
        work = Path(tmp)
        for part in args.parts:
            spec = plan[part]
            if spec is None:
                results[part] = dict(skipped="skipped in --cpu-smoke (the same code as (a))")
            elif deadline - time.monotonic() < 30:
                results[part] = dict(skipped=f"skipped: the {budget:.0f} s budget was spent")
            elif part in "abe":
                results[part] = compare_one_and_two(part, spec, work, out, cpu, deadline, args.repeats,
                                                    tuple(shlex.split(args.train_flags)))
            elif part == "c" and not fsdp_supported():
                results[part] = dict(skipped=f"skipped: --fsdp needs torch >= 2.7; this is {torch.__version__}")
            elif part == "c":
                results[part] = memory(spec, out, cpu, deadline)
            else:
                results[part] = failure(spec, work, out, cpu, deadline)
            print(f"({part}) finished at {time.monotonic() - start:.0f} s: {json.dumps(results[part])[:300]}",
                  flush=True)
    results["seconds"] = time.monotonic() - start
    if not cpu:  # only now: this process should not hold a CUDA context on GPU 0 while the runs measure
        results["device"] = f"2 x {torch.cuda.get_device_name(0)}"
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = table(results)
    (out / "summary.txt").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
