"""LatentCache: only latents are stored, writes are in place, transformers' cache methods work."""

from __future__ import annotations

import copy

import torch

import mla_patch
from conftest import build_model, case_seed, tiny_config


def _latents(B, S, R=32, P=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 1, S, R, generator=g, dtype=dtype), torch.randn(B, 1, S, P, generator=g, dtype=dtype)


def test_decode_steps_write_in_place_until_the_buffer_grows():
    layer = mla_patch.cache.LatentLayer(initial_capacity=16)
    c, k = _latents(2, 5)
    layer.update(c, k)
    pointers, capacities = [], []
    for step in range(40):
        c1, k1 = _latents(2, 1, seed=step + 1)
        keys, values = layer.update(c1, k1)
        pointers.append(layer.buffer.data_ptr())
        capacities.append(layer.capacity)
        assert torch.equal(keys[:, :, -1:], c1) and torch.equal(values[:, :, -1:], k1)
    # The storage only moves when the capacity doubles: 16 -> 32 -> 64 for 45 rows.
    moves = sum(a != b for a, b in zip(pointers, pointers[1:]))
    assert moves == 2 and capacities[-1] == 64
    assert layer.get_seq_length() == 45 and layer.keys.shape == (2, 1, 45, 32)
    # keys/values are views of one packed row per token: [c_kv | k_pe].
    assert layer.keys.data_ptr() == layer.buffer.data_ptr()
    assert layer.values.data_ptr() == layer.buffer.data_ptr() + 32 * layer.buffer.element_size()


def test_memory_after_generate_is_the_latent_size():
    config = tiny_config("deepseek_v2")
    model = build_model(config, dtype=torch.float32)
    mla_patch.patch(model)
    ids = torch.randint(3, 97, (3, 9), generator=torch.Generator().manual_seed(case_seed("mem")))
    out = model.generate(input_ids=ids, max_new_tokens=30, min_new_tokens=30, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    assert isinstance(cache, mla_patch.LatentCache)
    capacity = cache.layers[0].capacity
    expected = config.num_hidden_layers * 3 * capacity * (config.kv_lora_rank + config.qk_rope_head_dim) * 4
    assert cache.nbytes() == expected
    assert capacity == 256  # the default initial capacity holds 9 + 29 rows without growing
    assert cache.get_seq_length() == 9 + 29


def test_crop_reorder_select_and_reset():
    layer = mla_patch.cache.LatentLayer(initial_capacity=4)
    c, k = _latents(3, 6, seed=1)
    layer.update(c, k)
    layer.crop(-2)
    assert torch.equal(layer.keys, c[:, :, :4]) and torch.equal(layer.values, k[:, :, :4])
    layer.crop(3)  # legacy form: the final length
    assert layer.get_seq_length() == 3
    order = torch.tensor([2, 0, 1])
    layer.reorder_cache(order)
    assert torch.equal(layer.keys, c[order][:, :, :3])
    layer.batch_select_indices(torch.tensor([1, 2]))
    assert torch.equal(layer.values, k[order][1:, :, :3])
    layer.batch_repeat_interleave(2)
    assert layer.keys.shape[0] == 4
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.capacity >= 6


def test_wrong_inputs_are_named():
    import pytest

    layer = mla_patch.cache.LatentLayer()
    with pytest.raises(ValueError, match="MLA latents"):
        layer.update(torch.zeros(2, 4, 3, 16), torch.zeros(2, 4, 3, 16))
    layer.update(*_latents(2, 3))
    with pytest.raises(ValueError, match="batch size changed"):
        layer.update(*_latents(3, 1))
    with pytest.raises(ValueError, match="dtype changed"):
        layer.update(*_latents(2, 1, dtype=torch.float64))


def test_generate_twice_reuses_nothing_stale():
    stock = build_model(tiny_config("deepseek_v3"), dtype=torch.float64)
    patched = copy.deepcopy(stock)
    mla_patch.patch(patched)
    for batch in (2, 1):
        ids = torch.randint(3, 97, (batch, 7), generator=torch.Generator().manual_seed(batch))
        want = stock.generate(input_ids=ids, max_new_tokens=10, do_sample=False)
        got = patched.generate(input_ids=ids, max_new_tokens=10, do_sample=False)
        assert torch.equal(want, got)
