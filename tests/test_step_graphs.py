"""CUDA graphs of the uncompiled step (trainer/step_graphs.py): where they apply, their shapes, and on a GPU
the same losses and weights as the plain eager step."""

import pytest
import torch

from model.errors import UserError
from model.model_lora import lora_parameters, set_lora_fused
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from tests.test_fast_paths import tiny_model
from trainer.args import parse_args
from trainer.lora_setup import build_lora
from trainer.loss import IGNORE_INDEX, SupervisedLoss, supervision
from trainer.step_graphs import (
    SUPERVISED_MULTIPLE,
    cuda_graph_needs,
    pick_cuda_graphs,
    shape_key,
    supervised_padded,
    warm_up_key,
    whole_step_needs,
)

CUDA = torch.device("cuda")


def needs(**over: object) -> dict[str, bool]:
    """cuda_graph_needs for an uncompiled bf16 run of a dense MiniMind model on a GPU, with `over` changed."""
    kw = dict(device=CUDA, compiled=False, packing=False, fsdp=False, moe=False, checkpointing=False,
              minimind=True, amp_dtype=torch.bfloat16)
    return cuda_graph_needs(**{**kw, **over})


def test_graphs_are_on_wherever_they_apply_and_off_when_asked():
    assert parse_args("lora", "", []).cuda_graphs is None
    assert pick_cuda_graphs(None, needs()) and pick_cuda_graphs(True, needs())
    assert not pick_cuda_graphs(False, needs())
    assert pick_cuda_graphs(None, needs(compiled=True, packing=True))
    for over in (dict(device=torch.device("cpu")), dict(fsdp=True), dict(moe=True), dict(checkpointing=True),
                 dict(minimind=False), dict(amp_dtype=torch.float16), dict(compiled=True, packing=False)):
        assert not pick_cuda_graphs(None, needs(**over)), over
    # Compiled, transformers' own classes and float16 keep graphs: the compiled decoder's own, not whole steps.
    assert pick_cuda_graphs(None, needs(compiled=True, packing=True, minimind=False, amp_dtype=torch.float16))
    assert all(whole_step_needs(True, torch.bfloat16).values()) and all(whole_step_needs(True, torch.float32).values())
    assert not any(whole_step_needs(False, torch.float16).values())


def test_asking_for_graphs_where_they_cannot_run_names_what_is_missing():
    with pytest.raises(UserError, match=r"--cuda_graphs 1 needs a CUDA device, no --fsdp"):
        pick_cuda_graphs(True, needs(device=torch.device("cpu"), fsdp=True))


def padded_batch(rows: int, width: int, n_supervised: int, seed: int = 0) -> dict:
    """A right-padded micro-batch of `rows` × `width` (last row half pads) with `n_supervised` supervised tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 300, (rows, width), generator=g)
    mask = torch.ones(rows, width, dtype=torch.long)
    mask[-1, width // 2:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    flat = labels.view(-1)
    keep = (flat != IGNORE_INDEX).nonzero().flatten()
    keep = keep[(keep % width) != 0]  # the first token of a row is never a next-token target
    flat[keep[n_supervised:]] = IGNORE_INDEX
    sup_index, sup_targets = supervision(labels)
    return dict(input_ids=ids, attention_mask=mask, sup_index=sup_index, sup_targets=sup_targets,
                n_tokens=int(mask.sum()))


def test_shapes_repeat_across_supervised_counts_and_differ_across_widths():
    a, b = padded_batch(3, 20, 17), padded_batch(3, 20, 40, seed=1)
    assert a["sup_index"].numel() != b["sup_index"].numel()
    assert shape_key(a) == shape_key(b)
    assert shape_key(padded_batch(3, 24, 17)) != shape_key(a)
    padded = supervised_padded(a)
    assert padded["sup_index"].numel() == SUPERVISED_MULTIPLE
    assert (padded["sup_targets"][17:] == IGNORE_INDEX).all() and torch.equal(padded["sup_index"][:17], a["sup_index"])


def packed_batch(n_supervised: int, sup_slots: int | None, seed: int = 0) -> dict:
    """padded_batch(3, 20, n_supervised) as a packed micro-batch: no attention_mask, the run's sup_slots."""
    batch = padded_batch(3, 20, n_supervised, seed=seed)
    del batch["attention_mask"]
    return {**batch, "sup_slots": sup_slots}


def test_a_packed_run_has_one_shape_while_its_supervision_fits_its_slots():
    """Packed rows pad their supervision to sup_slots, even with none; more than that, or no sup_slots: one
    row per position. Either way the warm-up key, what an eager run must have met, is the same."""
    fitting = [packed_batch(n, 24, seed=n) for n in (0, 5, 24)]
    assert len({shape_key(b) for b in fitting}) == 1
    for batch in fitting:
        padded = supervised_padded(batch)
        assert padded["sup_index"].numel() == padded["sup_targets"].numel() == 24
        n = batch["sup_index"].numel()
        assert (padded["sup_targets"][n:] == IGNORE_INDEX).all() and (padded["sup_index"][n:] == 0).all()
    for batch in (packed_batch(25, 24), packed_batch(5, None)):
        assert supervised_padded(batch)["sup_index"].numel() == 60
        assert shape_key(batch) != shape_key(fitting[0])
        assert warm_up_key(shape_key(batch)) == warm_up_key(shape_key(fitting[0]))
    assert warm_up_key(shape_key(padded_batch(3, 20, 5))) != warm_up_key(shape_key(fitting[0]))


def test_packed_micro_batches_of_the_first_epoch_fit_their_sup_slots(tmp_path):
    """sup_slots is the most supervised positions of any rank's micro-batch in the first epoch, rounded up to
    ROW_MULTIPLE: checked against every micro-batch that the real loader makes, on each of 2 ranks."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from dataset.lm_dataset import SFTDataset
    from trainer.args import REPO_ROOT
    from trainer.data import prepare_data
    from trainer.distributed import DistInfo
    from trainer.loss import ROW_MULTIPLE

    tok = AutoTokenizer.from_pretrained(REPO_ROOT / "model" / "tokenizer")
    args = SimpleNamespace(data_path=str(REPO_ROOT / "dataset" / "lora_identity.jsonl"), val_data_path=None,
                           val_fraction=0.0, seed=3, max_seq_len=512, packing=True, batch_size=32,
                           accumulation_steps=2, num_workers=0)
    counts, slots, positions = [], set(), set()
    for rank in range(2):
        info = DistInfo(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"))
        data = prepare_data(lambda path: SFTDataset(path, tok, 512, log=None), args, info, pad_id=0)
        for _, micro_batches, _ in data.steps(0, 0, 1):
            counts += [b["sup_index"].numel() for b in micro_batches]
            slots |= {b["sup_slots"] for b in micro_batches}
            positions |= {b["input_ids"].numel() for b in micro_batches}
    assert len(counts) > 10 and len(slots) == 1 and len(positions) == 1
    (sup_slots,), (n_positions,) = slots, positions
    assert max(counts) <= sup_slots < max(counts) + ROW_MULTIPLE and sup_slots % ROW_MULTIPLE == 0
    assert sup_slots < n_positions  # fewer rows for the head than one per position: the point of it


def test_padded_supervision_changes_neither_loss_nor_gradients():
    model = tiny_model()
    loss_module = SupervisedLoss(model)
    batch = padded_batch(3, 20, 25)

    def loss_and_grads(b: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        ce, _ = loss_module(b["input_ids"], b["sup_index"], b["sup_targets"], attention_mask=b["attention_mask"])
        ce.backward()
        return ce.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    plain, padded = loss_and_grads(batch), loss_and_grads(supervised_padded(batch))
    torch.testing.assert_close(padded[0], plain[0], rtol=1e-6, atol=1e-6)
    for got, want in zip(padded[1], plain[1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


# Runs that train_lora.py gives CUDA graphs of whole micro-steps on a GPU: --dtype, LoRA flags beyond the rank,
# and whether the decoder is compiled (per layer, as the bare command; both runs of the test then compile it).
GRAPHED_RUNS = {
    "bf16": (torch.bfloat16, [], False),
    "fp32": (torch.float32, [], False),
    "bf16-dora": (torch.bfloat16, ["--use_dora"], False),
    # up_proj without LoRA: a plain NF4Linear runs too, beside fused LoRA on NF4 weights (q/k/v as one GEMM).
    "bf16-4bit": (torch.bfloat16, ["--load_in_4bit",
                                   "--lora_targets", "q_proj,k_proj,v_proj,o_proj,gate_proj,down_proj"], False),
    "bf16-compiled": (torch.bfloat16, [], True),
}


def gpu_lora_model(dtype: torch.dtype, flags: list[str]) -> MiniMindForCausalLM:
    """tiny_model()'s MiniMind as train_lora.py builds it on a GPU: the whole base in `dtype` (a bf16 run
    holds it in bf16), LoRA by build_lora from `flags` (--load_in_4bit puts the base's linear weights on the
    GPU in NF4), fused LoRA training. The LoRA tensors are randomized as tiny_model's (non-zero B), a DoRA
    magnitude only by ±10% (it stays near ‖W‖): without flags the weights are tiny_model()'s, exactly."""
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(generation=3, hidden_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2,
                                               intermediate_size=96, vocab_size=300)).to(dtype)
    build_lora(model, parse_args("lora", "", ["--lora_rank", "4", "--lora_alpha", "8", *flags]), CUDA)
    g = torch.Generator().manual_seed(1)  # fill_random(seed=1)'s draws
    with torch.no_grad():
        for p in lora_parameters(model):
            noise = torch.randn(p.shape, generator=g)
            p.copy_(p * (1 + 0.1 * noise) if p.dim() == 1 else noise * 0.1)  # 1-D: DoRA's magnitude
    model.to(CUDA).train()
    set_lora_fused(model)  # as train_lora.py on a GPU without --fsdp (DoRA layers keep their own path)
    return model


def train_with_and_without_graphs(run_name: str, plan: list[list[dict]]) -> tuple[list[float], list[float], object]:
    """`plan`'s optimizer steps through the trainer's train_step, without then with MicroStepGraphs, from the
    same GRAPHED_RUNS model: (eager losses, graphed losses, the graphs), after checking the LoRA weights (with
    DoRA, its magnitudes too) agree."""
    from functools import partial

    from trainer.compiling import compile_decoder
    from trainer.distributed import DistInfo, FlatGradients
    from trainer.engine import forward_backward, make_optimizer, train_step
    from trainer.step_graphs import MicroStepGraphs

    dtype, flags, compiled = GRAPHED_RUNS[run_name]
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=CUDA)

    def run(graphed: bool) -> tuple[list[float], list[torch.Tensor], MicroStepGraphs | None]:
        model = gpu_lora_model(dtype, flags)
        if compiled:
            torch._dynamo.reset()
            compile_decoder(model, cuda_graphs=False, per_layer=True)  # the graphs are this file's, not Inductor's
        loss_module = SupervisedLoss(model)
        params = lora_parameters(model)
        flat_grads = FlatGradients(params)
        optimizer = make_optimizer(params, 1e-2, 0.0, flat_grads)
        graphs = MicroStepGraphs(partial(forward_backward, loss_module, device=CUDA, amp_dtype=dtype), CUDA) \
            if graphed else None
        losses = []
        for micro_batches in plan:
            n_supervised = sum(b["sup_targets"].numel() for b in micro_batches)
            loss, _ = train_step(loss_module, micro_batches, n_supervised, info, optimizer, None, params, 1e-2, 1.0,
                                 dtype, flat_grads, graphs)
            losses.append(loss.item())
        return losses, [p.detach().float().cpu() for p in params], graphs

    (eager_losses, eager_params, _), (losses, params, graphs) = run(False), run(True)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert losses == pytest.approx(eager_losses, rel=tol)
    for got, want in zip(params, eager_params, strict=True):
        assert (got - want).abs().max() <= tol * want.abs().max()
    return eager_losses, losses, graphs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("run_name", list(GRAPHED_RUNS))
def test_graphed_steps_give_the_eager_steps_losses_and_weights(run_name):
    """Three micro-batch shapes in an order that records, replays and interleaves them (two per optimizer
    step, so one replay adds to the gradients of another), supervised counts that differ within a shape:
    the same losses and LoRA weights (with DoRA, its magnitudes too) as the step without graphs, through the
    trainer's train_step; plain LoRA in bf16 and fp32, DoRA, a 4-bit base and the compiled decoder in bf16."""
    widths = [20, 20, 32, 20, 32, 32, 24, 20, 24, 32, 20, 24]
    plan = [[padded_batch(3, w, 10 + 3 * i, seed=i) for i, w in enumerate(widths[s:s + 2], start=s)]
            for s in range(0, len(widths), 2)]
    *_, graphs = train_with_and_without_graphs(run_name, plan)
    assert not graphs.failure and len(graphs.graphs) == 3, graphs.note


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("run_name", ["bf16", "bf16-compiled"])
def test_a_packed_micro_batch_past_its_slots_is_recorded_without_an_eager_run(run_name):
    """Packed micro-batches of one width: those within sup_slots share a graph; the first with more supervised
    positions is recorded at once (its width already ran eagerly), and the losses and weights stay the
    eager step's."""
    counts = [10, 20, 30, 12, 45, 24, 50, 31, 15, 40]
    plan = [[packed_batch(n, 32, seed=i) for i, n in enumerate(counts[s:s + 2], start=s)]
            for s in range(0, len(counts), 2)]
    *_, graphs = train_with_and_without_graphs(run_name, plan)
    assert not graphs.failure and len(graphs.graphs) == 2 and len(graphs.seen) == 1, graphs.note
