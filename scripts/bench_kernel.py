"""Benchmark the absorbed MLA decode kernel against the card's ceilings and the peers.

One run measures: copy bandwidth and bf16 matmul rate (bench_ceilings.measure), then for
H in {16, 128}, B in {1, 16, 64, 128}, L in {1K, 4K, 16K} (and B=1 at 64K), S=1, bf16, R=512, P=64,
packed cache layout, scale 1/sqrt(192):
  time  = median over CUDA-graph replays of one graph that calls the op once on each of n_sets
          fresh random input sets (n_sets so the working set is >= 4x the L2), divided by n_sets;
  bytes = B*L*(R+P)*2 (cache read once; queries and outputs not counted, as the peers count);
  FLOPs = 2*B*H*S*L*(R+P) + 2*B*H*S*L*R;
  % of the copy bandwidth measured in the same run.
The PyTorch reference op (mla_patch.reference) is timed on the same inputs (events, no graph).
Each row records the kernel the default dispatch ran, and times every other kernel on the same sets
(--kernels, forced through the test hook: v7 = the sm_90a seesaw kernel, v8 = its 2-CTA pair kernel where it
serves, v9 = the narrow kernel (heads as wgmma's N) where it serves, mma = the portable mma.sync kernel), each
checked against the mma.sync
kernel's output on the first set (relative error, so a fast wrong variant shows).
FlashInfer's MLA decode (--fi-backends, default fa3,fa2; scripts/peer_flashinfer.py) is timed on the same
sets with the same graph timing and checked once per cell against the float64 reference, when `flashinfer`
imports (not on the device image: carry the wheels and AOT modules of scripts/fetch_flashinfer.sh).
--peer-only-check runs only a small FlashInfer check (for a quick smoke on the GPU).
Each row also times the default dispatch with each --ab switch flipped (same sets, same run): `nopdl`
(programmatic dependent launch off, nopdl_us), `f32part` (fp32 split partials, f32part_us), `cpq` (the query
tile by cp.async instead of TMA, in v7 and the mma.sync kernel, cpq_us), `plan` / `noplan` (v7's balanced grid
wherever it serves / never), `tmakv` / `cpkv` (the cache tiles by TMA wherever they can be / by cp.async, v7 and
the mma.sync kernel), `nonarrow` (the default dispatch
without the narrow kernel, v9), and
--sweep-splits N,N,... times every kernel with those split-KV factors forced on the --sweep-batches
cells (the data behind the split heuristics in csrc/mla_params.h).
Writes bench_kernel.json and bench_kernel.png under --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_ceilings  # noqa: E402
import peer_flashinfer  # noqa: E402

from mla_patch import ops  # noqa: E402
from mla_patch.reference import mla_decode_ref  # noqa: E402

R, P = 512, 64
SCALE = 192**-0.5
# Best of FlashMLA and FlashInfer fa3 on this H100 (docs/BASELINES): B=1 in us, else % of copy bw.
PEERS = {
    16: {1: (11.0, 18.1, 29.5), 16: (38, 71, 92), 64: (70, 93, 100), 128: (90, 98, 100)},
    128: {1: (13.5, 18.5, 31.2), 16: (28, 54, 73), 64: (62, 77, 79), 128: (66, 79, 83)},
}
LS = (1024, 4096, 16384)


def make_set(B, S, H, L, dtype=torch.bfloat16, gen=None):
    q_latent = torch.randn(B, S, H, R, device="cuda", dtype=dtype, generator=gen)
    q_pe = torch.randn(B, S, H, P, device="cuda", dtype=dtype, generator=gen)
    buf = torch.randn(B, L, R + P, device="cuda", dtype=dtype, generator=gen)
    kv_start = torch.zeros(B, dtype=torch.int32, device="cuda")
    kv_end = torch.full((B,), L, dtype=torch.int32, device="cuda")
    return q_latent, q_pe, buf[..., :R], buf[..., R:], kv_start, kv_end


def time_graph(fn_sets, replays=20):
    """Median per-call microseconds of a graph calling fn on every set once."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fn_sets[:2]:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fn_sets:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / len(fn_sets))
    del graph
    times.sort()
    return times[len(times) // 2]


def time_events(fn, iters=3):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    times.sort()
    return times[len(times) // 2]


# torch.ops.mla_patch._last_path() values and the _wgmma_mode that forces each kernel.
KERNEL_NAMES = {0: "mma", 1: "v7", 2: "v8", 3: "v9"}
KERNEL_MODES = {name: mode for mode, name in KERNEL_NAMES.items()}
# Kernels (and A/B switches: "tmakv", "nonarrow") scripts/gpu_check.sh found broken in this run (smoke test or kernel
# tests): never timed.
SKIPPED_KERNELS = set(os.environ.get("MLA_PATCH_SKIP_KERNELS", "").split(","))


def kernel_runs_here(name):
    """mma.sync runs on every GPU; the sm_90a kernels only on compute capability 9.0."""
    if name in SKIPPED_KERNELS:
        return False
    return name == "mma" or torch.cuda.get_device_capability() == (9, 0)


def time_kernels(fns, first_set, default_path, wanted, copy_gbs, cache_bytes):
    """Times each kernel in `wanted` (comma list) other than the default one on the same sets; checks each
    against the mma.sync kernel's output on the first set. Returns {name_us, name_pct, name_err}."""
    op = torch.ops.mla_patch
    out = {}
    with ops.kernel_settings(wgmma_mode=0):
        want, _ = op.mla_decode(*first_set, SCALE)
    rel = lambda got: ((got.double() - want.double()).norm() / want.double().norm()).item()  # noqa: E731
    if default_path != "mma":
        out["err"] = rel(op.mla_decode(*first_set, SCALE)[0])
    for name in [k for k in wanted.split(",") if k]:
        if name == default_path or not kernel_runs_here(name):
            continue
        with ops.kernel_settings(wgmma_mode=KERNEL_MODES[name]):
            got, _ = op.mla_decode(*first_set, SCALE)
            if KERNEL_NAMES[op._last_path()] != name:
                continue  # this kernel does not serve the shape
            us = time_graph(fns)
        out[name + "_us"] = us
        out[name + "_pct"] = 100 * cache_bytes / (us * 1e-6) / 1e9 / copy_gbs
        if name != "mma":
            out[name + "_err"] = rel(got)
    return out


# A/B switches (--ab): the kernel setting that flips one of the default's features.
AB_SWITCHES = {"nopdl": {"pdl_mode": 0}, "f32part": {"fp32_partials": 1}, "cpq": {"tma_q": 0},
               "plan": {"plan_mode": 1}, "noplan": {"plan_mode": 0},
               "tmakv": {"tma_kv": 1}, "cpkv": {"tma_kv": 0}, "nonarrow": {"narrow_mode": 0}}


def time_switched(fns, name):
    """The default dispatch timed with one A/B switch flipped (the feature's gain is the difference)."""
    with ops.kernel_settings(**AB_SWITCHES[name]):
        return time_graph(fns)


def sweep_splits(fns, splits, kernels):
    """{kernel: {splits: us}} with the split-KV factor forced (the data behind the split heuristics)."""
    res = {}
    for name in kernels:
        if not kernel_runs_here(name):
            continue
        res[name] = {}
        for n in splits:
            with ops.kernel_settings(wgmma_mode=KERNEL_MODES[name], force_splits=n):
                res[name][n] = time_graph(fns)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--heads", default="16,128")
    ap.add_argument("--batches", default="1,16,64,128")
    ap.add_argument("--no-ref", action="store_true", help="skip the PyTorch reference timings")
    ap.add_argument("--profile-one", default="", metavar="H,B,L[;H,B,L...]",
                    help="only call the op (and each --fi-backends peer) 5 times on these configs (for ncu), no timing")
    ap.add_argument("--kernels", default="v7,mma,v9",
                    help="kernels also timed on every cell's sets (sm_90a ones only on compute capability 9.0)")
    ap.add_argument("--ref-max-bytes", type=float, default=2.5e9, help="skip the reference above this cache size")
    ap.add_argument("--fi-backends", default="fa3,fa2", help="FlashInfer MLA backends timed on every cell ('' = none)")
    ap.add_argument("--sweep-splits", default="", metavar="N,N,...",
                    help="also time each kernel with these forced split-KV factors on the --sweep-batches cells")
    ap.add_argument("--sweep-batches", default="1")
    ap.add_argument("--ab", default="nopdl,f32part",
                    help=f"A/B switches timed on every cell, of {','.join(AB_SWITCHES)} ('' = none)")
    ap.add_argument("--peer-only-check", action="store_true", help="only check and time FlashInfer on one small config")
    args = ap.parse_args()
    fi = peer_flashinfer.load()
    if args.peer_only_check:
        sys.exit(peer_flashinfer.smoke(fi, make_set, time_graph, SCALE))
    assert ops.has_kernel(), ops.extension_error()
    if args.profile_one:
        for cell in args.profile_one.split(";"):
            H, B, L = map(int, cell.split(","))
            s = make_set(B, 1, H, L)
            for _ in range(5):
                torch.ops.mla_patch.mla_decode(*s, SCALE)
            for backend in filter(None, args.fi_backends.split(",") if not isinstance(fi, str) else []):
                fn = peer_flashinfer.make_decode(*s[:4], s[5] - s[4], SCALE, backend, fi)
                for _ in range(5):
                    fn()
            torch.cuda.synchronize()
        return
    torch.backends.cuda.matmul.allow_tf32 = False

    ceil = bench_ceilings.measure()
    copy_gbs = ceil["copy_gbs"]
    l2 = ceil["l2_bytes"] or 50 * 2**20
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    commit = os.environ.get("MLA_PATCH_COMMIT", commit) or "?"
    print(f"# {ceil['device']}  torch {ceil['torch']}  commit {commit}  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"# copy bandwidth {copy_gbs:.0f} GB/s (read+write), bf16 matmul {ceil['bf16_matmul_tflops']:.0f} TFLOP/s, "
          f"L2 {l2 / 2**20:.0f} MiB, SMs {ceil['sms']}")
    print(f"# flashinfer: {peer_flashinfer.describe(fi)}")

    configs = []
    for H in map(int, args.heads.split(",")):
        for B in map(int, args.batches.split(",")):
            for L in LS:
                configs.append((H, B, L))
            if B == 1:
                configs.append((H, 1, 65536))
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for H, B, L in configs:
        S = 1
        cache_bytes = B * L * (R + P) * 2
        n_sets = max(1, min(256, math.ceil(4 * l2 / cache_bytes)))
        sets = [make_set(B, S, H, L, gen=gen) for _ in range(n_sets)]
        op = torch.ops.mla_patch.mla_decode
        fns = [lambda s=s: op(*s, SCALE) for s in sets]
        us = time_graph(fns)
        path = KERNEL_NAMES[torch.ops.mla_patch._last_path()]
        alt = time_kernels(fns, sets[0], path, args.kernels, copy_gbs, cache_bytes)
        flops = 2 * B * H * S * L * (R + P) + 2 * B * H * S * L * R
        row = dict(H=H, B=B, L=L, S=S, n_sets=n_sets, us=us, gbs=cache_bytes / (us * 1e-6) / 1e9,
                   tflops=flops / (us * 1e-6) / 1e12, path=path)
        row.update(alt)
        for name in filter(None, args.ab.split(",")):
            if name not in SKIPPED_KERNELS:
                row[name + "_us"] = time_switched(fns, name)
        if args.sweep_splits and B in map(int, args.sweep_batches.split(",")):
            row["sweep"] = sweep_splits(fns, [int(n) for n in args.sweep_splits.split(",")], args.kernels.split(","))
        if not isinstance(fi, str) and args.fi_backends:
            row.update(peer_flashinfer.bench_row(fi, sets, SCALE, time_graph, copy_gbs, cache_bytes,
                                                 args.fi_backends.split(",")))
        row["pct_copy"] = 100 * row["gbs"] / copy_gbs
        if L in LS:
            peer = PEERS.get(H, {}).get(B)
            if peer is not None:
                v = peer[LS.index(L)]
                if B == 1:
                    row["peer_us"] = v
                    row["peer_pct"] = 100 * cache_bytes / (v * 1e-6) / 1e9 / 2971
                else:
                    row["peer_pct"] = v
                    row["peer_us"] = cache_bytes / (v / 100 * 2971e9) * 1e6
        if not args.no_ref and cache_bytes <= args.ref_max_bytes:
            s = sets[0]
            try:
                row["ref_us"] = time_events(lambda: mla_decode_ref(*s, SCALE))
            except torch.OutOfMemoryError:
                row["ref_us"] = None
            torch.cuda.empty_cache()
        rows.append(row)
        del sets, fns
        torch.cuda.empty_cache()
        ref = f"{row['ref_us']:9.0f}" if row.get("ref_us") else "        -"
        peer = f"{row['peer_us']:7.1f} {row['peer_pct']:5.0f}%" if "peer_us" in row else "      -      -"
        mma = "".join(f" | {k} {row[k + '_us']:7.1f} us {row[k + '_pct']:5.1f}% (err {row.get(k + '_err', 0):.1e})"
                      for k in KERNEL_NAMES.values() if k + "_us" in row)
        err = f" (err {row['err']:.1e})" if "err" in row else ""
        err += "".join(f" ({name} {row[name + '_us']:.1f})" for name in AB_SWITCHES if name + "_us" in row)
        print(f"H={H:3d} B={B:3d} L={L:6d}  {us:8.1f} us  {row['gbs']:6.0f} GB/s  {row['tflops']:5.0f} TFLOP/s  "
              f"{row['pct_copy']:5.1f}% copy [{path}{err}] | H100 peer {peer} | ref {ref} us{mma}"
              f"{peer_flashinfer.row_text(row)}", flush=True)

    for r in rows:
        for name, by_n in r.get("sweep", {}).items():
            best = min(by_n, key=by_n.get)
            print(f"sweep H={r['H']} B={r['B']} L={r['L']} {name}: "
                  + " ".join(f"{n}:{us:.1f}" for n, us in by_n.items()) + f"  best {best} splits {by_n[best]:.1f} us")
    res = dict(ceilings=ceil, commit=commit, flashinfer=peer_flashinfer.describe(fi), rows=rows,
               date=time.strftime("%Y-%m-%d", time.gmtime()))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_kernel.json"), "w") as f:
        json.dump(res, f, indent=1)
    names = [k for k in KERNEL_NAMES.values() if any(k + "_us" in r for r in rows)]
    fis = peer_flashinfer.table_backends(rows)
    switched = [n for n in AB_SWITCHES if any(n + "_us" in r for r in rows)]
    print("\n| H | B | L | path | us | GB/s | TFLOP/s | % copy | H100 peer % (us) | ref us | "
          + " | ".join([f"{k} us (% copy)" for k in names] + [f"{n} us" for n in switched]
                       + [f"FlashInfer {b} us (% copy)" for b in fis]) + " |")
    print("|---|---|---|---|---|---|---|---|---|---|" + "---|" * (len(names) + len(switched) + len(fis)))
    for r in rows:
        peer = f"{r['peer_pct']:.0f} ({r['peer_us']:.1f})" if "peer_us" in r else "-"
        ref = f"{r['ref_us']:.0f}" if r.get("ref_us") else "-"
        alts = " | ".join([f"{r[k + '_us']:.1f} ({r[k + '_pct']:.0f})" if k + "_us" in r else "-" for k in names]
                          + [f"{r[n + '_us']:.1f}" if n + "_us" in r else "-" for n in switched]
                          + [peer_flashinfer.table_cell(r, b) for b in fis])
        print(f"| {r['H']} | {r['B']} | {r['L']} | {r['path']} | {r['us']:.1f} | {r['gbs']:.0f} | {r['tflops']:.0f} | "
              f"{r['pct_copy']:.0f} | {peer} | {ref} | {alts} |")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
        for ax, H in zip(axes, (16, 128)):
            sel = [r for r in rows if r["H"] == H]
            x = range(len(sel))
            ax.bar([i - 0.2 for i in x], [r["pct_copy"] for r in sel], 0.4, label="mla_patch kernel")
            # The same-run FlashInfer peer when it ran, else BASELINES.md's H100 peer.
            same_run = any("fi_pct_copy" in r for r in rows)
            ax.bar([i + 0.2 for i in x], [r.get("fi_pct_copy" if same_run else "peer_pct", 0) for r in sel], 0.4,
                   label="FlashInfer (same run)" if same_run else "best peer (BASELINES, H100)")
            ax.set_xticks(list(x))
            ax.set_xticklabels([f"B{r['B']}\nL{r['L'] // 1024}K" for r in sel], fontsize=7)
            ax.set_title(f"H={H}, bf16, % of copy bandwidth ({copy_gbs:.0f} GB/s)")
            ax.axhline(100, color="gray", lw=0.5)
        axes[0].set_ylabel("% of measured copy bandwidth")
        axes[0].legend()
        fig.suptitle(f"{ceil['device']}  commit {commit}")
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "bench_kernel.png"), dpi=110)
    except Exception as err:  # noqa: BLE001
        print(f"plot skipped: {err}")


if __name__ == "__main__":
    main()
