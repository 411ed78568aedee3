"""The model shapes the generate() benchmarks build (bench_generate.py's help describes them), with random
bf16 weights: decode speed depends on the shapes, not on the values."""

from __future__ import annotations

import torch

MODELS = {
    "v2-lite": dict(family="deepseek_v2", hidden_size=2048, num_hidden_layers=27, num_attention_heads=16,
                    q_lora_rank=None, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
                    v_head_dim=128, intermediate_size=10944, moe_intermediate_size=1408, n_routed_experts=64,
                    num_experts_per_tok=6, n_shared_experts=2, first_k_dense_replace=1, vocab_size=102400),
    "v3-128h": dict(family="deepseek_v3", hidden_size=7168, num_hidden_layers=4, num_attention_heads=128,
                    q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
                    v_head_dim=128, intermediate_size=2048, first_k_dense_replace=4, vocab_size=32000,
                    n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1, rope_interleave=True),
}


def model_config(name: str, **overrides):
    """The transformers config of MODELS[name] (sdpa attention), with `overrides` applied to its spec."""
    from transformers import DeepseekV2Config, DeepseekV3Config

    spec = dict(MODELS[name], **overrides)
    cls = DeepseekV2Config if spec.pop("family") == "deepseek_v2" else DeepseekV3Config
    config = cls(num_key_value_heads=spec["num_attention_heads"], max_position_embeddings=65536, **spec)
    config._attn_implementation = "sdpa"
    return config


def shrink(q_lora_rank: int, n_routed_experts: int, **dims) -> None:
    """Tiny shapes for --smoke runs (they check a script, not speed): `dims` for every model, q_lora only
    where the model has one, the routed experts (top-2) only where it routes."""
    for spec in MODELS.values():
        spec.update(dims, q_lora_rank=None if spec["q_lora_rank"] is None else q_lora_rank)
        if "n_routed_experts" in spec:
            spec.update(n_routed_experts=n_routed_experts, num_experts_per_tok=2)


def fill_random_(param: torch.Tensor, gen: torch.Generator) -> None:
    """Matrices N(0, 1/fan_in) so activations keep their scale through the layers; vectors (norms) ones."""
    if param.dim() >= 2:
        param.normal_(0, param.shape[-1] ** -0.5, generator=gen)
    else:
        param.fill_(1.0)


def build(name: str, device):
    """MODELS[name] on one device, random bf16 weights, eval mode."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():  # parameters on the meta device; buffers (rotary inv_freq) stay real
        model = AutoModelForCausalLM.from_config(model_config(name), dtype=torch.bfloat16)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            fill_random_(p, gen)
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
    return model.eval()


def layer_devices(model) -> list[torch.device]:
    """The device of each decoder layer (one device, or a device_map's split)."""
    return [next(layer.parameters()).device for layer in model.model.layers]
