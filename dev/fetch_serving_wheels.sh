#!/usr/bin/env bash
# Download here (network) what the GPU image (transformers 5.17, Python 3.12, no network) lacks to run
# transformers 5.25 and `transformers serve`: .whl/ takes transformers 5.25 and its hub and tokenizers,
# .whl/serve/ the server's stack (fastapi, uvicorn, pydantic, openai, typer, rich and their deps). torch, its
# CUDA libraries, numpy and the rest the image already has stay out, and so does `kernels` (with it installed,
# transformers reaches for hub kernels, which the GPU machine cannot fetch). Both folders are git-ignored; carry them
# with carry=[".whl"] and install them there with dev/install_serving_wheels.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pip download -q -d "$tmp" --python-version 3.12 --only-binary=:all: --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "transformers[serving]==${TRANSFORMERS_VERSION:-5.25.0}"
rm -rf .whl && mkdir -p .whl/serve
image_has='^(torch|triton|nvidia_[a-z0-9_]+|numpy|sympy|mpmath|networkx|setuptools|jinja2|markupsafe|accelerate|filelock|fsspec|packaging|pyyaml|regex|tqdm|safetensors|psutil|typing_extensions|kernels)-'
for wheel in "$tmp"/*.whl; do
  name=$(basename "$wheel")
  if [[ $name =~ $image_has ]]; then continue; fi
  case $name in
    transformers-*|huggingface_hub-*|hf_xet-*|tokenizers-*) mv "$wheel" .whl/ ;;
    *) mv "$wheel" .whl/serve/ ;;
  esac
done
ls .whl .whl/serve
du -sh .whl
