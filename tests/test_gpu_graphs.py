"""generate() on CUDA after patch(): decode steps replayed from mla_patch's own CUDA graphs.

Against the same model run eagerly (generate(..., disable_compile=True)): identical greedy tokens and
step logits within bf16 rounding, with left padding, MoE layers, beam search and sampling; the graphs
are captured once per shape and replayed by later calls. Also: transformers' compile of a static cache
makes one graph with the kernel in it. Skipped (with the reason) without CUDA and the extension.
"""

from __future__ import annotations

import copy

import pytest
import torch

import mla_patch
from mla_patch import graphs
from mla_patch.demo import _output_cache
from conftest import build_model, case_seed, rel_err, tiny_config
from test_compile import _counting_compile, _generate_static, generate_counting_graphs

pytestmark = pytest.mark.cuda


def _require_kernel():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not mla_patch.ops.has_kernel():
        pytest.skip(f"extension not built: {mla_patch.ops.extension_error()}")


def _model(family="deepseek_v2", heads=16, moe=False, **overrides):
    config = tiny_config(family, hidden_size=16 * heads, num_attention_heads=heads, kv_lora_rank=512,
                         qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64, vocab_size=512,
                         first_k_dense_replace=1 if moe else 2, **overrides)
    model = build_model(config, dtype=torch.float32, seed=case_seed("graphs", family, heads) % 997)
    if moe:  # transformers' default experts on CUDA (grouped_mm; batched_mm while decoding): no host syncs
        model.set_experts_implementation("grouped_mm")
    return model.to("cuda", torch.bfloat16)


def _prompt(seed, batch=3, length=37):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 512, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row in range(batch):
        mask[row, : 5 * row] = 0  # left padding of 0, 5, 10, ... tokens
    return ids.cuda(), mask.cuda()


def _generate(model, ids, mask, **kwargs):
    settings = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, output_logits=True,
                    return_dict_in_generate=True, pad_token_id=0)
    return model.generate(input_ids=ids, attention_mask=mask, **{**settings, **kwargs})


@pytest.mark.parametrize("family,heads,moe", [("deepseek_v2", 16, True), ("deepseek_v3", 128, False)])
def test_graph_decode_equals_eager_decode(family, heads, moe):
    _require_kernel()
    model = _model(family, heads, moe)
    mla_patch.patch(model, backend="kernel")
    ids, mask = _prompt(case_seed("graph-eager", family))
    mla_patch.reset_decode_stats()
    eager = _generate(model, ids, mask, disable_compile=True)
    assert mla_patch.decode_stats()["graph_replays"] == 0
    graphed = _generate(model, ids, mask)
    stats = mla_patch.decode_stats()
    assert stats["graph_replays"] == 19 and stats["vanilla_fallbacks"] == 0, stats
    assert "CUDA graphs" in mla_patch.status(model)["generate_decode"]
    captured = list(graphs.graphs_of(model).captured.values())[-1]
    assert len(captured.experts_ms) == (2 if moe else 1)  # a MoE step is captured with both experts kernels
    _assert_same_tokens(graphed, eager)


def _assert_same_tokens(got, want):
    """Equal step logits within bf16 rounding while the tokens agree; a differing greedy token must be a
    near-tie in `want`'s logits (the graph may run the other experts kernel: another bf16 rounding)."""
    for row in range(got.sequences.shape[0]):
        for step, (a, b) in enumerate(zip(got.logits, want.logits)):
            assert rel_err(a[row].float(), b[row].float()) < 2e-2, f"row {row} step {step}"
            token, ref_token = a[row].argmax(), b[row].argmax()
            if token != ref_token:
                ref = b[row].float()
                assert ref[ref_token] - ref[token] < 2e-2 * ref.abs().max(), f"row {row} step {step}: not a near-tie"
                break


def test_graphs_are_reused_across_calls_and_follow_new_shapes():
    _require_kernel()
    model = _model()
    mla_patch.patch(model, backend="kernel")
    ids, mask = _prompt(case_seed("reuse"))
    first = _generate(model, ids, mask)
    held = graphs.graphs_of(model)
    warmup = held.warmup_s
    again = _generate(model, ids, mask)
    assert held.warmup_s == warmup, "the second call of the same shape captured again"
    assert torch.equal(first.sequences, again.sequences)
    # Another batch size is another graph; its tokens still match the eager run.
    ids2, mask2 = ids[:2], mask[:2]
    graphed = _generate(model, ids2, mask2)
    eager = _generate(model, ids2, mask2, disable_compile=True)
    assert len(held.captured) == 2
    _assert_same_tokens(graphed, eager)


def test_a_returned_cache_keeps_its_rows_when_the_next_call_reuses_the_shape():
    _require_kernel()
    model = _model()
    mla_patch.patch(model, backend="kernel")
    ids, mask = _prompt(case_seed("kept"))
    kept = _generate(model, ids, mask)
    cache = _output_cache(kept)
    rows = cache.layers[0].keys.clone()
    _generate(model, torch.flip(ids, dims=[1]), mask)
    assert torch.equal(cache.layers[0].keys, rows), "a later generate() wrote into a cache the user holds"


def test_beam_search_and_sampling_replay():
    _require_kernel()
    model = _model(moe=True)
    mla_patch.patch(model, backend="kernel")
    ids, mask = _prompt(case_seed("beams"), batch=2)
    beams = dict(num_beams=3, max_new_tokens=8, min_new_tokens=8, output_logits=False, output_scores=True)
    got = _generate(model, ids, mask, **beams)
    want = _generate(model, ids, mask, disable_compile=True, **beams)
    assert got.sequences.shape == want.sequences.shape  # transformers 5.17's beam search runs eagerly
    assert rel_err(got.sequences_scores.float(), want.sequences_scores.float()) < 2e-2
    sample = dict(do_sample=True, top_k=20, max_new_tokens=8, min_new_tokens=8)
    torch.manual_seed(0)
    a = _generate(model, ids, mask, **sample)
    torch.manual_seed(0)
    b = _generate(model, ids, mask, disable_compile=True, **sample)
    assert rel_err(a.logits[1].float(), b.logits[1].float()) < 2e-2  # the first replayed step


def test_an_eager_moe_loop_falls_back_to_eager_decode_with_the_reason(caplog):
    """transformers' eager experts sync the host (nonzero): capture fails once, generate() still works."""
    _require_kernel()
    model = _model(moe=True)
    model.set_experts_implementation("eager")
    mla_patch.patch(model, backend="kernel")
    ids, mask = _prompt(case_seed("eager-moe"))
    with caplog.at_level("WARNING", logger="mla_patch"):
        out = _generate(model, ids, mask)
    want = _generate(model, ids, mask, disable_compile=True)
    assert torch.equal(out.sequences, want.sequences)
    assert "capturing the decode step failed" in mla_patch.status(model)["generate_decode"]


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_static_cache_compiles_to_one_graph_with_the_kernel(family):
    _require_kernel()
    torch._dynamo.reset()
    model = _model(family)
    reference = copy.deepcopy(model)
    mla_patch.patch(model, backend="kernel")
    mla_patch.patch(reference, backend="torch")
    ids, mask = _prompt(case_seed("static-one-graph", family), batch=2)
    got, breaks, compiled = generate_counting_graphs(model, ids, mask)
    assert breaks == 0, dict(torch._dynamo.utils.counters["graph_break"])
    assert compiled == 1, f"the decode step compiled into {compiled} graphs"
    want = _generate_static(reference, ids, mask, _counting_compile([]))
    assert rel_err(torch.stack(got.logits)[:1].float(), torch.stack(want.logits)[:1].float()) < 2e-2
