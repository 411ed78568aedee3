"""Per-CTA timeline of one decode call: where the kernel's time goes, phase by phase.

The kernels write a stamp row per CTA into the buffer a call passes as `timeline` (kernel_probe.decode_forced;
layout: csrc/common.cuh, TimelineSlot): the SM, the block, its cache tiles, and (globaltimer ns, clock64) at
each phase boundary. For each --cells "H,B,L;..." cell (bf16, R=512, P=64, S=1, packed cache) and each
--kernels kernel this script
  - times the call as benchmarks/bench_kernel.py does (CUDA-graph replays over rotating input sets);
  - records the last call of a graph over the same sets (so it follows a call, as in decode and in the timing,
    and its programmatic dependent launch overlaps that call's combine);
  - prints, relative to the first CTA's entry: when CTAs enter, pass pdl_wait, know their rows, have the query
    tile, finish the first tile, end the loop, exit; the same for the combine's blocks; then per-CTA phase
    lengths (clock64, converted at the clock rate globaltimer measures), and how CTAs spread over the SMs.
v7's stamps inside its warpgroup code (q, first, loop_end, exit) are built only with MLA_PATCH_TIMELINE_PHASES=1
(`MLA_PATCH_TIMELINE_PHASES=1 python setup.py build_ext --inplace`): they cost its H = 16 cells 3-7 % even when
off. Writes timeline.json (every stamp) under --out. Needs the built extension and a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

if __name__ == "__main__":  # run as a file, sys.path[0] is this folder: import from the repo root instead
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from benchmarks.decode_inputs import make_set, parse_cells, set_count
from benchmarks.kernel_calls import LABELS, forced, forced_calls, kernel_named
from benchmarks.timing import graph_us
from mla_patch import ops

# TimelineSlot in csrc/common.cuh.
SLOTS = {"entry": 1, "waited": 2, "lengths": 3, "q": 4, "first": 5, "loop_end": 6, "loop_end_wg1": 7, "exit": 8}
MAX_BLOCKS = 1 << 15


def record(sets, kernel, capacity=MAX_BLOCKS):
    """Stamps of the last call of a CUDA graph that calls `kernel` on every set in turn (as bench_kernel.py
    times it: the recorded call follows another, with caches as cold as the rotation leaves them), from the
    third replay. int64 [2, capacity, 32] on the CPU."""
    stamps = torch.zeros(2, capacity, 32, dtype=torch.int64, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        forced(sets[0], kernel)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for s in sets[:-1]:
            forced(s, kernel)
        forced(sets[-1], kernel, timeline=stamps)  # only the last call stamps
    for _ in range(2):
        graph.replay()
    torch.cuda.synchronize()
    stamps.zero_()
    graph.replay()
    torch.cuda.synchronize()
    del graph
    return stamps.cpu()


def ctas(stamps, kernel):
    """The rows of one kernel's CTAs that ran: dicts of SM, block, tiles, ns and clk by slot name."""
    out = []
    rows = stamps[kernel]
    for row in rows[rows[:, 2 * SLOTS["entry"] + 2] != 0].tolist():
        ns = {n: row[2 * s + 2] for n, s in SLOTS.items() if row[2 * s + 2]}
        clk = {n: row[2 * s + 3] for n, s in SLOTS.items() if row[2 * s + 2]}
        blk = row[1]
        out.append(dict(sm=row[0], x=blk & 0xFFFFF, y=(blk >> 20) & 0xFFFFF, z=blk >> 40, tiles=row[2], ns=ns, clk=clk))
    return out


def spread(values):
    if not values:
        return "-"
    values = sorted(values)
    return f"{values[0]:7.2f} {values[len(values) // 2]:7.2f} {values[-1]:7.2f}"


def summarize(decode, combine):
    """Printable lines and a dict of the key numbers (us)."""
    t0 = min(c["ns"]["entry"] for c in decode)
    lines = [f"  {'stamp (us after first entry)':32s}    min  median     max   CTAs"]
    for kernel, rows in (("decode", decode), ("combine", combine)):
        for name in SLOTS:
            vals = [(c["ns"][name] - t0) / 1e3 for c in rows if name in c["ns"]]
            if vals:
                lines.append(f"  {kernel + ' ' + name:32s} {spread(vals)} {len(vals):6d}")
    # The SM clock from the longest CTA (globaltimer ticks coarsely; a long span averages that out).
    last = lambda c: max(c["ns"], key=c["ns"].get)
    longest = max(decode, key=lambda c: c["ns"][last(c)] - c["ns"]["entry"])
    span_ns = longest["ns"][last(longest)] - longest["ns"]["entry"]
    span_clk = longest["clk"][last(longest)] - longest["clk"]["entry"]
    ghz = span_clk / span_ns if span_ns > 0 else 1.98
    phases = [("entry", "waited"), ("waited", "lengths"), ("lengths", "q"), ("q", "first"), ("lengths", "first"),
              ("first", "loop_end"), ("loop_end", "exit"), ("entry", "exit")]
    lines.append(f"  per-CTA phases (clock64 at {ghz:.2f} GHz, us)      min  median     max")
    key = {}
    for a, b in phases:
        vals = [(c["clk"][b] - c["clk"][a]) / ghz / 1e3 for c in decode if a in c["clk"] and b in c["clk"]]
        if vals:
            lines.append(f"  {a + ' -> ' + b:32s}       {spread(vals)}")
            key[f"{a}->{b}"] = statistics.median(vals)
    per_tile = [(c["clk"]["loop_end"] - c["clk"]["first"]) / ghz / 1e3 / (c["tiles"] - 1)
                for c in decode if "first" in c["clk"] and "loop_end" in c["clk"] and c["tiles"] > 1]
    if per_tile:
        lines.append(f"  {'loop per tile after the first':32s}       {spread(per_tile)}")
        key["per_tile"] = statistics.median(per_tile)
    sms = {}
    for c in decode:
        sms[c["sm"]] = sms.get(c["sm"], 0) + 1
    exits = [c["ns"]["exit"] for c in decode if "exit" in c["ns"]]
    # v7 stamps its exit only in a build with its phase stamps (MLA_PATCH_TIMELINE_PHASES=1): without them the
    # combine's pdl_wait, which returns once the decode grid is done, bounds its end.
    end_decode = max(exits) if exits else max([c["ns"]["waited"] for c in combine if "waited" in c["ns"]]
                                                 or [c["ns"][last(c)] for c in decode])
    end_all = max([end_decode] + [c["ns"].get("exit", 0) for c in combine])
    key.update(decode_ctas=len(decode), sms=len(sms), max_ctas_per_sm=max(sms.values()),
               tiles_max=max(c["tiles"] for c in decode), decode_end=(end_decode - t0) / 1e3,
               end=(end_all - t0) / 1e3, combine_blocks=len(combine))
    lines.append(f"  {len(decode)} decode CTAs on {len(sms)} SMs (at most {key['max_ctas_per_sm']} a SM), "
                 f"tiles a CTA up to {key['tiles_max']}; {len(combine)} combine blocks; "
                 + ("last decode exit" if exits else "decode grid done (no exit stamps; combine waited) by")
                 + f" {key['decode_end']:.2f} us, last exit {key['end']:.2f} us after the first entry")
    return lines, key


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--cells", default="128,1,1024;128,1,16384;128,1,65536;128,16,1024;128,128,16384;16,1,16384")
    ap.add_argument("--kernels", default="default",
                    help="comma list of default, v7, v9, mma (or kernel_probe's names seesaw, narrow, mma)")
    ap.add_argument("--shared-lengths", action="store_true",
                    help="every set takes the first set's kv_start / kv_end (the rest stays fresh), so the lengths "
                         "stay hot in L2 and the TLB: what a cold first load costs the call")
    args = ap.parse_args()
    assert ops.has_kernel(), ops.extension_error()
    gen = torch.Generator(device="cuda").manual_seed(0)
    results = []
    for H, B, L in parse_cells(args.cells):
        sets = [make_set(B, 1, H, L, gen=gen) for _ in range(set_count(B, L, 3, 64))]
        if args.shared_lengths:
            sets = [s[:4] + sets[0][4:] for s in sets]
        for kernel in map(kernel_named, args.kernels.split(",")):
            path = LABELS[forced(sets[0], kernel)[2].kernel]  # raises here, eagerly, where the kernel cannot serve
            us = graph_us(forced_calls(sets, kernel))
            stamps = record(sets, kernel)
            decode, combine = ctas(stamps, 0), ctas(stamps, 1)
            lines, key = summarize(decode, combine)
            shared = ", lengths shared by the sets" if args.shared_lengths else ""
            print(f"H={H} B={B} L={L} kernel {path}{shared}: {us:.1f} us a call (graph replays)", flush=True)
            print("\n".join(lines), flush=True)
            results.append(dict(H=H, B=B, L=L, kernel=path, us=us, key=key, decode=decode, combine=combine,
                                shared_lengths=args.shared_lengths))
        del sets
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "timeline.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), results=results), f)


if __name__ == "__main__":
    main()
