"""Patched models on the GPU: the kernel backend against the PyTorch reference backend and stock.

Skipped (with the reason) where there is no CUDA device or the extension is not built.
"""

from __future__ import annotations

import copy

import pytest
import torch

import mla_patch
from mla_patch import CACHE_KWARG
from conftest import build_model, case_seed, rel_err, tiny_config

pytestmark = pytest.mark.cuda


def _rewind(cache, tokens=1):
    """Drop the last cached tokens (StaticLayer has no crop() in transformers 5.17)."""
    for layer in cache.layers:
        layer.cumulative_length.sub_(tokens)


def _require_kernel():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not mla_patch.ops.has_kernel():
        pytest.skip(f"extension not built: {mla_patch.ops.extension_error()}")


def _gpu_model(family, rank, rope, heads, dtype=torch.bfloat16, **overrides):
    config = tiny_config(family, hidden_size=16 * heads, num_attention_heads=heads, kv_lora_rank=rank, qk_rope_head_dim=rope,
                         qk_nope_head_dim=64, v_head_dim=64, vocab_size=512, **overrides)
    return build_model(config, dtype=torch.float32, seed=case_seed(family, rank, heads) % 997).to("cuda", dtype)


def _prompt(seed, batch=4, length=40):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 512, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row in range(batch):
        mask[row, : 7 * row] = 0
    return ids.cuda(), mask.cuda()


def _teacher_forced_logits(model, ids, mask, continuation):
    """Logits of each step when `continuation` is fed one token at a time (prefill, then decode)."""
    cache = mla_patch.LatentCache(config=model.config)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **{CACHE_KWARG: cache})
        logits = [out.logits[:, -1]]
        for t in range(continuation.shape[1] - 1):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            out = model(input_ids=continuation[:, t : t + 1], attention_mask=mask, position_ids=positions,
                        use_cache=True, **{CACHE_KWARG: cache})
            logits.append(out.logits[:, -1])
    return torch.stack(logits, dim=1).float()


@pytest.mark.parametrize("family,rank,rope,heads", [("deepseek_v2", 512, 64, 16), ("deepseek_v3", 256, 32, 40)])
def test_kernel_backend_matches_reference_backend(family, rank, rope, heads):
    _require_kernel()
    base = _gpu_model(family, rank, rope, heads)
    models = {}
    for backend in ("torch", "kernel"):
        models[backend] = copy.deepcopy(base)
        mla_patch.patch(models[backend], backend=backend)
    ids, mask = _prompt(case_seed("gpu", family))
    kwargs = dict(max_new_tokens=24, do_sample=False)
    ref_seq = models["torch"].generate(input_ids=ids, attention_mask=mask, **kwargs)
    ker_seq = models["kernel"].generate(input_ids=ids, attention_mask=mask, **kwargs)
    continuation = ref_seq[:, ids.shape[1]:]
    # Teacher-forced on the same tokens, so every step's logits are comparable.
    ref = _teacher_forced_logits(models["torch"], ids, mask, continuation)
    ker = _teacher_forced_logits(models["kernel"], ids, mask, continuation)
    worst = rel_err(ker, ref)
    agree = (ker_seq == ref_seq).float().mean().item()
    print(f"{family} R={rank} H={heads}: step-logit rel err kernel vs reference {worst:.2e}, greedy agreement {agree:.1%}")
    assert worst < 2e-2
    assert agree > 0.9, f"greedy tokens agree on only {agree:.1%}"
    stock = _teacher_forced_logits(base, ids, mask, continuation)
    assert rel_err(ker, stock) < 3e-2


def test_static_cache_compiled_generate_uses_the_kernel():
    """generate(cache_implementation="static") compiles the decode step; the custom op traces."""
    _require_kernel()
    model = _gpu_model("deepseek_v3", 512, 64, 16, first_k_dense_replace=2)  # dense MLPs capture cleanly
    reference = copy.deepcopy(model)
    mla_patch.patch(model, backend="kernel")
    mla_patch.patch(reference, backend="torch")
    ids, mask = _prompt(case_seed("static"), batch=2)
    kwargs = dict(max_new_tokens=16, do_sample=False, cache_implementation="static", output_logits=True,
                  return_dict_in_generate=True)
    got = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    want = reference.generate(input_ids=ids, attention_mask=mask, **kwargs)
    worst = max(rel_err(a.float(), b.float()) for a, b in zip(got.logits, want.logits))
    assert worst < 2e-2


def test_cuda_graph_capture_of_a_patched_decode_step():
    _require_kernel()
    from transformers import StaticCache

    model = _gpu_model("deepseek_v2", 512, 64, 16, first_k_dense_replace=2)
    mla_patch.patch(model, backend="kernel")
    ids, _ = _prompt(case_seed("graph"), batch=2, length=30)
    cache = StaticCache(config=model.config, max_cache_len=64)
    with torch.no_grad():
        model(input_ids=ids, **{CACHE_KWARG: cache}, use_cache=True)
        token = torch.randint(3, 512, (2, 1), device="cuda")
        position = torch.full((2, 1), 30, device="cuda")
        eager = model(input_ids=token, position_ids=position, **{CACHE_KWARG: cache}, use_cache=True).logits
        _rewind(cache)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            model(input_ids=token, position_ids=position, **{CACHE_KWARG: cache}, use_cache=True)
            _rewind(cache)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = model(input_ids=token, position_ids=position, **{CACHE_KWARG: cache}, use_cache=True).logits
        _rewind(cache)
        graph.replay()
        torch.cuda.synchronize()
    assert rel_err(captured.float(), eager.float()) < 1e-3
