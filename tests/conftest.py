"""Shared fixtures: seeds, tiny MLA configs, tolerance table, the cuda marker."""

from __future__ import annotations

import os
import socket
import zlib

import pytest
import torch

import mla_patch

BASE_SEED = int(os.environ.get("MLA_PATCH_SEED", "1234"))

# Relative-error budgets against a float64 reference, by output dtype.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def case_seed(*params) -> int:
    """A seed mixed from the base seed and the case parameters (rotate with MLA_PATCH_SEED)."""
    return (BASE_SEED * 1_000_003 + zlib.crc32(repr(params).encode())) % (2**31)


def free_port() -> int:
    """A loopback TCP port free now, for a server or a torch.distributed rendezvous a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    if torch.isnan(out).any():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def tiny_config(family: str = "deepseek_v2", **overrides):
    """A two-layer random MLA config, small enough for CPU tests in float64."""
    from transformers import DeepseekV2Config, DeepseekV3Config

    common = dict(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=None,
        kv_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        n_shared_experts=1,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family == "deepseek_v3":
        common.update(n_group=1, topk_group=1)
    common.update(overrides)
    common.setdefault("num_key_value_heads", common["num_attention_heads"])
    if "num_key_value_heads" not in overrides:
        common["num_key_value_heads"] = common["num_attention_heads"]
    cls = {"deepseek_v2": DeepseekV2Config, "deepseek_v3": DeepseekV3Config}[family]
    return cls(**common)


def build_model(config, dtype=torch.float64, seed=0, attn="sdpa"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config._attn_implementation = attn
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, experts_implementation="eager").eval()
    # Random init of transformers is small; widen it so attention is neither flat nor one-hot.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.normal_(0, 1.0 / p.shape[-1] ** 0.5)
    return model


def left_padded_prompt(seed, batch=3, length=11, pad=(0, 4, 7)):
    """Random ids [batch, length] and their mask, row i left-padded by pad[i] (pad ids are 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row, p in enumerate(pad[:batch]):
        mask[row, :p] = 0
        ids[row, :p] = 0
    return ids, mask


@pytest.fixture
def wrong_decode_scale(monkeypatch):
    """Injects a fault: the absorbed decode attends with 1.5x the softmax scale."""
    import mla_patch

    original = mla_patch.ops.mla_decode

    def wrong_scale(q_latent, q_pe, c_kv, k_pe, kv_start, kv_end, sm_scale, **kw):
        return original(q_latent, q_pe, c_kv, k_pe, kv_start, kv_end, sm_scale * 1.5, **kw)

    monkeypatch.setattr(mla_patch.ops, "mla_decode", wrong_scale)


@pytest.fixture(autouse=True)
def _clean_patch_state():
    """Every test starts and ends unpatched, with fresh counters."""
    mla_patch.unpatch()
    mla_patch.reset_decode_stats()
    yield
    mla_patch.unpatch()


def pytest_collection_modifyitems(config, items):
    if os.environ.get("MLA_PATCH_SLOW"):
        return
    skip = pytest.mark.skip(reason="slow sweep; set MLA_PATCH_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
