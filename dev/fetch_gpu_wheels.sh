#!/usr/bin/env bash
# Download here (network) the wheels the GPU image lacks for the evals (lm-eval and what it needs
# beyond the image's packages, Python 3.12), into .carry/wheels (git-ignored). Then pass
# carry=[".carry"] to the device call: dev/gpu_models.sh installs them (no deps, no index).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.carry/wheels
mkdir -p "$dest"
binary=(lm-eval datasets evaluate jsonlines pytablewriter dataproperty mbstrdecoder pathvalidate tabledata
        tcolorpy typepy chardet zstandard dill multiprocess more-itertools numexpr nltk)
pip download -q --no-deps -d "$dest" --python-version 3.12 --only-binary=:all: \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "${binary[@]}"
# Pure-Python projects published only as sdists: build their (py3-none-any) wheels here.
pip wheel -q --no-deps -w "$dest" sqlitedict word2number rouge-score tqdm-multiprocess
du -sh "$dest"
