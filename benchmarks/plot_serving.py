"""One PNG of the serving results: stock against patched, per workload.

Reads the serving JSONs of a results folder (default docs/results): serving_*.json from benchmarks/bench_serving.py
(`model.generate_batch`) and serving_http_*.json from benchmarks/bench_serving_http.py (through `transformers
serve`). Each file is one workload (model, requests x prompt tokens, new tokens, mixed or not, and the path; where
several files hold the same workload the newest by name, the date in it, is drawn); its variants are the keys holding
results (stock, patched, patched-decode-graphs, ...). Top: output tokens/s (end to end), with each
patched variant's ratio to stock; bottom: p50 per-token latency (ms; through HTTP, the gap between streamed chunks),
with stock's over the variant's. Where a file gives the decode phase's floor (decode_floor_tokens_per_s,
decode_step_floor_ms: the bytes a step of every request reads over the copy bandwidth), the workload's label gives
it, and a dashed line marks it over that workload's bars where it fits the panel's scale.

    python benchmarks/plot_serving.py serving.png [--results docs/results]
"""

from __future__ import annotations

import argparse
import glob
import json
import os

VARIANT_ORDER = ("stock", "patched", "patched-decode-graphs", "patched-eager")
COLORS = {"stock": "#9e9e9e", "patched": "#1f77b4", "patched-decode-graphs": "#2ca02c", "patched-eager": "#ff7f0e"}


def load(folder: str) -> list[dict]:
    """The workloads of `folder`'s serving JSONs, the newest file of each, in a stable order (generate_batch first,
    then HTTP)."""
    workloads = {}
    for path in sorted(glob.glob(os.path.join(folder, "serving_*.json"))):
        with open(path) as f:
            data = json.load(f)
        http = os.path.basename(path).startswith("serving_http")
        variants = {k: v for k, v in data.items() if isinstance(v, dict) and "output_tokens_per_s" in v}
        if "stock" not in variants:
            continue
        order = [v for v in VARIANT_ORDER if v in variants] + sorted(set(variants) - set(VARIANT_ORDER))
        layers = f", {data['layers']} layers" if data.get("layers") else ""
        mixed = bool(data.get("mixed"))
        sizes = (f"{data['prompt'] // 2}..{data['prompt']} tok, {data['new_tokens'] // 4}..{data['new_tokens']} new"
                 if mixed else f"{data['prompt']} tok, {data['new_tokens']} new")
        device = data.get("device", "?").replace("NVIDIA ", "")
        label = (f"{data['model']}{layers}\n{data['requests']} x {sizes}\n"
                 f"{'HTTP serve' if http else 'generate_batch'}\n{device}, {data.get('commit', '?')}")
        key = (http, data["model"], data["requests"], data["prompt"], data["new_tokens"], mixed)
        workloads[key] = {"label": label, "http": http, "file": os.path.basename(path),
                          "variants": [(name, variants[name]) for name in order],
                          "floor_tokens_per_s": data.get("decode_floor_tokens_per_s"),
                          "floor_ms": data.get("decode_step_floor_ms"),
                          "key": key}  # files come sorted by name: a newer one replaces an older
    return sorted(workloads.values(), key=lambda w: w["key"])


def floor_text(w: dict) -> str:
    """The decode floor of a workload, for its label (ratio of the patched variants to it: how far off they are)."""
    if not w["floor_tokens_per_s"]:
        return ""
    return f"\nfloor {w['floor_tokens_per_s']:.0f} tok/s, {w['floor_ms']:.1f} ms/step"


def plot(workloads: list[dict], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in VARIANT_ORDER if any(n == v for w in workloads for v, _ in w["variants"])]
    names += sorted({v for w in workloads for v, _ in w["variants"]} - set(names))
    width = 0.8 / len(names)
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 2.6 * len(workloads)), 9.0))
    panels = [("output_tokens_per_s", "output tokens/s (end to end)", "floor_tokens_per_s"),
              ("token_ms_p50", "p50 per-token latency, ms", "floor_ms")]
    for ax, (key, title, floor_key) in zip(axes, panels):
        top = max(r[key] for w in workloads for _, r in w["variants"]) * 1.3
        floor_drawn, labelled = False, set()
        for i, w in enumerate(workloads):
            results = dict(w["variants"])
            stock = results["stock"][key]
            for j, name in enumerate(names):
                if name not in results:
                    continue
                value = results[name][key]
                x = i + (j - (len(names) - 1) / 2) * width
                ax.bar(x, value, width, color=COLORS.get(name), label=None if name in labelled else name)
                labelled.add(name)
                text = f"{value:.0f}"
                if name != "stock" and stock and value:
                    ratio = value / stock if key == "output_tokens_per_s" else stock / value
                    text += f"\n{ratio:.2f}x" if ratio >= 1 else f"\n{1 / ratio:.2f}x slower"
                ax.annotate(text, (x, value), ha="center", va="bottom", fontsize=7, xytext=(0, 2),
                            textcoords="offset points")
            floor = w[floor_key]
            if floor and floor <= top:  # a floor far above the bars is in the workload's label only
                ax.hlines(floor, i - 0.45, i + 0.45, colors="k", linestyles="dashed",
                          label="decode floor" if not floor_drawn else None)
                floor_drawn = True
        ax.set_ylim(0, top)
        ax.set_xticks(range(len(workloads)))
        ax.set_xticklabels([w["label"] + floor_text(w) for w in workloads], fontsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    for h, lab in zip(*axes[1].get_legend_handles_labels()):
        if lab not in labels:
            handles.append(h)
            labels.append(lab)
    axes[0].legend(handles, labels, loc="upper left", fontsize=8)
    fig.suptitle("Serving, stock vs patched (card and commit under each workload)", fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=130)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="the PNG to write")
    ap.add_argument("--results", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                      "docs", "results"))
    args = ap.parse_args(argv)
    workloads = load(args.results)
    if not workloads:
        raise SystemExit(f"no serving_*.json with a stock result in {args.results}")
    plot(workloads, args.out)
    for w in workloads:
        row = ", ".join(f"{n} {r['output_tokens_per_s']:.1f} tok/s, p50 {r['token_ms_p50']:.0f} ms"
                        for n, r in w["variants"])
        print(f"{w['file']}: {row}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
