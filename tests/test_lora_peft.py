"""Our adapter files against PEFT itself, both directions, on a tiny random Qwen3ForCausalLM."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from model.model_lora import apply_lora, load_lora, lora_parameters, save_lora
from tests.train_utils import fill_random

peft = pytest.importorskip("peft")

IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random Qwen3 saved as a model directory, loaded fresh by each side."""
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    path = tmp_path_factory.mktemp("qwen3_tiny")
    Qwen3ForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny random Llama with biases on attention and MLP (the LoRA layer must keep the base bias)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True)
    path = tmp_path_factory.mktemp("llama_tiny")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def load_base(path):
    cls = LlamaForCausalLM if "llama" in path.name else Qwen3ForCausalLM
    return cls.from_pretrained(path).eval()


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


CASES = {
    "plain": {"rank": 4, "alpha": 8, "targets": "q_proj,k_proj,v_proj,o_proj"},
    "rslora": {"rank": 8, "alpha": 4, "use_rslora": True, "targets": None},
    "rank_pattern": {"rank": 4, "alpha": 16, "targets": "q_proj,o_proj,gate_proj,down_proj",
                     "rank_pattern": {"mlp": 8, "layers.1.self_attn.q_proj": 2}, "alpha_pattern": {"o_proj": 2}},
    # layer 0's q_proj only: PEFT's target_modules must not widen that to every q_proj
    "some_layers": {"rank": 4, "targets": "layers.0.self_attn.q_proj,mlp.down_proj"},
}


@pytest.mark.parametrize("case", CASES)
def test_peft_loads_our_adapter(base_dir, tmp_path, case):
    ours = load_base(base_dir)
    apply_lora(ours, **CASES[case])
    fill_random(lora_parameters(ours))
    save_lora(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(load_base(base_dir), tmp_path / "adapter").eval()
    n_lora = sum(1 for n, _ in theirs.named_modules() if n.endswith(".lora_A.default"))
    assert n_lora == len(lora_parameters(ours)) // 2  # PEFT adapted exactly our layers
    base = logits(load_base(base_dir))
    want = logits(ours)
    assert (want - base).abs().max() > 1e-2
    assert (logits(theirs) - want).abs().max() <= 1e-5


PEFT_CASES = {
    "plain": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]},
    "rslora": {"r": 8, "lora_alpha": 4, "use_rslora": True, "target_modules": "all-linear"},
    "rank_pattern": {"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "o_proj", "gate_proj"],
                     "rank_pattern": {"gate_proj": 8, "model.layers.1.self_attn.k_proj": 2},
                     "alpha_pattern": {"o_proj": 4}},
    # PEFT also saves the head's base weight (lm_head.base_layer.weight) when the head is a target
    "lm_head": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "lm_head"]},
}


@pytest.mark.parametrize("case", PEFT_CASES)
def test_we_load_peft_adapter(base_dir, tmp_path, case):
    theirs = peft.get_peft_model(load_base(base_dir), peft.LoraConfig(task_type="CAUSAL_LM", **PEFT_CASES[case]))
    fill_random(p for n, p in theirs.named_parameters() if "lora_" in n)
    theirs.eval()
    want = logits(theirs)
    theirs.save_pretrained(tmp_path / "adapter")
    ours = load_base(base_dir)
    names = load_lora(ours, tmp_path / "adapter")
    assert len(names) == sum(1 for n, _ in theirs.named_modules() if n.endswith(".lora_A.default"))
    assert (want - logits(load_base(base_dir))).abs().max() > 1e-2
    assert (logits(ours) - want).abs().max() <= 1e-5


def test_llama_with_biases_both_ways(llama_dir, tmp_path):
    ours = load_base(llama_dir)
    apply_lora(ours, rank=4, alpha=8, targets="q_proj,v_proj,down_proj")
    fill_random(lora_parameters(ours))
    want = logits(ours)
    assert (want - logits(load_base(llama_dir))).abs().max() > 1e-2
    save_lora(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(load_base(llama_dir), tmp_path / "ours").eval()
    assert (logits(theirs) - want).abs().max() <= 1e-5

    theirs = peft.get_peft_model(load_base(llama_dir), peft.LoraConfig(
        task_type="CAUSAL_LM", r=2, lora_alpha=6, target_modules=["k_proj", "o_proj", "up_proj"]))
    fill_random((p for n, p in theirs.named_parameters() if "lora_" in n), seed=2)
    theirs.eval().save_pretrained(tmp_path / "theirs")
    ours = load_base(llama_dir)
    load_lora(ours, tmp_path / "theirs")
    assert (logits(ours) - logits(theirs)).abs().max() <= 1e-5


def test_a_peft_adapter_whose_saved_head_is_not_the_base_is_refused(base_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from model.model_lora import LoRAError

    theirs = peft.get_peft_model(load_base(base_dir), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    theirs.save_pretrained(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.lm_head.base_layer.weight"
    tensors[key] = tensors[key] + 0.1  # as if the vocabulary had been resized or the head retrained
    save_file(tensors, weights)
    with pytest.raises(LoRAError, match="'lm_head.base_layer.weight' differs from the model's 'lm_head' weight"):
        load_lora(load_base(base_dir), tmp_path / "adapter")


def trained_peft(base_dir, **options):
    """A PEFT model on the tiny base with `options`, its LoRA tensors moved off their init (as training would)."""
    theirs = peft.get_peft_model(load_base(base_dir), peft.LoraConfig(task_type="CAUSAL_LM", **options))
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.05)
    return theirs.eval()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_an_adapter_on_a_rewritten_base_is_refused_and_its_conversion_loads(base_dir, tmp_path, init):
    from model.model_lora import LoRAError

    options = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "rank_pattern": {"v_proj": 2}}
    initial = peft.get_peft_model(load_base(base_dir), peft.LoraConfig(init_lora_weights=init, **options))
    initial.peft_config["default"].init_lora_weights = True  # PEFT's recipe: the start saved as a plain LoRA
    initial.save_pretrained(tmp_path / "initial")
    theirs = trained_peft(base_dir, init_lora_weights=init, **options)
    want = logits(theirs)
    theirs.save_pretrained(tmp_path / "adapter")
    assert (logits(peft.PeftModel.from_pretrained(load_base(base_dir), tmp_path / "adapter")) - want).abs().max() < 1e-5
    with pytest.raises(LoRAError, match=f"adapter_config.json: init_lora_weights='{init}' .*path_initial_model"):
        load_lora(load_base(base_dir), tmp_path / "adapter")
    theirs.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    ours = load_base(base_dir)
    load_lora(ours, tmp_path / "converted")
    assert (logits(ours) - want).abs().max() <= 1e-5


def test_an_activated_lora_is_refused(base_dir, tmp_path):
    from model.model_lora import LoRAError

    theirs = trained_peft(base_dir, r=4, target_modules=["q_proj"], alora_invocation_tokens=[5, 6])
    theirs.save_pretrained(tmp_path / "adapter")
    with pytest.raises(LoRAError, match="adapter_config.json: alora_invocation_tokens is set"):
        load_lora(load_base(base_dir), tmp_path / "adapter")


def test_a_peft_adapter_with_dropout_loaded_into_a_model_in_eval_mode_answers_as_peft_does(base_dir, tmp_path):
    theirs = trained_peft(base_dir, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.5)
    theirs.save_pretrained(tmp_path / "adapter")
    ours = load_base(base_dir)  # eval mode, as chat.py and eval_lora.py load the base
    load_lora(ours, tmp_path / "adapter")
    assert not any(m.training for m in ours.modules())
    assert (logits(ours) - logits(theirs)).abs().max() <= 1e-5



def test_a_fan_in_fan_out_adapter_on_linear_layers_loads_as_peft_loads_it(base_dir, tmp_path):
    theirs = trained_peft(base_dir, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    theirs.peft_config["default"].fan_in_fan_out = True  # as a config written for another base says
    theirs.save_pretrained(tmp_path / "adapter")
    assert '"fan_in_fan_out": true' in (tmp_path / "adapter" / "adapter_config.json").read_text()
    with pytest.warns(UserWarning, match="Setting fan_in_fan_out to False"):  # PEFT's own reading of it
        reloaded = peft.PeftModel.from_pretrained(load_base(base_dir), tmp_path / "adapter").eval()
    want = logits(reloaded)
    assert (want - logits(load_base(base_dir))).abs().max() > 1e-2
    ours = load_base(base_dir)
    load_lora(ours, tmp_path / "adapter")
    assert (logits(ours) - want).abs().max() <= 1e-5


def test_a_peft_adapter_on_gpt2_conv1d_layers_is_refused_naming_the_layer_kind(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from model.model_lora import LoRAError

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=32)).save_pretrained(
        tmp_path / "gpt2")
    theirs = peft.get_peft_model(GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2"),
                                 peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    theirs.save_pretrained(tmp_path / "adapter")
    with pytest.raises(LoRAError, match=r"'transformer.h.0.attn.c_attn' .* is a GPT-2-style Conv1D .*fan_in_fan_out"
                                        r".*run this adapter with PEFT"):
        load_lora(GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2").eval(), tmp_path / "adapter")

# PEFT settings that save tensors other than LoRA factors: each is named in the message, with the way out
OTHER_TENSORS = {
    "bias_lora_only": ({"bias": "lora_only"}, {}, "says bias='lora_only'"),
    "bias_all": ({"bias": "all"}, {}, "says bias='all'"),
    "modules_to_save": ({"modules_to_save": ["lm_head"]}, {}, "lists 'lm_head' in modules_to_save"),
    "trainable_tokens": ({"trainable_token_indices": [3, 5]}, {}, "sets trainable_token_indices"),
    "embedding_target": ({"target_modules": ["q_proj", "embed_tokens"]}, {}, "include an embedding layer"),
    # with save_embedding_layers too, the head's saved copies are still those of modules_to_save
    "modules_to_save_and_embeddings": ({"modules_to_save": ["lm_head"]}, {"save_embedding_layers": True},
                                       "lists 'lm_head' in modules_to_save"),
}


@pytest.mark.parametrize("case", OTHER_TENSORS)
def test_peft_tensors_other_than_lora_factors_name_the_setting_that_saved_them(llama_dir, tmp_path, case):
    from model.model_lora import LoRAError

    options, save_options, says = OTHER_TENSORS[case]
    theirs = trained_peft(llama_dir, **{"r": 4, "target_modules": ["q_proj"], **options})
    theirs.save_pretrained(tmp_path / "adapter", **save_options)
    with pytest.raises(LoRAError, match=rf"is not a LoRA or DoRA tensor: .*{says}.*merge_and_unload") as err:
        load_lora(load_base(llama_dir), tmp_path / "adapter")
    assert "\n" not in str(err.value)


def test_embedding_layers_peft_saved_as_the_base_has_them_load_as_peft_loads_them(llama_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    theirs = trained_peft(llama_dir, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    theirs.save_pretrained(tmp_path / "adapter", save_embedding_layers=True)
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= set(saved)
    want = logits(peft.PeftModel.from_pretrained(load_base(llama_dir), tmp_path / "adapter").eval())
    assert (want - logits(load_base(llama_dir))).abs().max() > 1e-2
    ours = load_base(llama_dir)
    load_lora(ours, tmp_path / "adapter")
    assert (logits(ours) - want).abs().max() <= 1e-5
    load_lora(load_base(llama_dir).to(torch.bfloat16), tmp_path / "adapter")  # float32 copies of a bf16 base's
    # float16 copies round to bf16 a step away from the bf16 base in places, and are the base's all the same
    save_file({k: v.half() for k, v in saved.items()}, tmp_path / "adapter" / "adapter_model.safetensors")
    load_lora(load_base(llama_dir).to(torch.bfloat16), tmp_path / "adapter")


def resized_vocabulary(llama_dir, path):
    """An adapter PEFT saved for a base whose vocabulary grew ("auto" saves the resized embedding and head)."""
    base = load_base(llama_dir)
    base.resize_token_embeddings(100)
    peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(path)


def trained_embedding(llama_dir, path):
    """An adapter saved with save_embedding_layers after the embedding itself was trained."""
    theirs = trained_peft(llama_dir, r=4, target_modules=["q_proj"])
    with torch.no_grad():
        theirs.get_input_embeddings().weight.add_(1e-3)
    theirs.save_pretrained(path, save_embedding_layers=True)


@pytest.mark.parametrize("make, says", [(resized_vocabulary, r"its shape \[100, 64\] is not that of the base's"),
                                        (trained_embedding, "its values differ from the base's 'model.embed_tokens'")])
def test_embedding_layers_peft_saved_that_are_not_the_base_are_refused(llama_dir, tmp_path, make, says):
    from model.model_lora import LoRAError

    make(llama_dir, tmp_path / "adapter")
    with pytest.raises(LoRAError, match=rf"is not a LoRA or DoRA tensor: .*save_embedding_layers.*{says}"
                                        r".*merge_and_unload") as err:
        load_lora(load_base(llama_dir), tmp_path / "adapter")
    assert "\n" not in str(err.value)
