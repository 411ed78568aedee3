"""Bad input fails clearly or is served correctly, never silently wrong; nothing leaks.

Non-MLA models, malformed op arguments, a missing or mismatched extension, cache growth past
its capacity, batch size and dtype changes between calls, empty prompts, fp16 overflow of the
absorbed query, a property-based patched == stock sweep, and memory across many generate() calls.
"""

from __future__ import annotations

import copy
import gc
import inspect
import logging
import sys
import weakref

import pytest
import torch

try:  # the property test needs hypothesis (a test extra); everything else runs without it
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:
    given = None

from conftest import build_model, case_seed, left_padded_prompt, rel_err, tiny_config

import mla_patch
from mla_patch import kernel_probe, ops

GEN = {"do_sample": False, "output_logits": True, "return_dict_in_generate": True}


def _pair(family="deepseek_v3", dtype=torch.float64, seed=0, **overrides):
    stock = build_model(tiny_config(family, **overrides), dtype=dtype, seed=seed)
    patched = copy.deepcopy(stock)
    mla_patch.patch(patched)
    return stock, patched


def _prompt(seed, batch=3, length=9, pad=(0, 3, 6)):
    return left_padded_prompt(seed, batch, length, pad)


def _cache_kwarg(model) -> str:
    """generate()'s cache keyword: `cache` from transformers 5.20, `past_key_values` before."""
    forward = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in forward else "past_key_values"


def _worst(want, got) -> float:
    return max(rel_err(b, a) for a, b in zip(want.logits, got.logits))


# -- models we do not serve ----------------------------------------------------------------------------


def test_non_mla_model_is_untouched_with_a_message(caplog):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    classes = [type(m) for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids, mask = _prompt(1, length=5)
    before = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    with caplog.at_level(logging.WARNING, logger="mla_patch"):
        report = mla_patch.patch(model)
    assert "left untouched" in caplog.text and "LlamaForCausalLM" in caplog.text
    assert report["patched_layers"] == 0
    assert [type(m) for m in model.modules()] == classes
    assert "_prepare_cache_for_generation" not in type(model).__dict__
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    after = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(before, after)


# -- the op: malformed arguments -------------------------------------------------------------------------


def _op_args(B=2, S=1, H=3, R=16, P=4, T=7, dtype=torch.float64):
    g = torch.Generator().manual_seed(case_seed("op", B, S, H, R, P, T))
    return {
        "q_latent": torch.randn(B, S, H, R, generator=g, dtype=dtype),
        "q_pe": torch.randn(B, S, H, P, generator=g, dtype=dtype),
        "c_kv": torch.randn(B, T, R, generator=g, dtype=dtype),
        "k_pe": torch.randn(B, T, P, generator=g, dtype=dtype),
        "kv_start": torch.tensor([0, 2], dtype=torch.int32),
        "kv_end": torch.tensor([T, T - 1], dtype=torch.int32),
    }


BAD_ARGS = {
    "q_latent 3-D": ("q_latent", lambda a: a["q_latent"][0]),
    "q_latent integer": ("q_latent", lambda a: a["q_latent"].long()),
    "q_pe other dtype": ("q_pe", lambda a: a["q_pe"].float()),
    "q_pe other heads": ("q_pe", lambda a: a["q_pe"][:, :, :2]),
    "c_kv other dtype": ("c_kv", lambda a: a["c_kv"].float()),
    "c_kv other rank": ("c_kv", lambda a: a["c_kv"][..., :8]),
    "c_kv other batch": ("c_kv", lambda a: a["c_kv"][:1]),
    "k_pe other length": ("k_pe", lambda a: a["k_pe"][:, :5]),
    "k_pe other rope dim": ("k_pe", lambda a: a["k_pe"][..., :2]),
    "k_pe other device": ("k_pe", lambda a: a["k_pe"].to("meta")),
    "kv_start float": ("kv_start", lambda a: a["kv_start"].float()),
    "kv_end other shape": ("kv_end", lambda a: a["kv_end"][:1]),
    "kv_end other device": ("kv_end", lambda a: a["kv_end"].to("meta")),
    "q_pe not a tensor": ("q_pe", lambda a: a["q_pe"].tolist()),
}


@pytest.mark.parametrize("backend", ["auto", "torch", "kernel"])
@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_op_rejects_malformed_arguments_naming_them(case, backend):
    name, mutate = BAD_ARGS[case]
    args = _op_args()
    args[name] = mutate(args)
    with pytest.raises((ValueError, TypeError), match=name):
        ops.mla_decode(*args.values(), 0.25, backend=backend)


def test_op_serves_strided_inputs_exactly():
    """Non-contiguous views (last dim strided, offset base) are served by the reference, same result."""
    args = _op_args()
    want, want_lse = ops.mla_decode(*args.values(), 0.25, backend="torch")
    strided = dict(args)
    wide = torch.zeros(*args["c_kv"].shape[:-1], 2 * args["c_kv"].shape[-1], dtype=torch.float64)
    wide[..., ::2] = args["c_kv"]
    strided["c_kv"] = wide[..., ::2]
    strided["q_latent"] = args["q_latent"].transpose(1, 2).contiguous().transpose(1, 2)
    got, got_lse = ops.mla_decode(*strided.values(), 0.25, backend="auto")
    assert torch.equal(got, want) and torch.equal(got_lse, want_lse)


@pytest.mark.skipif(not torch.cuda.is_available() or not ops.has_kernel(), reason="needs CUDA and the built extension")
def test_kernel_refuses_misaligned_inputs_by_name_and_auto_falls_back():
    args = {k: v.cuda() for k, v in _op_args(B=2, S=1, H=4, R=512, P=64, T=40, dtype=torch.bfloat16).items()}
    want, _ = ops.mla_decode(*args.values(), 0.1, backend="torch")
    for name in ("q_latent", "c_kv"):
        bad = dict(args)
        flat = torch.empty(args[name].numel() + 1, dtype=torch.bfloat16, device="cuda")
        bad[name] = flat[1:].view(args[name].shape).copy_(args[name])  # 2-byte offset: misaligned
        with pytest.raises(RuntimeError, match=name):
            ops.mla_decode(*bad.values(), 0.1, backend="kernel")
        got, _ = ops.mla_decode(*bad.values(), 0.1, backend="auto")
        assert torch.equal(got, want)


# -- the extension missing or built for another torch ----------------------------------------------------


class _BrokenExtension:
    """A meta-path finder that makes `mla_patch._C` fail to load like a build for another torch."""

    def find_spec(self, name, path=None, target=None):
        if name == "mla_patch._C":
            raise OSError("mla_patch/_C.so: undefined symbol: _ZN3c104impl8GPUTrace")


@pytest.mark.parametrize("how", ["missing", "mismatched"])
def test_broken_extension_warns_once_and_falls_back(how, monkeypatch, caplog):
    monkeypatch.setattr(ops, "_ext", None)
    monkeypatch.setattr(ops, "_ext_error", None)
    monkeypatch.setattr(ops, "_warned", set())
    monkeypatch.delattr(sys.modules["mla_patch"], "_C", raising=False)
    monkeypatch.delitem(sys.modules, "mla_patch._C", raising=False)
    if how == "missing":
        monkeypatch.setitem(sys.modules, "mla_patch._C", None)  # import raises ImportError
    else:
        monkeypatch.setattr(sys, "meta_path", [_BrokenExtension(), *sys.meta_path])
    assert not ops.has_kernel()
    assert ("not built" if how == "missing" else "does not load with this torch") in ops.extension_error()
    assert mla_patch.status()["kernel_available"] is False
    stock, patched = _pair(dtype=torch.float64)
    ids, mask = _prompt(case_seed("ext", how))
    with caplog.at_level(logging.WARNING, logger="mla_patch"):
        want = stock.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, **GEN)
        got = patched.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, **GEN)
    assert torch.equal(want.sequences, got.sequences) and _worst(want, got) < 1e-10
    fallbacks = [r for r in caplog.records if "PyTorch reference" in r.getMessage()]
    assert len(fallbacks) == 1, [r.getMessage() for r in fallbacks]  # 11 steps x 2 layers, one warning
    with pytest.raises(RuntimeError, match="cannot serve"):
        ops.mla_decode(*_op_args().values(), 0.25, backend="kernel")


def test_decode_forced_names_the_problem(monkeypatch):
    """kernel_probe.decode_forced checks its own arguments before it reaches the extension (no GPU needed): an
    unknown kernel name is a ValueError naming it, CPU tensors a RuntimeError saying the kernel cannot serve, bad
    shapes the argument that is wrong."""

    def no_extension():
        raise AssertionError("decode_forced reached the extension")

    monkeypatch.setattr(ops, "load_extension", no_extension)
    args = _op_args()
    for kernel in ("v7", "MMA", "pair"):
        with pytest.raises(ValueError, match=rf"kernel must be 'auto' or one of .*got '{kernel}'"):
            kernel_probe.decode_forced(*args.values(), 0.25, kernel=kernel)
    for kernel in ("auto", *kernel_probe.KERNELS):
        with pytest.raises(RuntimeError, match="cannot serve this call: inputs are on cpu"):
            kernel_probe.decode_forced(*args.values(), 0.25, kernel=kernel)
    bad = dict(args, kv_end=args["kv_end"][:1])
    with pytest.raises(ValueError, match="kv_end"):
        kernel_probe.decode_forced(*bad.values(), 0.25)


# -- cache capacity, batch size, dtype, empty prompts -----------------------------------------------------


def test_generation_past_the_cache_capacity_grows_the_cache():
    stock, patched = _pair(rope_interleave=True)
    ids, mask = _prompt(case_seed("grow"))
    cache = mla_patch.LatentCache(config=patched.config, initial_capacity=4)
    want = stock.generate(input_ids=ids, attention_mask=mask, max_new_tokens=40, **GEN)
    got = patched.generate(input_ids=ids, attention_mask=mask, max_new_tokens=40, **GEN,
                           **{_cache_kwarg(patched): cache})
    assert torch.equal(want.sequences, got.sequences) and _worst(want, got) < 1e-10
    layer = cache.layers[0]
    assert layer.get_seq_length() == 9 + 39 and 48 <= layer.capacity < 2 * 48  # grown geometrically
    assert cache.nbytes() == 2 * 3 * layer.capacity * (32 + 8) * 8


def test_batch_size_and_dtype_may_change_between_generate_calls():
    stock, patched = _pair(rope_interleave=True)
    for batch, length in ((3, 9), (1, 4), (2, 13)):
        ids, mask = _prompt(case_seed("batch", batch), batch=batch, length=length)
        want = stock.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, **GEN)
        got = patched.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, **GEN)
        assert torch.equal(want.sequences, got.sequences) and _worst(want, got) < 1e-10, batch
    stale = got.past_key_values  # batch 2, float64
    stock.float()
    patched.float()
    ids, mask = _prompt(case_seed("dtype"))
    want = stock.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, **GEN)
    got = patched.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, **GEN)
    assert torch.equal(want.sequences, got.sequences) and _worst(want, got) < 1e-4
    # A cache from another batch size or dtype is refused with a clear error, never misread.
    with pytest.raises(ValueError, match="batch size changed"), torch.no_grad():
        patched(input_ids=ids, attention_mask=torch.ones(3, 20 + 9, dtype=torch.long), **{_cache_kwarg(patched): stale})
    ids2 = ids[:2]
    with pytest.raises(ValueError, match="dtype changed"), torch.no_grad():
        patched(input_ids=ids2, attention_mask=torch.ones(2, 20 + 9, dtype=torch.long), **{_cache_kwarg(patched): stale})


def test_empty_prompt_behaves_like_stock():
    stock, patched = _pair()
    # No prompt at all: generation starts from BOS, as in stock.
    want = stock.generate(max_new_tokens=10, **GEN)
    got = patched.generate(max_new_tokens=10, **GEN)
    assert torch.equal(want.sequences, got.sequences) and _worst(want, got) < 1e-10
    # A zero-length input_ids: stock raises; so do we, with the same error.
    empty = torch.zeros(2, 0, dtype=torch.long)
    with pytest.raises(Exception) as stock_error:
        stock.generate(input_ids=empty, max_new_tokens=3, do_sample=False)
    with pytest.raises(type(stock_error.value)):
        patched.generate(input_ids=empty, max_new_tokens=3, do_sample=False)
    # One-token prompts: the first generated token is already an absorbed decode step.
    ids = torch.tensor([[5], [7]])
    want = stock.generate(input_ids=ids, max_new_tokens=6, **GEN)
    got = patched.generate(input_ids=ids, max_new_tokens=6, **GEN)
    assert torch.equal(want.sequences, got.sequences) and _worst(want, got) < 1e-10


# -- fp16 overflow of the absorbed query -----------------------------------------------------------------


def _latent_heavy(model, k: float):
    """kv_b_proj x k, kv_a_layernorm / k: stock K and V are unchanged, q_latent = q_nope W_UK grows x k."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.kv_b_proj.weight.mul_(k)
            layer.self_attn.kv_a_layernorm.weight.div_(k)
            layer.self_attn.q_proj.weight.mul_(20.0)
    return model


def _decode_step_logits(model, ids, patched):
    with torch.no_grad():
        if patched:
            cache = mla_patch.LatentCache(config=model.config)
            model(input_ids=ids[:, :-1], **{_cache_kwarg(model): cache})
        else:
            cache = model(input_ids=ids[:, :-1], use_cache=True).past_key_values
        return model(input_ids=ids[:, -1:], **{_cache_kwarg(model): cache}).logits


def test_fp16_large_absorbed_query_does_not_overflow():
    """q_latent exceeds 65504 in fp16 while stock q . k_nope does not: the folded softmax scale keeps it in range."""
    base = _latent_heavy(build_model(tiny_config("deepseek_v3", rope_interleave=True), seed=3), 1500.0)
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(case_seed("fp16")))
    attn = base.model.layers[0].self_attn
    h = base.model.layers[0].input_layernorm(base.model.embed_tokens(ids))
    q_nope = attn.q_proj(h).view(2, 7, 4, 24)[..., :16]
    q_latent = torch.einsum("bshn,hnr->bshr", q_nope, attn.kv_b_proj.weight.view(4, 32, 32)[:, :16])
    assert q_latent.abs().max() > 65504 > (q_latent * attn.scaling).abs().max()  # the case the fold fixes
    ref = _decode_step_logits(base, ids, patched=False)
    stock16 = copy.deepcopy(base).half()
    patched16 = copy.deepcopy(stock16)
    mla_patch.patch(patched16)
    got = _decode_step_logits(patched16, ids, patched=True)
    want16 = _decode_step_logits(stock16, ids, patched=False)
    assert torch.isfinite(got).all()
    assert rel_err(got, ref) < max(2 * rel_err(want16, ref), 2e-3)


def test_fp16_extreme_absorbed_query_saturates_instead_of_nan():
    """Past what the fold covers, q_latent saturates at the fp16 maximum: finite logits, never inf/NaN."""
    model = _latent_heavy(build_model(tiny_config("deepseek_v3", rope_interleave=True), seed=3), 3e4).half()
    mla_patch.patch(model)
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(case_seed("fp16-extreme")))
    assert torch.isfinite(_decode_step_logits(model, ids, patched=True)).all()


# -- property: patched == stock over random configs, batches, paddings, lengths ---------------------------


if given is None:

    @pytest.mark.skip(reason="hypothesis is not installed")
    def test_property_patched_equals_stock():
        pass

else:

    @settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        family=st.sampled_from(["deepseek_v2", "deepseek_v3"]),
        heads=st.sampled_from([1, 2, 4]),
        kv_lora=st.sampled_from([8, 16, 32]),
        rope=st.sampled_from([2, 4, 8]),
        nope=st.sampled_from([4, 8, 16]),
        v_dim=st.sampled_from([4, 8, 16]),
        q_lora=st.sampled_from([None, 12]),
        interleave=st.booleans(),
        pads=st.lists(st.integers(0, 6), min_size=1, max_size=3),
        length=st.integers(1, 8),
        new_tokens=st.integers(1, 10),
        seed=st.integers(0, 2**16),
    )
    def test_property_patched_equals_stock(family, heads, kv_lora, rope, nope, v_dim, q_lora, interleave, pads, length,
                                           new_tokens, seed):
        overrides = {"num_attention_heads": heads, "kv_lora_rank": kv_lora, "qk_rope_head_dim": rope,
                     "qk_nope_head_dim": nope, "v_head_dim": v_dim, "q_lora_rank": q_lora, "num_hidden_layers": 2}
        if family == "deepseek_v3":
            overrides["rope_interleave"] = interleave
        stock = build_model(tiny_config(family, **overrides), seed=seed % 1000)
        patched = copy.deepcopy(stock)
        mla_patch.patch(patched)
        length = max(length, max(pads) + 1)  # every row keeps at least one real token
        ids, mask = _prompt(seed, batch=len(pads), length=length, pad=tuple(pads))
        want = stock.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, **GEN)
        got = patched.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, **GEN)
        assert torch.equal(want.sequences, got.sequences)
        assert _worst(want, got) < 1e-10


# -- memory ------------------------------------------------------------------------------------------------


def _live_tensor_bytes() -> int:
    gc.collect()
    total = 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and not obj.is_meta:
                total += obj.untyped_storage().nbytes()
        except (ReferenceError, RuntimeError):
            continue
    return total


def test_no_memory_leak_across_many_generate_calls():
    _, patched = _pair(rope_interleave=True)
    caches = []
    cuda = torch.cuda.is_available()
    if cuda:
        patched = patched.cuda()

    def run(seed):
        ids, mask = _prompt(seed)
        device = next(patched.parameters()).device
        out = patched.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=12,
                               do_sample=False, return_dict_in_generate=True)
        caches.append(weakref.ref(out.past_key_values))
        assert isinstance(out.past_key_values, mla_patch.LatentCache)

    run(0)  # warm-up: lazily built state (merged weights, memos) is allowed once
    baseline = _live_tensor_bytes()
    cuda_baseline = torch.cuda.memory_allocated() if cuda else 0
    for seed in range(1, 16):
        run(seed)
    after = _live_tensor_bytes()
    assert all(ref() is None for ref in caches), "a LatentCache outlived its generate() result"
    assert after - baseline < 64 * 1024, f"{after - baseline} bytes of tensors left behind"
    if cuda:
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() - cuda_baseline < 1 << 20
