#!/usr/bin/env bash
# Runs bench/gpu_run.py --dry-run here in a copy of the lent GPU machine's software, before any GPU
# run (issue #20, item 5): a Python 3.12 virtualenv holding only packages that the GPU image lists
# (/work/.library/device/KINDS.md; versions pinned where that page gives them), Ray and what else
# the image lacks only from .gpu through `source .gpu/setup.sh`, and the project not installed but
# on PYTHONPATH from a clean clone of HEAD with .gpu and .photos copied beside it - what travels.
# No s3fs, duckdb, webdataset, pydantic or weed: a dry run that passes here needs none of them.
#   bash bench/gpu_image_venv.sh [VENV]        # VENV default /tmp/glcic-gpu-image-venv, reused
# It unpacks the bundle into /tmp/site, as the device does; that folder is replaced.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-/tmp/glcic-gpu-image-venv}
py312=${PYTHON312:-python3.12}
"$py312" -c '' 2>/dev/null || py312=/root/.pyenv/versions/3.12.1/bin/python3.12  # pyenv's shim fails
[ -f "$root/.gpu/setup.sh" ] && [ -d "$root/.photos" ] || bash "$root/bench/gpu_prepare.sh"
if [ ! -x "$venv/bin/python3" ]; then
  "$py312" -m venv "$venv"
  # torch from PyPI is the CUDA 13 build the image holds; it runs on this CPU.
  "$venv/bin/python3" -m pip install -q --disable-pip-version-check \
    torch==2.11.0 numpy==2.5.2 onnxruntime==1.30.0 safetensors==0.8.0 \
    pyarrow pandas fsspec opencv-python-headless typer pillow rich psutil aiohttp msgpack \
    pyyaml requests filelock protobuf click
fi
# typer's newest release pulls pydantic in; the image lists none of these, so only .gpu's wheels
# (which Ray needs) may provide them, as on the device.
"$venv/bin/python3" -m pip uninstall -q -y pydantic pydantic-core annotated-types typing-inspection 2>/dev/null || true
copy=$(mktemp -d /tmp/glcic-gpu-image.XXXXXX)
git -C "$root" clone -q "$root" "$copy/tree"
cp -r "$root/.gpu" "$root/.photos" "$copy/tree/"
rm -rf /tmp/site
cd "$copy/tree"
env -i HOME="$HOME" PATH="$venv/bin:/usr/bin:/bin" bash -c \
  'source .gpu/setup.sh && python3 --version && PYTHONUNBUFFERED=1 python3 bench/gpu_run.py --dry-run --out "$0"' \
  "$copy/out"
echo "dry run in the GPU image's copy passed; its files: $copy/out"
