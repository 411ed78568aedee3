"""Train the embedded default model (mla_patch/assets/mla-tiny) on CPU and report what it learned.

    python dev/train_default_model.py                 # train, evaluate, write assets + eval data
    python dev/train_default_model.py --eval-only     # evaluate the shipped model

Deterministic: fixed seeds, 2 threads, torch.use_deterministic_algorithms. The report (also saved as
`stats.json` next to the weights) gives perplexity against uniform, accuracy on copy spans (the repeat
after `again :` of a span first seen after `note :`), and how peaked the attention is there: for the best
head, the share of copy positions whose attention argmax lands exactly on the token to be copied.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dev.default_model_training as dm
from dev.default_model_training import EVAL_SEED, make_documents, train_default_model
from mla_patch.default_model import DEFAULT_MODEL_DIR, load_default_model

EVAL_DATA = ROOT / "mla_patch" / "evals" / "data" / "mla_tiny_eval.jsonl"
N_EVAL_DOCS = 64


def _copy_spans(doc: str, offsets: list[tuple[int, int]]):
    """Yield (first_tok, again_tok, n_tok) token index triples of each note/again pair (indices into offsets)."""

    def tok_at(char: int) -> int:
        return next(i for i, (s, e) in enumerate(offsets) if s <= char < e or s >= char)

    for m in re.finditer(r"again : ([a-z ]+) \.", doc):
        span = m.group(1)
        note = doc.find(f"note : {span} .")
        a0, a1 = tok_at(m.start(1) - 1), tok_at(m.end(1))
        n0 = tok_at(note + len("note : ") - 1)
        yield n0, a0, a1 - a0


@torch.no_grad()
def evaluate(model, tokenizer, docs: list[str]) -> dict:
    """Perplexity, and how well far-back tokens are recalled, with the attention that does it.

    Name recall: at each later mention of a story's name, the share of the probability given to copy
    words that goes to the right name (1/|copy words| without recall), and whether the head that
    recalls best puts its attention argmax on an earlier mention. Copy spans: the same for the repeat
    of a span, with the argmax on the very token to copy.
    """
    model.config._attn_implementation = "eager"  # attention probabilities for the peakedness stats
    copy_ids = torch.tensor(
        sorted({tokenizer.convert_tokens_to_ids(tokenizer.tokenize(" " + w))[0] for w in dm._COPY_WORDS})
    )
    nll_all, kinds = [], {"name": {}, "span": {}}
    for doc in docs:
        enc = tokenizer(doc, return_offsets_mapping=True, add_special_tokens=False)
        ids = torch.tensor([[tokenizer.eos_token_id] + enc["input_ids"]])
        offsets = [(-1, -1)] + [tuple(o) for o in enc["offset_mapping"]]
        out = model(ids, output_attentions=True)
        logp = torch.log_softmax(out.logits[0, :-1].double(), -1)
        tgt = ids[0, 1:]
        nll_all += (-logp.gather(-1, tgt[:, None])[:, 0]).tolist()
        queries = []  # (kind, query position t, set of right source positions)
        if doc.startswith("name : "):
            first = next(i for i, (st, en) in enumerate(offsets) if st <= len("name : ") < en)
            name_id, seen = ids[0, first].item(), [first]
            for t in range(first + 1, ids.shape[1] - 1):
                if tgt[t].item() == name_id:
                    queries.append(("name", t, set(seen)))
                    seen.append(t + 1)
        for n0, a0, n in _copy_spans(doc, offsets):
            d = a0 - n0
            queries += [("span", t, {t + 1 - d}) for t in range(a0 + 1, a0 + n - 1)]
        for kind, t, sources in queries:
            k = kinds[kind]
            p_copy = logp[t, copy_ids].exp()
            k.setdefault("share", []).append((logp[t, tgt[t]].exp() / p_copy.sum()).item())
            k.setdefault("top1", []).append(float(logp[t].argmax().item() == tgt[t].item()))
            k.setdefault("nll", []).append(-logp[t, tgt[t]].item())
            for layer, att in enumerate(out.attentions):
                for h in range(att.shape[1]):
                    row = att[0, h, t]
                    k.setdefault(("hit", layer, h), []).append(float(row.argmax().item() in sources))
                    k.setdefault(("mass", layer, h), []).append(row[sorted(sources)].sum().item())
    model.config._attn_implementation = "sdpa"
    mean = lambda xs: sum(xs) / max(len(xs), 1)
    report = {
        "eval_docs": len(docs),
        "eval_tokens": len(nll_all),
        "vocab_size": len(tokenizer),
        "token_ppl": round(math.exp(mean(nll_all)), 4),
        "uniform_ppl": len(tokenizer),
        "copy_words": len(copy_ids),
    }
    for kind, k in kinds.items():
        if not k:
            continue
        heads = [key[1:] for key in k if key[0] == "hit"]
        best = max(heads, key=lambda h: mean(k[("hit",) + h]))
        report[kind] = {
            "queries": len(k["share"]),
            "right_word_share_of_copy_word_prob": round(mean(k["share"]), 4),
            "top1_acc": round(mean(k["top1"]), 4),
            "nll": round(mean(k["nll"]), 4),
            "best_head": {"layer": best[0], "head": best[1]},
            "best_head_argmax_on_source": round(mean(k[("hit",) + best]), 4),
            "best_head_mass_on_source": round(mean(k[("mass",) + best]), 4),
        }
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(DEFAULT_MODEL_DIR))
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the shipped recipe)")
    ap.add_argument("--eval-only", action="store_true")
    args = ap.parse_args(argv)

    out = Path(args.out)
    train_stats = {}
    if not args.eval_only:
        kw = {} if args.steps is None else {"steps": args.steps}
        train_stats = train_default_model(out, **kw)
    elif (out / "stats.json").exists():
        train_stats = json.loads((out / "stats.json").read_text()).get("train", {})

    docs = make_documents(N_EVAL_DOCS, EVAL_SEED)
    EVAL_DATA.parent.mkdir(parents=True, exist_ok=True)
    EVAL_DATA.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))

    model, tokenizer = load_default_model(dtype=torch.float32, device="cpu", path=out)
    stats = {"train": train_stats, "eval": evaluate(model, tokenizer, docs)}
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
