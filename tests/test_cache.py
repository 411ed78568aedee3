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
    # Sized from generate()'s max length (9 + 30 tokens): the smallest bucket, never grown.
    assert capacity == mla_patch.cache.capacity_for(9 + 30) == 64
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


def test_a_recorded_step_writes_at_its_device_position_and_reads_its_ranges():
    """What a captured decode step runs (graphs.py): the row goes to write_pos, each sequence sees
    [kv_start, kv_end), no host length and no mask, and the logits equal the ordinary eager step's."""
    from mla_patch.cache import CapturedStep

    config = tiny_config("deepseek_v3", first_k_dense_replace=2)
    model = build_model(config, dtype=torch.float64)
    mla_patch.patch(model, backend="torch")
    g = torch.Generator().manual_seed(case_seed("recorded-step"))
    ids = torch.randint(3, 97, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    kwarg = mla_patch.CACHE_KWARG
    cache = mla_patch.LatentCache(config=config, initial_capacity=32)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=positions, **{kwarg: cache}, use_cache=True)
        recorded = copy.deepcopy(cache)
        token = torch.randint(3, 97, (3, 1), generator=g)
        step_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        step_pos = positions[:, -1:] + 1
        want = model(input_ids=token, attention_mask=step_mask, position_ids=step_pos, **{kwarg: cache}, use_cache=True)
        step = CapturedStep(write_pos=torch.tensor([11]), kv_start=torch.tensor([0, 4, 7], dtype=torch.int32),
                            kv_end=torch.full((3,), 12, dtype=torch.int32))
        for layer in recorded.latent_layers():
            layer.step = step
        got = model(input_ids=token, position_ids=step_pos, **{kwarg: recorded}, use_cache=True)
    assert torch.allclose(got.logits, want.logits, rtol=1e-10, atol=1e-10)
    for mine, theirs in zip(recorded.latent_layers(), cache.latent_layers()):
        assert mine.length == 11  # the host length is advanced by the replaying code, not by the step
        assert torch.equal(mine.buffer[:, :, :12], theirs.buffer[:, :, :12])


def test_capacity_buckets_hold_the_tokens_with_little_waste_and_repeat():
    from mla_patch.cache import capacity_for

    sizes = [capacity_for(t) for t in range(1, 40000, 7)]
    for tokens, size in zip(range(1, 40000, 7), sizes):
        assert size >= tokens and (size <= 64 or size < 1.26 * tokens)
    assert sizes == sorted(sizes) and len(set(sizes)) < 70  # few distinct sizes: captured steps are reused
