#!/usr/bin/env bash
# Packs what bench/gpu_run.py carries to a lent GPU besides the tracked tree, into git-ignored
# folders, and prints the sum against the 64 MiB that travel:
#   .gpu/     the stripped Ray bundle (../shared/gpu/bundle.sh) plus the wheels of what this project
#             needs and the GPU image lacks (PyPatchMatch for evaluate's baseline, braceexpand);
#   .photos/  the photo set (../shared/photos does not travel).
# Then, on the device: carry [".gpu", ".photos"] and run
#   source .gpu/setup.sh && python3 bench/gpu_run.py --out "$OUT"
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .gpu/setup.sh ] || bash ../shared/gpu/bundle.sh
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/wheels pypatchmatch==2.2.0 braceexpand==0.1.7
grep -qx '/.photos/' .git/info/exclude 2>/dev/null || echo '/.photos/' >> .git/info/exclude
photos=${PHOTOS:-../shared/photos}
rm -rf .photos && mkdir .photos && cp "$photos"/*.jpg .photos/
python3 bench/gpu_run.py --carry-only --photos .photos
