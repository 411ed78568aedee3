"""Accuracy parity of the absorbed MLA decode path, measured with lm-eval.

`evals.lm_model` registers the lm-eval model `mla-hf`; `python -m evals.parity` compares vanilla
(prefill scoring, unpatched) with patched (teacher-forced decode scoring) on the local tasks in
`evals/tasks/`. See docs/PARITY.md.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
DATA_DIR = Path(__file__).resolve().parent / "data"
RESULTS_DIR = Path(__file__).resolve().parent / "results"  # the recorded runs docs/PARITY.md cites
