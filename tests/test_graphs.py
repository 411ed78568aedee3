"""graphs.py's logic that needs no GPU: which steps it replays, the padding it reads once per cache, the cache
buffers it lends across generate() calls, and the experts kernels it tries. The captures themselves are in
tests/test_gpu_graphs.py."""

from __future__ import annotations

import torch

import mla_patch
from conftest import build_model, tiny_config
from test_cache import _latents


def test_a_cache_with_lent_buffers_dies_with_its_generation_and_its_buffers_are_lent_again():
    """graphs.py lends each layer a buffer that outlives the cache: the cache must still be freed at once
    (no reference cycle through the lending function), and the next cache of that shape gets the same
    buffers; a cache still held keeps its rows (it gets a copy)."""
    import gc
    import weakref

    from mla_patch.graphs import DecodeGraphs

    config = tiny_config("deepseek_v2")
    held = DecodeGraphs()

    def filled_cache(seed):
        cache = mla_patch.LatentCache(config=config, initial_capacity=32)
        held.lend_buffers(cache)
        for layer_idx in range(config.num_hidden_layers):
            cache.update(*_latents(2, 5, seed=seed + layer_idx), layer_idx)
        return cache

    gc.disable()
    try:
        first = filled_cache(0)
        pointers = [layer.buffer.data_ptr() for layer in first.latent_layers()]
        ref = weakref.ref(first)
        del first
        assert ref() is None, "the cache outlived its last reference (a reference cycle)"
    finally:
        gc.enable()
    second = filled_cache(10)
    assert [layer.buffer.data_ptr() for layer in second.latent_layers()] == pointers
    rows = second.layers[0].keys.clone()
    third = filled_cache(20)  # `second` is still held: it keeps its rows, `third` takes the buffers
    assert [layer.buffer.data_ptr() for layer in third.latent_layers()] == pointers
    assert torch.equal(second.layers[0].keys, rows) and second.layers[0].buffer.data_ptr() not in pointers


def test_graph_bindings_read_left_padding_once_and_refuse_other_masks():
    """What graphs.py checks once per cache before it replays: left padding gives each row's first valid row;
    right padding or a hole is refused with the reason (the step then runs eagerly)."""
    from mla_patch.graphs import DecodeGraphs

    model = build_model(tiny_config("deepseek_v2"), dtype=torch.float32)
    ids = torch.zeros(3, 1, dtype=torch.long)
    left = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1]])
    binding = DecodeGraphs()._bind(model, ("buffers",), left, ids)
    assert binding.reason is None and binding.kv_start.tolist() == [0, 1, 3]
    for bad in ([[1, 1, 0, 1]] * 3, [[1, 1, 1, 0]] * 3):  # a hole; right padding
        binding = DecodeGraphs()._bind(model, ("buffers",), torch.tensor(bad), ids)
        assert binding.reason == "an attention mask that is not left padding"
    assert DecodeGraphs()._bind(model, ("buffers",), None, ids).kv_start.tolist() == [0, 0, 0]


def test_graph_steps_are_only_plain_one_token_steps_on_a_latent_cache():
    from mla_patch.graphs import DecodeGraphs

    config = tiny_config("deepseek_v2")
    cache = mla_patch.LatentCache(config=config, initial_capacity=16)
    def reason(cache, inputs):
        layers = cache.latent_layers() if cache is not None else []
        return DecodeGraphs._step_unsupported_reason(cache, layers, inputs)

    assert reason(None, {}) == "not a LatentCache"
    assert "before its prefill" in reason(cache, {"input_ids": torch.zeros(2, 1, dtype=torch.long)})
    for layer_idx in range(config.num_hidden_layers):
        cache.update(*_latents(2, 5, seed=layer_idx), layer_idx)
    assert reason(cache, {"input_ids": torch.zeros(2, 3, dtype=torch.long)}) == "not one new token per sequence"


def test_a_moe_step_is_captured_with_either_graph_safe_experts_kernel():
    """graphs.py times batched_mm against grouped_mm for a MoE step; an eager expert loop (host syncs) has no
    alternative, and the model's own setting comes back after each try."""
    from mla_patch.graphs import experts_as, _experts_choices

    model = build_model(tiny_config("deepseek_v2"))
    assert _experts_choices(model) == [None]  # eager experts: nothing graph-safe to swap to
    model.set_experts_implementation("batched_mm")
    choices = _experts_choices(model)
    assert choices == [None, {"": "grouped_mm"}]
    with experts_as(model, choices[1]):
        assert model.get_experts_implementation() == {"": "grouped_mm"}
    assert model.get_experts_implementation() == {"": "batched_mm"}
