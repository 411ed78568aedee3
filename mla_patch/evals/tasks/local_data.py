"""Local data for the offline tasks: json lines under mla_patch/evals/data, read through `datasets`.

Paths are resolved from this file, so the tasks work from any working directory.
"""

import re
from pathlib import Path

import datasets

DATA_FILE = Path(__file__).resolve().parents[1] / "data" / "mla_tiny_eval.jsonl"


def load_mla_tiny(**kwargs):
    """Held-out documents of the default model's training distribution: {"text": str} rows."""
    return datasets.load_dataset("json", data_files={"test": str(DATA_FILE)})


COPY_TARGET_WORDS = 12  # one token each in the default model's vocabulary


def load_mla_tiny_copy(**kwargs):
    """One row per copy span: context = document up to `again : <first span word>`, target = the next
    COPY_TARGET_WORDS words. Completing it needs attention to the span's first occurrence, far back.
    """
    rows = {"context": [], "target": []}
    for doc in load_mla_tiny()["test"]["text"]:
        for m in re.finditer(r"again : (\S+)((?: [a-z]+)*) \.", doc):
            words = m.group(2).split()[:COPY_TARGET_WORDS]
            if words:
                rows["context"].append(doc[: m.end(1)])
                rows["target"].append(" " + " ".join(words))
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows)})
