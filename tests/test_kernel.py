"""The CUDA kernel `torch.ops.mla_patch.mla_decode` against the float64 reference.

Skipped (with the reason) without a GPU or without the built extension. Inputs are drawn fresh
per case from a seed mixed from MLA_PATCH_SEED and the case parameters (printed on failure),
rounded to the kernel dtype, and the same rounded values are upcast to float64 for the oracle.
Cache rows outside each sequence's visible range are NaN, and the caching allocator is primed
with NaN blocks of the outputs' sizes, so an out-of-range read or a missed write shows as NaN.
Observed errors go to the file named by MLA_PATCH_KERNEL_ERRLOG (one JSON line per case).
"""

from __future__ import annotations

import json
import math
import os
import zlib

import pytest
import torch

from mla_patch import ops
from mla_patch.reference import mla_decode_ref

pytestmark = pytest.mark.cuda

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
if not ops.has_kernel():
    pytest.skip(f"extension not available: {ops.extension_error()}", allow_module_level=True)

BASE_SEED = int(os.environ.get("MLA_PATCH_SEED", "1234"))
REL_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
# The kernel's error may be at most this multiple of the reference's own error in the kernel
# dtype (float32 math on the same inputs, output rounded once), plus a small floor.
REF_RATIO = 2.0
LSE_ATOL = 2e-3
DIMS = [(512, 64), (256, 32)]
SM_SCALE = 192**-0.5
DEV = "cuda"


def _seed(*params) -> int:
    return (BASE_SEED * 1_000_003 + zlib.crc32(repr(params).encode())) % (2**31)


def _log(record: dict) -> None:
    path = os.environ.get("MLA_PATCH_KERNEL_ERRLOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def make_case(B, S, H, R, P, T, lens, dtype, layout, seed, pads=None):
    """Random rounded inputs; rows outside [kv_start, kv_end) are NaN. lens[b] = kv_end - kv_start."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    q_latent = torch.randn(B, S, H, R, generator=g, device=DEV).to(dtype)
    q_pe = torch.randn(B, S, H, P, generator=g, device=DEV).to(dtype)
    if layout == "packed":  # the latent cache's one-row-per-token buffer
        buf = torch.randn(B, T, R + P, generator=g, device=DEV).to(dtype)
        c_kv, k_pe = buf[..., :R], buf[..., R:]
    else:  # transformers' own caches: two contiguous tensors
        c_kv = torch.randn(B, T, R, generator=g, device=DEV).to(dtype)
        k_pe = torch.randn(B, T, P, generator=g, device=DEV).to(dtype)
    lens = torch.tensor(lens, dtype=torch.int64)
    if pads is None:
        pads = [int(torch.randint(0, T - int(n) + 1, (1,)).item()) if T > n else 0 for n in lens]
    kv_start = torch.tensor(pads, dtype=torch.int32, device=DEV)
    kv_end = (kv_start.long() + lens.to(DEV)).to(torch.int32)
    rows = torch.arange(T, device=DEV)
    outside = (rows[None, :] < kv_start[:, None]) | (rows[None, :] >= kv_end[:, None])
    c_kv.masked_fill_(outside[..., None], float("nan"))
    k_pe.masked_fill_(outside[..., None], float("nan"))
    return q_latent, q_pe, c_kv, k_pe, kv_start, kv_end


def _prime_allocator_with_nan(*shapes_dtypes):
    """Free NaN-filled blocks of the outputs' sizes so the op's empty() likely reuses them."""
    blocks = [torch.full(shape, float("nan"), dtype=dt, device=DEV) for shape, dt in shapes_dtypes]
    del blocks


def run_kernel(q_latent, q_pe, c_kv, k_pe, kv_start, kv_end, sm_scale=SM_SCALE):
    B, S, H, R = q_latent.shape
    _prime_allocator_with_nan(((B, S, H, R), q_latent.dtype), ((B, S, H), torch.float32))
    out, lse = torch.ops.mla_patch.mla_decode(q_latent, q_pe, c_kv, k_pe, kv_start, kv_end, sm_scale)
    torch.cuda.synchronize()
    return out, lse


def _rel(a, b):
    a, b = a.double(), b.double()
    if torch.isnan(a).any():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def check_case(inputs, tag, sm_scale=SM_SCALE):
    q_latent, q_pe, c_kv, k_pe, kv_start, kv_end = inputs
    dtype = q_latent.dtype
    out, lse = run_kernel(*inputs, sm_scale=sm_scale)
    ref, ref_lse = mla_decode_ref(
        q_latent.double(), q_pe.double(), c_kv.double(), k_pe.double(), kv_start, kv_end, sm_scale
    )
    ref_lowp, _ = mla_decode_ref(*inputs, sm_scale)
    assert out.shape == ref.shape and out.dtype == dtype and lse.dtype == torch.float32, tag
    assert not torch.isnan(out).any(), f"{tag}: NaN in out (unwritten element or out-of-range read)"
    assert not torch.isnan(lse).any(), f"{tag}: NaN in lse"
    err = _rel(out, ref)
    err_ref = _rel(ref_lowp, ref)
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty) and (lse[empty] < 0).all(), f"{tag}: lse -inf pattern differs"
    assert (out[empty] == 0).all(), f"{tag}: a query that sees no row must give zeros"
    lse_err = (lse[~empty].double() - ref_lse[~empty]).abs().max().item() if (~empty).any() else 0.0
    _log(dict(case=tag, dtype=str(dtype).replace("torch.", ""), rel_err=err, ref_rel_err=err_ref, lse_abs_err=lse_err))
    assert err < REL_TOL[dtype], f"{tag}: rel err {err:.3e} >= {REL_TOL[dtype]:.0e} (reference in {dtype}: {err_ref:.3e})"
    assert err <= REF_RATIO * err_ref + 1e-4, f"{tag}: rel err {err:.3e} > {REF_RATIO} x reference's {err_ref:.3e}"
    assert lse_err < LSE_ATOL, f"{tag}: lse abs err {lse_err:.3e}"
    return err, err_ref


def growing_case(S, H, dtype, seed):
    """make_case for two sequences (3000 and 1234 rows of a 3000-row separate cache) whose rows are scaled by a ramp
    from 0.2 to 4.0 along the cache: the scores grow, so the running max jumps many times (the rescale path)."""
    T = 3000
    q_latent, q_pe, c_kv, k_pe, kv_start, kv_end = make_case(2, S, H, 512, 64, T, [3000, 1234], dtype, "separate", seed)
    ramp = torch.linspace(0.2, 4.0, T, device=DEV)[None, :, None]
    return q_latent, q_pe, (c_kv.float() * ramp).to(dtype), (k_pe.float() * ramp).to(dtype), kv_start, kv_end


@pytest.mark.parametrize("layout", ["packed", "separate"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("S", [1, 2, 4])
@pytest.mark.parametrize("H", [1, 16, 40, 128])
@pytest.mark.parametrize("dims", DIMS, ids=lambda d: f"R{d[0]}P{d[1]}")
def test_sweep(dims, H, S, dtype, layout):
    """Ragged lengths: 1, 0 (empty), a non-multiple of the tile, random, the full capacity."""
    R, P = dims
    seed = _seed("sweep", dims, H, S, str(dtype), layout)
    g = torch.Generator().manual_seed(seed)
    T = int(torch.randint(200, 1500, (1,), generator=g).item())
    lens = [1, 0, 33, int(torch.randint(2, T, (1,), generator=g).item()), T]
    tag = f"sweep R={R} P={P} H={H} S={S} {dtype} {layout} T={T} lens={lens} seed={seed}"
    check_case(make_case(len(lens), S, H, R, P, T, lens, dtype, layout, seed), tag)


@pytest.mark.parametrize("dims", DIMS, ids=lambda d: f"R{d[0]}P{d[1]}")
@pytest.mark.parametrize("H", [16, 128])
def test_tile_edges_and_batch(dims, H):
    """Many sequences with lengths around the 32-row tile and the split boundaries."""
    R, P = dims
    seed = _seed("edges", dims, H)
    lens = [1, 2, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 1000, 4095, 4096, 0]
    tag = f"edges R={R} H={H} lens={lens} seed={seed}"
    check_case(make_case(len(lens), 1, H, R, P, 4096, lens, torch.bfloat16, "packed", seed), tag)


@pytest.mark.parametrize("H", [16, 128])
def test_short_sequences_in_long_buffer(H):
    """Capacity far above the lengths: most split chunks are empty and must exit cleanly."""
    seed = _seed("sparse", H)
    lens = [5, 100, 0, 37]
    tag = f"sparse H={H} lens={lens} seed={seed}"
    check_case(make_case(4, 2, H, 512, 64, 32768, lens, torch.bfloat16, "packed", seed), tag)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_growing_scores(dtype):
    """Scores that grow along the cache: the running max jumps many times (rescale path)."""
    seed = _seed("growing", str(dtype))
    inputs = growing_case(2, 40, dtype, seed)
    check_case(inputs, f"growing {dtype} seed={seed}")


def one_buffer_queries(q_latent, q_pe):
    """q_latent and q_pe as views of one [B, S, H, R + P] buffer (strided, not contiguous)."""
    qbuf = torch.cat([q_latent, q_pe], dim=-1)
    R = q_latent.shape[-1]
    return qbuf[..., :R], qbuf[..., R:]


def strided_case(S, H, seed):
    """Three sequences (700, 3 and 450 rows of a 700-row packed cache), bf16, their queries one_buffer_queries."""
    q_latent, q_pe, *cache = make_case(3, S, H, 512, 64, 700, [700, 3, 450], torch.bfloat16, "packed", seed)
    return (*one_buffer_queries(q_latent, q_pe), *cache)


def test_strided_queries():
    """q_latent and q_pe as views of one [B, S, H, R+P] buffer (strides, not contiguity)."""
    seed = _seed("strided")
    inputs = strided_case(2, 16, seed)
    assert not inputs[0].is_contiguous()
    check_case(inputs, f"strided seed={seed}")


@pytest.mark.slow
@pytest.mark.parametrize("H", [16, 128])
@pytest.mark.parametrize("S", [1, 2])
def test_long_context(H, S):
    """128K tokens at batch 1 (all splits busy) and a ragged batch of long sequences."""
    seed = _seed("long", H, S)
    T = 131072
    check_case(make_case(1, S, H, 512, 64, T, [T], torch.bfloat16, "packed", seed), f"long B=1 H={H} S={S} seed={seed}")
    lens = [T - 17, 65537, 1]
    check_case(
        make_case(3, S, H, 512, 64, T, lens, torch.bfloat16, "separate", seed + 1),
        f"long B=3 H={H} S={S} lens={lens} seed={seed + 1}",
    )


# ---- The kernels behind the dispatch, each forced through the test hook torch.ops.mla_patch._wgmma_mode:
# 0 the portable mma.sync kernel (v4), 1 the sm_90a seesaw kernel (v7, any S*H), 2 its 2-CTA pair kernel (v8)
# where that serves, else v7. _last_path() names the kernel the last call launched. "v7" runs v7's regular grid,
# "v7plan" its balanced grid (mla_plan_start, csrc/mla_params.h), which serves every call of these tests
# (B < 1024); _last_plan() says which grid ran. "v7" copies its cache tiles by cp.async, "v7tmakv" by TMA (the
# default) where they can be (_kv_by_tma_expected); _last_kv_tma() says which. Mode 3, the narrow kernel (v9: the
# heads as wgmma's N, R = 512 and S*H <= 16 only, elsewhere v7), has tests of its own below (test_v9_*).
IS_SM90 = torch.cuda.get_device_capability() == (9, 0)
PATHS = ["v7", "v7plan", "v7tmakv", "v8", "mma"]
MODES = {"mma": 0, "v7": 1, "v7plan": 1, "v7tmakv": 1, "v8": 2, "v9": 3}
PLAN_MODES = {"v7": 0, "v7plan": 1, "v7tmakv": 0}
TMA_KV_MODES = {"v7": 0, "v7plan": 0, "v7tmakv": 1}  # v8 where it does not serve: v7 with the default (on)
WGMMA_PATHS = ("v7", "v7plan", "v7tmakv", "v8")
# Lengths around the 32- and 64-row tiles and pairs of 64-row tiles, with an empty sequence (a 4096-row capacity).
TILE_EDGE_LENS = [1, 2, 31, 32, 33, 63, 64, 65, 95, 96, 97, 127, 128, 129, 191, 192, 193, 255, 256, 257,
                  1000, 4095, 4096, 0]


def _expected_kernel(path, q_latent):
    """The kernel `path` launches for these queries: v8 serves R = 512 with more than 32 query rows in an even
    number of 64-row tiles (mla_pair_serves, csrc/mla_params.h), v9 R = 512 with at most 16 (mla_narrow_serves);
    elsewhere their modes run v7."""
    _, S, H, R = q_latent.shape
    if path == "v8":
        tiles = -(-S * H // 64)
        return MODES["v8"] if R == 512 and S * H > 32 and tiles % 2 == 0 else MODES["v7"]
    if path == "v9":
        return MODES["v9"] if R == 512 and S * H <= 16 else MODES["v7"]
    return MODES[path]


def _path_settings(path, **extra):
    """kernel_settings for `path`: its mode, and for v7 which grid and which cache tile copy."""
    settings = dict(wgmma_mode=MODES[path], **extra)
    if path in PLAN_MODES:
        settings["plan_mode"] = PLAN_MODES[path]
        settings["tma_kv"] = TMA_KV_MODES[path]
    return settings


def _mma_tma_serves(S, H, R):
    """The mma.sync kernel's query (and, by default, cache) tiles go by TMA on compute capability 9.0 where R = 512
    and each M tile is heads of one token (mla_decode_tma_q_serves, csrc/mla_params.h)."""
    m = 16 if S * H <= 16 else 32
    return IS_SM90 and R == 512 and (S == 1 or H % m == 0)


def _kv_by_tma_expected(path, q_latent, ran):
    """Whether `path`, having launched kernel `ran`, copied these queries' cache tiles by TMA: v7 with the switch on
    (v7tmakv; v8's fallback, by default) where R = 512 (128-byte rows in every block: the TMA boxes' 128-byte swizzle
    is the kernel's layout); v9 always; mma.sync (its switches on by default) where _mma_tma_serves."""
    _, S, H, R = q_latent.shape
    if ran == MODES["mma"]:
        return _mma_tma_serves(S, H, R)
    return ran == MODES["v9"] or (ran == MODES["v7"] and TMA_KV_MODES.get(path, 1) == 1 and R == 512)


def _splits_forced() -> bool:
    op = torch.ops.mla_patch
    n = op._force_splits(0)
    op._force_splits(n)
    return n > 0


def _skip_unless_sm90(path):
    if path != "mma" and not IS_SM90:
        pytest.skip(f"the {path} kernel needs compute capability 9.0")


def _check_path(path, inputs, tag, sm_scale=SM_SCALE):
    """check_case with the dispatch forced to `path`; asserts that kernel is the one that ran."""
    _skip_unless_sm90(path)
    with ops.kernel_settings(**_path_settings(path)):
        check_case(inputs, f"{path} {tag}", sm_scale=sm_scale)
        ran = torch.ops.mla_patch._last_path()
        planned = torch.ops.mla_patch._last_plan()
        kv_tma = torch.ops.mla_patch._last_kv_tma()
    want = _expected_kernel(path, inputs[0])
    assert ran == want, f"{path} {tag}: launched kernel {ran}, expected {want}"
    want_kv = int(_kv_by_tma_expected(path, inputs[0], ran))
    assert kv_tma == want_kv, f"{path} {tag}: cache tiles by TMA {kv_tma}, expected {want_kv}"
    if path in PLAN_MODES:  # a forced split count runs the regular grid
        want_plan = 0 if _splits_forced() else PLAN_MODES[path]
        assert planned == want_plan, f"{path} {tag}: balanced grid {planned}, expected {want_plan}"


@pytest.mark.parametrize("layout", ["packed", "separate"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("S", [1, 2])
@pytest.mark.parametrize("H", [16, 40, 64, 128])
@pytest.mark.parametrize("dims", DIMS, ids=lambda d: f"R{d[0]}P{d[1]}")
@pytest.mark.parametrize("path", PATHS)
def test_paths_sweep(path, dims, H, S, dtype, layout):
    """Both paths on ragged lengths: 1, 0, 33, random, the full capacity."""
    R, P = dims
    seed = _seed("paths", dims, H, S, str(dtype), layout)
    g = torch.Generator().manual_seed(seed)
    T = int(torch.randint(200, 1500, (1,), generator=g).item())
    lens = [1, 0, 33, int(torch.randint(2, T, (1,), generator=g).item()), T]
    tag = f"R={R} P={P} H={H} S={S} {dtype} {layout} T={T} lens={lens} seed={seed}"
    _check_path(path, make_case(len(lens), S, H, R, P, T, lens, dtype, layout, seed), tag)


@pytest.mark.parametrize("layout", ["packed", "separate"])
@pytest.mark.parametrize("H, S", [(16, 1), (64, 1), (128, 1), (128, 2), (40, 2)])
@pytest.mark.parametrize("path", PATHS)
def test_paths_tile_edges(path, H, S, layout):
    """Lengths around the 32- and 64-row tiles, pairs of tiles and split boundaries, a batch large enough for
    no split too."""
    seed = _seed("paths-edges", H, S, layout)
    lens = TILE_EDGE_LENS
    tag = f"edges H={H} S={S} {layout} lens={lens} seed={seed}"
    _check_path(path, make_case(len(lens), S, H, 512, 64, 4096, lens, torch.bfloat16, layout, seed), tag)


@pytest.mark.parametrize("H", [16, 64, 128])
@pytest.mark.parametrize("path", PATHS)
def test_paths_batch_one(path, H):
    """Batch 1 (many splits, the combine) at a few lengths, and short sequences in a long buffer."""
    for L in (1, 31, 32, 33, 64, 65, 128, 129, 1000, 4096):
        seed = _seed("paths-b1", H, L)
        _check_path(path, make_case(1, 1, H, 512, 64, 4096, [L], torch.bfloat16, "packed", seed), f"B=1 H={H} L={L} seed={seed}")
    seed = _seed("paths-sparse", H)
    lens = [5, 100, 0, 37]
    _check_path(path, make_case(4, 2, H, 512, 64, 32768, lens, torch.bfloat16, "packed", seed), f"sparse H={H} lens={lens} seed={seed}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("path", PATHS)
def test_paths_growing_scores(path, dtype):
    """The running max jumps many times (rescale path), 128 heads, two new tokens."""
    seed = _seed("paths-growing", str(dtype))
    inputs = growing_case(2, 128, dtype, seed)
    _check_path(path, inputs, f"growing {dtype} seed={seed}")


def test_paths_strided_queries():
    """Queries as views of one [B, S, H, R+P] buffer through the v7 kernel."""
    seed = _seed("paths-strided")
    _check_path("v7", strided_case(1, 128, seed), f"strided seed={seed}")


@pytest.mark.slow
@pytest.mark.parametrize("S", [2])
@pytest.mark.parametrize("path", PATHS)
def test_paths_long_context(path, S):
    """128K tokens at batch 1 and a ragged batch of long sequences, 128 heads (test_long_context runs
    the default dispatch at S = 1 and 2)."""
    seed = _seed("paths-long", S)
    T = 131072
    _check_path(path, make_case(1, S, 128, 512, 64, T, [T], torch.bfloat16, "packed", seed), f"long B=1 S={S} seed={seed}")
    lens = [T - 17, 65537, 1]
    _check_path(path, make_case(3, S, 128, 512, 64, T, lens, torch.bfloat16, "separate", seed + 1),
                f"long B=3 S={S} lens={lens} seed={seed + 1}")


def test_paths_agree():
    """The sm_90a kernel agrees closely with the mma.sync kernel on one H=128 case (both near float64)."""
    path = "v7"
    _skip_unless_sm90(path)
    inputs = make_case(4, 1, 128, 512, 64, 2048, [2048, 1, 900, 0], torch.bfloat16, "packed", _seed("agree"))
    with ops.kernel_settings(wgmma_mode=MODES[path]):
        out1, lse1 = run_kernel(*inputs)
        assert torch.ops.mla_patch._last_path() == MODES[path]
    with ops.kernel_settings(wgmma_mode=0):
        out0, lse0 = run_kernel(*inputs)
    assert _rel(out1, out0) < 1e-2
    torch.testing.assert_close(lse1, lse0, rtol=0, atol=1e-3)


def _query_layouts_case(S, H, dtype, seed):
    """Three sequences (full, empty and ragged) over a 2000-row cache, and their queries two ways: two tensors, and
    views of one [B, S, H, R + P] buffer (strided). Returns (the query pairs, (c_kv, k_pe, kv_start, kv_end))."""
    q_latent, q_pe, *cache = make_case(3, S, H, 512, 64, 2000, [2000, 0, 777], dtype, "packed", seed)
    return ((q_latent, q_pe), one_buffer_queries(q_latent, q_pe)), tuple(cache)


@pytest.mark.parametrize("H, S", [(128, 1), (128, 2), (64, 1), (64, 3)])
def test_v7_query_by_tma_same_bits(H, S):
    """v7's query tile by TMA (H a multiple of 64) lands the same bytes in the same layout as its cp.async copy:
    outputs bit-identical either way, for contiguous and strided queries, with empty and ragged sequences;
    _last_q_tma() says which ran."""
    _skip_unless_sm90("v7")
    seed = _seed("v7-tma-q", H, S)
    dtype = torch.float16 if S == 3 else torch.bfloat16
    queries, cache = _query_layouts_case(S, H, dtype, seed)
    for q in queries:
        got = {}
        for tma_q in (0, 1):
            with ops.kernel_settings(wgmma_mode=MODES["v7"], tma_q=tma_q):
                got[tma_q] = run_kernel(*q, *cache)
                assert torch.ops.mla_patch._last_path() == MODES["v7"]
                assert torch.ops.mla_patch._last_q_tma() == tma_q, f"H={H} S={S}: query by TMA {tma_q} not honoured"
        assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1]), f"H={H} S={S} seed={seed}"
    with ops.kernel_settings(wgmma_mode=MODES["v7"]):  # where it does not serve (H = 16, 40) the copy stays cp.async
        for h in (16, 40):
            run_kernel(*make_case(1, 1, h, 512, 64, 300, [300], dtype, "packed", seed))
            assert torch.ops.mla_patch._last_q_tma() == 0


@pytest.mark.parametrize("H, S", [(128, 1), (16, 1), (40, 1), (1, 1), (32, 2), (16, 3)])
def test_mma_tiles_by_tma_same_bits(H, S):
    """The mma.sync kernel's query tile by TMA (sm_90a: M heads of one token a box, heads past H read as zeros) and its
    cache tiles by TMA (32-row boxes, rows past T read as zeros, a split's last tile zeroed past its end in shared
    memory; the cache past each length is NaN here) feed the same fragments as its cp.async copies into padded rows:
    outputs bit-identical all three ways, for contiguous and strided queries, with empty and ragged sequences (split
    partials and the combine); _last_q_tma() / _last_kv_tma() say which ran. Where it does not serve (an M tile across
    tokens: S > 1 and H not a multiple of M; R = 256) the copies stay cp.async."""
    if not IS_SM90:
        pytest.skip("the TMA copies need compute capability 9.0")
    serves = _mma_tma_serves(S, H, 512)
    seed = _seed("mma-tma", H, S)
    dtype = torch.float16 if H == 40 else torch.bfloat16
    queries, cache = _query_layouts_case(S, H, dtype, seed)
    for q in queries:
        got = {}
        for tma_q, tma_kv in ((0, 0), (1, 0), (1, 1)):
            with ops.kernel_settings(wgmma_mode=MODES["mma"], tma_q=tma_q, tma_kv=tma_kv):
                got[tma_q, tma_kv] = run_kernel(*q, *cache)
                assert torch.ops.mla_patch._last_path() == MODES["mma"]
                ran = (torch.ops.mla_patch._last_q_tma(), torch.ops.mla_patch._last_kv_tma())
                want = (int(tma_q and serves), int(tma_q and tma_kv and serves))
                assert ran == want, f"H={H} S={S} tma_q={tma_q} tma_kv={tma_kv}: ran {ran}"
        ref = got[0, 0]
        for key, (out, lse) in got.items():
            assert torch.equal(out, ref[0]) and torch.equal(lse, ref[1]), f"H={H} S={S} {key} seed={seed}"
    with ops.kernel_settings(wgmma_mode=MODES["mma"], tma_q=1, tma_kv=1):  # R = 256: 64-byte rope rows, cp.async
        run_kernel(*make_case(1, 1, H, 256, 32, 300, [300], dtype, "packed", seed))
        assert (torch.ops.mla_patch._last_q_tma(), torch.ops.mla_patch._last_kv_tma()) == (0, 0)


@pytest.mark.parametrize("splits", [0, 1, 3, 7, 64])
@pytest.mark.parametrize("H, S, layout", [(128, 1, "packed"), (128, 2, "separate"), (64, 1, "separate"),
                                          (192, 1, "packed"), (16, 1, "packed"), (16, 3, "separate"),
                                          (40, 2, "separate")])
def test_v7_cache_tiles_by_tma_same_bits(H, S, layout, splits):
    """v7's cache tiles by TMA (TMAK) hold the same bytes where the products read them: TMA fills whole 64-row
    boxes (real rows, here NaN, past a split's end; zeros past the capacity) and the kernel zeroes a split's last
    tile past its end before PV, where cp.async zero-fills. So outputs are bit-identical either way, with ragged
    and empty sequences, left padding, tails of every split count (0: the heuristic) and NaN outside the ranges,
    with the query by TMA (H a multiple of 64) or by cp.async, padded query rows (S*H = 16, 48, 80), both orders
    (S*H <= 32: the late one); _last_kv_tma() says which ran."""
    _skip_unless_sm90("v7")
    seed = _seed("v7-tma-kv", H, S, layout, splits)
    dtype = torch.float16 if S == 2 else torch.bfloat16
    lens = [2000, 0, 777, 1, 64, 129]
    case = make_case(len(lens), S, H, 512, 64, 2100, lens, dtype, layout, seed)
    got = {}
    for tma_kv in (0, 1):
        with ops.kernel_settings(wgmma_mode=MODES["v7"], plan_mode=0, tma_kv=tma_kv, force_splits=splits):
            got[tma_kv] = run_kernel(*case)
            ran = torch.ops.mla_patch._last_kv_tma()
            assert ran == tma_kv, f"H={H} S={S}: cache tiles by TMA {tma_kv} not honoured"
    tag = f"H={H} S={S} {layout} splits={splits} seed={seed}"
    assert not torch.isnan(got[1][0]).any(), tag
    assert torch.equal(got[0][0], got[1][0]) and torch.equal(got[0][1], got[1][1]), tag
    with ops.kernel_settings(wgmma_mode=MODES["v7"], plan_mode=0, tma_kv=1, force_splits=splits):
        check_case(case, f"v7tmakv {tag}")  # and against the float64 reference


def test_v7_cache_tiles_by_tma_only_where_they_can_be():
    """The TMA cache tiles are the default where they serve (R = 512, both orders), and the switch leaves alone what
    they do not: R = 256 (a 64-byte rope row), the balanced grid."""
    _skip_unless_sm90("v7")
    seed = _seed("v7-tma-kv-not")
    with ops.kernel_settings(wgmma_mode=MODES["v7"]):
        for h in (16, 40):
            run_kernel(*make_case(1, 1, h, 512, 64, 300, [300], torch.bfloat16, "packed", seed))
            assert torch.ops.mla_patch._last_kv_tma() == 1, h
    with ops.kernel_settings(wgmma_mode=MODES["v7"], tma_kv=1):
        for h in (16, 128):
            run_kernel(*make_case(1, 1, h, 256, 32, 300, [300], torch.bfloat16, "packed", seed))
            assert torch.ops.mla_patch._last_kv_tma() == 0, h
        with ops.kernel_settings(plan_mode=1):
            run_kernel(*make_case(2, 1, 128, 512, 64, 300, [300, 5], torch.bfloat16, "packed", seed))
            assert torch.ops.mla_patch._last_plan() == 1 and torch.ops.mla_patch._last_kv_tma() == 0


@pytest.mark.parametrize(
    "H, S, B, T, dtype, f32",
    [(128, 1, 300, 600, torch.bfloat16, 0), (128, 2, 64, 2000, torch.float16, 0), (16, 1, 1000, 300, torch.bfloat16, 0),
     (40, 1, 200, 900, torch.float16, 1), (128, 1, 150, 700, torch.bfloat16, 1)],
)
def test_v7_plan_many_items(H, S, B, T, dtype, f32):
    """v7's balanced grid where each CTA walks many items (short ragged sequences, empty ones among them): items cut
    at both ends of a share, several pieces merged, the mbarrier parities carried from item to item, bf16/fp16 and
    fp32 partials; against float64."""
    _skip_unless_sm90("v7")
    seed = _seed("v7-plan", H, S, B, T, str(dtype), f32)
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, T + 1, (B,), generator=g).tolist()
    lens[0], lens[1], lens[-1] = 0, 1, T
    tag = f"plan H={H} S={S} B={B} T={T} {dtype} f32={f32} seed={seed}"
    inputs = make_case(B, S, H, 512, 64, T, lens, dtype, "packed", seed)
    with ops.kernel_settings(wgmma_mode=MODES["v7"], plan_mode=1, fp32_partials=f32):
        check_case(inputs, tag)
        assert torch.ops.mla_patch._last_plan() == 1, tag


def test_v7_plan_serves_below_1024_sequences():
    """The balanced grid computes its offsets per CTA for fewer than 1024 sequences; from 1024 the regular grid runs
    (and is right)."""
    _skip_unless_sm90("v7")
    for B, want in ((1023, 1), (1024, 0)):
        seed = _seed("v7-plan-max", B)
        inputs = make_case(B, 1, 16, 512, 64, 64, [64] * (B - 1) + [3], torch.bfloat16, "packed", seed)
        with ops.kernel_settings(wgmma_mode=MODES["v7"], plan_mode=1):
            check_case(inputs, f"plan B={B} seed={seed}")
            assert torch.ops.mla_patch._last_plan() == want, f"B={B}"


@pytest.mark.parametrize("splits", [1, 5, 64])
def test_v8_same_bits_as_v7(splits):
    """The pair kernel runs v7's arithmetic in v7's order on the same tiles (TMA instead of cp.async, rows past a
    split's end zeroed in shared memory instead of zero-filled), so at one split count its outputs are v7's bits:
    batch 1 at 128 heads, and a ragged batch of two new tokens (four query tiles, two clusters) in fp16."""
    _skip_unless_sm90("v8")
    cases = [
        make_case(1, 1, 128, 512, 64, 9000, [8999], torch.bfloat16, "packed", _seed("v8-bits", splits)),
        make_case(3, 2, 128, 512, 64, 3000, [3000, 65, 1711], torch.float16, "separate", _seed("v8-bits", splits, 1)),
    ]
    for inputs in cases:
        with ops.kernel_settings(wgmma_mode=MODES["v7"], force_splits=splits):
            want = run_kernel(*inputs)
            assert torch.ops.mla_patch._last_path() == MODES["v7"]
        with ops.kernel_settings(wgmma_mode=MODES["v8"], force_splits=splits):
            got = run_kernel(*inputs)
            assert torch.ops.mla_patch._last_path() == MODES["v8"]
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ---- The narrow kernel (v9, mode 3): its own shapes (R = 512, S*H <= 16: one 16-row query tile, the heads as
# wgmma's N), each against float64 with NaN outside the ranges; elsewhere mode 3 runs v7.
@pytest.mark.parametrize("layout", ["packed", "separate"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("H, S", [(16, 1), (1, 1), (4, 1), (8, 2), (5, 3), (2, 8), (13, 1)])
def test_v9_narrow_sweep(H, S, dtype, layout):
    """Ragged lengths (1, 0, 33, random, the full capacity) at every head count and token count the narrow kernel
    serves: padded query columns (S*H < 16), causal new tokens, fp16 and bf16, packed and separate caches."""
    seed = _seed("v9-sweep", H, S, str(dtype), layout)
    g = torch.Generator().manual_seed(seed)
    T = int(torch.randint(200, 1500, (1,), generator=g).item())
    lens = [1, 0, 33, int(torch.randint(2, T, (1,), generator=g).item()), T]
    tag = f"H={H} S={S} {dtype} {layout} T={T} lens={lens} seed={seed}"
    _check_path("v9", make_case(len(lens), S, H, 512, 64, T, lens, dtype, layout, seed), tag)


@pytest.mark.parametrize("layout", ["packed", "separate"])
def test_v9_tile_edges_and_batch_one(layout):
    """Lengths around the 64-row tiles, pairs of tiles (a warpgroup with no tile) and split boundaries; batch 1 at a
    few lengths (many splits, the combine); short sequences in a long buffer (empty splits)."""
    seed = _seed("v9-edges", layout)
    lens = TILE_EDGE_LENS
    _check_path("v9", make_case(len(lens), 1, 16, 512, 64, 4096, lens, torch.bfloat16, layout, seed),
                f"edges {layout} lens={lens} seed={seed}")
    for L in (1, 64, 65, 128, 129, 1000, 4096):
        seed = _seed("v9-b1", layout, L)
        _check_path("v9", make_case(1, 1, 16, 512, 64, 4096, [L], torch.bfloat16, layout, seed),
                    f"B=1 L={L} seed={seed}")
    seed = _seed("v9-sparse", layout)
    _check_path("v9", make_case(4, 2, 8, 512, 64, 32768, [5, 100, 0, 37], torch.bfloat16, layout, seed),
                f"sparse seed={seed}")


def test_v9_strided_queries():
    """Queries as views of one [B, S, H, R+P] buffer (strides, not contiguity) through the narrow kernel."""
    seed = _seed("v9-strided")
    _check_path("v9", strided_case(2, 8, seed), f"strided seed={seed}")


@pytest.mark.parametrize("fp32_partials", [0, 1], ids=["dtype_partials", "fp32_partials"])
@pytest.mark.parametrize("splits", [1, 2, 3, 7, 64, 128])
def test_v9_forced_splits(splits, fp32_partials):
    """Any split-KV factor with partials in the input dtype or fp32: uneven chunks, empty splits, one split."""
    with ops.kernel_settings(force_splits=splits, fp32_partials=fp32_partials):
        seed = _seed("v9-splits", splits)
        lens = [4000, 1, 777]
        _check_path("v9", make_case(3, 1, 16, 512, 64, 4096, lens, torch.bfloat16, "packed", seed),
                    f"splits={splits} lens={lens} seed={seed}")
        seed += 1
        _check_path("v9", make_case(1, 2, 8, 512, 64, 3000, [2999], torch.float16, "separate", seed),
                    f"B=1 S=2 H=8 fp16 splits={splits} seed={seed}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_v9_growing_scores(dtype):
    """Scores that grow along the cache: each warpgroup's running max jumps many times, and the two maxima differ
    when they merge."""
    seed = _seed("v9-growing", str(dtype))
    inputs = growing_case(1, 16, dtype, seed)
    _check_path("v9", inputs, f"growing {dtype} seed={seed}")


@pytest.mark.parametrize("splits", [1, 8])
def test_v9_fp16_at_range_edge(splits):
    """test_paths_fp16_at_range_edge through the narrow kernel (16 heads)."""
    test_paths_fp16_at_range_edge("v9", splits)


@pytest.mark.slow
def test_v9_long_context():
    """128K tokens at batch 1 and a ragged batch of long sequences."""
    seed = _seed("v9-long")
    T = 131072
    _check_path("v9", make_case(1, 1, 16, 512, 64, T, [T], torch.bfloat16, "packed", seed), f"long B=1 seed={seed}")
    lens = [T - 17, 65537, 1]
    _check_path("v9", make_case(3, 1, 16, 512, 64, T, lens, torch.bfloat16, "separate", seed + 1),
                f"long B=3 lens={lens} seed={seed + 1}")


def test_v9_only_where_it_serves():
    """Mode 3 runs v7 where the narrow kernel does not serve (more than 16 query rows, R = 256), right either way;
    its outputs with PDL off and in a CUDA graph are the same bits."""
    _skip_unless_sm90("v9")
    for H, S, R, P in ((40, 1, 512, 64), (16, 2, 512, 64), (16, 1, 256, 32)):
        seed = _seed("v9-not", H, S, R)
        _check_path("v9", make_case(2, S, H, R, P, 700, [700, 3], torch.bfloat16, "packed", seed),
                    f"H={H} S={S} R={R}")
    _pdl_off_same_bits_and_graph("v9", heads=16)


@pytest.mark.parametrize("narrow", [-1, 0])
def test_v9_default_dispatch(narrow):
    """The default dispatch runs the narrow kernel where it serves from 128K cached rows a call (B x capacity) and
    mma.sync below; with its switch off (_narrow_mode(0), MLA_PATCH_NARROW=0) v7's thresholds apply (S*H < 64 at
    R = 512: mma.sync below 128K rows too, v7 from there). More than 16 query rows never take it."""
    _skip_unless_sm90("v9")
    above = MODES["v9"] if narrow == -1 else MODES["v7"]
    # (B, S, H, T): the kernel the default dispatch runs
    cases = [((4, 1, 16, 16384), MODES["mma"]), ((1, 1, 16, 4096), MODES["mma"]), ((4, 2, 8, 8192), MODES["mma"]),
             ((2, 2, 16, 8192), MODES["mma"]), ((1, 1, 16, 131072), above), ((8, 2, 8, 16384), above)]
    for (B, S, H, T), want in cases:
        seed = _seed("v9-default", B, S, H, T, narrow)
        tag = f"default narrow={narrow} B={B} S={S} H={H} T={T} seed={seed}"
        inputs = make_case(B, S, H, 512, 64, T, [T - 3 * b for b in range(B)], torch.bfloat16, "packed", seed)
        with ops.kernel_settings(narrow_mode=narrow):
            check_case(inputs, tag)
            assert torch.ops.mla_patch._last_path() == want, f"{tag}: kernel {torch.ops.mla_patch._last_path()}"


def test_dispatch_through_ops():
    """mla_patch.ops.mla_decode with backend='kernel' reaches the kernel and agrees with it."""
    inputs = make_case(2, 1, 16, 512, 64, 300, [300, 77], torch.bfloat16, "packed", _seed("ops"))
    out, lse = ops.mla_decode(*inputs, SM_SCALE, backend="kernel")
    out2, lse2 = run_kernel(*inputs)
    torch.testing.assert_close(out, out2, rtol=0, atol=0)
    torch.testing.assert_close(lse, lse2, rtol=0, atol=0)


def test_cuda_graph_capture():
    """The op captures into a CUDA graph (no syncs, allocator-only memory) and replays on new data."""
    inputs = make_case(4, 1, 128, 512, 64, 2048, [2048, 1, 900, 0], torch.bfloat16, "packed", _seed("graph"))
    q_latent, q_pe, c_kv, k_pe, kv_start, kv_end = inputs
    op = torch.ops.mla_patch.mla_decode
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        op(*inputs, SM_SCALE)  # warm-up outside capture (sets the kernel's shared-memory attribute)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = op(*inputs, SM_SCALE)
    fresh = make_case(4, 1, 128, 512, 64, 2048, [17, 2048, 0, 1500], torch.bfloat16, "packed", _seed("graph2"))
    for dst, src in zip(inputs, fresh):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    want, want_lse = op(*fresh, SM_SCALE)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)


def test_torch_compile_fullgraph():
    inputs = make_case(2, 2, 16, 256, 32, 500, [500, 31], torch.float16, "separate", _seed("compile"))

    def f(q_latent, q_pe, c_kv, k_pe, kv_start, kv_end):
        out, lse = torch.ops.mla_patch.mla_decode(q_latent, q_pe, c_kv, k_pe, kv_start, kv_end, SM_SCALE)
        return out * 2, lse

    compiled = torch.compile(f, fullgraph=True)
    out, lse = compiled(*inputs)
    want, want_lse = f(*inputs)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)


def _good():
    return make_case(2, 1, 16, 512, 64, 64, [64, 10], torch.bfloat16, "packed", 7)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: (a[0].float(), *a[1:]), "q_latent must be bfloat16 or float16"),
        (lambda a: (a[0], a[1].half(), *a[2:]), "share one dtype"),
        (lambda a: (a[0].cpu(), *a[1:]), "q_latent must be a CUDA tensor"),
        (lambda a: (a[0], a[1], a[2].contiguous()[:, :, :256], *a[3:]), "c_kv must be"),
        (lambda a: (a[0][..., :256].contiguous(), a[1], a[2][..., :256], *a[3:]), r"\(kv_lora_rank, rope\)"),
        (lambda a: (*a[:4], a[4].long(), a[5]), "kv_start must be int32"),
        (lambda a: (*a[:5], a[5][:1]), "kv_end must have shape"),
        (lambda a: (a[0], a[1], a[2], a[3][:, :10], *a[4:]), "k_pe must be"),
        (lambda a: (a[0], a[1][:, :, :, :32], *a[2:]), r"\(kv_lora_rank, rope\)|k_pe must be"),
        (lambda a: (a[0].transpose(-1, -2).contiguous().transpose(-1, -2), *a[1:]), "contiguous in its last dim|must have"),
        (lambda a: (*a[:2], torch.empty(2 * 64 * 512 + 1, dtype=torch.bfloat16, device=DEV)[1:].view(2, 64, 512), *a[3:]), "16-byte aligned"),
    ],
    ids=["float32", "mixed-dtype", "cpu", "c_kv-R", "dims", "int64-lens", "lens-shape", "k_pe-T", "q_pe-P", "last-dim-stride", "misaligned"],
)
def test_bad_inputs_raise(mutate, match):
    args = mutate(_good())
    with pytest.raises(RuntimeError, match=match):
        torch.ops.mla_patch.mla_decode(*args, SM_SCALE)
    torch.cuda.synchronize()  # and the context is still healthy


def test_bad_lengths_never_read_out_of_range():
    """kv_start < 0 or kv_end > T are clamped on the GPU: no illegal access, rows in range only."""
    q_latent, q_pe, c_kv, k_pe, _, _ = make_case(2, 1, 16, 512, 64, 96, [96, 96], torch.bfloat16, "packed", 11)
    kv_start = torch.tensor([-5, 50], dtype=torch.int32, device=DEV)
    kv_end = torch.tensor([10**6, 40], dtype=torch.int32, device=DEV)
    out, lse = run_kernel(q_latent, q_pe, c_kv, k_pe, kv_start, kv_end)
    ref, ref_lse = mla_decode_ref(
        q_latent.double(), q_pe.double(), c_kv.double(), k_pe.double(),
        kv_start.clamp(0, 96), kv_end.clamp(0, 96), SM_SCALE,
    )
    assert _rel(out, ref) < 1e-2 and math.isinf(lse[1].max().item())


@pytest.mark.parametrize("fp32_partials", [0, 1], ids=["dtype_partials", "fp32_partials"])
@pytest.mark.parametrize("splits", [1, 2, 3, 4, 7, 8, 12, 64, 128])
@pytest.mark.parametrize("path", PATHS)
def test_paths_forced_splits(path, splits, fp32_partials):
    """Any split-KV factor (the benchmark's sweep hook), split partials in the input dtype (the default) or
    fp32: the combine with empty splits (a 1-row sequence cut 128 ways), uneven chunks, one split (no
    combine); batch 1 with two tokens, 40 heads, R = 256, fp16 (few combine rows: the column-chunked combine);
    135 rows of R = 256 (several rows a combine block, the last one partly empty)."""
    with ops.kernel_settings(force_splits=splits, fp32_partials=fp32_partials):
        seed = _seed("paths-splits", splits)
        lens = [4000, 1, 777]
        inputs = make_case(3, 1, 128, 512, 64, 4096, lens, torch.bfloat16, "packed", seed)
        _check_path(path, inputs, f"splits={splits} lens={lens} seed={seed}")
        seed += 1
        inputs = make_case(1, 2, 40, 256, 32, 3000, [2999], torch.float16, "separate", seed)
        _check_path(path, inputs, f"B=1 S=2 H=40 R=256 fp16 splits={splits} seed={seed}")
        seed += 1  # 135 rows: the combine's last block (2 or 4 rows a block) is partly empty
        inputs = make_case(3, 1, 45, 256, 32, 700, [700, 3, 555], torch.bfloat16, "packed", seed)
        _check_path(path, inputs, f"B=3 H=45 R=256 splits={splits} seed={seed}")


def _fp16_score_rounding_up():
    """An fp16 score x (with a unit query and sm_scale 1) whose probability 2^(x log2 e) against a running max
    of 0 is rounded up by fp16 by at least 4e-4 relative: found by search, as the kernel computes it in fp32."""
    xs = torch.linspace(-4.0, -0.05, 200001).half().unique().float()
    p = torch.exp2(xs * 1.4426950408889634)
    up = p.half().float() / p - 1
    best = int(up.argmax())
    assert up[best] > 4e-4, up.max()
    return xs[best].item()


@pytest.mark.parametrize("splits", [1, 8])
@pytest.mark.parametrize("path", PATHS)
def test_paths_fp16_at_range_edge(path, splits):
    """fp16 where the cache holds the largest finite fp16 value, 65504. P is rounded to fp16 for the tensor
    cores and its row sum is not, so a row (output or split partial) can come out a hair above 65504, which
    fp16 rounds to inf unless clamped. Scores are set so that it does: the first row of every 32 rows scores
    0 (the running max), every other row x, whose probability fp16 rounds up by >= 4e-4 (inf from 2.4e-4)."""
    seed = _seed("fp16-edge", splits)
    x = _fp16_score_rounding_up()
    q_latent, q_pe, c_kv, k_pe, kv_start, kv_end = make_case(2, 1, 16, 512, 64, 2048, [2048, 1500], torch.float16,
                                                             "packed", seed)
    visible = ~torch.isnan(k_pe[..., :1])
    q_latent.zero_()
    q_pe.zero_()
    q_pe[..., 0] = 1.0
    # Tiles (32 rows for mma.sync, 64 for v7) start at kv_start.
    rows = torch.arange(k_pe.shape[1], device=DEV)[None, :, None] - kv_start[:, None, None]
    k_pe.copy_(torch.where(visible, torch.zeros_like(k_pe), k_pe))
    k_pe[..., :1] = torch.where(visible & (rows % 32 != 0), torch.full_like(k_pe[..., :1], x), k_pe[..., :1])
    c_kv[..., :8] = torch.where(visible, torch.full_like(c_kv[..., :8], 65504.0), c_kv[..., :8])
    for fp32_partials in (0, 1):
        with ops.kernel_settings(force_splits=splits, fp32_partials=fp32_partials):
            _check_path(path, (q_latent, q_pe, c_kv, k_pe, kv_start, kv_end),
                        f"fp16 range edge splits={splits} fp32_partials={fp32_partials} seed={seed}", sm_scale=1.0)


@pytest.mark.parametrize("path", PATHS)
def test_paths_pdl_off_same_bits_and_graph(path):
    """Programmatic dependent launch changes scheduling only: with it off the outputs are bit-identical, and
    a CUDA graph of back-to-back calls (main kernel, combine, next main kernel) replays to the same bits."""
    _pdl_off_same_bits_and_graph(path, heads=128)


def _pdl_off_same_bits_and_graph(path, heads):
    _skip_unless_sm90(path)
    op = torch.ops.mla_patch
    sets = [make_case(1, 1, heads, 512, 64, 8192, [8192 - 5 * i], torch.bfloat16, "packed", _seed("pdl", i))
            for i in range(3)]
    with ops.kernel_settings(**_path_settings(path)):
        want = [run_kernel(*s) for s in sets]
        assert op._last_path() == _expected_kernel(path, sets[0][0])
        with ops.kernel_settings(pdl_mode=0):
            off = [run_kernel(*s) for s in sets]
        for (o1, l1), (o0, l0) in zip(want, off):
            assert torch.equal(o1, o0) and torch.equal(l1, l0)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for s in sets:
                op.mla_decode(*s, SM_SCALE)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = [op.mla_decode(*s, SM_SCALE) for s in sets]
        for o, _ in outs:
            o.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        for (o, l), (ow, lw) in zip(outs, want):
            assert torch.equal(o, ow) and torch.equal(l, lw)


@pytest.mark.parametrize("path", PATHS)
def test_paths_timeline_stamps(path):
    """The profiling hook (scripts/kernel_timeline.py): outputs bit-identical with it on; one stamped row per
    CTA of the decode grid and per combine block, with the block index and tiles the split arithmetic gives,
    stamps in phase order within a CTA and the combine's after every decode CTA's exit; bad buffers raise."""
    _skip_unless_sm90(path)
    op = torch.ops.mla_patch
    H, L = 128, 5000
    case = make_case(1, 1, H, 512, 64, L, [L], torch.bfloat16, "packed", _seed("timeline", path))
    # TimelineSlot (csrc/mla_decode.cuh): entry, waited, lengths, first, loop_end, exit; v7 has q, first, loop_end
    # and exit only in a build with MLA_PATCH_TIMELINE_PHASES=1 (all of them or none).
    order = [1, 2, 3, 5, 6, 8]
    with ops.kernel_settings(**_path_settings(path, force_splits=6)):
        want = run_kernel(*case)
        stamps = torch.zeros(2, 64, 32, dtype=torch.int64, device=DEV)
        op._timeline(stamps)
        try:
            got = run_kernel(*case)
        finally:
            op._timeline(None)
        after = run_kernel(*case)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and torch.equal(after[0], want[0])
    # Query rows a CTA, cache rows a split is rounded to, cache rows a tile.
    m_tile, n_split, tile = (64, 128, 64) if path in WGMMA_PATHS else (32, 32, 32)
    x_tiles = H // m_tile

    def ceil_div(a, b):
        return -(-a // b)

    per = ceil_div(ceil_div(L, 6), n_split) * n_split
    decode = stamps[0].cpu()
    if path in WGMMA_PATHS:
        phases = decode[0, [2 * s + 2 for s in (4, 5, 6, 7, 8)]] != 0
        assert phases.all() or not phases.any(), f"v7 phase stamps partly written: {phases.tolist()}"
        order = [1, 2, 3, 4, 5, 6, 8] if phases.all() else [1, 2, 3]
    ran = decode[:, 4] != 0
    assert ran.sum().item() == x_tiles * 6 and not ran[x_tiles * 6:].any()
    for blk in range(x_tiles * 6):
        row = decode[blk].tolist()
        x, y = blk % x_tiles, blk // x_tiles
        assert row[1] == x | (y << 20), f"block {blk}: index word {row[1]:#x}"
        rows = max(0, min(L, (y + 1) * per) - min(L, y * per))
        assert row[2] == ceil_div(rows, tile), f"block {blk}: {row[2]} tiles for {rows} rows"
        ns = [row[2 * s + 2] for s in order]
        clk = [row[2 * s + 3] for s in order]
        assert all(v > 0 for v in ns) and ns == sorted(ns) and clk == sorted(clk), f"block {blk}: {ns} {clk}"
    combine = stamps[1].cpu()
    used = combine[:, 4] != 0
    assert used.any()
    last_exit = decode[ran][:, 2 * order[-1] + 2].max()
    assert (combine[used][:, 2 * 2 + 2] >= last_exit).all(), "a combine block passed pdl_wait before the decode grid ended"
    for bad in (torch.zeros(2, 8, 31, dtype=torch.int64, device=DEV), torch.zeros(2, 8, 32, dtype=torch.int32, device=DEV),
                torch.zeros(2, 8, 32, dtype=torch.int64)):
        with pytest.raises(RuntimeError, match="_timeline takes"):
            op._timeline(bad)
