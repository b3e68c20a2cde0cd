"""Qwen3, Qwen2/2.5, Llama 2/3/3.1+ and Mistral model directories on MiniMind's decoder (the fast paths).

These four transformers architectures are MiniMind's decoder with a few switches read from config.json:
q/k RMSNorm (Qwen3), q/k/v (and o) biases (Qwen2, Llama's `attention_bias`), MLP biases (Llama's
`mlp_bias`), Llama 3.1's rope scaling, `head_dim`, a tied or untied head. Their parameter names are
already MiniMind's (`model.layers.N.self_attn.q_proj`, ...), so `FastCausalLM` loads their weights with
no renaming, its LoRA adapter files load with `PeftModel.from_pretrained` on the original class, and
`save_pretrained` writes the original architecture's directory (its config.json, its `architectures`).

`why_not_fast` names what the decoder cannot reproduce exactly (another architecture, another rope type,
sliding-window attention that a --max_seq_len row could reach, dropout, ...); such a directory trains
through transformers' own class instead (trainer/base_model.py says so at start-up).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from model.hf_compat import ROPE_PARAMETERS
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM, MiniMindModel, MiniMindPreTrainedModel

# model_type -> the transformers class whose layout FastCausalLM reproduces
ARCHITECTURES = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM",
                 "mistral": "MistralForCausalLM"}
ROPE_TYPES = ("default", "llama3")
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope(config: PretrainedConfig) -> dict:
    """The rope settings as one dict (rope_theta, rope_type, and the type's own keys): transformers 5's
    `rope_parameters`, or transformers 4's `rope_theta` and `rope_scaling` put together."""
    if ROPE_PARAMETERS:   # read what the installed transformers' own class reads, so the two agree
        rope = getattr(config, "rope_parameters", None) or {}
        return rope if isinstance(rope, dict) else {}
    rope = dict(getattr(config, "rope_scaling", None) or {})
    if "type" in rope:                                      # 4.x's older spelling of rope_type
        rope.setdefault("rope_type", rope.pop("type"))
    for key in ("rope_theta", "partial_rotary_factor"):
        if getattr(config, key, None) is not None:
            rope.setdefault(key, getattr(config, key))
    return rope


def _sliding_window(config: PretrainedConfig) -> int | None:
    """The window of the layers that attend within one (None when every layer sees the whole row)."""
    if config.model_type == "mistral":  # Mistral applies config.sliding_window to every layer
        return config.sliding_window
    if "sliding_attention" in (getattr(config, "layer_types", None) or []):
        return config.sliding_window
    return None


def why_not_fast(config: PretrainedConfig, max_seq_len: int | None = None) -> str | None:
    """Why MiniMind's decoder cannot reproduce this config exactly, or None when it can.

    `max_seq_len` is the longest row that will be run (None: the config's max_position_embeddings);
    a sliding window at least that long never cuts anything off, so it is the same model there.
    """
    problem = _layout_problem(config)
    if problem:
        return problem
    window, longest = _sliding_window(config), max_seq_len or config.max_position_embeddings
    if window is not None and window < longest:
        flag = f"--max_seq_len {max_seq_len}" if max_seq_len else f"max_position_embeddings {longest}"
        return f"its sliding window ({window} tokens) is shorter than {flag}"
    return None


def _layout_problem(config: PretrainedConfig) -> str | None:
    """What in the config, rows' length aside, the decoder does not have."""
    kind = getattr(config, "model_type", None)
    if kind not in ARCHITECTURES:
        return f"its architecture ({kind}) is not one of {', '.join(sorted(ARCHITECTURES))}"
    quantized = getattr(config, "quantization_config", None)
    if quantized:
        method = quantized.get("quant_method", "?") if isinstance(quantized, dict) else type(quantized).__name__
        return f"its weights are quantized ({method})"
    rope = _rope(config)
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        return f"its rope type {rope_type!r} is not one of {', '.join(ROPE_TYPES)}"
    if rope_type == "llama3" and any(k not in rope for k in LLAMA3_KEYS):
        return f"its llama3 rope parameters lack one of {', '.join(LLAMA3_KEYS)}"
    if "rope_theta" not in rope:
        return "its config gives no rope_theta"
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        return f"it rotates only part of each head (partial_rotary_factor {rope['partial_rotary_factor']})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"its MLP activation is {config.hidden_act}, not silu"
    if getattr(config, "attention_dropout", 0.0):
        return f"it uses attention dropout {config.attention_dropout}"
    layer_types = set(getattr(config, "layer_types", None) or []) - {"full_attention", "sliding_attention"}
    if layer_types:
        return f"it has layer types {sorted(layer_types)}"
    return None


def decoder_config(config: PretrainedConfig) -> MiniMindConfig:
    """The MiniMind decoder settings that reproduce a Qwen2/Qwen3/Llama/Mistral config."""
    reason = _layout_problem(config)  # the sliding window is load_fast's caller's to check (why_not_fast)
    if reason:
        raise ValueError(f"{config.model_type} config cannot run on the fast decoder: {reason}")
    kind, rope = config.model_type, _rope(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention_bias = bool(getattr(config, "attention_bias", False))
    return MiniMindConfig(
        generation=3 if kind == "qwen3" else 2,
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads or config.num_attention_heads, head_dim=head_dim,
        intermediate_size=config.intermediate_size, rms_norm_eps=config.rms_norm_eps,
        rope_theta=rope["rope_theta"], max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        qk_norm=kind == "qwen3",
        qkv_bias=kind == "qwen2" or (kind in ("qwen3", "llama") and attention_bias),  # Qwen2: always
        o_bias=kind in ("qwen3", "llama") and attention_bias,
        mlp_bias=kind == "llama" and bool(getattr(config, "mlp_bias", False)),
        rope_llama3=[float(rope[k]) for k in LLAMA3_KEYS] if rope.get("rope_type") == "llama3" else None,
    )


class FastCausalLM(MiniMindForCausalLM):
    """A Qwen2/Qwen3/Llama/Mistral causal LM on MiniMind's decoder; `config` stays the original one.

    Forward, generation and the trainer's fast paths (packed rows through FlexAttention, the RoPE table
    op, the fused LoRA/CE kernels) are MiniMindForCausalLM's. Sliding windows are not applied: load
    through `load_fast`, which checks `why_not_fast` for the row length first.
    """

    config_class = PretrainedConfig
    # Checkpoints of transformers < 4.31 (Llama 2's among them) hold each layer's rotary inv_freq, which the
    # config gives too; transformers' own classes skip it on load, and so does this one.
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq$"]

    def __init__(self, config: PretrainedConfig) -> None:
        MiniMindPreTrainedModel.__init__(self, config)
        self.model = MiniMindModel(decoder_config(config))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @property
    def original_class(self) -> str:
        """The transformers class this model's files belong to, e.g. "Qwen3ForCausalLM"."""
        return ARCHITECTURES[self.config.model_type]

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """transformers' directory, named as the original architecture so that its own class loads it."""
        super().save_pretrained(save_directory, **kwargs)
        self.config.architectures = [self.original_class]
        self.config.save_pretrained(save_directory)


class LayoutMismatch(ValueError):
    """The directory's tensors are not the ones the fast decoder built from its config.json."""


class ShapeMismatch(LayoutMismatch):
    """The directory's tensors have other shapes than its config.json gives them: no class can load it."""


def check_loaded(info: dict, strict_names: bool) -> None:
    """Raise if from_pretrained's loading info shows weights left random: a tensor whose shape differs from the
    config's (ShapeMismatch), or with `strict_names` one missing or unexpected (LayoutMismatch). transformers only
    warns about these."""
    if info["mismatched_keys"]:
        first = sorted(info["mismatched_keys"])[0]  # (name, shape in the file, by the config); transformers 4: name
        shapes = (f"{first[0]} is {list(first[1])} in the file, {list(first[2])} by the config"
                  if isinstance(first, tuple) else f"{first} has another shape in the file than by the config")
        raise ShapeMismatch(f"its weights do not match its config.json: {shapes} ({len(info['mismatched_keys'])} "
                            "tensor(s) differ); the config or the weights are from another model")
    names = ("missing_keys", "unexpected_keys") if strict_names else ("missing_keys",)
    bad = {k: sorted(info[k])[:3] for k in names if info[k]}
    if bad:
        raise LayoutMismatch(f"its weights do not fit the layout read from its config.json ({bad})")


def load_fast(path: str | Path, dtype: torch.dtype | None = None) -> FastCausalLM:
    """Load a Qwen2/Qwen3/Llama/Mistral model directory onto the fast decoder (eval mode), strictly."""
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    # dtype None keeps the file's ("auto": transformers 5's default; 4.x would load float32)
    model, info = FastCausalLM.from_pretrained(str(path), config=config, local_files_only=True,
                                               dtype=dtype or "auto", output_loading_info=True,
                                               ignore_mismatched_sizes=True)  # listed in info, then refused
    check_loaded(info, strict_names=True)
    return model.eval()
