"""Wall time to a finished LoRA epoch, start-up included: the trainer's CLI against transformers Trainer + PEFT.

    python scripts/bench_e2e.py --json out/e2e.json                   # one GPU: every variant, one table
    python scripts/bench_e2e.py --variants ours,ours-warm,hf-flatten  # a subset
    python scripts/bench_e2e.py --tiny                                # CPU smoke test (tiny model, 200 chats)
    git worktree add /tmp/before <rev>                                # the trainer of another revision ...
    python scripts/bench_e2e.py --variants ours,ours-warm --against /tmp/before   # ... in the same run

The data: `write_chat_mix`, a fixed-seed synthetic chat SFT mix (default 12,000 conversations, 2.94M
tokens, mean 245 with the repo tokenizer, half Chinese and half English, 25% multi-turn, 15% with a system
prompt). The base: random weights of the Qwen3-0.6B shape (`bench_lora.SHAPES`), as a MiniMind .pth for
the trainer and as transformers' Qwen3ForCausalLM for the Trainer rows; LoRA r16 on every linear layer,
learning rate 1e-4, one epoch, samples truncated to 512 tokens, bf16.

Each variant runs in its own process, all on one bytecode cache filled before the first (as after a pip
install), after one small untimed compile in a cache of its own (the machine's first compile loads Triton and
the CUDA libraries from disk; see cache_bytecode). `ours` is the bare command (`train_lora.py --from_weight ...
--data_path ... --device cuda`, no speed flags) with an empty compile cache and an empty tokenized-data cache;
`ours-warm` the same again on the caches the first one filled (likewise `unsloth` and `unsloth-warm`: every row
has its own compile caches, emptied first unless its name ends in -warm). The table compares each row with the
fastest peer row (Trainer or Unsloth) and gives, for our measured epochs, the loss at the last step: rows with
another step size (`ours-b32`) finish the epoch in fewer optimizer steps, so they are compared by how far they
got too.
Every row's clock starts when its process is launched, so each stack's imports and reading of the data count.
Rows marked "projected" ran --steps optimizer steps only: their epoch time is the measured time to the end of
their warm-up plus the epoch's remaining tokens at their steady rate; `--steps 0` runs every row to the end of
its epoch (measured; the Trainer rows then save their adapter, as the trainer does). The Trainer rows use 32
samples per batch (padded, or padding-free with DataCollatorWithFlattening), `hf-liger` adds Liger Kernel's
Qwen3 patches (needs `liger_kernel`), the `-grouped` rows the Trainer's length-grouped sampler (batches of
samples of about one length, so less padding). Each Trainer row gives `pad_share`, the share of its batches' token slots that held
padding, and in the JSON each step's end time and token slots. `unsloth` is the padded Trainer row on Unsloth's
model and LoRA (`FastLanguageModel`, needs `unsloth`; it loads the base's Qwen3 directory). The `ours-eager-*`
rows run uncompiled (`--use_compile 0`), padded or packed, with their CUDA graphs per micro-batch shape or, in
the `-nographs` rows, without; as they record graphs for a while, each row also gives `late_tok_s`, the median
of its second half. With `--against DIR` every `ours*` row is followed by the same row run from the checkout in
DIR (named `<row>@<DIR's name>`, with compile caches of its own): this trainer before and after a change, on
one machine and the same data. Above the table, a line names the device, the CPU cores and the versions of
torch, transformers, PEFT, Liger Kernel and Unsloth that the rows import. docs/PERF.md holds the results.
"""

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

EN = ("the model learns from data and answers questions about training language systems with care while "
      "every example shows how a small network reads text then writes a reply that people find useful "
      "because clear steps explain each idea simply please tell me more about tokens layers attention").split()
ZH = ("我们 学习 数据 模型 训练 问题 回答 语言 系统 例子 文本 网络 步骤 解释 清楚 有用 注意力 层 词元 "
      "请 告诉 更多 关于 这个 那个 因为 所以 但是 如果 可以 需要 时间 方法 结果 今天 中国 世界").split()
SYSTEMS = {"en": "You are a helpful assistant. Answer briefly and clearly.", "zh": "你是一个有帮助的助手，请简洁清楚地回答。"}

# The padded eager path at 8 samples of up to 1024 tokens per step
EAGER_1024 = ["--packing", "0", "--use_compile", "0", "--batch_size", "8", "--max_seq_len", "1024"]
VARIANTS = {  # name: (stack, trainer flags / Trainer options, full epoch or --steps)
    "ours": ("ours", [], "epoch"),
    "ours-warm": ("ours", [], "epoch"),
    "ours-b32": ("ours", ["--batch_size", "32"], "epoch"),  # MiniMind's train_lora.py default batch size
    "ours-b32-warm": ("ours", ["--batch_size", "32"], "epoch"),
    "ours-sdpa": ("ours", ["--attention", "sdpa"], "epoch"),  # packed rows through the dense block mask
    "ours-sdpa-warm": ("ours", ["--attention", "sdpa"], "epoch"),
    "ours-varlen": ("ours", ["--attention", "varlen"], "epoch"),  # packed rows through Flash's varlen kernel
    "ours-varlen-warm": ("ours", ["--attention", "varlen"], "epoch"),
    "ours-layer": ("ours", ["--compile_scope", "layer"], "epoch"),
    "ours-layer-warm": ("ours", ["--compile_scope", "layer"], "epoch"),
    "ours-qwen3-dir": ("ours", ["--from_weight", "{qwen3_dir}"], "epoch"),  # on `ours`' cache: the same graphs
    "ours-eager-packed": ("ours", ["--use_compile", "0"], "steps"),
    "ours-eager-packed-nographs": ("ours", ["--use_compile", "0", "--cuda_graphs", "0"], "steps"),
    "ours-eager-padded": ("ours", ["--packing", "0", "--use_compile", "0"], "steps"),
    "ours-eager-padded-unbucketed": ("ours", ["--packing", "0", "--use_compile", "0"], "steps"),
    "hf-padded": ("hf", {"collator": "padded"}, "steps"),
    "hf-flatten": ("hf", {"collator": "flatten"}, "steps"),
    "hf-liger": ("hf", {"collator": "padded", "liger": True}, "steps"),
    "hf-liger-flatten": ("hf", {"collator": "flatten", "liger": True}, "steps"),
    "hf-grouped": ("hf", {"collator": "padded", "grouped": True}, "steps"),  # batches of samples of like length
    "hf-liger-grouped": ("hf", {"collator": "padded", "grouped": True, "liger": True}, "steps"),
    "unsloth": ("hf", {"collator": "padded", "unsloth": True}, "steps"),  # Unsloth's model and LoRA, same Trainer
    "unsloth-warm": ("hf", {"collator": "padded", "unsloth": True}, "steps"),
    "ours-eager-padded-1024": ("ours", EAGER_1024, "steps"),
    "ours-eager-padded-1024-unbucketed": ("ours", EAGER_1024, "steps"),
    "ours-eager-padded-1024-nographs": ("ours", [*EAGER_1024, "--cuda_graphs", "0"], "steps"),
    "ours-eager-padded-1024-qwen3-dir": ("ours", [*EAGER_1024, "--from_weight", "{qwen3_dir}"], "steps"),
}
DEFAULT_VARIANTS = ("ours,ours-warm,ours-eager-padded,ours-eager-padded-unbucketed,hf-padded,hf-flatten,hf-liger,"
                    "hf-liger-grouped")


# ------------------------------------------------------------------------- data and base model

def _words(rng: object, pool: list[str], cost: dict[str, int], budget: int, sep: str) -> str:
    """Random words from `pool` until about `budget` tokens (each word's token count known)."""
    out, used = [], 0
    while used < budget:
        w = pool[int(rng.integers(len(pool)))]
        out.append(w)
        used += cost[w] + (sep == " ")
    return sep.join(out)


def write_chat_mix(path: Path, n: int, tokenizer: object, seed: int = 0) -> Path:
    """n conversations whose token lengths follow a chat SFT mix (see the module docstring); fixed seed.

    Length in tokens: 60% short chats (log-normal, median 150), 40% longer ones (median 520), clipped to
    [24, 1000]; the prompt side (system + user turns) takes 20-50% of it. Half the chats are Chinese.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    cost = {w: len(tokenizer(w, add_special_tokens=False).input_ids) for w in EN + ZH}
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            short = rng.random() < 0.6
            total = int(np.clip(rng.lognormal(math.log(150 if short else 520), 0.5), 24, 1000))
            lang = "zh" if rng.random() < 0.5 else "en"
            pool, sep = (ZH, "") if lang == "zh" else (EN, " ")
            turns = int(rng.integers(2, 4)) if rng.random() < 0.25 else 1
            msgs = [{"role": "system", "content": SYSTEMS[lang]}] if rng.random() < 0.15 else []
            per_turn = max(8, total // turns - 12)  # ~12 tokens of template per user/assistant pair
            for _ in range(turns):
                prompt = max(3, int(per_turn * rng.uniform(0.2, 0.5)))
                msgs.append({"role": "user", "content": _words(rng, pool, cost, prompt, sep)})
                msgs.append({"role": "assistant", "content": _words(rng, pool, cost, per_turn - prompt, sep)})
            f.write(json.dumps({"conversations": msgs}, ensure_ascii=False) + "\n")
    return path


def shape_of(name: str, n_tokens: int) -> dict:
    """bench_lora's model shape, its vocabulary at least the tokenizer's (the tiny shape's is smaller)."""
    from scripts.bench_lora import SHAPES

    return dict(SHAPES[name], vocab_size=max(SHAPES[name]["vocab_size"], n_tokens))


def prepare(workdir: Path, n: int, shape_name: str) -> tuple[Path, Path, dict]:
    """(base .pth, data jsonl, data stats) in workdir, written once."""
    from transformers import AutoTokenizer

    from dataset.lm_dataset import SFTDataset
    from scripts.multi_gpu_check import write_random_base

    workdir.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(REPO / "model" / "tokenizer")
    data = workdir / f"chat_mix_{n}.jsonl"
    if not data.is_file():
        write_chat_mix(data, n, tok)
    base = workdir / f"base_{shape_name}.pth"
    if not base.is_file():
        write_random_base(base, shape_of(shape_name, len(tok)))
    if not (qwen3_dir(base) / "config.json").is_file():
        write_qwen3_dir(base, qwen3_dir(base), shape_of(shape_name, len(tok)))
    ds = SFTDataset(data, tok, max_length=512, log=None)
    stats = dict(conversations=len(ds), tokens=int(ds.lengths.sum()), mean=float(ds.lengths.mean()))
    return base, data, stats


def qwen3_dir(base: Path) -> Path:
    """Where the base .pth's weights are also written as a Qwen3 directory (base_X.pth -> qwen3_X/)."""
    return base.with_name("qwen3_" + base.stem.removeprefix("base_"))


def write_qwen3_dir(base: Path, out: Path, shape: dict) -> Path:
    """The .pth's weights as a transformers Qwen3 directory (the same tensor names; tied head)."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen3Config

    state = torch.load(base, map_location="cpu", weights_only=True, mmap=True)
    out.mkdir(parents=True, exist_ok=True)
    Qwen3Config(**shape, rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=32768,
                rope_theta=1e6, architectures=["Qwen3ForCausalLM"], dtype="bfloat16").save_pretrained(out)
    save_file({k: v.contiguous() for k, v in state.items() if k != "lm_head.weight"}, out / "model.safetensors",
              metadata={"format": "pt"})
    for f in (REPO / "model" / "tokenizer").iterdir():  # a complete model directory, as loaders expect
        shutil.copy(f, out / f.name)
    return out


# ------------------------------------------------------------------------- our trainer, through its CLI

def python_path(repo: Path = REPO) -> str:
    """The trainer's checkout first, then whatever PYTHONPATH already holds (e.g. carried wheels)."""
    return os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH", "")) if p)


# What both stacks import: warmed once into the bytecode cache before any timed run.
COMMON_IMPORTS = ("torch, torch._dynamo, torch._inductor.compile_fx, transformers, peft, "
                  "transformers.trainer, trainer.train_lora, scripts.bench_e2e")


# A first compile on the GPU, in a cache of its own: the machine's first one loads Triton's compiler and the
# CUDA libraries from disk, and no row should pay for that alone.
WARM_MACHINE = ("import torch; torch.cuda.is_available() and torch.compile(lambda x: x.sin() @ x)"
                "(torch.ones(64, 64, device='cuda'))")


def cache_bytecode(workdir: Path) -> None:
    """Give every run a bytecode cache, as a pip install does, and fill it once; then start the machine's
    first compile (both untimed).

    Without one (PYTHONDONTWRITEBYTECODE, or a read-only site-packages, as on some GPU images) each new
    process compiles the sources of torch and transformers again: about 10 s at every start-up, for both stacks.
    """
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ.setdefault("PYTHONPYCACHEPREFIX", str(workdir / "pycache"))
    env = {**os.environ, "PYTHONPATH": python_path()}
    subprocess.run([sys.executable, "-c", f"import {COMMON_IMPORTS}"], cwd=REPO, check=False, env=env)
    shutil.rmtree(workdir / "cache_machine", ignore_errors=True)
    subprocess.run([sys.executable, "-c", WARM_MACHINE], cwd=REPO, check=False,
                   env={**env, "TORCHINDUCTOR_CACHE_DIR": str(workdir / "cache_machine")})


STEP_LINE = re.compile(r"^step (\d+)/(\d+) .*?\| ([\d,]+) tok/s \| (warm-up ([\d.]+) s|eta)")
LOSS = re.compile(r"\| loss ([\d.]+) \|")


def run_ours(name: str, flags: list[str], base: Path, data: Path, workdir: Path, steps: int | None,
             cache: Path, device: str, timeout: float, repo: Path = REPO) -> dict:
    """train_lora.py as a user runs it (from the checkout `repo`); wall time from launch to exit, the log
    lines time-stamped."""
    save = workdir / "runs" / name
    argv = [sys.executable, "-u", str(repo / "trainer" / "train_lora.py"), "--from_weight", str(base),
            "--data_path", str(data), "--tokenizer_path", str(REPO / "model" / "tokenizer"), "--device", device,
            "--save_dir", str(save), "--epochs", "1",
            *(f.format(qwen3_dir=qwen3_dir(base)) for f in flags)]
    if steps:
        argv += ["--max_steps", str(steps)]
    if name.partition("@")[0].endswith("unbucketed"):  # the padded path as it was: every batch its own width
        argv = [sys.executable, "-u", "-c", "import sys, runpy, trainer.data as d; d.BUCKET = 1; "
                "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')", *argv[2:]]
    # The tokenized data lives beside the compile caches: a cold row tokenizes, its -warm row reads the tokens
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "MINILORA_CACHE_DIR": str(cache / "tokenized"),
           "PYTHONPATH": python_path(repo)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=repo)
    lines, t_compile = [], None
    try:
        for line in proc.stdout:
            t = time.perf_counter() - t0
            lines.append((t, line.rstrip()))
            if line.startswith("compiling..."):
                t_compile = t
            if time.perf_counter() - t0 > timeout:
                proc.kill()
        code = proc.wait()
    finally:
        proc.kill()
    wall = time.perf_counter() - t0
    log = "\n".join(f"{t:7.1f} {text}" for t, text in lines)
    (workdir / f"{name}.log").write_text(log)
    rows = [(t, STEP_LINE.match(text)) for t, text in lines]
    rows = [(t, m) for t, m in rows if m]
    warm = [(t, int(m.group(1)), float(m.group(5))) for t, m in rows if m.group(5)]
    rates = [float(m.group(3).replace(",", "")) for _, m in rows if not m.group(5)]
    steady = statistics.median(rates[:-1] or rates) if rates else float("nan")  # the last window is partial
    first_step = warm[0][0] - (t_compile or warm[0][0] - warm[0][2]) if warm else float("nan")
    # Uncompiled runs record a CUDA graph per new batch shape for a while; the second half shows the rate after.
    late = rates[len(rates) // 2:-1]
    out = dict(name=name, code=code, wall_s=wall, steady_tok_s=steady, first_step_s=first_step,
               late_tok_s=statistics.median(late) if late else float("nan"),
               warmup_end_s=warm[-1][0] if warm else float("nan"), steps=rows[-1][1].group(1) if rows else None,
               # rows that train with other step sizes compare by how far they got, not only by how fast
               last_loss=float(LOSS.search(rows[-1][1].string).group(1)) if rows else float("nan"),
               note=next((text for _, text in lines if text.startswith(("packed:", "padded:"))), ""),
               head=next((text for _, text in lines if text.startswith("base ")), ""),
               # where a start goes: imports and the model load, then reading the data, then the first step
               startup_line_s=next((t for t, text in lines if text.startswith("base ")), float("nan")),
               data_line_s=next((t for t, text in lines if ": kept " in text), float("nan")),
               step1_line_s=warm[0][0] if warm else float("nan"),
               tail=[text for _, text in lines[-3:]])
    if code != 0:
        out["error"] = log[-3000:]
    return out


# ------------------------------------------------------------------------- transformers Trainer + PEFT

def run_hf(opts: dict) -> dict:
    """One Trainer run in this process (a subprocess of main, which adds its wall time): time to each step end,
    tokens per step. The clock starts when main launched the process (`launched_at`), as ours does, so the
    imports and reading the data count here too. With `steps` 0 the run trains its whole epoch and saves its
    adapter, as a user's script would."""
    t0 = time.perf_counter() - (time.time() - opts.get("launched_at", time.time()))
    import torch

    if opts.get("unsloth"):  # before transformers and PEFT: it patches them as they load
        from unsloth import FastLanguageModel
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoTokenizer,
        DataCollatorWithFlattening,
        Qwen3Config,
        Qwen3ForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from dataset.lm_dataset import SFTDataset

    imports_s = time.perf_counter() - t0
    cuda = opts["device"] == "cuda"
    if opts.get("liger"):
        from liger_kernel.transformers import apply_liger_kernel_to_qwen3

        apply_liger_kernel_to_qwen3()
    tok = AutoTokenizer.from_pretrained(REPO / "model" / "tokenizer")
    ds = SFTDataset(Path(opts["data"]), tok, max_length=512, log=None)
    samples = [{"input_ids": ds[i][0].tolist(), "labels": ds[i][1].tolist()} for i in range(len(ds))]
    if opts.get("unsloth"):  # the base's own weights (the Qwen3 directory); no activation checkpointing, as ours
        model, _ = FastLanguageModel.from_pretrained(opts["qwen3_dir"], max_seq_length=512, dtype=torch.bfloat16,
                                                     load_in_4bit=False, fix_tokenizer=False)
        model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0.0, bias="none",
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                 "up_proj", "down_proj"],
                                                 use_gradient_checkpointing=False)
    else:
        cfg = Qwen3Config(**shape_of(opts["shape"], len(tok)), tie_word_embeddings=True, rope_theta=1e6,
                          max_position_embeddings=32768, attn_implementation="sdpa")
        with torch.device(opts["device"]):
            model = Qwen3ForCausalLM(cfg).to(torch.bfloat16 if cuda else torch.float32)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    pad = tok.pad_token_id or 0

    def padded(batch: list[dict]) -> dict:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), pad)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(b["input_ids"]), torch.tensor(b["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    flatten = DataCollatorWithFlattening()
    tokens: list[int] = []
    slots: list[int] = []  # what each batch computes on: tokens and padding

    def collate(batch: list[dict]) -> dict:
        tokens.append(sum(len(b["input_ids"]) for b in batch))
        out = padded(batch) if opts["collator"] == "padded" else flatten(batch)
        slots.append(out["input_ids"].numel())
        return out

    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args: object, state: object, control: object, **kw: object) -> None:
            if cuda:
                torch.cuda.synchronize()
            ends.append(time.perf_counter() - t0)

    targs = TrainingArguments(output_dir=opts["out"], per_device_train_batch_size=opts["batch"], num_train_epochs=1,
                              max_steps=opts["steps"] or -1, learning_rate=1e-4, bf16=cuda, use_cpu=not cuda,
                              logging_steps=10_000, save_strategy="no", report_to=[], optim="adamw_torch_fused"
                              if cuda else "adamw_torch", dataloader_num_workers=0, remove_unused_columns=False,
                              disable_tqdm=True, **length_grouping(TrainingArguments, opts.get("grouped", False)))
    Trainer(model=model, args=targs, train_dataset=samples, data_collator=collate, callbacks=[Clock()]).train()
    full_epoch = not opts["steps"]
    if full_epoch:
        model.save_pretrained(opts["out"])  # the adapter, as ours saves its own at the end
    warm = min(2, len(ends) - 1)
    steady = (sum(tokens[warm + 1:len(ends)]) / (ends[-1] - ends[warm])) if len(ends) > warm + 1 else float("nan")
    total = int(ds.lengths.sum())
    done = sum(tokens[:warm + 1])
    row = dict(name=opts["name"], code=0, steady_tok_s=steady, imports_s=round(imports_s, 3), first_step_s=ends[0],
               warmup_end_s=ends[warm], steps=len(ends), full_epoch=full_epoch,
               pad_share=round(1 - sum(tokens) / sum(slots), 4),
               # per step, for a look at what a step's time follows (its width, a width met before)
               step_end_s=[round(e, 4) for e in ends], step_slots=slots[:len(ends)])
    if not full_epoch:
        row["projected_s"] = ends[warm] + (total - done) / steady
    return row


def length_grouping(training_arguments: type, grouped: bool) -> dict:
    """The TrainingArguments option of the length-grouped sampler, under the name this transformers gives it."""
    if not grouped:
        return {}
    names = {f.name for f in dataclasses.fields(training_arguments)}
    if "train_sampling_strategy" in names:  # its name since transformers 5.2
        return {"train_sampling_strategy": "group_by_length"}
    return {"group_by_length": True}


def run_hf_subprocess(opts: dict, cache: Path, timeout: float) -> dict:
    """run_hf in a fresh process (clean memory, its own patches), its compile caches in `cache` (Inductor's,
    Triton's, and Unsloth's, which it writes to the working folder). Its `wall_s`, like ours', runs from launch
    to exit."""
    cache.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": python_path(), "TORCHINDUCTOR_CACHE_DIR": str(cache),
           "TRITON_CACHE_DIR": str(cache / "triton"), "UNSLOTH_DISABLE_STATISTICS": "1"}  # no Hub request
    t0 = time.perf_counter()
    worker_opts = json.dumps(dict(opts, launched_at=time.time()))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--hf-worker", worker_opts]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cache, env=env)
    except subprocess.TimeoutExpired:
        return dict(name=opts["name"], code=124, error=f"timed out after {timeout:.0f} s")
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            return dict(json.loads(line), wall_s=time.perf_counter() - t0)
    return dict(name=opts["name"], code=p.returncode, error=(p.stdout + p.stderr)[-3000:])


# ------------------------------------------------------------------------- table

def epoch_s(row: dict, stats: dict) -> float:
    """Wall time to the finished epoch: measured, or projected for --steps rows."""
    if "projected_s" in row:
        return row["projected_s"]
    if row.get("full_epoch"):
        return row["wall_s"]
    rate = row.get("steady_tok_s") or float("nan")
    return row.get("warmup_end_s", float("nan")) + stats["tokens"] / rate


def machine_and_software(device: str) -> str:
    """What the figures were measured on: the device, the CPU cores and the versions of each stack's
    libraries, as the rows' processes import them (the first found on the path)."""
    import torch

    where = "CPU"
    if device == "cuda":  # asked in a child process: this one starts no CUDA, leaving the GPU's memory to the rows
        where = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.get_device_name())"],
                               capture_output=True, text=True, check=False).stdout.strip() or "a CUDA device"
    found = [f"torch {torch.__version__}"]  # with its build tag (+cu130), which the package's metadata leaves out
    for name in ("transformers", "peft", "liger-kernel", "unsloth"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return f"{where}, {os.cpu_count()} cores; " + ", ".join(found)


def print_table(rows: list[dict], stats: dict) -> None:
    """Every variant's epoch wall time, steady tokens/s, first step and (a measured epoch of ours) loss at the
    last step, against the fastest peer row (Trainer + PEFT, with or without Liger, or Unsloth)."""
    peers = [epoch_s(r, stats) for r in rows if r["name"] in VARIANTS and VARIANTS[r["name"]][0] == "hf" and r.get("code") == 0]
    ref = min(peers) if peers else float("nan")
    print(f"\n{stats['conversations']} conversations, {stats['tokens']:,} tokens (mean {stats['mean']:.0f}); "
          f"{stats['machine']}")
    print(f"{'variant':34s} {'epoch s':>9s} {'how':>9s} {'vs fastest peer':>15s} {'steady tok/s':>12s} "
          f"{'1st step s':>10s} {'last loss':>9s}")
    for r in rows:
        if r.get("code") != 0:
            print(f"{r['name']:34s} failed: {str(r.get('error', ''))[-300:]}")
            continue
        e = epoch_s(r, stats)
        how = "measured" if r.get("full_epoch") else "projected"
        loss = f"{r['last_loss']:9.4f}" if "last_loss" in r and r.get("full_epoch") else f"{'-':>9s}"  # ours only
        print(f"{r['name']:34s} {e:9.1f} {how:>9s} {ref / e:14.2f}x {r['steady_tok_s']:12,.0f} "
              f"{r['first_step_s']:10.1f} {loss}")


def main(argv: list[str] | None = None) -> int:
    """Run the chosen variants one after another; print the table; optionally write JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--conversations", type=int, default=None, help="chats in the mix (default 12,000; 200 with --tiny)")
    p.add_argument("--steps", type=int, default=60,
                   help="optimizer steps of the projected rows; 0: every row trains its whole epoch (measured)")
    p.add_argument("--workdir", default=str(REPO / "out" / "bench_e2e"),
                   help="where the base, the chat mix, the caches and the logs go; kept between runs "
                        "(default out/bench_e2e)")
    p.add_argument("--json", default=None, help="write every row here")
    p.add_argument("--timeout", type=float, default=400, help="seconds per variant")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny model, 200 conversations unless --conversations")
    p.add_argument("--against", default=None,
                   help="another checkout of this repo (e.g. a `git worktree` of an earlier revision): each ours* "
                        "row is run from it too, right after, as <row>@<its folder name>")
    p.add_argument("--hf-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.hf_worker:
        print(json.dumps(run_hf(json.loads(args.hf_worker))), flush=True)
        return 0
    import torch

    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    shape = "tiny" if args.tiny else "qwen3-0.6b"
    n = args.conversations or (200 if args.tiny else 12_000)
    workdir = Path(args.workdir).resolve()  # the Trainer rows run in their cache folders
    t = time.perf_counter()
    base, data, stats = prepare(workdir, n, shape)
    stats["machine"] = machine_and_software(device)
    cache_bytecode(workdir)
    print(f"data and base ready in {time.perf_counter() - t:.0f} s: {stats}", flush=True)
    against = Path(args.against).resolve() if args.against else None
    if against is not None and not (against / "trainer" / "train_lora.py").is_file():
        p.error(f"--against {args.against}: no trainer/train_lora.py there; pass a checkout of this repo")
    runs = [(name, REPO) for name in args.variants.split(",")]
    if against is not None:  # each ours* row, then the same from the other checkout
        runs = [run for name, repo in runs for run in
                ([(name, repo), (f"{name}@{against.name}", against)] if VARIANTS[name][0] == "ours" else [(name, repo)])]
    rows = []
    for name, repo in runs:
        variant, _, tag = name.partition("@")
        stack, opts, length = VARIANTS[variant]
        steps = args.steps if length == "steps" else None
        on_ours = variant == "ours-qwen3-dir"  # on `ours`' cache, as its graphs are the same
        suffix = f"@{tag}" if tag else ""
        cache = workdir / ("cache_" + ("ours" if on_ours else variant.removesuffix("-warm")) + suffix)
        if not (on_ours or variant.endswith("-warm")) and cache.exists():  # a cold start: empty compile caches
            shutil.rmtree(cache)
        if stack == "ours":
            row = run_ours(name, opts, base, data, workdir, steps, cache, device, args.timeout, repo)
            row["full_epoch"] = not steps
        else:
            row = run_hf_subprocess(dict(opts, name=name, data=str(data), shape=shape, device=device,
                                         qwen3_dir=str(qwen3_dir(base)),
                                         steps=steps or 0, batch=32, out=str(workdir / "runs" / name)),
                                    cache, args.timeout)
        rows.append(row)
        print(json.dumps(row, default=str)[:1500], flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(dict(stats=stats, rows=rows), indent=1, default=str))
    print_table(rows, stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
