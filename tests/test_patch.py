"""Patched vs stock models on tiny random configs: logits, generate() modes, patch round trips."""

from __future__ import annotations

import copy

import pytest
import torch

import mla_patch
from mla_patch import CACHE_KWARG
from conftest import left_padded_prompt, build_model, case_seed, rel_err, tiny_config

CONFIGS = {
    "v2-lite-like": ("deepseek_v2", {}),
    "v2-q_lora-v!=nope": ("deepseek_v2", dict(q_lora_rank=24, v_head_dim=12, num_attention_heads=8)),
    "v2-yarn": (
        "deepseek_v2",
        dict(rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64,
                                  mscale=0.707, mscale_all_dim=0.707, beta_fast=32, beta_slow=1)),
    ),
    "v3-interleave": ("deepseek_v3", dict(rope_interleave=True, q_lora_rank=24)),
    "v3-no-interleave": ("deepseek_v3", dict(rope_interleave=False, num_attention_heads=2)),
    "v3-yarn": (
        "deepseek_v3",
        dict(rope_interleave=True, rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=8.0,
                                                       original_max_position_embeddings=64, mscale=1.0,
                                                       mscale_all_dim=1.0, beta_fast=32, beta_slow=1)),
    ),
}


def _pair(name, dtype=torch.float64, attn="sdpa"):
    family, overrides = CONFIGS[name]
    stock = build_model(tiny_config(family, **overrides), dtype=dtype, seed=case_seed(name) % 1000, attn=attn)
    patched = copy.deepcopy(stock)
    mla_patch.patch(patched)
    return stock, patched


def _prompt(seed, batch=3, length=11, pad=(0, 4, 7)):
    return left_padded_prompt(seed, batch, length, pad)


def _max_rel_step_error(scores_a, scores_b) -> float:
    return max(rel_err(b, a) for a, b in zip(scores_a, scores_b))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_generate_matches_stock(name):
    stock, patched = _pair(name)
    ids, mask = _prompt(case_seed("greedy", name))
    kwargs = dict(max_new_tokens=24, do_sample=False, output_logits=True, return_dict_in_generate=True)
    want = stock.generate(input_ids=ids, attention_mask=mask, **kwargs)
    got = patched.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(want.sequences, got.sequences)
    assert _max_rel_step_error(want.logits, got.logits) < 1e-10
    stats = mla_patch.decode_stats()
    assert stats["absorbed_tokens"] == 3 * 23 and stats["vanilla_fallbacks"] == 0
    assert isinstance(got.past_key_values, mla_patch.LatentCache)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_float32_step_logits_within_1e4(attn):
    stock, patched = _pair("v3-interleave", dtype=torch.float32, attn=attn)
    ids, mask = _prompt(case_seed("fp32", attn))
    kwargs = dict(max_new_tokens=16, do_sample=False, output_logits=True, return_dict_in_generate=True)
    want = stock.generate(input_ids=ids, attention_mask=mask, **kwargs)
    got = patched.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(want.sequences, got.sequences)
    assert _max_rel_step_error(want.logits, got.logits) < 1e-4


def test_sampling_with_fixed_seed_matches_stock():
    stock, patched = _pair("v2-q_lora-v!=nope")
    ids, mask = _prompt(case_seed("sample"))
    kwargs = dict(max_new_tokens=20, do_sample=True, top_k=20, temperature=0.9)
    torch.manual_seed(7)
    want = stock.generate(input_ids=ids, attention_mask=mask, **kwargs)
    torch.manual_seed(7)
    got = patched.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(want, got)


def test_beam_search_reorders_the_latent_cache():
    stock, patched = _pair("v3-no-interleave")
    ids, mask = _prompt(case_seed("beam"), batch=2)
    kwargs = dict(max_new_tokens=12, num_beams=3, do_sample=False, output_scores=True, return_dict_in_generate=True)
    want = stock.generate(input_ids=ids, attention_mask=mask, **kwargs)
    got = patched.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(want.sequences, got.sequences)
    assert torch.allclose(want.sequences_scores, got.sequences_scores, rtol=1e-10)


def test_assisted_decoding_crops_the_latent_cache():
    stock, patched = _pair("v2-lite-like")
    assistant = build_model(tiny_config("deepseek_v2", num_hidden_layers=1), seed=3)
    ids, mask = _prompt(case_seed("assisted"), batch=1, pad=(0,))
    kwargs = dict(max_new_tokens=20, do_sample=False, assistant_model=assistant)
    want = stock.generate(input_ids=ids, attention_mask=mask, **kwargs)
    got = patched.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(want, got)
    # Candidate blocks of several tokens went through the absorbed path (S > 1).
    assert mla_patch.decode_stats()["absorbed_calls"] > 0


def test_long_generation_grows_the_cache_several_times():
    stock, patched = _pair("v2-lite-like")
    ids, mask = _prompt(case_seed("grow"), batch=2, pad=(0, 3))
    cache = mla_patch.LatentCache(config=patched.config, initial_capacity=8)
    kwargs = dict(max_new_tokens=60, do_sample=False, min_new_tokens=60)
    want = stock.generate(input_ids=ids, attention_mask=mask, **kwargs)
    got = patched.generate(input_ids=ids, attention_mask=mask, **{CACHE_KWARG: cache}, **kwargs)
    assert torch.equal(want, got)
    assert cache.layers[0].capacity == 88  # the 11-token prompt, then x2 three times for 70 rows


@pytest.mark.parametrize("cache_kind", ["dynamic", "static"])
def test_user_caches_still_give_stock_results(cache_kind):
    from transformers import DynamicCache

    stock, patched = _pair("v3-interleave")
    ids, mask = _prompt(case_seed("usercache", cache_kind))
    kwargs = dict(max_new_tokens=15, do_sample=False)
    want = stock.generate(input_ids=ids, attention_mask=mask, **kwargs)
    if cache_kind == "dynamic":
        got = patched.generate(input_ids=ids, attention_mask=mask, **{CACHE_KWARG: DynamicCache(config=patched.config)}, **kwargs)
    else:
        got = patched.generate(input_ids=ids, attention_mask=mask, cache_implementation="static", **kwargs)
    assert torch.equal(want, got)
    assert mla_patch.decode_stats()["absorbed_tokens"] == 3 * 14


def test_inputs_embeds_and_output_attentions():
    stock, patched = _pair("v2-lite-like", dtype=torch.float32, attn="eager")
    ids, mask = _prompt(case_seed("embeds"))
    embeds = stock.get_input_embeddings()(ids)
    from transformers import DynamicCache

    outs = []
    for model in (stock, patched):
        cache = DynamicCache(config=model.config)
        first = model(inputs_embeds=embeds, attention_mask=mask, **{CACHE_KWARG: cache}, use_cache=True)
        step_mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
        nxt = model.get_input_embeddings()(first.logits[:, -1:].argmax(-1))
        outs.append(model(inputs_embeds=nxt, attention_mask=step_mask, **{CACHE_KWARG: cache}, use_cache=True, output_attentions=True))
    assert rel_err(outs[1].logits, outs[0].logits) < 1e-5
    for want, got in zip(outs[0].attentions, outs[1].attentions):
        assert want.shape == got.shape
        valid = step_mask.bool()[:, None, None, :].expand_as(want)
        assert torch.allclose(got[valid], want[valid], atol=1e-5)


def test_prefill_is_the_stock_forward_and_training_works():
    stock, patched = _pair("v2-q_lora-v!=nope", dtype=torch.float32)
    ids, mask = _prompt(case_seed("train"), pad=(0, 0, 0))
    want = stock(input_ids=ids, attention_mask=mask, labels=ids)
    got = patched(input_ids=ids, attention_mask=mask, labels=ids)
    assert torch.equal(want.logits, got.logits)  # bit-identical: the stock code ran
    patched.train()
    # transformers 5.24 renamed it; 5.17 has only the old name.
    getattr(patched, "activation_checkpointing_enable", patched.gradient_checkpointing_enable)()
    loss = patched(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss
    loss.backward()
    grad = patched.model.layers[0].self_attn.kv_b_proj.weight.grad
    assert grad is not None and torch.isfinite(grad).all()


def test_absorb_merged_matches_per_head():
    stock, patched = _pair("v3-interleave")
    merged = copy.deepcopy(stock)
    mla_patch.patch(merged, absorb="merged")
    ids, mask = _prompt(case_seed("merged"))
    kwargs = dict(max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
    want = stock.generate(input_ids=ids, attention_mask=mask, **kwargs)
    got = merged.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(want.sequences, got.sequences)
    assert _max_rel_step_error(want.logits, got.logits) < 1e-10
    assert mla_patch.status(merged)["layer_options"] == [("auto", "merged")]


# -- patch / unpatch ----------------------------------------------------------------------------------


def test_class_patch_before_loading_and_unpatch_restores(tmp_path):
    from transformers import AutoModelForCausalLM
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as modeling

    original = modeling.DeepseekV2Attention
    stock = build_model(tiny_config("deepseek_v2"))
    stock.save_pretrained(tmp_path)
    report = mla_patch.patch()
    assert "transformers.models.deepseek_v2.modeling_deepseek_v2.DeepseekV2Attention" in report["patched_classes"]
    assert mla_patch.patch() == report  # twice is harmless
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64)
    attn = loaded.model.layers[0].self_attn
    assert type(attn).__name__ == "MlaDeepseekV2Attention" and isinstance(attn, original)
    # Checkpoint compatibility: same names and shapes, strict load both ways.
    assert list(loaded.state_dict()) == list(stock.state_dict())
    stock.load_state_dict(loaded.state_dict(), strict=True)
    loaded.save_pretrained(tmp_path / "again")
    mla_patch.unpatch()
    assert modeling.DeepseekV2Attention is original
    assert type(attn) is original  # modules built while patched are restored too
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", dtype=torch.float64)
    assert type(again.model.layers[0].self_attn) is original


def test_instance_patch_round_trip_keeps_weights():
    model = build_model(tiny_config("deepseek_v3"))
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    report = mla_patch.patch(model)
    assert report["patched_layers"] == 2
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before  # in place, no copy
    mla_patch.patch(model)
    assert mla_patch.status(model)["patched_layers"] == 2
    mla_patch.unpatch(model)
    assert mla_patch.status(model)["patched_layers"] == 0
    assert type(model.model.layers[0].self_attn).__name__ == "DeepseekV3Attention"


def test_patched_model_pickles_and_deepcopies():
    import io

    model = build_model(tiny_config("deepseek_v2"))
    mla_patch.patch(model)
    clone = copy.deepcopy(model)
    assert type(clone.model.layers[0].self_attn).__name__ == "MlaDeepseekV2Attention"
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    restored = torch.load(buf, weights_only=False)
    assert type(restored.model.layers[1].self_attn) is type(model.model.layers[1].self_attn)


def test_meta_device_init_then_materialize():
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    mla_patch.patch()
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(tiny_config("deepseek_v3"))
    assert type(model.model.layers[0].self_attn).__name__ == "MlaDeepseekV3Attention"
    assert model.model.layers[0].self_attn.kv_b_proj.weight.is_meta
    model.to_empty(device="cpu")
    assert not model.model.layers[0].self_attn.kv_b_proj.weight.is_meta


def test_non_mla_models_are_untouched(caplog):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4))
    classes = [type(m) for m in model.modules()]
    with caplog.at_level("WARNING", logger="mla_patch"):
        report = mla_patch.patch(model)
    assert report["patched_layers"] == 0 and "no MLA attention" in caplog.text
    assert [type(m) for m in model.modules()] == classes


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="backend"):
        mla_patch.patch(backend="cuda")
    with pytest.raises(ValueError, match="absorb"):
        mla_patch.patch(absorb="both")
    with pytest.raises(ValueError, match="unknown MLA family"):
        mla_patch.patch(families=["llama"])


def test_compiled_fullgraph_decode_on_a_static_cache():
    """torch.compile(fullgraph=True) traces the absorbed decode: no graph break, stock results."""
    from transformers import StaticCache

    config = tiny_config("deepseek_v3", rope_interleave=True, first_k_dense_replace=2)  # dense MLPs compile
    stock = build_model(config, dtype=torch.float32)
    patched = copy.deepcopy(stock)
    mla_patch.patch(patched, backend="torch")
    ids, mask = _prompt(case_seed("compile"), batch=2, pad=(0, 3))

    def run(model, compiled):
        cache = StaticCache(config=model.config, max_cache_len=32)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        out = model(input_ids=ids, attention_mask=mask, **{CACHE_KWARG: cache}, use_cache=True, position_ids=positions)
        step = torch.compile(model, fullgraph=True) if compiled else model
        token, step_mask, logits = out.logits[:, -1:].argmax(-1), mask, []
        for _ in range(6):
            step_mask = torch.cat([step_mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
            positions = (step_mask.cumsum(-1) - 1)[:, -1:]
            out = step(input_ids=token, attention_mask=step_mask, **{CACHE_KWARG: cache}, use_cache=True, position_ids=positions)
            logits.append(out.logits)
            token = out.logits[:, -1:].argmax(-1)
        return torch.stack(logits)

    assert rel_err(run(patched, compiled=True), run(stock, compiled=False)) < 1e-4


def test_status_says_how_generate_decodes_and_unpatch_frees_it():
    model = build_model(tiny_config("deepseek_v2"), dtype=torch.float32)
    mla_patch.patch(model)
    assert mla_patch.status(model)["generate_decode"] == "eager: the model is on cpu, CUDA graphs need CUDA"
    mla_patch.graphs.graphs_of(model)
    mla_patch.unpatch(model)
    assert "_mla_decode_graphs" not in model.__dict__
    assert mla_patch.status(model)["generate_decode"] == "stock (nothing patched)"


def test_patch_arguments_a_new_user_gets_wrong_are_named():
    # One family as a string is that family, not its letters.
    report = mla_patch.patch(families="deepseek_v2")
    assert report["patched_classes"] == ["transformers.models.deepseek_v2.modeling_deepseek_v2.DeepseekV2Attention"]
    mla_patch.unpatch()
    with pytest.raises(TypeError, match="model must be a loaded model"):
        mla_patch.patch("not a model")
    model = build_model(tiny_config("deepseek_v3"), dtype=torch.float32)
    # backend="kernel" on a CPU model is refused at patch time, not at the first decode step.
    with pytest.raises((ValueError, RuntimeError), match="backend='kernel' needs"):
        mla_patch.patch(model, backend="kernel")
    # status() after patch(model) names the classes of the layers it patched.
    report = mla_patch.patch(model)
    assert report["patched_classes"] == ["transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3Attention"]
    assert report["patched_layers"] == 2


def test_options_belong_to_each_layer_not_to_the_class():
    """A second patch() with other options changes the models built after it, never a live one; patch(model)
    changes only that model."""
    mla_patch.patch(backend="torch")
    first = build_model(tiny_config("deepseek_v2"), dtype=torch.float32)
    mla_patch.patch(backend="auto", absorb="merged")
    second = build_model(tiny_config("deepseek_v2"), dtype=torch.float32)
    assert mla_patch.status(first)["layer_options"] == [("torch", "per_head")]
    assert mla_patch.status(second)["layer_options"] == [("auto", "merged")]
    mla_patch.patch(second, backend="torch")
    assert mla_patch.status(first)["layer_options"] == [("torch", "per_head")]
    assert mla_patch.status(second)["layer_options"] == [("torch", "per_head")]
