"""Layers placed through accelerate's hooks (issue 7, what a CPU can show).

A model split by `device_map` runs each layer on its own device; its weights may even live on the
meta device or on disk and be brought in by accelerate's hooks just before the layer runs. The
patched decode must read its absorbed weights at that moment (never cached copies from load time),
and each layer's latent cache must live where that layer runs. On a machine with one device type we
check the machinery itself: layers offloaded to disk/meta and layers resident, mixed in one model.
"""

from __future__ import annotations

import copy

import pytest
import torch

import mla_patch
from conftest import build_model, case_seed, tiny_config


def _prompt(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_offloaded_layers_decode_through_accelerate_hooks(family, tmp_path):
    from accelerate import dispatch_model

    config = tiny_config(family, num_hidden_layers=3, first_k_dense_replace=3)
    stock = build_model(config, dtype=torch.float32)
    split = copy.deepcopy(stock)
    # Layer 1 lives on disk (its parameters are meta tensors until its hook loads them), the rest on CPU.
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    split = dispatch_model(split, device_map=device_map, main_device="cpu", offload_dir=str(tmp_path))
    assert split.model.layers[1].self_attn.kv_b_proj.weight.is_meta
    mla_patch.patch(split)
    assert mla_patch.status(split)["patched_layers"] == 3

    ids, mask = _prompt(case_seed("offload", family))
    kwargs = dict(max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    want = stock.generate(input_ids=ids, attention_mask=mask, **kwargs)
    got = split.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(want.sequences, got.sequences)
    assert mla_patch.decode_stats()["vanilla_fallbacks"] == 0
    assert mla_patch.decode_stats()["absorbed_tokens"] == 2 * 11
    cache = got["cache"] if "cache" in got.keys() else got["past_key_values"]
    assert isinstance(cache, mla_patch.LatentCache)
    # Each layer's latent lives on the device its layer ran on (the execution device, not meta).
    assert all(layer.buffer.device.type == "cpu" for layer in cache.layers)
    assert split.model.layers[1].self_attn.kv_b_proj.weight.is_meta  # offloaded again after use


def test_cache_layers_follow_their_layer_device():
    """The cache allocates each layer's buffer where that layer's latents arrive."""
    layer_a, layer_b = mla_patch.cache.LatentLayer(), mla_patch.cache.LatentLayer()
    c, k = torch.randn(1, 1, 3, 16), torch.randn(1, 1, 3, 4)
    layer_a.update(c, k)
    layer_b.update(c.to(torch.float64), k.to(torch.float64))  # stands in for "another device": own dtype/device
    assert layer_a.buffer.device == c.device and layer_b.buffer.dtype == torch.float64
