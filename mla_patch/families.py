"""Which transformers model families are MLA, and what differs between them.

One entry per family: where its attention class lives, how it applies RoPE to the shared
rope part (the model's own helper, never a copy), the pretrained-model class that owns
generate()'s cache creation, and the few extra multipliers some families put on the query or
on the cached latent. Everything else (projections, kv_a_layernorm, kv_b_proj, `scaling`) is
read off the attention module itself, so the decode path is written once.

Families whose attention is not plain MLA are listed in `NOT_SERVED` with the reason; patch()
leaves them untouched and says why.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Callable

import torch


def _modeling(module):
    return sys.modules[module._mla_original_class.__module__]


def rope_complex(module, q_pe: torch.Tensor, k_pe: torch.Tensor, position_embeddings):
    """DeepSeek-V2 style: `freqs_cis` (complex, attention_scaling folded in) on adjacent pairs."""
    return _modeling(module).apply_rotary_emb(q_pe, k_pe, position_embeddings.to(q_pe.device))


def rope_cos_sin(module, q_pe: torch.Tensor, k_pe: torch.Tensor, position_embeddings):
    """DeepSeek-V3 style: (cos, sin), interleaved or not per `config.rope_interleave`."""
    cos, sin = position_embeddings
    if getattr(module.config, "rope_interleave", False):
        return _modeling(module).apply_rotary_pos_emb_interleave(q_pe, k_pe, cos, sin)
    return _modeling(module).apply_rotary_pos_emb(q_pe, k_pe, cos, sin)


def rope_cos_sin_half(module, q_pe: torch.Tensor, k_pe: torch.Tensor, position_embeddings):
    """MiniCPM3: (cos, sin) on rotate-half pairs, whatever the config says."""
    cos, sin = position_embeddings
    return _modeling(module).apply_rotary_pos_emb(q_pe, k_pe, cos, sin)


def rope_cos_sin_interleave(module, q_pe: torch.Tensor, k_pe: torch.Tensor, position_embeddings):
    """LongCat-Flash: (cos, sin) on interleaved pairs, whatever the config says."""
    cos, sin = position_embeddings
    return _modeling(module).apply_rotary_pos_emb_interleave(q_pe, k_pe, cos, sin)


def rope_none(module, q_pe: torch.Tensor, k_pe: torch.Tensor, position_embeddings):
    """Kimi-Linear MLA layers are NoPE: the shared "rope" part of the key is used unrotated."""
    return q_pe, k_pe


def q_scale_longcat(module, bound: dict):
    """LongCat-Flash multiplies q_pass and q_rot by (hidden / q_lora_rank) ** 0.5."""
    return module.mla_scale_q_lora


def latent_scale_longcat(module):
    """LongCat-Flash caches kv_a_layernorm(c) * (hidden / kv_lora_rank) ** 0.5."""
    return module.mla_scale_kv_lora


def q_scale_llama4(module, bound: dict):
    """Mistral4: Llama-4 position-dependent query scale [B, 1, S, 1] (rope_parameters beta; 1 when unset)."""
    params = module.config.rope_parameters
    beta, original = params.get("llama_4_scaling_beta"), params.get("original_max_position_embeddings")
    position_ids = bound.get("position_ids")
    if position_ids is None:
        raise ValueError(f"{type(module).__name__}: position_ids are needed for the Llama-4 query scale")
    return _modeling(module).get_llama_4_attn_scale(position_ids, beta, original)


def out_gate_bailing(module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Ling 3 (bailing_hybrid): sigmoid(g_proj(x)) [B, S, H] multiplies each head's attention output."""
    return torch.sigmoid(module.g_proj(hidden_states).float()).to(hidden_states.dtype)


@dataclass(frozen=True)
class MlaFamily:
    model_type: str
    modeling_module: str  # transformers module path holding the classes
    attention_class: str  # its MLA attention class
    pretrained_class: str  # its PreTrainedModel base, which owns generate()'s cache creation
    rope: Callable  # (module, q_pe [B,H,S,P], k_pe [B,1,S,P], position_embeddings) -> roped pair
    # (module, bound forward args) -> multiplier of the whole query, broadcastable to [B, H, S, 1]
    q_scale: Callable | None = None
    # (module) -> multiplier of kv_a_layernorm(c) before it is cached
    latent_scale: Callable | None = None
    # (module, hidden_states) -> [B, S, H] multiplier of each head's attention output, before o_proj
    out_gate: Callable | None = None

    def load(self):
        """The modeling module, or None when this transformers has no such family."""
        try:
            return importlib.import_module(self.modeling_module)
        except ImportError:
            return None


def _family(model_type, prefix, rope, attention=None, **extra) -> MlaFamily:
    return MlaFamily(
        model_type,
        f"transformers.models.{model_type}.modeling_{model_type}",
        attention or f"{prefix}Attention",
        f"{prefix}PreTrainedModel",
        rope,
        **extra,
    )


FAMILIES: dict[str, MlaFamily] = {
    f.model_type: f
    for f in (
        _family("deepseek_v2", "DeepseekV2", rope_complex),
        _family("deepseek_v3", "DeepseekV3", rope_cos_sin),  # also Kimi-K2, Moonlight checkpoints
        _family("glm4_moe_lite", "Glm4MoeLite", rope_cos_sin),
        _family("youtu", "Youtu", rope_cos_sin),
        _family("axk1", "AXK1", rope_cos_sin),
        _family("minicpm3", "MiniCPM3", rope_cos_sin_half),
        _family("mistral4", "Mistral4", rope_cos_sin, q_scale=q_scale_llama4),
        _family(
            "longcat_flash",
            "LongcatFlash",
            rope_cos_sin_interleave,
            attention="LongcatFlashMLA",
            q_scale=q_scale_longcat,
            latent_scale=latent_scale_longcat,
        ),
        # Hybrid: KDA linear-attention layers stay stock; LatentCache keeps their state layers.
        _family("kimi_linear", "KimiLinear", rope_none),
        _family("bailing_hybrid", "BailingHybrid", rope_cos_sin_interleave, out_gate=out_gate_bailing),  # 5.24+
    )
}

_SPARSE = (
    "DSA: a lightning indexer picks the top-k cached tokens each query attends to, and the indexer "
    "keeps its own key cache; absorbed dense decode over the latent would attend to every token"
)

# model_type -> why its attention is not served (left untouched by patch()).
NOT_SERVED: dict[str, str] = {
    "deepseek_v32": _SPARSE,
    "glm_moe_dsa": _SPARSE,
    "glm5_next": _SPARSE + " (with cross-layer top-k sharing)",
    "axk2": _SPARSE + ", plus a sigmoid output gate and a fused q/gate projection",
    "hy_v4": _SPARSE + ", plus an output gate and learnable attention sinks",
    "hy_v4_vl": _SPARSE + ", plus an output gate and learnable attention sinks",
    "mistral_large4": _SPARSE + ", plus cross-layer KV sharing and no-RoPE layers",
    "dots3_note": _SPARSE + " on some layers, plus sliding-window layers, a k_pe norm and an output gate",
    "deepseek_v4": "not MLA: compressed / sliding-window attention with shared K=V heads, no kv_b_proj",
}
