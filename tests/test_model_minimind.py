"""MiniMind model: fixture logits from MiniMind's own code, masks, packing, KV cache, save/load, loss math."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from model.errors import UserError
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM, load_minimind

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "minimind"
GENERATIONS = ["minimind2_dense", "minimind2_moe", "minimind3_dense", "minimind3_moe"]


def fixture_dir(name: str) -> Path:
    path = FIXTURES / name
    if not (path / "weights.pth").is_file():
        pytest.skip(f"fixture {path} not available")
    return path


@pytest.mark.parametrize("name", GENERATIONS)
def test_fixture_base_logits(name):
    path = fixture_dir(name)
    vectors = torch.load(path / "vectors.pt", weights_only=True)
    model = load_minimind(path / "weights.pth")
    assert not model.training
    assert model.config.generation == (3 if name.startswith("minimind3") else 2)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        logits = model(vectors["input_ids"]).logits
    assert logits.shape == vectors["base_logits"].shape
    assert (logits - vectors["base_logits"]).abs().max().item() <= 1e-4


def fixture_config(path: Path) -> dict:
    import json

    return json.loads((path / "config.json").read_text())


def load_fixture(name: str) -> MiniMindForCausalLM:
    """The fixture model, with the settings its config.json used that a .pth cannot tell."""
    cfg = fixture_config(fixture_dir(name))
    return load_minimind(fixture_dir(name) / "weights.pth", num_attention_heads=cfg["num_attention_heads"],
                         num_experts_per_tok=cfg["num_experts_per_tok"])


def fixture_ids(name: str) -> torch.Tensor:
    return torch.load(fixture_dir(name) / "vectors.pt", weights_only=True)["input_ids"]


@pytest.mark.parametrize("name", GENERATIONS)
def test_fixture_config_inferred_from_shapes(name):
    cfg = fixture_config(fixture_dir(name))
    config = load_fixture(name).config
    for key in ("hidden_size", "num_hidden_layers", "use_moe", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "num_experts_per_tok"):
        assert getattr(config, key) == cfg[key], key
    if cfg["use_moe"]:
        assert config.num_experts == cfg.get("num_experts", cfg.get("n_routed_experts"))
        assert config.n_shared_experts == cfg.get("n_shared_experts", 0)


@pytest.mark.parametrize("name", GENERATIONS)
def test_padding_matches_unpadded(name):
    model = load_fixture(name)
    ids = fixture_ids(name)[0]
    lengths = [16, 9, 5]
    padded = torch.zeros(len(lengths), 16, dtype=torch.long)
    mask = torch.zeros_like(padded)
    for row, n in enumerate(lengths):
        padded[row, :n], mask[row, :n] = ids[:n], 1
    with torch.no_grad():
        right = model(padded, attention_mask=mask).logits
        # Left padding (as batched generation uses) only works if the mask hides the pads from real tokens.
        left_ids, left_mask = padded.clone(), mask.clone()
        for row, n in enumerate(lengths):
            left_ids[row] = padded[row].roll(16 - n)
            left_mask[row] = mask[row].roll(16 - n)
        positions = (left_mask.cumsum(-1) - 1).clamp(min=0)
        left = model(left_ids, attention_mask=left_mask, position_ids=positions).logits
        for row, n in enumerate(lengths):
            alone = model(ids[None, :n]).logits[0]
            assert (right[row, :n] - alone).abs().max() <= 1e-4
            assert (left[row, 16 - n:] - alone).abs().max() <= 1e-4
    assert torch.isfinite(right).all() and torch.isfinite(left).all()


@pytest.mark.parametrize("name", GENERATIONS)
def test_packed_row_matches_separate_samples(name):
    model = load_fixture(name)
    ids = fixture_ids(name)
    samples = [ids[0, :7], ids[1, :5], ids[0, 9:13]]
    row = torch.cat(samples)[None]
    positions = torch.cat([torch.arange(len(s)) for s in samples])[None]
    with torch.no_grad():
        packed = model(row, position_ids=positions).logits[0]
        separate = torch.cat([model(s[None]).logits[0] for s in samples])
        unpacked = model(row).logits[0]
    assert (packed - separate).abs().max() <= 1e-4
    # Sanity: without position_ids the row is one long sequence, so later samples do see earlier ones.
    assert (unpacked[7:] - separate[7:]).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["minimind2_dense", "minimind3_moe"])
def test_greedy_generate_with_cache_equals_full_forwards(name):
    model = load_fixture(name)
    model.generation_config.eos_token_id = None          # random weights: never stop early
    prompt = fixture_ids(name)[:, :6]
    steps, new = [], 8
    model.model.register_forward_pre_hook(
        lambda mod, args, kwargs: steps.append((args[0] if args else kwargs["input_ids"]).shape[1]),
        with_kwargs=True)
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=new, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        assert steps == [6] + [1] * (new - 1)               # the KV cache was used
        seq = prompt
        for step in range(new):                             # reference: full forward over everything so far
            logits = model(seq).logits[:, -1]
            assert (out.logits[step] - logits).abs().max() <= 1e-4
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.sequences, seq)


def test_batched_left_padded_generate_matches_single():
    model = load_fixture("minimind3_dense")
    model.generation_config.eos_token_id = None
    ids = fixture_ids("minimind3_dense")
    prompts = [ids[0, :7], ids[1, :4]]
    batch = torch.zeros(2, 7, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for row, p in enumerate(prompts):
        batch[row, 7 - len(p):], mask[row, 7 - len(p):] = p, 1
    with torch.no_grad():
        both = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        for row, p in enumerate(prompts):
            alone = model.generate(p[None], max_new_tokens=6, do_sample=False)
            assert torch.equal(both[row, 7:], alone[0, len(p):])


def test_chunked_prefill_with_cache_matches_full_forward():
    model = load_fixture("minimind3_moe")
    ids = fixture_ids("minimind3_moe")
    with torch.no_grad():
        full = model(ids).logits
        first = model(ids[:, :10], use_cache=True)
        one = model(ids[:, 10:11], past_key_values=first.past_key_values, use_cache=True)   # no mask given
        rest = model(ids[:, 11:], past_key_values=first.past_key_values)         # a given cache is used
    assert first.past_key_values.get_seq_length() == 16
    assert (torch.cat([first.logits, one.logits, rest.logits], 1) - full).abs().max() <= 1e-4


def tiny_config(**overrides) -> MiniMindConfig:
    settings = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    vocab_size=128)
    return MiniMindConfig(**{**settings, **overrides})


@pytest.mark.parametrize("generation", [2, 3])
def test_save_pretrained_round_trip(tmp_path, generation):
    torch.manual_seed(0)
    model = MiniMindForCausalLM(tiny_config(generation=generation, use_moe=True)).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is MiniMindForCausalLM
    assert loaded.config.generation == generation and loaded.config.use_moe
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def reference_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in float64, position by position."""
    logp = logits.double().log_softmax(-1)
    total, count = torch.zeros((), dtype=torch.float64), 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            target = labels[b, t + 1].item()
            if target != -100:
                total, count = total - logp[b, t, target], count + 1
    return total / count


def reference_aux_loss(model: MiniMindForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """MiniMind's MoE aux loss from the spec's formulas, in float64, summed over layers."""
    config, gate_inputs = model.config, []
    hooks = [layer.mlp.register_forward_pre_hook(lambda mod, args: gate_inputs.append(args[0]))
             for layer in model.model.layers]
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    E, k, total = config.num_experts, config.num_experts_per_tok, torch.zeros((), dtype=torch.float64)
    for layer, x in zip(model.model.layers, gate_inputs):
        scores = (x.double() @ layer.mlp.gate.weight.double().T).softmax(-1)        # [B, T, E]
        picks = scores.topk(k, dim=-1).indices                                       # [B, T, k]
        B, T = picks.shape[:2]
        if config.generation == 2:    # sequence-level, alpha 0.01
            per_seq = []
            for b in range(B):
                ce = [(picks[b] == e).sum().item() / (T * k) * E for e in range(E)]
                per_seq.append(sum(ce[e] * scores[b, :, e].mean() for e in range(E)))
            total = total + 0.01 * torch.stack(per_seq).mean()
        else:                         # batch-level, coef 5e-4
            load = [(picks == e).sum().item() / (B * T) for e in range(E)]
            total = total + 5e-4 * E * sum(load[e] * scores[..., e].mean() for e in range(E))
    return total


@pytest.mark.parametrize("name", GENERATIONS)
def test_labels_loss_is_shifted_ce_plus_aux(name):
    model = load_fixture(name).train()
    ids = fixture_ids(name)
    labels = ids.clone()
    labels[0, :5] = -100
    labels[1, 10:] = -100
    out = model(ids, labels=labels)
    expected = reference_loss(out.logits.detach(), labels)
    if model.config.use_moe:
        assert out.aux_loss.item() > 0
        expected = expected + reference_aux_loss(model, ids)
    else:
        assert out.aux_loss.dim() == 0 and out.aux_loss.item() == 0
    assert abs(out.loss.item() - expected.item()) <= 1e-5
    out.loss.backward()                                     # every weight, experts included, gets a gradient
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name,top_k", [("minimind2_moe", 2), ("minimind2_moe", 1),
                                        ("minimind3_moe", 1), ("minimind3_moe", 2)])
def test_moe_aux_loss_matches_spec_formula(name, top_k):
    model = load_minimind(fixture_dir(name) / "weights.pth", num_experts_per_tok=top_k).train()
    ids = fixture_ids(name)
    aux = model.model(ids).aux_loss
    assert aux.dim() == 0
    assert abs(aux.item() - reference_aux_loss(model, ids).item()) <= 1e-7
    assert model.eval().model(ids).aux_loss.item() == 0


def test_moe_matches_explicit_per_token_mixture():
    """Sorted dispatch == Σ_k w_k·expert_k(x) + shared(x) computed token by token in float64."""
    model = load_fixture("minimind2_moe")
    moe = model.model.layers[0].mlp
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        out, _ = moe(x)
        flat = x.reshape(-1, 64).double()
        moe64 = moe.double()
        for n, token in enumerate(flat):
            scores = (token @ moe64.gate.weight.T).softmax(-1)
            w, idx = scores.topk(2)
            w = w / w.sum()
            mixed = sum(w[j] * moe64.experts[idx[j]](token) for j in range(2)) + moe64.shared_experts[0](token)
            assert (out.reshape(-1, 64)[n].double() - mixed).abs().max() <= 1e-5


def test_gradient_checkpointing_gives_same_grads():
    torch.manual_seed(0)
    model = MiniMindForCausalLM(tiny_config(use_moe=True)).train()
    ids = torch.randint(0, 128, (2, 10))
    model(ids, labels=ids).loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.model.gradient_checkpointing = True
    model(ids, labels=ids).loss.backward()
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-6)


@pytest.mark.parametrize("override,flag", [(dict(hidden_size=768), "--hidden_size"),
                                           (dict(num_hidden_layers=8), "--num_hidden_layers"),
                                           (dict(use_moe=1), "--use_moe")])
def test_mismatched_override_names_the_flag(override, flag):
    with pytest.raises(UserError, match=flag) as err:
        load_minimind(fixture_dir("minimind2_dense") / "weights.pth", **override)
    assert "weights.pth" in str(err.value)


def test_missing_or_foreign_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_minimind(tmp_path / "full_sft_512.pth")
    with pytest.raises(UserError, match="load_lora"):
        load_minimind(fixture_dir("minimind2_dense") / "lora_rank4.pth")


def test_wrapped_file_with_one_tied_key_loads(tmp_path):
    path = fixture_dir("minimind3_dense")
    state = torch.load(path / "weights.pth", weights_only=True)
    wrapped = {"_orig_mod.module." + k: v.clone() for k, v in state.items() if k != "lm_head.weight"}
    torch.save(wrapped, tmp_path / "full_sft_64.pth")
    model = load_minimind(tmp_path / "full_sft_64.pth")
    vectors = torch.load(path / "vectors.pt", weights_only=True)
    with torch.no_grad():
        assert (model(vectors["input_ids"]).logits - vectors["base_logits"]).abs().max() <= 1e-4
