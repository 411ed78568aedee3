"""Every served MLA family: patched greedy generate() equals stock on a tiny random config.

One tiny config per family (two attention layers, a few heads, small ranks, a left-padded
batch), built with the family's own config class, so each family's rope layout, softmax scale
and extra multipliers (LongCat LoRA scales, Mistral4 Llama-4 query scale) go through the
absorbed decode path. float64 with sdpa (eager gives NaN rows under left padding in float64):
any mismatch is logic, not rounding. A float32 run checks the 1e-4 budget.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import logging

import pytest
import torch

import mla_patch
from conftest import left_padded_prompt, build_model, case_seed, rel_err
from mla_patch.families import FAMILIES, NOT_SERVED

COMMON = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=32,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
MOE = dict(moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=1, topk_group=1)

# family -> (config overrides, what the case exercises)
CASES = {
    "deepseek_v2": dict(q_lora_rank=None),
    "deepseek_v3": dict(MOE, q_lora_rank=24, rope_interleave=True),
    "glm4_moe_lite": dict(MOE, q_lora_rank=24, v_head_dim=12),  # rope_interleave=True by default
    "youtu": dict(q_lora_rank=None, rope_interleave=False),
    "axk1": dict(MOE, q_lora_rank=24),
    "minicpm3": dict(q_lora_rank=24, kv_lora_rank=24, qk_rope_head_dim=4),  # rotate-half rope always
    "mistral4": dict(
        MOE,
        q_lora_rank=24,
        # original_max_position_embeddings small, so the Llama-4 query scale is > 1 within the test
        rope_parameters=dict(
            rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=8,
            beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.5,
            partial_rotary_factor=8 / 24,
        ),
    ),
    "longcat_flash": dict(
        num_layers=1,  # two attention sublayers per decoder layer
        num_hidden_layers=None,
        q_lora_rank=24,
        qk_head_dim=24,
        head_dim=8,
        ffn_hidden_size=96,
        expert_ffn_hidden_size=32,
        n_routed_experts=4,
        zero_expert_num=2,
        moe_topk=2,
    ),
    # Hybrid: layers 1 and 3 (1-indexed) NoPE MLA, 2 and 4 KDA linear attention (stock, PyTorch fallback).
    "kimi_linear": dict(
        num_hidden_layers=4,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_token=2,
        linear_attn_config=dict(full_attn_layers=[1, 3], kda_layers=[2, 4], head_dim=16, num_heads=4,
                                short_conv_kernel_size=4),
    ),
    # Ling 3 hybrid (transformers 5.24+): MLA layers 0 and 2 with a per-head sigmoid output gate, KDA at 1 and 3.
    "bailing_hybrid": dict(
        MOE,
        num_hidden_layers=4,
        layer_types=["full_attention", "linear_attention", "full_attention", "linear_attention"],
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"],
        num_local_experts=4,
        head_dim=16,
    ),
}


def tiny_family_config(model_type: str, **extra):
    from transformers import AutoConfig

    kwargs = dict(COMMON, **CASES[model_type])
    kwargs.update(extra)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    qk_head_dim = kwargs["qk_nope_head_dim"] + kwargs["qk_rope_head_dim"]
    if "qk_head_dim" in kwargs:  # LongCat: settable qk_head_dim, and head_dim sizes its rotary embedding
        kwargs["qk_head_dim"], kwargs["head_dim"] = qk_head_dim, kwargs["qk_rope_head_dim"]
    if "partial_rotary_factor" in kwargs.get("rope_parameters", {}):
        kwargs["rope_parameters"] = dict(kwargs["rope_parameters"], partial_rotary_factor=kwargs["qk_rope_head_dim"] / qk_head_dim)
    if model_type == "deepseek_v2":
        kwargs.update({k: v for k, v in MOE.items() if k not in ("n_group", "topk_group")})
    config = AutoConfig.for_model(model_type, **kwargs)
    if model_type == "deepseek_v3" or "mlp_layer_types" in config.to_dict():
        config.first_k_dense_replace = 1
    return config


def _installed(model_type: str) -> bool:
    return FAMILIES[model_type].load() is not None


def _prompt(seed, batch=3, length=9, pad=(0, 3, 6)):
    return left_padded_prompt(seed, batch, length, pad)


def _build(model_type, dtype, attn, **extra):
    config = tiny_family_config(model_type, **extra)
    seed = case_seed(model_type) % 1000
    try:
        return build_model(config, dtype=dtype, seed=seed, attn=attn)
    except ValueError:  # no AutoModelForCausalLM mapping (Mistral4 ships as a multimodal checkpoint)
        pass
    modeling = FAMILIES[model_type].load()
    causal_lm = next(getattr(modeling, n) for n in dir(modeling) if n.endswith("ForCausalLM"))
    torch.manual_seed(seed)
    config._attn_implementation = attn
    model = causal_lm._from_config(config, dtype=dtype, experts_implementation="eager").eval()
    with torch.no_grad():  # as conftest.build_model: widen the small random init
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.normal_(0, 1.0 / p.shape[-1] ** 0.5)
    return model


def _generate_both(model_type, dtype, new_tokens, attn="sdpa"):
    if not _installed(model_type):
        import transformers

        pytest.skip(f"{model_type} is not in transformers {transformers.__version__}")
    stock = _build(model_type, dtype, attn)
    patched = copy.deepcopy(stock)
    report = mla_patch.patch(patched)
    family = FAMILIES[model_type]
    attention_class = getattr(family.load(), family.attention_class)
    assert report["patched_layers"] == sum(isinstance(m, attention_class) for m in stock.modules()) > 0
    ids, mask = _prompt(case_seed("families", model_type))
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True)
    want = stock.generate(input_ids=ids, attention_mask=mask, **kwargs)
    got = patched.generate(input_ids=ids, attention_mask=mask, **kwargs)
    errors = [rel_err(b, a) for a, b in zip(want.logits, got.logits)]
    return want, got, max(errors)


def test_every_family_has_one_entry_and_served_and_unserved_are_disjoint():
    assert not set(FAMILIES) & set(NOT_SERVED)
    for family in FAMILIES.values():
        modeling = family.load()
        if modeling is not None:  # the names the registry points at exist in this transformers
            assert hasattr(modeling, family.attention_class) and hasattr(modeling, family.pretrained_class)


@pytest.mark.parametrize("model_type", list(CASES))
def test_family_greedy_generate_matches_stock_float64(model_type):
    want, got, worst = _generate_both(model_type, torch.float64, new_tokens=24)
    assert torch.equal(want.sequences, got.sequences), f"seed {case_seed('families', model_type)}"
    assert worst < 1e-10, f"{model_type}: worst step logits rel err {worst:.2e}"
    stats = mla_patch.decode_stats()
    assert stats["absorbed_tokens"] == 3 * 23 and stats["vanilla_fallbacks"] == 0
    assert isinstance(got.past_key_values, mla_patch.LatentCache)
    print(f"{model_type}: float64 worst step-logit rel err {worst:.1e}")


@pytest.mark.parametrize("model_type", ["minicpm3", "mistral4", "longcat_flash", "kimi_linear", "bailing_hybrid"])
def test_family_float32_within_1e4(model_type):
    want, got, worst = _generate_both(model_type, torch.float32, new_tokens=16)
    assert torch.equal(want.sequences, got.sequences)
    assert worst < 1e-4, f"{model_type}: worst step logits rel err {worst:.2e}"
    print(f"{model_type}: float32 worst step-logit rel err {worst:.1e}")


def test_mistral4_query_scale_is_exercised():
    """The Llama-4 scale must differ from 1 at the decode positions, else the test above proves nothing."""
    if not _installed("mistral4"):
        pytest.skip("mistral4 is not in this transformers")
    config = tiny_family_config("mistral4")
    modeling = FAMILIES["mistral4"].load()
    params = config.rope_parameters
    scale = modeling.get_llama_4_attn_scale(
        torch.arange(9, 33)[None], params["llama_4_scaling_beta"], params["original_max_position_embeddings"]
    )
    assert scale.max() > 1.5


@pytest.mark.parametrize("model_type", sorted(NOT_SERVED))
def test_not_served_family_is_refused_by_name(model_type):
    with pytest.raises(ValueError, match="not served"):
        mla_patch.patch(families=[model_type])


def test_not_served_model_is_left_untouched_with_the_reason(caplog):
    """A DSA model (sparse indexer) keeps its stock attention; the warning says why."""
    modeling = None
    for model_type in ("deepseek_v32", "glm_moe_dsa"):
        try:
            modeling = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
            break
        except ImportError:
            continue
    if modeling is None:
        pytest.skip("no DSA family in this transformers")
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type, **dict(COMMON, q_lora_rank=24, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                           moe_intermediate_size=32, index_n_heads=2, index_head_dim=16, index_topk=4)
    )
    model = AutoModelForCausalLM.from_config(config)
    classes = [type(m) for m in model.modules()]
    with caplog.at_level(logging.WARNING, logger="mla_patch"):
        mla_patch.patch(model)
    assert [type(m) for m in model.modules()] == classes
    assert "left untouched" in caplog.text and "indexer" in caplog.text


@pytest.mark.parametrize(
    "model_type, field, wrong",
    [
        ("longcat_flash", "latent_scale", None),
        ("longcat_flash", "q_scale", None),
        ("mistral4", "q_scale", None),
        ("minicpm3", "rope", "no_rope"),
        ("bailing_hybrid", "out_gate", None),
    ],
)
def test_family_hooks_are_load_bearing(model_type, field, wrong, monkeypatch):
    """Negative control: without the family's own rope / multiplier the parity test above fails."""
    import dataclasses

    patch_module = importlib.import_module("mla_patch.patch")  # the module, not mla_patch.patch()

    if not _installed(model_type):
        pytest.skip(f"{model_type} is not in this transformers")
    family = FAMILIES[model_type]
    no_rope = lambda module, q_pe, k_pe, position_embeddings: (q_pe, k_pe)  # noqa: E731
    broken = dataclasses.replace(family, **{field: no_rope if wrong == "no_rope" else None})
    cls = patch_module._patched_class(family, getattr(family.load(), family.attention_class))
    monkeypatch.setattr(cls, "_mla_family", broken)
    want, got, worst = _generate_both(model_type, torch.float64, new_tokens=8)
    assert worst > 1e-6 or not torch.equal(want.sequences, got.sequences)


# The kernel is built for (kv_lora_rank, rope) = (512, 64) and (256, 32): MiniCPM3 dims, all others.
KERNEL_DIMS = {"minicpm3": (256, 32)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("model_type", list(CASES))
def test_family_kernel_decode_step_matches_stock(model_type, dtype, monkeypatch):
    """On GPU with real kernel dims: the absorbed decode runs the CUDA kernel (never the reference),
    and its decode-step logits are as close to a float32 stock run as stock's own half-precision run."""
    from mla_patch import ops

    if not ops.has_kernel():
        pytest.skip(f"extension not built: {ops.extension_error()}")
    if not _installed(model_type):
        pytest.skip(f"{model_type} is not in this transformers")
    rank, rope = KERNEL_DIMS.get(model_type, (512, 64))
    dims = dict(kv_lora_rank=rank, qk_rope_head_dim=rope, qk_nope_head_dim=32, v_head_dim=32, num_attention_heads=2,
                num_key_value_heads=2)
    ref_model = _build(model_type, torch.float32, "sdpa", **dims).cuda()
    stock = copy.deepcopy(ref_model).to(dtype)
    patched = copy.deepcopy(stock)
    mla_patch.patch(patched, backend="kernel")

    def no_reference(*args, **kwargs):
        raise AssertionError("the PyTorch reference ran where the kernel should have")

    monkeypatch.setattr(ops, "mla_decode_ref", no_reference)
    ids, mask = _prompt(case_seed("kernel", model_type))
    ids, mask = ids.cuda(), mask.cuda()
    cache_kw = "cache" if "cache" in inspect.signature(type(stock).forward).parameters else "past_key_values"

    def step_logits(model, cache):
        with torch.no_grad():
            out = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True, **({cache_kw: cache} if cache is not None else {}))
            return model(input_ids=ids[:, -1:], attention_mask=mask, **{cache_kw: out.past_key_values}).logits.float()

    want = step_logits(ref_model, None)
    stock_err = rel_err(step_logits(stock, None), want)
    got_err = rel_err(step_logits(patched, mla_patch.LatentCache(config=patched.config)), want)
    print(f"{model_type} {dtype}: kernel step-logit rel err {got_err:.1e} (stock same dtype {stock_err:.1e})")
    assert got_err < max(2 * stock_err, 1e-2 if dtype == torch.bfloat16 else 2e-3)
    # The 8-token prompt on an empty cache is within DECODE_MAX_NEW_TOKENS, so it runs absorbed too.
    assert mla_patch.decode_stats()["absorbed_calls"] == 2 * mla_patch.status(patched)["patched_layers"]
