"""Continuous batching (transformers' generate_batch): the paged op contract, and the patched layers under it.

The op reads a paged cache through a row table (`row_index`); here its reference is checked against a float64
loop over the pool rows with pages out of order and ragged lengths. generate_batch is then run stock and patched
on tiny DeepSeek-V2 / V3 models with small pages and a small token budget, so prompts are chunked, requests join
while others decode and finish at different times: the tokens must be equal and the decode tokens absorbed.
"""

from __future__ import annotations

import pytest
import torch

import mla_patch
from mla_patch import ops, paged

from conftest import build_model, case_seed, tiny_config

transformers = pytest.importorskip("transformers")
if not hasattr(transformers.GenerationMixin, "generate_batch"):
    pytest.skip("this transformers has no continuous batching", allow_module_level=True)


def loop_oracle(q_latent, q_pe, pool_c, pool_k, row_index, kv_start, kv_end, sm_scale):
    """out_latent of every (b, s, h) from the rows its row table names, one query at a time, in float64."""
    B, S, H, R = q_latent.shape
    out = torch.zeros(B, S, H, R, dtype=torch.float64)
    for b in range(B):
        for s in range(S):
            end = min(int(kv_end[b]) - (S - 1 - s), row_index.shape[1])
            rows = [int(row_index[b, t]) for t in range(max(int(kv_start[b]), 0), end)]
            if not rows:
                continue
            c, k = pool_c[rows].double(), pool_k[rows].double()
            for h in range(H):
                scores = (c @ q_latent[b, s, h].double() + k @ q_pe[b, s, h].double()) * sm_scale
                out[b, s, h] = torch.softmax(scores, 0) @ c
    return out


@pytest.mark.parametrize("S", [1, 2])
def test_paged_reference_matches_a_loop_over_pool_rows(S):
    gen = torch.Generator().manual_seed(case_seed("paged-ref", S))
    B, H, R, P, T, pool = 5, 3, 16, 8, 40, 200
    lengths = [1, 7, 40, 0, 23]  # one empty sequence
    q_latent = torch.randn(B, S, H, R, generator=gen, dtype=torch.float64)
    q_pe = torch.randn(B, S, H, P, generator=gen, dtype=torch.float64)
    pool_c = torch.randn(pool, R, generator=gen, dtype=torch.float64)
    pool_k = torch.randn(pool, P, generator=gen, dtype=torch.float64)
    # Pages of 4 rows handed out in a shuffled order; rows past a sequence's length hold any index (even out of
    # the pool, which is clamped) and NaN rows are never read.
    pages = torch.randperm(pool // 4, generator=gen)
    row_index = torch.full((B, T), 10_000, dtype=torch.int32)
    used = 0
    for b, n in enumerate(lengths):
        for t in range(n):
            row_index[b, t] = int(pages[(used + t) // 4]) * 4 + (used + t) % 4
        used += -(-n // 4) * 4
    unused = torch.ones(pool, dtype=torch.bool)
    unused[row_index[row_index < pool].long()] = False
    pool_c[unused] = float("nan")
    pool_k[unused] = float("nan")
    kv_start = torch.zeros(B, dtype=torch.int32)
    kv_end = torch.tensor(lengths, dtype=torch.int32)
    out, lse = ops.mla_decode(q_latent, q_pe, pool_c, pool_k, kv_start, kv_end, 0.3, backend="torch", row_index=row_index)
    want = loop_oracle(q_latent, q_pe, pool_c, pool_k, row_index, kv_start, kv_end, 0.3)
    assert not torch.isnan(out).any()
    err = ((out - want).norm() / want.norm()).item()
    assert err < 1e-12, err
    assert torch.isneginf(lse[3]).all() and (out[3] == 0).all()


def test_paged_arguments_name_the_problem():
    q = torch.zeros(2, 1, 2, 16)
    qp = torch.zeros(2, 1, 2, 8)
    pool_c, pool_k = torch.zeros(10, 16), torch.zeros(10, 8)
    ends = torch.ones(2, dtype=torch.int32)
    with pytest.raises(ValueError, match="row_index"):
        ops.mla_decode(q, qp, pool_c, pool_k, ends * 0, ends, 1.0, row_index=torch.zeros(3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="pool of rows"):
        ops.mla_decode(q, qp, pool_c[None].expand(2, -1, -1), pool_k, ends * 0, ends, 1.0,
                       row_index=torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="k_pe"):
        ops.mla_decode(q, qp, pool_c, pool_k[:5], ends * 0, ends, 1.0, row_index=torch.zeros(2, 4, dtype=torch.int32))


def _generate_batch(model, prompts, max_new_tokens):
    from transformers import ContinuousBatchingConfig, GenerationConfig

    generation = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    # Small pages and a small token budget: prompts are chunked and requests join while others decode.
    batching = ContinuousBatchingConfig(page_size=8, num_blocks=64, max_batch_tokens=24)
    out = model.generate_batch(inputs=prompts, generation_config=generation, continuous_batching_config=batching)
    return {k: out[k].generated_tokens for k in out}


@pytest.mark.skipif(not paged.has_latent_pages(), reason="this transformers' continuous batching has no MLA latent pages")
@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_generate_batch_tokens_equal_stock_and_decode_runs_absorbed(family):
    gen = torch.Generator().manual_seed(case_seed("cb", family))
    lengths = [5, 9, 3, 12, 30, 1, 17, 2]
    prompts = [torch.randint(3, 97, (n,), generator=gen).tolist() for n in lengths]
    config = tiny_config(family)
    stock = _generate_batch(build_model(config), prompts, 6)
    mla_patch.patch()
    try:
        model = build_model(config)
        mla_patch.reset_decode_stats()
        patched = _generate_batch(model, prompts, 6)
        stats = mla_patch.decode_stats()
    finally:
        mla_patch.unpatch()
    assert patched == stock
    assert all(len(tokens) == 6 for tokens in patched.values())
    # Every request's 5 decode steps, at least, ran absorbed; the long prompts' chunks ran the stock computation.
    assert stats["absorbed_tokens"] >= 5 * len(prompts), stats
    assert stats["prefill_calls"] > 0 and stats["vanilla_fallbacks"] == 0, stats


# ---- The decode fast path (decode_fast_path.py): decode-only steps read the pages through the block table.
@pytest.fixture
def fast_path_steps(monkeypatch):
    """Each fast-path step the layers work out: (kv_end list, row table width)."""
    from mla_patch import decode_fast_path

    seen = []
    original = decode_fast_path.block_table_step

    def spy(cache, layer_idx, kwargs):
        step = original(cache, layer_idx, kwargs)
        capturing = step.kv_end.is_cuda and torch.cuda.is_current_stream_capturing()  # no host read in a capture
        seen.append((None if capturing else step.kv_end.tolist(), step.row_table.shape[1]))
        return step

    monkeypatch.setattr(decode_fast_path, "block_table_step", spy)
    return seen


def _pad_like_graphs(monkeypatch):
    """Make continuous batching pad its steps as it does for CUDA graphs (powers of two, padding sequences of
    length 0), on the CPU."""
    from transformers.generation.continuous_batching import model_runner

    init = model_runner.ModelRunner.__init__

    def padded_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.pad_inputs = True

    monkeypatch.setattr(model_runner.ModelRunner, "__init__", padded_init)


@pytest.mark.skipif(not paged.has_latent_pages(), reason="this transformers' continuous batching has no MLA latent pages")
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_decode_fast_path_tokens_equal_stock(family, padded, fast_path_steps, monkeypatch):
    if padded:
        _pad_like_graphs(monkeypatch)
    gen = torch.Generator().manual_seed(case_seed("fast-path", family, padded))
    lengths = [5, 9, 3, 12, 30, 44]  # the long prompts join late: 3 of 6 requests decode alone for a while
    prompts = [torch.randint(3, 97, (n,), generator=gen).tolist() for n in lengths]
    config = tiny_config(family)
    stock = _generate_batch(build_model(config), prompts, 8)
    assert not fast_path_steps  # stock MLA never gets the fast path
    mla_patch.patch()
    try:
        patched = _generate_batch(build_model(config), prompts, 8)
    finally:
        mla_patch.unpatch()
    assert patched == stock
    assert fast_path_steps, "no decode step took the fast path"
    ends = [end for step_ends, _ in fast_path_steps for end in step_ends]
    assert max(ends) == max(lengths) + 7  # the longest request's last step sees its whole history
    assert all(width % 8 == 0 for _, width in fast_path_steps)  # whole pages of 8 rows
    assert (0 in ends) == padded  # padding sequences see nothing and write to the trash row


@pytest.mark.skipif(not paged.has_latent_pages(), reason="this transformers' continuous batching has no MLA latent pages")
def test_decode_fast_path_only_for_patched_models_and_unless_turned_off(fast_path_steps):
    from transformers import ContinuousBatchingConfig, GenerationConfig
    from transformers.generation.continuous_batching import initialization
    from transformers.generation.continuous_batching.cache_allocators import MLACacheAllocator

    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    generation = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    config = tiny_config("deepseek_v2")
    stock_model = build_model(config)  # built before patch(): its layers stay stock
    ensure = initialization.ensure_decode_fast_path_is_available
    mla_patch.patch()
    try:
        want = _generate_batch(stock_model, prompts, 4)
        assert not fast_path_steps
        off = ContinuousBatchingConfig(page_size=8, num_blocks=64, max_batch_tokens=24, max_blocks_per_request=0)
        out = build_model(config).generate_batch(inputs=prompts, generation_config=generation,
                                                 continuous_batching_config=off)
        assert {k: out[k].generated_tokens for k in out} == want and not fast_path_steps
    finally:
        mla_patch.unpatch()
    assert MLACacheAllocator.supports_block_table is False
    assert initialization.ensure_decode_fast_path_is_available is not ensure or not hasattr(ensure, "__wrapped__")


@pytest.mark.skipif(not paged.has_latent_pages(), reason="this transformers' continuous batching has no MLA latent pages")
@pytest.mark.parametrize("asked", [None, False, (True, False)], ids=["default", "off", "varlen-only"])
def test_decode_graphs_on_by_default_for_patched_models(asked, monkeypatch):
    """Where CUDA graphs exist, a fully patched model's decode path captures them unless the user chose; a stock MLA
    model keeps transformers' choice (no graphs for attention that needs a mask)."""
    from transformers import ContinuousBatchingConfig, GenerationConfig
    from transformers.generation.continuous_batching import initialization

    from mla_patch import decode_fast_path

    monkeypatch.setattr(decode_fast_path, "captures_safely", lambda model: True)  # as on a GPU
    monkeypatch.setattr(initialization, "get_accelerator_graph_name", lambda: "cuda")

    def resolved(model):
        options = {} if asked is None else {"use_cuda_graph": asked}
        config = ContinuousBatchingConfig(page_size=8, num_blocks=16, max_batch_tokens=16, **options)
        generation = GenerationConfig(max_new_tokens=2, do_sample=False, eos_token_id=None, pad_token_id=0)
        manager = model.init_continuous_batching(generation_config=generation, continuous_batching_config=config)
        return tuple(manager.continuous_batching_config.use_cuda_graph)

    stock_model = build_model(tiny_config("deepseek_v2"))
    mla_patch.patch()
    try:
        patched_model = build_model(tiny_config("deepseek_v2"))
        stock_choice, patched_choice = resolved(stock_model), resolved(patched_model)
    finally:
        mla_patch.unpatch()
    expected_stock = (False, False) if asked is None else ((asked, asked) if isinstance(asked, bool) else asked)
    assert stock_choice == expected_stock
    assert patched_choice == ((False, True) if asked is None else expected_stock)


def test_graphs_by_default_only_where_a_step_can_be_captured(monkeypatch):
    """No default graphs for a model off CUDA, nor for one whose MoE reads its routing on the host: transformers'
    eager experts (a loop over the experts hit), or grouped_mm where torch has no grouped GEMM for it (not bfloat16,
    or a GPU before sm90: torch's fallback copies the offsets to the host)."""
    from mla_patch import decode_fast_path

    model = build_model(tiny_config("deepseek_v2"), dtype=torch.float32)  # eager experts (conftest)
    assert not decode_fast_path.captures_safely(model)  # on the CPU
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda")))
    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    assert not decode_fast_path.captures_safely(model)
    model.set_experts_implementation("batched_mm")
    assert decode_fast_path.captures_safely(model)
    model.set_experts_implementation("grouped_mm")
    assert not decode_fast_path.captures_safely(model)  # float32
    model.to(torch.bfloat16)
    assert decode_fast_path.captures_safely(model)
    capability[0] = (8, 0)
    assert not decode_fast_path.captures_safely(model)


# ---- The CUDA kernel on a paged cache (GPU): every kernel that reads one, against the float64 reference.
def _paged_case(B, S, H, R, P, lengths, page, dtype, seed):
    """Random queries and a pool of rows whose pages are handed out shuffled; pool rows no sequence owns are NaN
    and the row table past each sequence's length points anywhere (out of the pool too)."""
    gen = torch.Generator().manual_seed(seed)
    T = max(lengths) + 5
    pages_needed = sum(-(-n // page) for n in lengths) + 3
    pool = pages_needed * page
    q_latent = torch.randn(B, S, H, R, generator=gen).to(dtype)
    q_pe = torch.randn(B, S, H, P, generator=gen).to(dtype)
    rows = torch.randn(pool, R + P, generator=gen).to(dtype)  # one row a token: latent | rope, as transformers
    order = torch.randperm(pages_needed, generator=gen)
    row_index = torch.randint(-5, pool + 50, (B, T), generator=gen, dtype=torch.int32)
    owned = torch.zeros(pool, dtype=torch.bool)
    used = 0
    for b, n in enumerate(lengths):
        for t in range(n):
            row_index[b, t] = int(order[(used + t) // page]) * page + (used + t) % page
            owned[row_index[b, t]] = True
        used += -(-n // page) * page
    rows[~owned] = float("nan")
    ends = torch.tensor(lengths, dtype=torch.int32)
    tensors = [q_latent, q_pe, rows, row_index, torch.zeros_like(ends), ends]
    return [t.cuda() for t in tensors]


def _check_paged(run, case, tag, sm_scale=0.1):
    q_latent, q_pe, rows, row_index, kv_start, kv_end = case
    R = q_latent.shape[-1]
    pool_c, pool_k = rows[:, :R], rows[:, R:]  # strided views of the one pool, as the cache hands them
    out, lse = run(q_latent, q_pe, pool_c, pool_k, kv_start, kv_end, sm_scale, row_index)
    args = [t.double() if t.is_floating_point() else t for t in (q_latent, q_pe, pool_c, pool_k)]
    want, want_lse = ops.mla_decode(*args, kv_start, kv_end, sm_scale, backend="torch", row_index=row_index)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), tag
    err = ((out.double() - want).norm() / want.norm().clamp_min(1e-30)).item()
    bound = 1e-2 if q_latent.dtype == torch.bfloat16 else 2e-3
    assert err < bound, f"{tag}: relative error {err:.2e}"
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), finite), tag
    assert (lse[finite] - want_lse[finite].float()).abs().max().item() < 2e-3, tag


needs_kernel = pytest.mark.skipif(not (torch.cuda.is_available() and ops.has_kernel()),
                                  reason="needs CUDA and the built extension")


@needs_kernel
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("S, H, dims", [(1, 16, (512, 64)), (1, 128, (512, 64)), (2, 16, (512, 64)),
                                         (1, 40, (256, 32)), (1, 1, (512, 64))])
@pytest.mark.parametrize("kernel", ["auto", "mma", "seesaw"])
def test_paged_kernel_matches_the_reference(kernel, S, H, dims, dtype):
    from mla_patch import kernel_probe

    if kernel == "seesaw" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("seesaw needs compute capability 9.0")
    R, P = dims
    lengths = [1, 255, 256, 257, 1000, 0, 31, 4096]
    case = _paged_case(len(lengths), S, H, R, P, lengths, 16, dtype, case_seed("paged-kernel", kernel, S, H, R))

    def run(*args):
        *inputs, row_index = args
        out, lse, ran = kernel_probe.decode_forced(*inputs, kernel=kernel, row_index=row_index)
        assert ran.kernel != "narrow" and not ran.q_tma and not ran.kv_tma, ran  # a row table goes by cp.async
        return out, lse

    _check_paged(run, case, f"{kernel} S={S} H={H} R={R}")
    if kernel == "auto":  # the product's path: ops.mla_decode with a row table
        _check_paged(lambda *a: ops.mla_decode(*a[:-1], backend="kernel", row_index=a[-1]), case, "ops")


@needs_kernel
@pytest.mark.cuda
@pytest.mark.parametrize("splits", [1, 3, 64])
def test_paged_kernel_forced_splits(splits):
    from mla_patch import kernel_probe

    case = _paged_case(3, 1, 128, 512, 64, [5000, 17, 2048], 256, torch.bfloat16, case_seed("paged-splits", splits))
    for kernel in ("mma", "seesaw") if torch.cuda.get_device_capability() == (9, 0) else ("mma",):
        _check_paged(lambda *a, k=kernel: kernel_probe.decode_forced(*a[:-1], kernel=k, splits=splits,
                                                                     row_index=a[-1])[:2],
                     case, f"{kernel} splits={splits}")


@needs_kernel
@pytest.mark.cuda
@pytest.mark.skipif(not paged.has_latent_pages(), reason="this transformers' continuous batching has no MLA latent pages")
def test_decode_fast_path_replays_cuda_graphs_on_the_gpu(fast_path_steps, monkeypatch):
    """On CUDA the patched model's decode steps are captured and replayed by default (nothing asked for): the tokens
    equal the stock model's (float32: the reference op) and the patched eager ones (bfloat16: the kernel)."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    replays = []
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda graph: (replays.append(1), replay(graph))[1])
    gen = torch.Generator().manual_seed(case_seed("fast-path-gpu"))
    prompts = [torch.randint(3, 97, (n,), generator=gen).tolist() for n in (5, 9, 3, 12, 30, 44)]
    generation = GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)

    def run(model, **options):
        batching = ContinuousBatchingConfig(page_size=16, num_blocks=64, max_batch_tokens=32, **options)
        out = model.cuda().generate_batch(inputs=prompts, generation_config=generation,
                                          continuous_batching_config=batching)
        return {k: out[k].generated_tokens for k in out}

    def built(config, dtype, experts=None):  # a step a graph can hold (captures_safely): grouped_mm only in bf16
        model = build_model(config, dtype=dtype)
        model.set_experts_implementation(experts or ("grouped_mm" if dtype == torch.bfloat16 else "batched_mm"))
        return model

    fp32 = tiny_config("deepseek_v2")
    kernel_dims = tiny_config("deepseek_v2", kv_lora_rank=512, qk_rope_head_dim=64)
    stock = run(built(fp32, torch.float32))
    assert not replays  # stock MLA has no decode fast path to replay
    mla_patch.patch()
    try:
        assert run(built(fp32, torch.float32, experts="eager")) == stock and not replays  # no graphs by default
        graphed = run(built(fp32, torch.float32))
        assert replays and fast_path_steps, "the decode steps were not replayed from CUDA graphs"
        assert graphed == stock
        bf16 = built(kernel_dims, torch.bfloat16)
        assert run(bf16) == run(bf16, use_cuda_graph=False)
    finally:
        mla_patch.unpatch()
