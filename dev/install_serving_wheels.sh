#!/usr/bin/env bash
# On the GPU machine (no network): install the carried wheels, transformers 5.25 (.whl/*.whl) and what
# `transformers serve` needs on top of the image (.whl/serve/*.whl: fastapi, uvicorn, pydantic, openai, typer,
# rich and their deps, CPython 3.12 manylinux x86_64), into one folder, and print the PYTHONPATH to use.
# The image's own packages (torch, numpy, tokenizers, safetensors, accelerate, ...) stay where they are: the folder
# goes in front of them on PYTHONPATH. Carry .whl to the device (carry=[".whl"]) and run, from the repo root:
#   eval "$(dev/install_serving_wheels.sh)"     # sets PYTHONPATH=$SITE:$PWD:... and USE_HUB_KERNELS=0
# or, to see what it does: dev/install_serving_wheels.sh; then export the printed PYTHONPATH.
# SITE (default /tmp/site) picks the folder, PYTHON (default python3) the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
SITE=${SITE:-/tmp/site}
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' || {
  echo "the wheels under .whl/serve are for CPython 3.12 ($PYTHON is $("$PYTHON" --version 2>&1))" >&2; exit 1; }
shopt -s nullglob
wheels=(.whl/*.whl .whl/serve/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
  echo "no wheels under .whl/ (carry it: carry=[\".whl\"])" >&2
  exit 1
fi
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
  "${wheels[@]}" >&2
# The server's imports, from the folder first: a missing or broken wheel shows here, not in the benchmark.
PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -c "
import fastapi, openai, pydantic, rich, starlette, typer, uvicorn, transformers
import transformers.cli.serve
print('installed', len('${wheels[*]}'.split()), 'wheels in $SITE: transformers', transformers.__version__,
      'fastapi', fastapi.__version__, 'uvicorn', uvicorn.__version__, 'openai', openai.__version__, file=__import__('sys').stderr)
" >&2
# transformers 5.25 requires `kernels` and, by default, has from_pretrained load hub kernels: without it (left out,
# as hub kernels cannot be fetched there) from_pretrained refuses unless hub kernels are switched off.
echo "export USE_HUB_KERNELS=0 PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
