"""Map a MiniMind state dict onto transformers' own architectures, so plain transformers opens it.

| MiniMind variant | transformers class | how it is made exact |
|---|---|---|
| minimind-3 dense | `Qwen3ForCausalLM` | same layout (q_norm/k_norm, head_dim) |
| minimind-3 MoE | `Qwen3MoeForCausalLM` | softmax top-k router with norm_topk_prob, no shared expert |
| minimind2 dense | `LlamaForCausalLM` | same layout (no q/k norm) |
| minimind2 MoE | `Qwen2MoeForCausalLM` | zero q/k/v biases; shared experts concatenated into one, gate 0, down ×2 |

transformers 5 keeps MoE experts fused as 3-D tensors (`mlp.experts.gate_up_proj` `[E, 2I, H]`,
`mlp.experts.down_proj` `[E, H, I]`; 4.x: a module per expert, MiniMind's own names); we build those, load them strictly into the transformers model
(so a wrong key or shape fails here, not in the user's hands) and let `save_pretrained` write its own
on-disk format.
"""

import warnings
from pathlib import Path

import torch
from torch import Tensor
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    PretrainedConfig,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

from model.errors import UserError
from model.hf_compat import FUSED_EXPERTS


class ExportError(UserError):
    """A model that cannot be written exactly as a transformers architecture."""


def _n_layers(sd: dict[str, Tensor]) -> int:
    return 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("model.layers."))


def _n_experts(sd: dict[str, Tensor], group: str) -> int:
    prefix = f"model.layers.0.mlp.{group}."
    idx = {int(k[len(prefix) :].split(".")[0]) for k in sd if k.startswith(prefix)}
    return len(idx)


def describe(sd: dict[str, Tensor]) -> tuple[str, bool]:
    """Return (generation, is_moe) of a MiniMind state dict: q_norm keys mark minimind-3."""
    gen = "minimind3" if any(".q_norm." in k for k in sd) else "minimind2"
    return gen, any(".mlp.experts." in k for k in sd)


def transformers_config(sd: dict[str, Tensor], cfg: object) -> PretrainedConfig:
    """The transformers config that reproduces MiniMind model `cfg` with weights `sd` exactly."""
    gen, moe = describe(sd)
    if getattr(cfg, "rope_scaling", None):
        raise ExportError("export of a model with rope_scaling (YaRN) is not supported: turn it off first")
    embed = sd["model.embed_tokens.weight"]
    vocab, hidden = embed.shape
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    q_out = sd["model.layers.0.self_attn.q_proj.weight"].shape[0]
    head_dim = q_out // heads
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=_n_layers(sd),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=getattr(cfg, "max_position_embeddings", 32768),
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=float(cfg.rope_theta),   # transformers 5 turns it into rope_parameters; 4.x reads it as is
        # MiniMind ties lm_head to the embedding; keep them separate only if they really differ.
        tie_word_embeddings=torch.equal(sd["lm_head.weight"], embed),
        bos_token_id=getattr(cfg, "bos_token_id", 1),
        eos_token_id=getattr(cfg, "eos_token_id", 2),
        pad_token_id=getattr(cfg, "pad_token_id", 0),
    )
    if not moe:
        common["intermediate_size"] = sd["model.layers.0.mlp.gate_proj.weight"].shape[0]
        if gen == "minimind3":
            return Qwen3Config(attention_bias=False, use_sliding_window=False, **common)
        return LlamaConfig(attention_bias=False, mlp_bias=False, **common)

    moe_inter = sd["model.layers.0.mlp.experts.0.gate_proj.weight"].shape[0]
    top_k = cfg.num_experts_per_tok
    moe_common = dict(
        num_experts=_n_experts(sd, "experts"),
        num_experts_per_tok=top_k,
        moe_intermediate_size=moe_inter,
        intermediate_size=moe_inter,  # unused: every layer is sparse (decoder_sparse_step 1)
        decoder_sparse_step=1,
        mlp_only_layers=[],
        output_router_logits=False,
    )
    n_shared = _n_experts(sd, "shared_experts")
    if gen == "minimind3":
        if n_shared:  # Qwen3-MoE has no shared expert, and Qwen2-MoE (which has one) no q/k norm
            raise ExportError(
                "a minimind-3 MoE with shared experts has no exact transformers architecture; "
                "export the MiniMind .pth only"
            )
        # minimind-3 renormalises its top-k weights (with top-1 that makes the weight 1), as Qwen3-MoE does.
        norm = getattr(cfg, "norm_topk_prob", True)
        return Qwen3MoeConfig(norm_topk_prob=norm, attention_bias=False, **moe_common, **common)
    if head_dim * heads != hidden:
        raise ExportError(
            f"Qwen2-MoE needs head_dim = hidden / heads ({hidden // heads}); this minimind2 MoE has {head_dim}"
        )
    shared_inter = (
        n_shared * sd["model.layers.0.mlp.shared_experts.0.gate_proj.weight"].shape[0] if n_shared else 0
    )
    del common["head_dim"]  # Qwen2-MoE has no head_dim: it is hidden / heads, as in minimind2
    return Qwen2MoeConfig(
        # minimind2 renormalises only when top_k > 1; with top_k == 1 it keeps the raw softmax score.
        norm_topk_prob=top_k > 1 and getattr(cfg, "norm_topk_prob", True),
        qkv_bias=True,  # present (as zeros) so every transformers version builds the same module
        shared_expert_intermediate_size=shared_inter,
        **moe_common,
        **common,
    )


def _fuse_experts(sd: dict[str, Tensor], prefix: str, n: int) -> dict[str, Tensor]:
    gate_up = [
        torch.cat([sd[f"{prefix}.{e}.gate_proj.weight"], sd[f"{prefix}.{e}.up_proj.weight"]])
        for e in range(n)
    ]
    down = [sd[f"{prefix}.{e}.down_proj.weight"] for e in range(n)]
    return {f"{prefix}.gate_up_proj": torch.stack(gate_up), f"{prefix}.down_proj": torch.stack(down)}


def transformers_state_dict(sd: dict[str, Tensor], config: PretrainedConfig) -> dict[str, Tensor]:
    """MiniMind keys → transformers keys (in-memory layout) for the architecture of `config`."""
    out = {k: v for k, v in sd.items() if ".mlp.experts." not in k and ".mlp.shared_experts." not in k}
    if config.model_type not in ("qwen3_moe", "qwen2_moe"):
        return out
    for i in range(config.num_hidden_layers):
        mlp = f"model.layers.{i}.mlp"
        if FUSED_EXPERTS:
            out.update(_fuse_experts(sd, f"{mlp}.experts", config.num_experts))
        else:  # transformers 4.x: a module per expert, under the names MiniMind uses too
            out.update({k: v for k, v in sd.items() if k.startswith(f"{mlp}.experts.")})
        # mlp.gate.weight keeps its name: MiniMind's router and transformers' TopKRouter both call it weight.
        if config.model_type != "qwen2_moe":
            continue
        hidden = config.hidden_size
        dtype = sd[f"{mlp}.gate.weight"].dtype
        for proj in ("q_proj", "k_proj", "v_proj"):
            w = sd[f"model.layers.{i}.self_attn.{proj}.weight"]
            out[f"model.layers.{i}.self_attn.{proj}.bias"] = torch.zeros(w.shape[0], dtype=w.dtype)
        # Σ_s down_s(silu(gate_s x)·up_s x) is one SwiGLU whose intermediate dim is the concatenation.
        # Qwen2-MoE multiplies it by sigmoid(gate·x): a zero gate gives exactly 0.5, undone by down × 2
        # (multiplying by 2 is exact in floating point).
        n_shared = config.shared_expert_intermediate_size and _n_experts(sd, "shared_experts")
        shared = [f"{mlp}.shared_experts.{s}" for s in range(n_shared)]
        if shared:
            out[f"{mlp}.shared_expert.gate_proj.weight"] = torch.cat(
                [sd[f"{s}.gate_proj.weight"] for s in shared]
            )
            out[f"{mlp}.shared_expert.up_proj.weight"] = torch.cat(
                [sd[f"{s}.up_proj.weight"] for s in shared]
            )
            down = torch.cat([sd[f"{s}.down_proj.weight"] for s in shared], dim=1)
            out[f"{mlp}.shared_expert.down_proj.weight"] = down * 2
        else:
            out[f"{mlp}.shared_expert.gate_proj.weight"] = torch.zeros(0, hidden, dtype=dtype)
            out[f"{mlp}.shared_expert.up_proj.weight"] = torch.zeros(0, hidden, dtype=dtype)
            out[f"{mlp}.shared_expert.down_proj.weight"] = torch.zeros(hidden, 0, dtype=dtype)
        out[f"{mlp}.shared_expert_gate.weight"] = torch.zeros(1, hidden, dtype=dtype)
    return out


def save_transformers(
    sd: dict[str, Tensor],
    config: PretrainedConfig,
    out_dir: Path,
    dtype: torch.dtype,
    generation_config: GenerationConfig | None = None,
) -> None:
    """Write `sd` (transformers keys) as a model directory through transformers' own save_pretrained, with
    `generation_config` (default: the one transformers derives from `config`)."""
    config.architectures = [_ARCH[config.model_type]]
    with (
        torch.device("meta"),
        warnings.catch_warnings(),
    ):  # meta: no random init, no second copy of the weights
        # A minimind2 MoE without shared experts gets an empty (0-wide) shared MLP, which torch warns about.
        warnings.filterwarnings("ignore", "Initializing zero-element tensors")
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    sd = {k: v.to(dtype) for k, v in sd.items()}
    if config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    if missing or unexpected:
        raise ExportError(
            f"weights do not fit {config.architectures[0]}: missing {missing}, unexpected {unexpected}"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    if generation_config is not None:
        model.generation_config = generation_config
    model.save_pretrained(out_dir)


_ARCH = {
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
}


def export_minimind(
    sd: dict[str, Tensor],
    cfg: object,
    out_dir: Path,
    dtype: torch.dtype,
    generation_config: GenerationConfig | None = None,
) -> str:
    """Export a (merged) MiniMind state dict as a transformers model directory, with `generation_config` if given
    (the model's eos ids, sampling defaults); return the class name."""
    config = transformers_config(sd, cfg)
    save_transformers(transformers_state_dict(sd, config), config, out_dir, dtype, generation_config)
    return config.architectures[0]
