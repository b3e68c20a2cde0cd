"""The trainer's pieces against references: LR endpoints, flags, loss vs float64, sharding, nan skipping."""

import json
import math
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from dataset.lm_dataset import collate_padded
from model.model_lora import apply_lora, lora_parameters
from model.model_minimind import MiniMindForCausalLM
from tests.train_utils import REPO, python, save_tiny_minimind, scaled, subprocess_env, tiny_config
from trainer.args import FlagError, parse_args
from trainer.base_model import BaseModelError, load_directory, load_tokenizer, resolve_weight
from trainer.data import GROUP_STEPS, StepSampler, collate_supervised, epoch_order, group_by_length
from trainer.distributed import DistInfo, FlatGradients
from trainer.engine import enable_activation_checkpointing, make_optimizer, train_step
from trainer.guard import DivergenceGuard, TrainingDiverged
from trainer.logger import RunLogger
from trainer.loss import IGNORE_INDEX, SupervisedLoss
from trainer.schedule import lr_at

VOCAB = 512  # these tests need no real tokenizer: a small vocabulary keeps them fast
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
NOHUP_FLAGS = ("--epochs 20 --hidden_size 2048 --device cpu --batch_size 16 --learning_rate 1e-4 "
               "--accumulation_steps 8 --log_interval 10 --save_interval 100 --data_path ../dataset/lora_identity.jsonl "
               "--num_hidden_layers 20 --use_wandb --from_resume 1 --from_weight full_sft").split()


# ------------------------------------------------------------------------- schedule and flags

def test_lr_schedule_endpoints():
    peak, total, warm = 1e-3, 100, 10
    assert lr_at(0, total, peak, warm) == pytest.approx(peak / 11)  # warmup starts small but non-zero
    assert lr_at(warm - 1, total, peak, warm) == pytest.approx(peak * 10 / 11)
    assert lr_at(warm, total, peak, warm) == pytest.approx(peak)  # peak right after warmup
    assert lr_at(total - 1, total, peak, warm) == pytest.approx(peak / 10)  # MiniMind's floor on the last step
    lrs = [lr_at(s, total, peak, warm) for s in range(warm, total)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(0, 5, peak) == pytest.approx(peak) and lr_at(4, 5, peak) == pytest.approx(peak / 10)
    assert lr_at(0, 1, peak) == pytest.approx(peak)  # a one-step run does not divide by zero


def test_flags_accept_minimind_spellings():
    a = parse_args("lora", "t", NOHUP_FLAGS)
    assert (a.epochs, a.hidden_size, a.num_hidden_layers, a.batch_size, a.accumulation_steps) == (20, 2048, 20, 16, 8)
    assert a.use_wandb is True and a.from_resume is True and a.from_weight == "full_sft"
    assert a.eval_interval == a.save_interval == 100
    b = parse_args("lora", "t", ["--out_dir", "x", "--dim", "768", "--n_layers", "16", "--use_moe", "True",
                                 "--use_wandb", "0", "--use_compile", "1", "--from_resume", "0", "--ddp",
                                 "--local-rank", "3", "--skip_invalid"])
    assert (b.save_dir, b.hidden_size, b.num_hidden_layers, b.use_moe) == ("x", 768, 16, True)
    assert (b.use_wandb, b.use_compile, b.from_resume, b.ddp, b.local_rank, b.skip_bad_data) == (
        False, True, False, True, 3, True)
    with pytest.raises(FlagError, match="--accumulation_steps"):
        parse_args("lora", "t", ["--accumulation_steps", "0"])
    with pytest.raises(SystemExit):  # argparse: a switch value that is not 0/1/true/false
        parse_args("lora", "t", ["--use_moe", "maybe"])


def test_from_weight_names_resolve_like_minimind(tmp_path):
    save_tiny_minimind(tmp_path / "full_sft_64.pth")
    assert resolve_weight("full_sft", str(tmp_path), None, None) == tmp_path / "full_sft_64.pth"
    assert resolve_weight("full_sft", str(tmp_path), 64, False) == tmp_path / "full_sft_64.pth"
    with pytest.raises(BaseModelError, match=r"full_sft_768\.pth does not exist.*full_sft_64\.pth"):
        resolve_weight("full_sft", str(tmp_path), 768, None)
    (tmp_path / "full_sft_128_moe.pth").write_bytes(b"")
    with pytest.raises(BaseModelError, match=r"2 files match.*full_sft_128_moe\.pth, full_sft_64\.pth"):
        resolve_weight("full_sft", str(tmp_path), None, None)
    assert resolve_weight("full_sft", str(tmp_path), None, True) == tmp_path / "full_sft_128_moe.pth"
    with pytest.raises(BaseModelError, match="no such file"):
        resolve_weight(str(tmp_path / "nope.pth"), str(tmp_path), None, None)


def test_a_folder_without_config_names_the_models_inside(tmp_path):
    # merge_lora.py's --save_dir: a MiniMind .pth beside a transformers directory
    (tmp_path / "merged_64.pth").write_bytes(b"")
    (tmp_path / "merged_64_hf").mkdir()
    (tmp_path / "merged_64_hf" / "config.json").write_text("{}")
    (tmp_path / "notes").mkdir()
    with pytest.raises(BaseModelError, match=r"needs config.json \(and weights\); it holds merged_64.pth, "
                                              r"merged_64_hf/: pass one of those$"):
        load_directory(tmp_path, torch.float32)
    with pytest.raises(BaseModelError, match=r"needs config.json \(and weights\)$"):
        load_directory(tmp_path / "notes", torch.float32)


def test_directories_whose_weights_would_load_partly_random_or_run_their_own_code_are_refused(tmp_path, capsys):
    """transformers only warns (with a table) when tensors do not fit config.json, and asks on the terminal whether to
    run a directory's own code: each is one line here, and no directory loads with weights left random."""
    from safetensors.torch import load_file, save_file
    from transformers import GemmaConfig, GemmaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8)
    Qwen3ForCausalLM(Qwen3Config(**common)).save_pretrained(tmp_path / "shape")  # the fast decoder's kind
    config = json.loads((tmp_path / "shape" / "config.json").read_text())
    (tmp_path / "shape" / "config.json").write_text(json.dumps({**config, "intermediate_size": 64}))
    capsys.readouterr()
    shapes = (r"is \[32, 48\] in the file, \[32, 64\] by the config" if int(transformers.__version__.split(".")[0]) >= 5 else
              r"has another shape in the file than by the config")  # transformers 4 lists the names alone
    with pytest.raises(BaseModelError, match=r"its weights do not match its config.json: model.layers.0.mlp.down_proj"
                                             rf".weight {shapes} \(3 tensor"):
        load_directory(tmp_path / "shape", torch.float32)
    assert "LOAD REPORT" not in capsys.readouterr().err

    GemmaForCausalLM(GemmaConfig(**common)).save_pretrained(tmp_path / "gemma")  # transformers' own class
    weights = load_file(tmp_path / "gemma" / "model.safetensors")
    del weights["model.layers.0.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "gemma" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BaseModelError, match=r"gemma: its weights do not fit .*model.layers.0.mlp.up_proj.weight"):
        load_directory(tmp_path / "gemma", torch.float32)

    shutil.copytree(tmp_path / "shape", tmp_path / "custom")
    (tmp_path / "custom" / "config.json").write_text(json.dumps(
        {**config, "model_type": "mine", "auto_map": {"AutoModelForCausalLM": "modeling_mine.Mine"}}))
    with pytest.raises(BaseModelError, match=r"custom: its config.json names custom code \(auto_map, model_type "
                                             r"'mine'\), which this repo does not run"):
        load_directory(tmp_path / "custom", torch.float32)

    # a model_type this transformers does not know (a newer model's): one line, not transformers' paragraph
    (tmp_path / "custom" / "config.json").write_text(json.dumps({**config, "model_type": "qwen9"}))
    with pytest.raises(BaseModelError, match=r"custom: its config.json's model_type 'qwen9' is no architecture "
                                             r"transformers \S+ ships; .*pip install -U transformers") as err:
        load_directory(tmp_path / "custom", torch.float32)
    assert "\n" not in str(err.value)


MODEL_TYPE_FIX = r"; set it to the architecture its weights are"


@pytest.mark.parametrize("model_type,problem", [
    ("", r'model_type is empty \(""\)'), ("  ", r'model_type is empty \("  "\)'), (None, "model_type is null, not a string"),
    (5, "model_type is 5, not a string"), (["mistral"], r'model_type is \["mistral"\], not a string'),
    ("<missing>", "no model_type key")])
def test_a_config_without_a_model_type_names_its_file_not_a_transformers_upgrade(tmp_path, model_type, problem):
    """No transformers release knows an empty or absent model_type: the file is named, not `pip install -U`."""
    folder = tmp_path / "mistral-7b"  # a name transformers would guess an architecture from
    folder.mkdir()
    config = {"model_type": model_type, "hidden_size": 32, "vocab_size": 64, "auto_map": {"AutoConfig": "x.Y"}}
    if model_type == "<missing>":
        del config["model_type"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(BaseModelError, match=rf"^{folder}/config.json: {problem}{MODEL_TYPE_FIX}") as err:
        load_directory(folder, torch.float32)
    assert "pip install" not in str(err.value) and "\n" not in str(err.value)


def test_chat_on_a_config_with_an_empty_model_type_exits_2_in_one_line(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "", "hidden_size": 32, "vocab_size": 64}))
    run = subprocess.run([python(), "scripts/chat.py", "--from_weight", str(folder), "--device", "cpu"],
                         cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    lines = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(f'error: {folder}/config.json: model_type is empty ("")')
    assert "pip install" not in run.stdout + run.stderr


def test_a_missing_tokenizer_folder_is_named_as_missing(tmp_path):
    with pytest.raises(BaseModelError, match=r"nope: no such folder; --tokenizer_path takes a folder") as err:
        load_tokenizer(tmp_path / "nope")
    assert "Repo id" not in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaseModelError, match=r"empty: holds no tokenizer \(tokenizer.json, "):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "empty" / "tokenizer.json").write_text("{")  # a damaged tokenizer keeps the loader's own reason
    with pytest.raises(BaseModelError, match=r"empty: cannot load a tokenizer from it \("):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(BaseModelError, match=r"tokenizer.json: a file; --tokenizer_path takes a folder .*: pass "):
        load_tokenizer(tmp_path / "empty" / "tokenizer.json")


# ------------------------------------------------------------------------- data order

@pytest.mark.parametrize("n,world,batch,accum", [(23, 1, 4, 1), (23, 2, 3, 2), (10, 3, 2, 2), (5, 4, 2, 1)])
def test_each_sample_once_per_epoch_and_ranks_stay_in_step(n, world, batch, accum):
    ranks = [StepSampler(n, batch, accum, r, world, seed=7) for r in range(world)]
    for s in ranks:
        s.set_epoch(2)
    seen = [i for s in ranks for step in s.steps for mb in step for i, live in mb if live]
    assert sorted(seen) == list(range(n))
    assert len({len(s.steps) for s in ranks}) == 1 and len(ranks[0].steps) == ranks[0].steps_in_epoch()
    for k in range(len(ranks[0].steps)):  # same number of micro-batches on every rank (DDP needs it)
        assert len({len(s.steps[k]) for s in ranks}) == 1
        assert all(len(mb) <= batch for s in ranks for mb in s.steps[k])
    assert sum(ranks[0].step_sizes) == n
    # A resume on a different number of ranks continues with exactly the unseen samples.
    done = sum(ranks[0].step_sizes[:1])
    other = [StepSampler(n, batch, accum, r, world + 1, seed=7) for r in range(world + 1)]
    for s in other:
        s.set_epoch(2, start=done)
    rest = [i for s in other for step in s.steps for mb in step for i, live in mb if live]
    assert sorted(rest) == sorted(epoch_order(n, 7, 2)[done:])


def test_group_by_length_pads_less_and_resumes_in_the_same_order():
    """--group_by_length: the epoch's shuffled order cut into runs of GROUP_STEPS steps' samples, each run longest
    first; the ranks' steps take it in turn (every sample once), with far less padding than random batches; and
    a resume on another number of ranks with the same samples per step continues with exactly the unseen ones."""
    n, batch, accum, world = 1500, 3, 2, 2  # 12 samples per step: runs of 600
    lengths = np.random.default_rng(0).integers(5, 400, n)
    plain = epoch_order(n, 7, 1)
    group = GROUP_STEPS * world * batch * accum
    grouped = group_by_length(plain, lengths, group)
    for start in range(0, n, group):
        assert sorted(grouped[start:start + group]) == sorted(plain[start:start + group])
        run = [int(lengths[i]) for i in grouped[start:start + group]]
        assert run == sorted(run, reverse=True)

    def samplers(ranks: int, batch: int, start: int = 0, by_length: bool = True) -> list[StepSampler]:
        out = [StepSampler(n, batch, accum, r, ranks, seed=7, lengths=lengths if by_length else None)
               for r in range(ranks)]
        for s in out:
            s.set_epoch(1, start=start)
        return out

    def steps(plan: list[StepSampler]) -> list[list[int]]:
        """Each global step's samples, over all ranks."""
        return [sorted(i for s in plan for mb in s.steps[k] for i, live in mb if live) for k in range(len(plan[0].steps))]

    def padding(plan: list[StepSampler]) -> int:
        """Pad tokens of every micro-batch padded to its longest sample."""
        return sum(len(mb) * max(lengths[i] for i, _ in mb) - sum(lengths[i] for i, _ in mb)
                   for s in plan for step in s.steps for mb in step)

    assert steps(samplers(world, batch)) == [sorted(grouped[k:k + 12]) for k in range(0, n, 12)]
    assert padding(samplers(world, batch)) < padding(samplers(world, batch, by_length=False)) / 10
    done = 70 * 12  # a resume past the first run, on 3 ranks of 2 × 2 (12 samples per step)
    assert steps(samplers(3, 2, start=done)) == [sorted(grouped[k:k + 12]) for k in range(done, n, 12)]


# ------------------------------------------------------------------------- loss and gradients vs float64

def _samples(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(4, 20, (), generator=g))
        ids = torch.randint(3, VOCAB, (length,), generator=g)
        prompt = int(torch.randint(1, length - 1, (), generator=g))
        labels = ids.clone()
        labels[:prompt] = IGNORE_INDEX
        out.append((ids, labels))
    return out


def _lora_model(seed: int = 0) -> MiniMindForCausalLM:
    torch.manual_seed(seed)
    model = MiniMindForCausalLM(tiny_config(vocab_size=VOCAB))
    apply_lora(model, rank=4)
    with torch.no_grad():  # B = 0 would give A no gradient at all
        for p in lora_parameters(model):
            p.normal_(0, 0.05)
    return model.train()


def _reference_grads(model: MiniMindForCausalLM, samples: list) -> tuple[float, list[torch.Tensor]]:
    """One big batch in float64, sample by sample (no padding): mean CE over all supervised tokens."""
    ref = _lora_model()
    ref.load_state_dict(model.state_dict())
    ref.double()
    total, count = 0.0, 0
    for ids, labels in samples:
        logits = ref(ids[None]).logits[0, :-1]
        total = total + F.cross_entropy(logits, labels[1:], ignore_index=IGNORE_INDEX, reduction="sum")
        count += int((labels[1:] != IGNORE_INDEX).sum())
    loss = total / count
    loss.backward()
    return loss.item(), [p.grad for p in lora_parameters(ref)]


def test_supervised_loss_matches_float64_full_logits():
    model, samples = _lora_model(), _samples(5)
    batch = collate_supervised(samples, lambda s: collate_padded(s, pad_id=0))
    ref_loss, ref_grads = _reference_grads(model, samples)
    n = batch["sup_targets"].numel()
    for chunk in (None, 7):  # one chunk, and chunks recomputed in backward (checkpointed)
        model.zero_grad()
        ce_sum, aux = SupervisedLoss(model, chunk_tokens=chunk)(
            batch["input_ids"], batch["sup_index"], batch["sup_targets"], attention_mask=batch["attention_mask"])
        (ce_sum / n).backward()
        assert (ce_sum / n).item() == pytest.approx(ref_loss, abs=1e-5) and aux.item() == 0
        for p, g in zip(lora_parameters(model), ref_grads):
            torch.testing.assert_close(p.grad.double(), g, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("batch_size,flat", [(8, False), (2, False), (3, False), (3, True)])
def test_accumulated_step_is_one_big_batch(batch_size, flat):
    """SGD with lr 1 makes the update the gradient itself: micro-batches and padding must not change it.
    `flat`: the gradients live in one FlatGradients buffer (CUDA graphs, several ranks) and stay views of it."""
    model, samples = _lora_model(), _samples(8, seed=1)
    _, ref_grads = _reference_grads(model, samples)
    before = [p.detach().clone() for p in lora_parameters(model)]
    micro = [collate_supervised(samples[i:i + batch_size], lambda s: collate_padded(s, pad_id=0))
             for i in range(0, 8, batch_size)]
    n_sup = sum(b["sup_targets"].numel() for b in micro)
    params = lora_parameters(model)
    flat_grads = FlatGradients(params) if flat else None
    opt = torch.optim.SGD(params, lr=1.0, fused=True)
    loss, norm = train_step(SupervisedLoss(model), micro, n_sup, CPU, opt, None, params, 1.0, 0.0, torch.float32,
                            flat_grads=flat_grads)
    grads = [b - p.detach() for b, p in zip(before, params)]
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, atol=2e-6, rtol=1e-4)
    assert norm.item() == pytest.approx(math.sqrt(sum((r ** 2).sum().item() for r in ref_grads)), rel=1e-5)
    if flat:  # zeroed in place after the step, and the next backward adds into the same buffer
        buffer = flat_grads.buffer
        assert all(p.grad.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr() for p in params)
        assert not buffer.any()
        ce_sum, _ = SupervisedLoss(model)(micro[0]["input_ids"], micro[0]["sup_index"], micro[0]["sup_targets"],
                                          attention_mask=micro[0]["attention_mask"])
        ce_sum.backward()
        assert buffer.abs().sum() > 0
        assert sum(p.grad.abs().sum() for p in params).item() == pytest.approx(buffer.abs().sum().item(), rel=1e-6)


@pytest.mark.parametrize("max_norm", [0.5, 100.0, math.inf])
def test_flat_gradients_clip_like_torch(max_norm):
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(shape, generator=g) for shape in ((4, 8), (8, 4), (3,), (16, 2))]
    params = [torch.nn.Parameter(torch.zeros_like(x)) for x in grads]
    flat = FlatGradients(params)
    for p, x in zip(params, grads):
        p.grad.copy_(x)
    want = [x.clone() for x in grads]
    want_norm = torch.nn.utils.clip_grad_norm_(_with_grads(want), max_norm)  # clips `want` in place
    norm = flat.clip_(max_norm)
    assert norm.item() == pytest.approx(want_norm.item(), rel=1e-6)
    for p, w in zip(params, want):
        torch.testing.assert_close(p.grad, w, rtol=1e-6, atol=1e-7)
    flat.zero_()
    assert all(not p.grad.any() for p in params) and all(p.grad is not None for p in params)


def _with_grads(grads: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    """Parameters whose .grad are `grads` themselves (clip_grad_norm_ then scales them in place)."""
    out = []
    for x in grads:
        p = torch.nn.Parameter(torch.zeros_like(x))
        p.grad = x
        out.append(p)
    return out


def test_several_ranks_without_ddp_must_average_their_gradients():
    """A step of one of several ranks, with neither DDP nor FlatGradients, would train each rank apart."""
    model, samples = _lora_model(), _samples(2, seed=1)
    batch = collate_supervised(samples, lambda s: collate_padded(s, pad_id=0))
    params = lora_parameters(model)
    rank0_of_2 = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="flat_grads"):
        train_step(SupervisedLoss(model), [batch], 1, rank0_of_2, make_optimizer(params, 1e-3, 0.0), None, params,
                   1e-3, 1.0, torch.float32)


# ------------------------------------------------------------------------- non-finite steps

def test_nan_step_is_skipped_and_reported(capsys):
    model, samples = _lora_model(), _samples(4, seed=2)
    poison = int(samples[0][0][0])
    # Untie the head first, so only samples containing the poisoned token get a nan loss.
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
    with torch.no_grad():
        model.model.embed_tokens.weight[poison] = float("nan")
    clean = [(ids, lab) for ids, lab in _samples(30, seed=3) if poison not in ids][:4]
    params = lora_parameters(model)
    opt = make_optimizer(params, 1e-2, 0.01)
    log = RunLogger(CPU, total_steps=10, start_step=0, log_interval=1)
    guard = DivergenceGuard(VOCAB, params, [], checkpoint=None, limit=2)

    def step(k: int, batch: list) -> None:
        b = collate_supervised(batch, lambda s: collate_padded(s, pad_id=0))
        loss, norm = train_step(SupervisedLoss(model), [b], b["sup_targets"].numel(), CPU, opt, None, params,
                                1e-2, 1.0, torch.float32)
        guard.check(log.step(k, 1, loss, norm, 1e-2, 10), log.write, check_grads=True)

    before = [p.detach().clone() for p in params]
    step(1, samples)
    assert all(torch.equal(b, p) for b, p in zip(before, params))  # no update at all ...
    assert all(float(opt.state[p]["step"]) == 0 and not opt.state[p]["exp_avg"].any() for p in params)  # ... nor moments
    assert "step 1: loss is nan; skipped this step" in capsys.readouterr().out
    step(2, clean)
    assert not all(torch.equal(b, p) for b, p in zip(before, params))
    assert all(float(opt.state[p]["step"]) == 1 for p in params)
    step(3, samples)
    with pytest.raises(TrainingDiverged, match=r"2 optimizer steps in a row.*lower --learning_rate.*bfloat16"):
        step(4, samples)
    assert [s for s, _ in log.history["train"]] == [2]  # nan losses stay out of the curve


def test_pyplot_preload_shortens_the_gil_switch_interval_only_while_it_imports(monkeypatch):
    """The background import of pyplot runs with a short GIL switch interval (so the training loop's thread gets
    the GIL back quickly) and leaves the interpreter's own interval as it was."""
    import trainer.logger as logger

    for earlier in [t for t in threading.enumerate() if t.name == "preload-plotting"]:  # a RunLogger's, above
        earlier.join(timeout=60)
    seen = []
    monkeypatch.setattr(logger, "_import_pyplot", lambda: seen.append(sys.getswitchinterval()))
    before = sys.getswitchinterval()
    logger.preload_plotting().join(timeout=60)
    assert seen and seen[0] < before / 10
    assert sys.getswitchinterval() == before


# ------------------------------------------------------------------------- MoE aux loss, gradient checkpointing

def _collate(samples: list) -> dict:
    return collate_supervised(samples, lambda s: collate_padded(s, pad_id=0))


def test_moe_aux_loss_is_averaged_over_micro_batches():
    torch.manual_seed(0)
    model = MiniMindForCausalLM(tiny_config(vocab_size=VOCAB, use_moe=True))
    apply_lora(model, rank=4)  # all linears, experts included (some get no gradient in a step)
    model.train()
    samples = _samples(6, seed=4)
    micro = [_collate(samples[:4]), _collate(samples[4:])]
    ce, aux, count = 0.0, [], 0
    with torch.no_grad():  # the reference: the model's own logits and aux loss, batch by batch
        for b in micro:
            out = model(b["input_ids"], attention_mask=b["attention_mask"])
            labels = b["labels"][:, 1:]
            ce += F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB).double(), labels.reshape(-1),
                                  ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((labels != IGNORE_INDEX).sum())
            aux.append(out.aux_loss.item())
    assert min(aux) > 0
    params = lora_parameters(model)
    loss, _ = train_step(SupervisedLoss(model), micro, count, CPU, make_optimizer(params, 1e-3, 0.0), None, params,
                         1e-3, 1.0, torch.float32)
    assert loss.item() == pytest.approx(ce / count + sum(aux) / len(aux), rel=1e-5)


def test_gradient_checkpointing_gives_the_same_step():
    samples = _samples(4, seed=5)
    grads = []
    for checkpointing in (False, True):
        model = _lora_model()
        if checkpointing:
            enable_activation_checkpointing(model)
            assert model.model.gradient_checkpointing
        params = lora_parameters(model)
        before = [p.detach().clone() for p in params]
        b = _collate(samples)
        train_step(SupervisedLoss(model), [b], b["sup_targets"].numel(), CPU, torch.optim.SGD(params, lr=1.0, fused=True),
                   None, params, 1.0, 0.0, torch.float32)
        grads.append([x - p.detach() for x, p in zip(before, params)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------- leaving

_RELEASE_WORKERS = """
import os
from torch._inductor.async_compile import AsyncCompile
from trainer.compiling import CompileWorkers

def children():
    with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as f:
        return f.read().split()

AsyncCompile.process_pool().submit(sum, [1, 2]).result()  # the pool a GPU compile starts, with a job done
never = CompileWorkers(None)
for done in range(5):
    never.before_step(done, epoch=0)
assert never.thread is None and children(), "a run that may still compile keeps its compile workers"
workers = CompileWorkers(release_after=2)
workers.before_step(0, epoch=0)
workers.before_step(1, epoch=0)
assert workers.thread is None and children(), "released during the warm-up"
workers.before_step(2, epoch=0)
assert workers.thread is not None
workers.before_step(3, epoch=1)  # a new epoch may compile a new shape: the stop in flight is waited for
assert not workers.thread.is_alive()
print("left", children())
"""


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads child processes from Linux's /proc")
def test_compile_workers_go_after_the_warm_up():
    """CompileWorkers stops Inductor's compile worker processes in a thread once the warm-up steps are done,
    never for a run that may still compile, and waits for a stop in flight when a new epoch begins."""
    run = subprocess.run([python(), "-c", _RELEASE_WORKERS], env=subprocess_env(TORCHINDUCTOR_COMPILE_THREADS="2"),
                         capture_output=True, text=True, timeout=scaled(180))
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "left []"


_FUNCTION = '''
import torch


class Product(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x @ w

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return grad @ w.t() * FACTOR, x.t() @ grad


def layer(x, w):
    return torch.sin(Product.apply(x, w))
'''
_COMPILE_ONCE = '''
import json, sys
import torch
from torch._dynamo.utils import counters
sys.path.insert(0, sys.argv[1])
import function
from trainer.compiling import compiler_settings

compiler_settings()
torch.manual_seed(0)
x, w = torch.randn(8, 16, requires_grad=True), torch.randn(16, 4, requires_grad=True)
torch.compile(function.layer)(x, w).sum().backward()
compiled = x.grad.clone()
x.grad = None
function.layer(x, w).sum().backward()
aot = counters["aot_autograd"]
print(json.dumps(dict(hit=aot["autograd_cache_hit"], miss=aot["autograd_cache_miss"],
                      same=torch.allclose(compiled, x.grad), grad=compiled.sum().item())))
'''


@pytest.mark.skipif(not hasattr(torch._functorch.config, "autograd_cache_allow_custom_autograd_functions"),
                    reason="torch < 2.7 keeps graphs with custom autograd.Functions out of AOTAutograd's cache")
def test_warm_start_reuses_a_graph_with_our_autograd_function_and_never_a_stale_one(tmp_path):
    """compiler_settings lets AOTAutograd's cache hold a compiled graph with a custom autograd.Function (as
    the fused LoRA layer is), so a second process loads it instead of tracing it again. A Function whose
    backward changed misses the cache, and the compiled gradient is the new backward's."""
    def run(factor: float) -> dict:
        (tmp_path / "function.py").write_text(_FUNCTION.replace("FACTOR", repr(factor)))
        env = subprocess_env(TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"), PYTHONDONTWRITEBYTECODE="1")
        out = subprocess.run([python(), "-c", _COMPILE_ONCE, str(tmp_path)], env=env, capture_output=True,
                             text=True, timeout=scaled(300))
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    first, again, edited = run(1.0), run(1.0), run(2.0)
    assert (first["hit"], first["miss"]) == (0, 1) and first["same"]
    assert (again["hit"], again["miss"]) == (1, 0) and again["same"] and again["grad"] == first["grad"]
    assert (edited["hit"], edited["miss"]) == (0, 1) and edited["same"]
    assert edited["grad"] == pytest.approx(2 * first["grad"])


def test_a_pth_finds_the_tokenizer_of_the_model_directory_written_beside_it(tmp_path, capsys):
    # train_pretrain.py writes out/pretrain_512.pth and out/pretrain_512/; merge_lora.py merged_256.pth and _hf/
    from trainer.base_model import REPO_TOKENIZER, TOKENIZER_CORE, pick_tokenizer

    for folder in ("pretrain_512", "merged_256_hf"):
        (tmp_path / folder).mkdir()
        for name in TOKENIZER_CORE[:2]:
            shutil.copy(REPO_TOKENIZER / name, tmp_path / folder / name)
        weight = tmp_path / (folder.removesuffix("_hf") + ".pth")
        weight.write_bytes(b"")
        tok = pick_tokenizer(weight, None)
        assert Path(tok.name_or_path) == tmp_path / folder and "warning" not in capsys.readouterr().out
        shutil.rmtree(tmp_path / folder)
    pick_tokenizer(tmp_path / "alone.pth", None)
    assert "warning: using the repo's tokenizer" in capsys.readouterr().out


def test_a_warmup_as_long_as_the_run_is_noted():
    from trainer.schedule import lr_at, warmup_note

    assert warmup_note(3, 4) is None
    note = warmup_note(10, 3)
    assert "--warmup_iters 10 is not shorter than the run's 3 steps" in note
    assert f"to {lr_at(2, 3, 1.0, 10):.0%} of --learning_rate" in note


def test_a_model_directory_without_a_tokenizer_is_told_to_get_one(tmp_path, capsys):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from trainer.base_model import load_base

    Qwen3ForCausalLM(Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=8)).save_pretrained(tmp_path / "m")
    with pytest.raises(BaseModelError, match=rf"or put its tokenizer.json and tokenizer_config.json into {tmp_path / 'm'}$"):
        load_base(str(tmp_path / "m"), str(tmp_path), torch.float32)
    assert f"warning: {tmp_path / 'm'} holds no tokenizer (tokenizer.json, " in capsys.readouterr().out
