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
Each row records the kernel the default dispatch ran (`path`), and times every other kernel on the same sets
(--kernels, forced through mla_patch.kernel_probe: v7 = the sm_90a seesaw kernel, v9 = the narrow kernel
(heads as wgmma's N) where it serves, mma = the portable mma.sync kernel; kernel_probe's names seesaw, narrow,
mma work too), each checked against the mma.sync kernel's output on the first set (relative error, so a fast
wrong kernel shows).
FlashInfer's MLA decode (--fi-backends, default fa3,fa2; benchmarks/peer_flashinfer.py) is timed on the same
sets with the same graph timing and checked once per cell against the float64 reference, when `flashinfer`
imports (not on the device image: carry the wheels and AOT modules of dev/fetch_flashinfer.sh).
--peer-only-check runs only a small FlashInfer check (for a quick smoke on the GPU).
--sweep-splits N,N,... times every kernel with those split-KV factors forced on the --sweep-batches
cells (the data behind the split heuristics in csrc/).
Writes --json (default bench_kernel.json) and the plot beside it (the same name, .png) under --out; two builds
timed in one GPU run keep their grids apart by name (e.g. --json before.json, then --json after.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

if __name__ == "__main__":  # run as a file, sys.path[0] is this folder: import from the repo root instead
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from benchmarks import bench_ceilings, peer_flashinfer
from benchmarks.decode_inputs import SCALE, P, R, cache_bytes, l2_bytes, make_set, parse_cells, set_count
from benchmarks.kernel_calls import LABELS, default_calls, forced, forced_calls, kernel_named, serves
from benchmarks.provenance import commit as current_commit
from benchmarks.timing import event_ms, graph_us
from mla_patch import ops
from mla_patch.reference import mla_decode_ref

# Best of FlashMLA and FlashInfer fa3 on an H100 (the former docs/BASELINES): B=1 in us, else % of copy bw.
PEERS = {
    16: {1: (11.0, 18.1, 29.5), 16: (38, 71, 92), 64: (70, 93, 100), 128: (90, 98, 100)},
    128: {1: (13.5, 18.5, 31.2), 16: (28, 54, 73), 64: (62, 77, 79), 128: (66, 79, 83)},
}
H100_COPY_GBS = 2971  # the copy bandwidth those peer percentages are of
LS = (1024, 4096, 16384)


def pct_of_copy(nbytes, us, copy_gbs):
    return 100 * nbytes / (us * 1e-6) / 1e9 / copy_gbs


def time_kernels(sets, default_label, kernels, copy_gbs, nbytes):
    """Times each of `kernels` (kernel_probe names) other than the default one on the same sets; checks each
    against the mma.sync kernel's output on the first set. Returns {label_us, label_pct, label_err}, and the
    default's own error as `err` where it is not mma.sync."""
    want = forced(sets[0], "mma")[0].double()
    rel = lambda got: ((got.double() - want).norm() / want.norm()).item()
    out = {}
    if default_label != "mma":
        out["err"] = rel(torch.ops.mla_patch.mla_decode(*sets[0], SCALE)[0])
    for kernel in kernels:
        label = LABELS[kernel]
        ran = None if label == default_label else serves(sets[0], kernel)
        if ran is None:
            continue  # timed as the default, or it does not serve this shape (or this GPU)
        us = graph_us(forced_calls(sets, kernel))
        out[label + "_us"] = us
        out[label + "_pct"] = pct_of_copy(nbytes, us, copy_gbs)
        if kernel != "mma":
            out[label + "_err"] = rel(ran[0])
    return out


def sweep_splits(sets, splits, kernels):
    """{label: {splits: us}} with the split-KV factor forced (the data behind the split heuristics)."""
    res = {}
    for kernel in kernels:
        by_n = {n: graph_us(forced_calls(sets, kernel, n)) for n in splits if serves(sets[0], kernel, n)}
        if by_n:
            res[LABELS[kernel]] = by_n
    return res


def profile_only(cells, fi, backends):
    """Five calls of the op (and of each FlashInfer backend) per cell, nothing timed: a run for ncu."""
    for H, B, L in cells:
        s = make_set(B, 1, H, L)
        for _ in range(5):
            torch.ops.mla_patch.mla_decode(*s, SCALE)
        for backend in backends if not isinstance(fi, str) else []:
            fn = peer_flashinfer.make_decode(*s[:4], s[5] - s[4], SCALE, backend, fi)
            for _ in range(5):
                fn()
        torch.cuda.synchronize()


def grid(heads, batches):
    cells = []
    for H in heads:
        for B in batches:
            cells += [(H, B, L) for L in LS]
            if B == 1:
                cells.append((H, 1, 65536))
    return cells


def h100_peer(H, B, L, nbytes):
    """peer_us / peer_pct of the H100 table where it has the cell."""
    peer = PEERS.get(H, {}).get(B)
    if peer is None or L not in LS:
        return {}
    v = peer[LS.index(L)]
    if B == 1:
        return dict(peer_us=v, peer_pct=pct_of_copy(nbytes, v, H100_COPY_GBS))
    return dict(peer_pct=v, peer_us=nbytes / (v / 100 * H100_COPY_GBS * 1e9) * 1e6)


def measure_cell(H, B, L, args, gen, fi, copy_gbs):
    S = 1
    nbytes = cache_bytes(B, L)
    sets = [make_set(B, S, H, L, gen=gen) for _ in range(set_count(B, L, 1, 256))]
    us = graph_us(default_calls(sets))
    path = LABELS[forced(sets[0], "auto")[2].kernel]
    flops = 2 * B * H * S * L * (R + P) + 2 * B * H * S * L * R
    row = dict(H=H, B=B, L=L, S=S, n_sets=len(sets), us=us, gbs=nbytes / (us * 1e-6) / 1e9,
               tflops=flops / (us * 1e-6) / 1e12, path=path)
    row.update(time_kernels(sets, path, args.kernels, copy_gbs, nbytes))
    if args.sweep_splits and B in map(int, args.sweep_batches.split(",")):
        row["sweep"] = sweep_splits(sets, [int(n) for n in args.sweep_splits.split(",")], args.kernels)
    if not isinstance(fi, str) and args.fi_backends:
        row.update(peer_flashinfer.bench_row(fi, sets, SCALE, copy_gbs, nbytes, args.fi_backends.split(",")))
    row["pct_copy"] = 100 * row["gbs"] / copy_gbs
    row.update(h100_peer(H, B, L, nbytes))
    if not args.no_ref and nbytes <= args.ref_max_bytes:
        s = sets[0]
        try:
            row["ref_us"] = event_ms(lambda: mla_decode_ref(*s, SCALE), iters=3, warmup=1) * 1e3
        except torch.OutOfMemoryError:
            row["ref_us"] = None
    del sets
    torch.cuda.empty_cache()
    return row


def row_line(row):
    ref = f"{row['ref_us']:9.0f}" if row.get("ref_us") else "        -"
    peer = f"{row['peer_us']:7.1f} {row['peer_pct']:5.0f}%" if "peer_us" in row else "      -      -"
    alts = "".join(f" | {k} {row[k + '_us']:7.1f} us {row[k + '_pct']:5.1f}% (err {row.get(k + '_err', 0):.1e})"
                   for k in LABELS.values() if k + "_us" in row)
    err = f" (err {row['err']:.1e})" if "err" in row else ""
    return (f"H={row['H']:3d} B={row['B']:3d} L={row['L']:6d}  {row['us']:8.1f} us  {row['gbs']:6.0f} GB/s  "
            f"{row['tflops']:5.0f} TFLOP/s  {row['pct_copy']:5.1f}% copy [{row['path']}{err}] | H100 peer {peer} | "
            f"ref {ref} us{alts}{peer_flashinfer.row_text(row)}")


def print_table(rows):
    names = [k for k in LABELS.values() if any(k + "_us" in r for r in rows)]
    fis = peer_flashinfer.table_backends(rows)
    print("\n| H | B | L | path | us | GB/s | TFLOP/s | % copy | H100 peer % (us) | ref us | "
          + " | ".join([f"{k} us (% copy)" for k in names] + [f"FlashInfer {b} us (% copy)" for b in fis]) + " |")
    print("|---|---|---|---|---|---|---|---|---|---|" + "---|" * (len(names) + len(fis)))
    for r in rows:
        peer = f"{r['peer_pct']:.0f} ({r['peer_us']:.1f})" if "peer_us" in r else "-"
        ref = f"{r['ref_us']:.0f}" if r.get("ref_us") else "-"
        alts = " | ".join([f"{r[k + '_us']:.1f} ({r[k + '_pct']:.0f})" if k + "_us" in r else "-" for k in names]
                          + [peer_flashinfer.table_cell(r, b) for b in fis])
        print(f"| {r['H']} | {r['B']} | {r['L']} | {r['path']} | {r['us']:.1f} | {r['gbs']:.0f} | {r['tflops']:.0f} | "
              f"{r['pct_copy']:.0f} | {peer} | {ref} | {alts} |")


def plot(rows, ceil, commit, copy_gbs, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
        for ax, H in zip(axes, (16, 128)):
            sel = [r for r in rows if r["H"] == H]
            x = range(len(sel))
            ax.bar([i - 0.2 for i in x], [r["pct_copy"] for r in sel], 0.4, label="mla_patch kernel")
            # The same-run FlashInfer peer when it ran, else the H100 peer table.
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
        fig.savefig(path, dpi=110)
    except Exception as err:  # noqa: BLE001
        print(f"plot skipped: {err}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--json", default="bench_kernel.json",
                    help="result file name under --out (the plot takes the same name, .png)")
    ap.add_argument("--heads", default="16,128")
    ap.add_argument("--batches", default="1,16,64,128")
    ap.add_argument("--no-ref", action="store_true", help="skip the PyTorch reference timings")
    ap.add_argument("--profile-one", default="", metavar="H,B,L[;H,B,L...]",
                    help="only call the op (and each --fi-backends peer) 5 times on these configs (for ncu), no timing")
    ap.add_argument("--kernels", default="v7,mma,v9",
                    help="kernels also timed on every cell's sets, where they serve (v7, v9, mma or seesaw, narrow)")
    ap.add_argument("--ref-max-bytes", type=float, default=2.5e9, help="skip the reference above this cache size")
    ap.add_argument("--fi-backends", default="fa3,fa2", help="FlashInfer MLA backends timed on every cell ('' = none)")
    ap.add_argument("--sweep-splits", default="", metavar="N,N,...",
                    help="also time each kernel with these forced split-KV factors on the --sweep-batches cells")
    ap.add_argument("--sweep-batches", default="1")
    ap.add_argument("--peer-only-check", action="store_true", help="only check and time FlashInfer on one small config")
    args = ap.parse_args()
    try:
        args.kernels = [kernel_named(k) for k in args.kernels.split(",") if k]
    except ValueError as err:
        ap.error(str(err))
    if "auto" in args.kernels:
        ap.error("--kernels names kernels to force; the default path is timed on every cell anyway")
    fi = peer_flashinfer.load()
    if args.peer_only_check:
        sys.exit(peer_flashinfer.smoke(fi))
    assert ops.has_kernel(), ops.extension_error()
    if args.profile_one:
        profile_only(parse_cells(args.profile_one), fi, list(filter(None, args.fi_backends.split(","))))
        return
    torch.backends.cuda.matmul.allow_tf32 = False

    ceil = bench_ceilings.measure()
    copy_gbs = ceil["copy_gbs"]
    commit = current_commit()
    print(f"# {ceil['device']}  torch {ceil['torch']}  commit {commit}  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"# copy bandwidth {copy_gbs:.0f} GB/s (read+write), bf16 matmul {ceil['bf16_matmul_tflops']:.0f} TFLOP/s, "
          f"L2 {l2_bytes() / 2**20:.0f} MiB, SMs {ceil['sms']}")
    print(f"# flashinfer: {peer_flashinfer.describe(fi)}")

    rows = []
    gen = torch.Generator(device="cuda").manual_seed(0)
    for H, B, L in grid(map(int, args.heads.split(",")), [int(b) for b in args.batches.split(",")]):
        rows.append(measure_cell(H, B, L, args, gen, fi, copy_gbs))
        print(row_line(rows[-1]), flush=True)

    for r in rows:
        for name, by_n in r.get("sweep", {}).items():
            best = min(by_n, key=by_n.get)
            print(f"sweep H={r['H']} B={r['B']} L={r['L']} {name}: "
                  + " ".join(f"{n}:{us:.1f}" for n, us in by_n.items()) + f"  best {best} splits {by_n[best]:.1f} us")
    res = dict(ceilings=ceil, commit=commit, flashinfer=peer_flashinfer.describe(fi), rows=rows,
               date=time.strftime("%Y-%m-%d", time.gmtime()))
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, args.json)
    with open(json_path, "w") as f:
        json.dump(res, f, indent=1)
    print(f"# wrote {json_path}")
    print_table(rows)
    plot(rows, ceil, commit, copy_gbs, os.path.splitext(json_path)[0] + ".png")


if __name__ == "__main__":
    main()
