"""Accuracy parity of the absorbed MLA decode path, measured with lm-eval.

`mla_patch.evals.lm_model` registers the lm-eval model `mla-hf` (`mla-lm-eval` is lm-eval's CLI with it
registered); `python -m mla_patch.evals.parity` compares vanilla
(prefill scoring, unpatched) with patched (teacher-forced decode scoring) on the local tasks in
`tasks/`. See docs/PARITY.md.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
DATA_DIR = Path(__file__).resolve().parent / "data"
