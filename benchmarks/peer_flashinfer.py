"""FlashInfer's MLA decode (flashinfer.mla.BatchMLAPagedAttentionWrapper, backends fa3 / fa2) run on
exactly mla_patch's inputs: the peer that benchmarks/bench_kernel.py times on the same GPU and input sets.

Mapping (no copy): our packed cache buffer [B, L, 576] is viewed as FlashInfer pages
[B * L / page_size, page_size, 576]; c_kv = [..., :512] and k_pe = [..., 512:] stay views of it
(FlashInfer's split KV input takes strided views), sequence b owns pages b * L / page_size onward.
page_size = 64 (FlashInfer's KV tile) when L is a multiple of 64, else 1. Queries [B, 1, H, *] are viewed
as [B, H, *] (one query token per sequence, qo_indptr = 0..B). One plan (host scheduling, metadata
upload) is made per (lengths, H, L, backend) outside timing; the wrapper is built with use_cuda_graph=True
and reserved metadata buffers, so a bound call is capturable in a CUDA graph and the plan can serve every
input set of the same shape (bench_kernel.py times one graph over all sets).

The wheels and the ahead-of-time compiled sm_90a modules come from dev/fetch_flashinfer.sh.
`python benchmarks/peer_flashinfer.py` says whether flashinfer imports and where its MLA modules come from.
"""

from __future__ import annotations

import math
import os
import sys

import torch

if __name__ == "__main__":  # run as a file, sys.path[0] is this folder: import from the repo root instead
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from benchmarks.decode_inputs import SCALE, P, R, make_set
from benchmarks.timing import graph_us

WORKSPACE_BYTES = 128 * 2**20   # FlashInfer's usual float workspace (split-KV partial outputs)
BACKENDS = ("fa3", "fa2")       # fa3: the Hopper (sm_90a) kernel; fa2: the portable one


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def load():
    """The flashinfer module, or a string saying why it is not usable."""
    try:
        import flashinfer
        from flashinfer.mla import BatchMLAPagedAttentionWrapper  # noqa: F401
    except Exception as err:  # noqa: BLE001
        return f"not importable ({type(err).__name__}: {err})"
    return flashinfer


def module_source(fi, backend: str, dtype=torch.bfloat16) -> str:
    """'aot' when flashinfer will load a prebuilt module for this backend (no nvcc), 'jit' when it
    would compile it on first plan (with nvcc, into its JIT cache), '?' when this version does not say."""
    try:
        from flashinfer.jit import env as jit_env
        from flashinfer.jit.attention import get_batch_mla_uri

        uri = get_batch_mla_uri(backend, dtype, dtype, dtype, torch.int32, R, P, False)
        return "aot" if jit_env.get_aot_artifacts(uri) else "jit"
    except Exception:  # noqa: BLE001
        return "?"


def describe(fi) -> str:
    if isinstance(fi, str):
        return fi
    where = os.path.dirname(getattr(fi, "__file__", "?") or "?")
    mods = ", ".join(f"{b} {module_source(fi, b)}" for b in BACKENDS)
    jit = " (JIT disabled)" if os.environ.get("FLASHINFER_DISABLE_JIT") else ""
    dl = "" if hasattr(torch.Tensor, "__dlpack_c_exchange_api__") else (
        "; torch lacks __dlpack_c_exchange_api__: tvm-ffi may JIT its torch addon and use the default stream")
    return f"flashinfer {getattr(fi, '__version__', '?')} at {where}; MLA modules: {mods}{jit}{dl}"


class FlashInferMLA:
    """One FlashInfer MLA decode plan for B sequences of kv_len[b] rows (rows 0..kv_len[b]-1 of a
    cache with `capacity` rows per sequence), H heads. bind() gives the callable for one input set."""

    def __init__(self, fi, kv_len: torch.Tensor, num_heads: int, capacity: int, sm_scale: float,
                 backend: str = "fa3", page_size: int | None = None, dtype=torch.bfloat16):
        device = kv_len.device
        lens = [int(x) for x in kv_len.tolist()]
        if page_size is None:
            page_size = 64 if capacity % 64 == 0 else 1
        if capacity % page_size or min(lens) < 1 or max(lens) > capacity:
            raise ValueError(f"bad cache shape: capacity {capacity}, page_size {page_size}, lengths {min(lens)}..{max(lens)}")
        B, per_seq = len(lens), capacity // page_size
        i32 = dict(dtype=torch.int32, device=device)
        n_pages = [math.ceil(n / page_size) for n in lens]
        qo_indptr = torch.arange(B + 1, **i32)
        kv_indptr = torch.tensor([0] + n_pages, **i32).cumsum(0, dtype=torch.int32)
        kv_indices = torch.cat([torch.arange(b * per_seq, b * per_seq + n, **i32) for b, n in enumerate(n_pages)])
        kv_len_arr = torch.tensor(lens, **i32)
        self.B, self.H, self.capacity, self.page_size, self.backend = B, num_heads, capacity, page_size, backend
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        # Reserved metadata buffers (CUDA-graph mode): plan() copies the metadata into them.
        self._bufs = [t.clone() for t in (qo_indptr, kv_indptr, kv_indices, kv_len_arr)]
        mla = fi.mla
        self.wrapper = mla.BatchMLAPagedAttentionWrapper(
            self.workspace, use_cuda_graph=True, qo_indptr=self._bufs[0], kv_indptr=self._bufs[1],
            kv_indices=self._bufs[2], kv_len_arr=self._bufs[3], backend=backend)
        common = dict(num_heads=num_heads, head_dim_ckv=R, head_dim_kpe=P, page_size=page_size, causal=False,
                      sm_scale=sm_scale, q_data_type=dtype, kv_data_type=dtype)
        self._structural = hasattr(mla, "MLAPlanMetadata")  # flashinfer >= 0.6: metadata object, query=/kv_cache=
        if self._structural:
            meta = mla.MLAPlanMetadata.csr(qo_indptr, kv_indptr, kv_indices, kv_len_arr)
            self.wrapper.plan(metadata=meta, query_layout="split", kv_cache_layout="split", **common)
        else:
            self.wrapper.plan(qo_indptr, kv_indptr, kv_indices, kv_len_arr, *common.values())
        _sync()

    def bind(self, q_latent, q_pe, c_kv, k_pe):
        """Callable running one decode on this input set; returns out [B, 1, H, 512] (a fixed buffer)."""
        B, S, H, _ = q_latent.shape
        if (B, H) != (self.B, self.H) or S != 1 or c_kv.shape[:2] != (B, self.capacity):
            raise ValueError(f"inputs {tuple(q_latent.shape)} / cache {tuple(c_kv.shape)} do not match the plan "
                             f"(B={self.B}, S=1, H={self.H}, capacity={self.capacity})")
        qn, qp = q_latent.view(B, H, R), q_pe.view(B, H, P)
        pages = B * self.capacity // self.page_size
        try:
            ckv = c_kv.view(pages, self.page_size, R)
            kpe = k_pe.view(pages, self.page_size, P)
        except RuntimeError:  # not viewable as pages: one copy, here, outside any timing
            ckv = c_kv.reshape(pages, self.page_size, R).contiguous()
            kpe = k_pe.reshape(pages, self.page_size, P).contiguous()
        out = torch.empty(B, H, R, dtype=q_latent.dtype, device=q_latent.device)
        run, out4 = self.wrapper.run, out.view(B, 1, H, R)
        if self._structural:
            def fn():
                run(query=(qn, qp), kv_cache=(ckv, kpe), out=out)
                return out4
        else:
            def fn():
                run(qn, qp, ckv, kpe, out=out)
                return out4
        return fn


def make_decode(q_latent, q_pe, ckv, kpe, kv_len, sm_scale, backend="fa3", fi=None):
    """Plan once (outside timing) and return a callable running FlashInfer's MLA decode on these inputs
    (q_latent [B,1,H,512], q_pe [B,1,H,64], ckv [B,L,512], kpe [B,L,64] bf16, kv_len [B] int32 or int:
    rows 0..kv_len-1 are attended); the callable returns out [B,1,H,512] and is CUDA-graph capturable."""
    fi = load() if fi is None else fi
    if isinstance(fi, str):
        raise RuntimeError(f"flashinfer {fi}")
    B, _, H, _ = q_latent.shape
    if not torch.is_tensor(kv_len):
        kv_len = torch.full((B,), int(kv_len), dtype=torch.int32, device=q_latent.device)
    plan = FlashInferMLA(fi, kv_len, H, ckv.shape[1], sm_scale, backend, dtype=q_latent.dtype)
    return plan.bind(q_latent, q_pe, ckv, kpe)


def check(fn, q_latent, q_pe, ckv, kpe, kv_start, kv_end, sm_scale, max_seqs=8) -> float:
    """Relative error (Frobenius) of fn()'s output against the float64 reference
    (mla_patch.reference.mla_decode_ref, same arguments as our op), on up to max_seqs sequences spread
    over the batch (first and last included) to bound the reference's memory."""
    from mla_patch.reference import mla_decode_ref

    if bool((kv_start != 0).any()):
        raise ValueError("the FlashInfer mapping assumes kv_start == 0")
    got = fn().double()
    _sync()
    B = q_latent.shape[0]
    idx = torch.linspace(0, B - 1, min(B, max_seqs), device=q_latent.device).round().long().unique()
    d = lambda t: t.index_select(0, idx).double()
    want, _ = mla_decode_ref(d(q_latent), d(q_pe), d(ckv), d(kpe), kv_start[idx], kv_end[idx], sm_scale)
    got = got.index_select(0, idx)
    return ((got - want).norm() / want.norm()).item()


def bench_row(fi, sets, sm_scale, copy_gbs, cache_bytes, backends=BACKENDS) -> dict:
    """Times FlashInfer on bench_kernel.py's `sets` (tuples q_latent, q_pe, c_kv, k_pe, kv_start, kv_end)
    as bench_kernel.py times the op (timing.graph_us), and checks the first set against the reference.
    Per backend b: fi_<b>_us, fi_<b>_pct_copy, fi_<b>_rel_err, fi_<b>_page_size, fi_<b>_modules (aot/jit), or
    fi_<b>_error; the first backend that ran also as fi_us, fi_pct_copy, fi_rel_err, fi_backend. Never raises."""
    row = {}
    for b in [b for b in backends if b]:
        plan = fns = None
        try:
            first = sets[0]
            H, L = first[0].shape[2], first[2].shape[1]
            row[f"fi_{b}_modules"] = module_source(fi, b, first[0].dtype)
            plan = FlashInferMLA(fi, first[5], H, L, sm_scale, b, dtype=first[0].dtype)
            row[f"fi_{b}_page_size"] = plan.page_size
            fns = [plan.bind(*s[:4]) for s in sets]
            try:
                row[f"fi_{b}_rel_err"] = check(fns[0], *first, sm_scale)
            except Exception as err:  # noqa: BLE001
                row[f"fi_{b}_check_error"] = f"{type(err).__name__}: {err}"[:300]
            us = graph_us(fns)
            row[f"fi_{b}_us"] = us
            row[f"fi_{b}_pct_copy"] = 100 * cache_bytes / (us * 1e-6) / 1e9 / copy_gbs
            if "fi_us" not in row:
                row.update(fi_backend=b, fi_us=us, fi_pct_copy=row[f"fi_{b}_pct_copy"])
                if f"fi_{b}_rel_err" in row:
                    row["fi_rel_err"] = row[f"fi_{b}_rel_err"]
        except Exception as err:  # noqa: BLE001
            row[f"fi_{b}_error"] = f"{type(err).__name__}: {err}"[:300]
        finally:
            del plan, fns
            _sync()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return row


def row_text(row, backends=BACKENDS) -> str:
    """The FlashInfer part of bench_kernel.py's per-row line."""
    parts = []
    for b in backends:
        if f"fi_{b}_us" in row:
            err = row.get(f"fi_{b}_rel_err")
            parts.append(f" | FI {b} {row[f'fi_{b}_us']:7.1f} us {row[f'fi_{b}_pct_copy']:5.1f}%"
                         + (f" (err {err:.1e})" if err is not None else " (err ?)"))
        elif f"fi_{b}_error" in row:
            parts.append(f" | FI {b} failed: {row[f'fi_{b}_error'][:120]}")
    return "".join(parts)


def table_backends(rows, backends=BACKENDS) -> list:
    return [b for b in backends if any(f"fi_{b}_us" in r for r in rows)]


def table_cell(row, b) -> str:
    return f"{row[f'fi_{b}_us']:.1f} ({row[f'fi_{b}_pct_copy']:.0f})" if f"fi_{b}_us" in row else "-"


def smoke(fi, H=128, B=4, L=4096) -> int:
    """--peer-only-check: one small config, every backend: reference check and a graph timing.
    Exit status 0 when fa3 (or, off sm_90, fa2) matches the reference within 1e-2."""
    print(f"# flashinfer: {describe(fi)}", flush=True)
    if isinstance(fi, str) or not torch.cuda.is_available():
        print("peer check FAIL (no flashinfer or no CUDA device)")
        return 1
    cap = torch.cuda.get_device_capability()
    print(f"# {torch.cuda.get_device_name()} sm_{cap[0]}{cap[1]}  torch {torch.__version__}  H={H} B={B} L={L}", flush=True)
    sets = [make_set(B, 1, H, L) for _ in range(4)]
    row = bench_row(fi, sets, SCALE, copy_gbs=1.0, cache_bytes=0)
    for b in BACKENDS:
        if f"fi_{b}_error" in row:
            print(f"{b}: FAILED {row[f'fi_{b}_error']}")
        else:
            print(f"{b}: {row.get(f'fi_{b}_us', float('nan')):.1f} us, rel err vs float64 reference "
                  f"{row.get(f'fi_{b}_rel_err', float('nan')):.2e}, page_size {row.get(f'fi_{b}_page_size')}, "
                  f"modules {row.get(f'fi_{b}_modules')}" + (f", check error {row[f'fi_{b}_check_error']}"
                                                           if f"fi_{b}_check_error" in row else ""))
    key = "fa3" if cap == (9, 0) else "fa2"
    err = row.get(f"fi_{key}_rel_err")
    ok = err is not None and err < 1e-2
    print(f"peer check {'PASS' if ok else 'FAIL'} ({key})")
    return 0 if ok else 1


if __name__ == "__main__":
    print(describe(load()))
