"""Qwen3, Qwen2, Llama and Mistral directories on the fast decoder (model/fast_decoder.py) against
transformers' own classes: logits (padded, packed), PEFT adapters both ways, merged exports, fallbacks."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    DogeConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

from model.fast_decoder import FastCausalLM, why_not_fast
from model.hf_compat import rope_config_kwargs
from model.model_lora import apply_lora, load_lora, lora_parameters, merge_lora, save_lora
from model.model_minimind import rope_cos_sin
from trainer.base_flags import lora_file
from trainer.base_model import EXPERT_COUNTS, REPO_TOKENIZER, BaseModelError, load_base, load_directory

peft = pytest.importorskip("peft")

VOCAB = 96
SIZES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
LLAMA3 = dict(rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=64)



# One tiny config per switch: q/k norm, q/k/v(/o) biases, MLP biases, llama3 rope, head_dim, tied/untied head.
CONFIGS = {
    "qwen3_tied": lambda: Qwen3Config(**SIZES, head_dim=24, tie_word_embeddings=True),
    "qwen3_untied_bias": lambda: Qwen3Config(**SIZES, head_dim=16, attention_bias=True, tie_word_embeddings=False),
    "qwen2_tied": lambda: Qwen2Config(**SIZES, tie_word_embeddings=True, **rope_config_kwargs(dict(rope_theta=1e6))),
    "llama3_untied": lambda: LlamaConfig(**SIZES, tie_word_embeddings=False, **rope_config_kwargs(LLAMA3),
                                         max_position_embeddings=256),
    "llama2_biases_tied": lambda: LlamaConfig(**SIZES, tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    "mistral_untied": lambda: MistralConfig(**SIZES, sliding_window=None, tie_word_embeddings=False),
}


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Every floating parameter random (norm weights, biases too, so no switch hides behind 1 or 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.dim() == 1 and p.shape[0] <= 64 else 0.0))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model_dir(request, tmp_path_factory):
    """A tiny random directory of the original class, written by transformers."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[request.param]())
    randomize(model, seed=sorted(CONFIGS).index(request.param))
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return path


def original(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_directory_loads_on_fast_decoder_with_exact_logits(model_dir, capsys):
    """Unpadded, right-padded and packed rows: the fast decoder's logits are transformers' (fp32, 1e-4)."""
    fast = load_directory(model_dir, torch.float32, max_seq_len=32).eval()
    assert isinstance(fast, FastCausalLM) and "fast decoder" in capsys.readouterr().out
    ref = original(model_dir)
    assert fast.state_dict().keys() == ref.state_dict().keys()
    assert (fast.lm_head.weight is fast.model.embed_tokens.weight) == ref.config.tie_word_embeddings
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 20), generator=g)
    with torch.no_grad():
        assert (fast(ids).logits - ref(ids).logits).abs().max() <= 1e-4
        mask = torch.ones_like(ids)
        mask[1, 13:] = 0
        diff = (fast(ids, attention_mask=mask).logits - ref(ids, attention_mask=mask).logits).abs()
        assert diff[mask.bool()].max() <= 1e-4
        # packed: samples of 7, 9 and 4 tokens in one row, each against transformers on it alone
        lengths = [7, 9, 4]
        positions = torch.cat([torch.arange(n) for n in lengths])[None]
        packed = fast(ids[:1], position_ids=positions).logits[0].split(lengths)
        starts = [0, 7, 16]
        for out, start, n in zip(packed, starts, lengths):
            alone = ref(ids[:1, start:start + n]).logits[0]
            assert (out - alone).abs().max() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_directory_matches_the_original_class_in_that_dtype(model_dir, dtype, tmp_path):
    """A directory stored in bf16/fp16 (what chat.py and merge_lora.py load as stored): the fast decoder in that
    dtype is within that dtype's own rounding of transformers' class in it (no wider than fp32 vs that dtype)."""
    original(model_dir).to(dtype).save_pretrained(tmp_path)
    fast = load_directory(tmp_path, None, max_seq_len=32).eval()
    assert next(fast.parameters()).dtype == dtype
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()  # by name: transformers 4 loads float32
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want, fp32 = ref(ids).logits.float(), ref.float()(ids).logits
        assert (fast(ids).logits.float() - want).abs().max() <= (fp32 - want).abs().max()


def test_peft_adapter_and_merged_export_load_on_the_original_class(model_dir, tmp_path):
    """LoRA trained on the fast decoder, saved by the trainer's saver, loads with PeftModel.from_pretrained
    on the original class with the same logits; merged and saved, it is the original architecture's directory."""
    fast = load_directory(model_dir, torch.float32)
    apply_lora(fast, rank=4, alpha=8)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in lora_parameters(fast):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ids = torch.randint(0, VOCAB, (2, 16), generator=g)
    # one optimizer step too: the saved file is what training produces
    loss = fast(ids, labels=ids).loss
    loss.backward()
    torch.optim.SGD(lora_parameters(fast), lr=0.1).step()
    fast.eval()
    with torch.no_grad():
        want = fast(ids).logits
    save_lora(fast, tmp_path / "adapter", base_model_name_or_path=str(model_dir))
    peft_model = peft.PeftModel.from_pretrained(original(model_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (peft_model(ids).logits - want).abs().max() <= 1e-4

    merge_lora(fast, unload=True)
    fast.save_pretrained(tmp_path / "merged")
    written = json.loads((tmp_path / "merged" / "config.json").read_text())
    source = json.loads((model_dir / "config.json").read_text())
    assert written["architectures"] == source["architectures"] and written["model_type"] == source["model_type"]
    merged = original(tmp_path / "merged")
    assert type(merged).__name__ == source["architectures"][0]
    with torch.no_grad():
        assert (merged(ids).logits - want).abs().max() <= 1e-4


def save_tiny(config, path) -> None:
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)


@pytest.mark.parametrize("name, config, max_seq_len, reason", [
    ("yarn", Qwen3Config(**SIZES, **rope_config_kwargs(dict(rope_type="yarn", rope_theta=1e6, factor=4.0,
                                                            original_max_position_embeddings=64))), 32, "rope type 'yarn'"),
    ("window", MistralConfig(**SIZES, sliding_window=16), 32, "sliding window (16 tokens) is shorter than --max_seq_len 32"),
    ("qwen2_window", Qwen2Config(**SIZES, use_sliding_window=True, sliding_window=16, max_window_layers=1), 32,
     "sliding window (16 tokens) is shorter than --max_seq_len 32"),  # only its second layer slides
    ("gpt2", GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2), 32, "architecture (gpt2) is not one of"),
])
def test_unsupported_config_falls_back_to_transformers_class_and_says_why(name, config, max_seq_len, reason,
                                                                         tmp_path, capsys):
    """Anything the fast decoder would not reproduce exactly trains on transformers' class, with one line."""
    save_tiny(config, tmp_path)
    model = load_directory(tmp_path, torch.float32, max_seq_len=max_seq_len)
    assert not isinstance(model, FastCausalLM)
    assert type(model) is type(original(tmp_path))
    lines = [line for line in capsys.readouterr().out.splitlines() if "fast paths off" in line]
    assert len(lines) == 1 and reason in lines[0], lines


def test_quantized_config_is_not_fast():
    """Pre-quantized weights (AWQ, GPTQ, FP8, ...) are transformers' business: the reason names the method."""
    config = Qwen3Config(**SIZES)
    config.quantization_config = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    assert why_not_fast(config, 32) == "its weights are quantized (fp8)"
    assert why_not_fast(Qwen3Config(**SIZES), 32) is None


def test_sliding_window_at_least_the_row_length_stays_fast(tmp_path):
    """A window no row can reach changes nothing: the same Mistral directory is fast at --max_seq_len 16."""
    config = MistralConfig(**SIZES, sliding_window=16)
    assert why_not_fast(config, 16) is None and "sliding window" in why_not_fast(config, 17)
    assert "max_position_embeddings" in why_not_fast(config)  # chat/merge: no row limit is known
    save_tiny(config, tmp_path)
    model = load_directory(tmp_path, torch.float32, max_seq_len=16)
    ids = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        assert (model(ids).logits - original(tmp_path)(ids).logits).abs().max() <= 1e-4


def test_broken_directory_is_a_user_error(tmp_path):
    """A config.json that transformers cannot read: one BaseModelError naming the directory."""
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(BaseModelError, match=str(tmp_path)):
        load_directory(tmp_path, torch.float32)


def test_use_moe_flag_is_checked_by_the_directory_experts(tmp_path):
    """--use_moe against a transformers directory: a Qwen3-MoE or DeepSeek-V3 one (num_experts, n_routed_experts;
    no use_moe key) is a MoE model, a dense Qwen3 one is not; the flag that says otherwise stops the run, the one that agrees loads it,
    and a LoRA named the MiniMind way is looked up with `_moe` for the MoE ones."""
    vocab = len(load_base(None, str(tmp_path), torch.float32).tokenizer)  # the demo base's: the repo tokenizer
    sizes = {**SIZES, "vocab_size": vocab}
    save_tiny(Qwen3MoeConfig(**sizes, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32), tmp_path / "moe")
    save_tiny(DeepseekV3Config(**{**sizes, "num_key_value_heads": 4}, n_routed_experts=4, num_experts_per_tok=2,
                               moe_intermediate_size=32, n_group=1, topk_group=1, first_k_dense_replace=1,
                               q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                               v_head_dim=16), tmp_path / "deepseek")  # its experts: n_routed_experts
    save_tiny(Qwen3Config(**sizes), tmp_path / "dense")
    save_tiny(DogeConfig(**sizes), tmp_path / "doge")  # dense (is_moe false), though its config lists num_experts
    for name, moe in (("moe", True), ("deepseek", True), ("dense", False), ("doge", False)):
        path = str(tmp_path / name)
        base = load_base(path, str(tmp_path), torch.float32, use_moe=moe, tokenizer_path=str(REPO_TOKENIZER))
        assert base.use_moe is moe
        with pytest.raises(BaseModelError, match=f", but --use_moe {int(not moe)} was given") as err:
            load_base(path, str(tmp_path), torch.float32, use_moe=not moe, tokenizer_path=str(REPO_TOKENIZER))
        # the refusal quotes what the file holds, which has no use_moe key: its count of experts, or none
        written = json.loads((tmp_path / name / "config.json").read_text())
        held = re.search(r"config\.json has (\w+)=(\d+), but", str(err.value))
        if moe:
            assert held and written[held[1]] == int(held[2]) and "use_moe" not in written, str(err.value)
        elif name == "doge":
            assert written["num_experts"] and "config.json has is_moe=False, but" in str(err.value)
        else:
            assert not any(k in written for k in EXPERT_COUNTS) and "config.json has no experts (" in str(err.value)
        # chat.py's --lora_path by MiniMind name finds the file under the name the trainer gave it
        saved = tmp_path / f"lo_{SIZES['hidden_size']}{'_moe' if moe else ''}.pth"
        saved.touch()
        assert lora_file("lo", str(tmp_path), base.model) == saved
        saved.unlink()


def test_llama3_rope_tables_match_transformers_and_the_op_checks():
    """The RoPE table op with llama3 scaling: transformers' inv_freq, and opcheck's schema/fake/compile checks."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(**SIZES, **rope_config_kwargs(LLAMA3), max_position_embeddings=256)
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config, torch.device("cpu"))
    positions = torch.tensor([[0, 1, 2, 3, 0, 1], [5, 60, 70, 80, 90, 200]])
    llama3 = [float(LLAMA3[k]) for k in ("factor", "low_freq_factor", "high_freq_factor",
                                         "original_max_position_embeddings")]
    cos, sin = rope_cos_sin(positions, 16, 5e5, torch.float32, llama3)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    assert torch.equal(cos, angles.cos()) and torch.equal(sin, angles.sin())
    plain, _ = rope_cos_sin(positions, 16, 5e5, torch.float32)
    assert not torch.equal(plain, cos)  # the scaling does change the tables at these sizes
    torch.library.opcheck(torch.ops.minilora.rope_tables.default, (positions, 16, 5e5, torch.float32, llama3))


def test_weights_that_do_not_fit_the_config_fall_back_not_half_random(tmp_path, capsys):
    """Tensors the config does not announce (MLP biases under mlp_bias false) are never dropped silently:
    the fast decoder refuses them and transformers' class (with its own load report) takes over."""
    save_tiny(LlamaConfig(**SIZES, mlp_bias=True), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "mlp_bias": False}))
    model = load_directory(tmp_path, torch.float32, max_seq_len=32)
    assert not isinstance(model, FastCausalLM)
    lines = [line for line in capsys.readouterr().out.splitlines() if "fast paths off" in line]
    assert len(lines) == 1 and "do not fit" in lines[0] and "mlp.down_proj.bias" in lines[0], lines


def test_old_checkpoints_rotary_inv_freq_is_skipped_as_transformers_does(tmp_path, capsys):
    """Weights written by transformers < 4.31 (Llama 2's) hold each layer's rotary_emb.inv_freq: the directory
    stays on the fast decoder, with the original class's logits (neither reads the buffer; both use the config)."""
    save_tiny(LlamaConfig(**SIZES), tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    for i in range(SIZES["num_hidden_layers"]):
        weights[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.rand(8)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = load_directory(tmp_path, torch.float32, max_seq_len=32)
    assert isinstance(model, FastCausalLM) and "fast decoder" in capsys.readouterr().out
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        assert (model(ids).logits - original(tmp_path)(ids).logits).abs().max() <= 1e-4


def test_bench_alternates_the_qwen3_and_minimind_directories_on_equal_terms(tmp_path):
    """scripts/bench/fast_decoder.py --interleave (the run behind the README's Qwen3-vs-MiniMind figure), CPU
    smoke size: both directories of the same weights train in one process, alternated, with the same losses."""
    from scripts.bench.fast_decoder import main

    out = tmp_path / "bench.json"
    assert main(["--tiny", "--work", str(tmp_path / "work"), "--json", str(out), "--interleave", "2",
                 "--variants", "qwen3-0.6b minimind-dir,qwen3-0.6b qwen3-dir"]) == 0
    mm, qwen = json.loads(out.read_text())["rows"]
    loaded = [line for line in qwen["log"] if line.startswith("loaded as")]  # one process: one log, in order
    assert loaded == ["loaded as MiniMindForCausalLM", "loaded as FastCausalLM"]
    assert len(mm["round_ms"]) == len(qwen["round_ms"]) == 2
    assert (mm["loss_first"], mm["loss_last"]) == (qwen["loss_first"], qwen["loss_last"])


def test_sliding_window_lora_gives_chat_eval_and_merge_the_logits_training_saw(tmp_path, capsys):
    """Training at --max_seq_len <= the window runs on the fast decoder; chat, eval and merge know no row limit
    and load transformers' class. Both are the model: on rows within the window chat's, eval's and the merged
    export's logits are the trained ones, and beyond it they are the original class's with the PEFT adapter."""
    from scripts import chat, eval_lora
    from scripts import merge_lora as merge_script
    from tests.train_utils import run_inprocess, tokenizer_dir, write_chat_data
    from trainer import train_lora
    from trainer.base_flags import load_from_flags
    from trainer.distributed import pick_device
    from trainer.engine import DTYPES

    window, base, out = 64, tmp_path / "mistral", tmp_path / "out"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(MistralConfig(**{**SIZES, "vocab_size": 6400}, sliding_window=window,
                                                           max_position_embeddings=256))
    randomize(model, seed=5)
    model.save_pretrained(base)
    tokenizer = tokenizer_dir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (base / name).write_bytes((tokenizer / name).read_bytes())
    flags = ["--from_weight", str(base), "--data_path", str(write_chat_data(tmp_path / "chat.jsonl", 8, max_words=4)),
             "--save_dir", str(out), "--max_seq_len", str(window), "--device", "cpu", "--num_workers", "0",
             "--batch_size", "4", "--max_steps", "3", "--learning_rate", "1e-2", "--lora_rank", "4"]
    assert run_inprocess(train_lora.main, flags) == 0
    assert "runs on the fast decoder" in capsys.readouterr().out
    adapter = out / "lora_identity_64"

    trained = load_directory(base, torch.float32, max_seq_len=window).eval()
    load_lora(trained, adapter)
    chat_args = chat.parse_args(["--lora_path", str(adapter), "--save_dir", str(out), "--device", "cpu"])
    [(_, chatted)], _ = chat.build_models(chat_args)
    eval_args = eval_lora.parse_args(["--lora_path", str(adapter), "--save_dir", str(out), "--device", "cpu"])
    scored, _ = load_from_flags(eval_args, pick_device("cpu"), DTYPES[eval_args.dtype])
    load_lora(scored, adapter)
    merge_script.main(["--lora_path", str(adapter), "--save_dir", str(out)])
    merged = original(out / "merged_hf")
    reference = peft.PeftModel.from_pretrained(original(base), adapter).eval()
    assert isinstance(trained, FastCausalLM) and not isinstance(chatted, FastCausalLM)

    g = torch.Generator().manual_seed(3)
    for length, want_model in ((window, trained), (2 * window + 5, reference)):
        ids = torch.randint(0, 6400, (2, length), generator=g)
        with torch.no_grad():
            want = want_model(ids).logits
            for name, loaded in (("chat", chatted), ("eval", scored), ("merge", merged)):
                assert (loaded(ids).logits - want).abs().max() <= 1e-4, (name, length)
    with torch.no_grad():  # past the window the fast decoder is another model: the reason it is not used there
        assert (trained(ids).logits - want).abs().max() > 1e-2
