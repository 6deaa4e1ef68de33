#!/usr/bin/env bash
# Compiles every .cu file under csrc/ with nvcc (no GPU needed), against torch's headers.
set -euo pipefail
cd "$(dirname "$0")/.."
torch_inc=$(ls -d .venv/lib/python3*/site-packages/torch/include 2>/dev/null | head -n 1 || true)
out=$(mktemp -d)
status=0
while IFS= read -r src; do
  echo "nvcc: $src"
  nvcc -std=c++17 -O2 -Icsrc ${torch_inc:+-I"$torch_inc"} -c "$src" -o "$out/$(basename "$src").o" || status=1
done < <(find csrc -name '*.cu' | sort)
rm -rf "$out"
exit $status
