"""`transformers serve` with every MLA layer patched: `python -m mla_patch.serve [transformers serve options]`.

transformers' OpenAI-compatible server (chat and text completions, streaming or not, continuous batching with
--continuous-batching) loads its models with from_pretrained; patching the classes first makes every model it
loads use the absorbed decode. The server loads each model in a process of its own, started by spawn, which
imports this module as `__mp_main__`: the patch is applied there too. The options are transformers serve's own
(`python -m mla_patch.serve --help`).
"""

from __future__ import annotations

import sys

import mla_patch


def main(argv: list[str] | None = None) -> None:
    try:
        from transformers.cli.transformers import main as transformers_cli
    except ImportError as err:  # transformers without its CLI
        raise SystemExit(f"mla_patch.serve needs transformers' CLI ({err}); pip install 'transformers[serving]'") from err
    mla_patch.patch()
    print(f"mla_patch: serving with {len(mla_patch.status()['patched_classes'])} MLA attention classes patched", flush=True)
    sys.argv = ["transformers", "serve", *(sys.argv[1:] if argv is None else argv)]
    transformers_cli()


if __name__ == "__main__":
    main()
elif __name__ == "__mp_main__":  # the server's model process
    mla_patch.patch()
