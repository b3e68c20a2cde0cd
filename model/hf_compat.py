"""What differs between the transformers versions we support, in one place.

transformers 5 keeps a model's rope settings in `config.rope_parameters` and MoE experts as fused
tensors; 4.x uses `rope_theta` / `rope_scaling` and a module per expert. transformers 5.2x renamed the KV-cache argument and output field from `past_key_values` to `cache` and
warns on the old name; older releases know only `past_key_values`. Code here passes and reads the cache
under whichever name the installed version uses, so neither version prints deprecation noise.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import transformers
from transformers.modeling_outputs import BaseModelOutputWithPast

# "cache" on transformers releases that renamed it, "past_key_values" before.
CACHE_NAME = "cache" if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)} \
    else "past_key_values"


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """The keyword argument that hands `cache` to a transformers-style forward: `{CACHE_NAME: cache}`."""
    return {CACHE_NAME: cache}


def cache_of(output: Any) -> Any:
    """The KV cache a forward returned (None when it built none)."""
    return getattr(output, CACHE_NAME)


# Whether configs hold their rope settings in `rope_parameters` (transformers 5) or in `rope_theta` and
# `rope_scaling` (4.x).
ROPE_PARAMETERS = int(transformers.__version__.split(".")[0]) >= 5


def rope_config_kwargs(params: dict[str, Any]) -> dict[str, Any]:
    """Config keyword arguments for rope settings given as transformers 5's `rope_parameters` (rope_theta,
    rope_type and the type's keys), in the form the installed transformers reads: the dict itself on 5,
    `rope_theta` plus `rope_scaling` on 4.x (which would keep an unknown `rope_parameters` unread)."""
    if ROPE_PARAMETERS:
        return {"rope_parameters": params}
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    return {"rope_theta": params["rope_theta"], "rope_scaling": scaling or None}


# Whether MoE experts are fused 3-D tensors (`experts.gate_up_proj`, transformers 5) or a module per
# expert (`experts.N.gate_proj`, 4.x).
FUSED_EXPERTS = ROPE_PARAMETERS
