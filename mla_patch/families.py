"""Which transformers model families are MLA, and what differs between them.

One entry per family: where its attention class lives, how it applies RoPE to the shared
rope part (the model's own helper, never a copy), and the pretrained-model class that owns
generate()'s cache creation. Everything else (projections, kv_a_layernorm, kv_b_proj,
`scaling`) is read off the attention module itself, so the decode path is written once.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Callable

import torch


def rope_complex(module, q_pe: torch.Tensor, k_pe: torch.Tensor, position_embeddings):
    """DeepSeek-V2 style: `freqs_cis` (complex, attention_scaling folded in) on adjacent pairs."""
    modeling = sys.modules[module._mla_original_class.__module__]
    return modeling.apply_rotary_emb(q_pe, k_pe, position_embeddings.to(q_pe.device))


def rope_cos_sin(module, q_pe: torch.Tensor, k_pe: torch.Tensor, position_embeddings):
    """DeepSeek-V3 style: (cos, sin), interleaved or not per `config.rope_interleave`."""
    modeling = sys.modules[module._mla_original_class.__module__]
    cos, sin = position_embeddings
    if getattr(module.config, "rope_interleave", False):
        return modeling.apply_rotary_pos_emb_interleave(q_pe, k_pe, cos, sin)
    return modeling.apply_rotary_pos_emb(q_pe, k_pe, cos, sin)


@dataclass(frozen=True)
class MlaFamily:
    model_type: str
    modeling_module: str  # transformers module path holding the classes
    attention_class: str  # its MLA attention class
    pretrained_class: str  # its PreTrainedModel base, which owns generate()'s cache creation
    rope: Callable  # (module, q_pe [B,H,S,P], k_pe [B,1,S,P], position_embeddings) -> roped pair

    def load(self):
        """The modeling module, or None when this transformers has no such family."""
        try:
            return importlib.import_module(self.modeling_module)
        except ImportError:
            return None


FAMILIES: dict[str, MlaFamily] = {
    f.model_type: f
    for f in (
        MlaFamily(
            "deepseek_v2",
            "transformers.models.deepseek_v2.modeling_deepseek_v2",
            "DeepseekV2Attention",
            "DeepseekV2PreTrainedModel",
            rope_complex,
        ),
        MlaFamily(
            "deepseek_v3",
            "transformers.models.deepseek_v3.modeling_deepseek_v3",
            "DeepseekV3Attention",
            "DeepseekV3PreTrainedModel",
            rope_cos_sin,
        ),
    )
}
