#!/usr/bin/env bash
# Prepare, on a machine with pip's network, what bench/gpu_suite.sh needs on a GPU machine that
# has none: run it in the checkout you send, then name `.whl` and `.gpu_carry` in `carry`.
#
#   bench/gpu_wheels.sh            # writes .whl/*.whl and .gpu_carry/peer_soft_torch.py
#
# The GPU machine (Python 3.12, jax, flax, optax, orbax-checkpoint, chex, absl-py, transformers,
# torch, tqdm, matplotlib, sentencepiece, protobuf, pyyaml, packaging) lacks what the trainer
# imports on the configs/tiny.py path: ml_collections (needs absl-py, PyYAML: there) and
# tensorboardX (needs numpy, packaging, protobuf: there). tensorflow-datasets is imported only
# for tfds: data, which the suite does not read. Pure-python wheels, ~0.2 MiB together, pinned to
# the versions the tests run with. The peer script lives in ../shared, which does not travel:
# a copy goes into .gpu_carry/. Both dirs are in .gitignore (so they travel only when carried).
#
# Settings: PYTHON (default python3), SHARED (default ../shared next to the repo).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
SHARED=${SHARED:-$REPO/../shared}
PACKAGES=(ml-collections==1.1.0 tensorboardX==2.6.5)

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
  exit 0
fi

cd "$REPO"
mkdir -p .whl .gpu_carry
# One version of each package, or the install on the GPU machine stops.
shopt -s nocaseglob nullglob
rm -f .whl/ml_collections-*.whl .whl/tensorboardx-*.whl
shopt -u nocaseglob nullglob
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${PACKAGES[@]}"
install -m 0644 "$SHARED/bench/peer_soft_torch.py" .gpu_carry/peer_soft_torch.py
ls -l .whl .gpu_carry
du -sh .whl .gpu_carry
echo "carry: [\".whl\", \".gpu_carry\"]"
