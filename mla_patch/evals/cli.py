"""`mla-lm-eval`: lm-eval's own command line with the `mla-hf` model registered and our tasks on its path.

lm-eval finds models only in its registry, which an installed package joins by being imported; this entry
point imports `mla_patch.evals.lm_model` first, adds `--include_path` for the tasks shipped here (unless one
is given), then hands the arguments to lm-eval unchanged:

    mla-lm-eval --model mla-hf --model_args pretrained=default,scoring=decode --tasks mla_tiny_ppl --device cpu
"""

from __future__ import annotations

import sys

from . import TASKS_DIR


def main(argv: list[str] | None = None) -> int:
    from lm_eval.__main__ import cli_evaluate

    from . import lm_model  # noqa: F401  (registers "mla-hf")

    args = list(sys.argv[1:] if argv is None else argv)
    if "--include_path" not in args:
        args += ["--include_path", str(TASKS_DIR)]
    sys.argv = ["mla-lm-eval", *args]
    return cli_evaluate() or 0


if __name__ == "__main__":
    raise SystemExit(main())
