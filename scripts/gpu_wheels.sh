#!/usr/bin/env bash
# Download the wheels scripts/gpu_check.sh needs on a CUDA machine that has no package registry,
# for CPython 3.12 on manylinux x86_64, into .whl/ (git-ignored), trimmed to what training imports.
#
#   bash scripts/gpu_wheels.sh            # fills .whl/, prints each wheel's size and the total with the tree
#   LIMIT_MIB=64 bash scripts/gpu_wheels.sh
#
# Then, on the GPU machine (torch 2.11+cu130, transformers 5.17, accelerate 1.15 preinstalled):
#   bash scripts/gpu_check.sh OUT_DIR     # installs .whl/*.whl into a temporary --target dir first
#
# What travels and why (read off unsloth 2026.10.9 / unsloth_zoo 2026.10.9, see docs/benchmarks.md):
# - unsloth, unsloth_zoo, trl, datasets (+ dill, multiprocess: datasets imports both at import time),
#   cut_cross_entropy (unsloth_zoo.loss_utils imports it on CUDA), peft and fsspec (pinned to the
#   CPU-tested 0.21.2 / 2026.2.0, the newest fsspec datasets 4.8.5 accepts, so the image's versions
#   cannot differ).
# - bitsandbytes for the 4-bit stage; _gpu_init imports it inside try/except, so training without it
#   works in 16 bit. Only libbitsandbytes_cuda130.so (torch.version.cuda == "13.0" selects it) and the
#   CPU library are kept; the 14 other CUDA/ROCm/XPU builds are dropped (43 MB -> ~4 MB).
# - unsloth without studio/ (the web UI, 26 MB) and unsloth_cli/ (the `unsloth` console command):
#   nothing under unsloth/ imports either.
# - tyro (+ docstring_parser, typeguard) and msgspec are Requires-Dist of unsloth / unsloth_zoo but are
#   not imported by `import unsloth`, FastLanguageModel or the SFT/DPO trainers (msgspec only by the
#   vLLM LoRA helper, tyro only by studio/); they are carried anyway because they cost 0.5 MB.
# Not carried (optional, imported inside try/except): xformers, flash_attn, torchao, pydantic,
# hf_transfer, vllm. Unsloth then uses torch SDPA attention.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=.whl
RAW=${WHEEL_CACHE:-build/wheels-raw}
LIMIT_MIB=${LIMIT_MIB:-64}

PINS=(
  unsloth==2026.10.9
  unsloth_zoo==2026.10.9
  trl==1.15.0
  datasets==4.8.5
  fsspec==2026.2.0
  dill==0.4.1
  multiprocess==0.70.19
  cut_cross_entropy==25.1.1
  peft==0.21.2
  bitsandbytes==0.50.2
  tyro==1.0.17
  docstring_parser==0.18.0
  typeguard==4.6.1
  msgspec==0.22.0
)

mkdir -p "$RAW" "$OUT"
grep -qx '/.whl/' .gitignore 2>/dev/null || grep -qx '/.whl/' .git/info/exclude 2>/dev/null \
  || echo '/.whl/' >> .git/info/exclude

PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp "${PLATFORMS[@]}" -d "$RAW" "${PINS[@]}"

rm -f "$OUT"/*.whl
for pin in "${PINS[@]}"; do
  name=${pin%%==*}; version=${pin##*==}
  # Wheel file names normalise '-' to '_'; match case-insensitively.
  stem=$(echo "$name" | tr '-' '_')
  src=$(ls "$RAW" | grep -i "^${stem}-${version}-" | head -1 || true)
  if [ -z "$src" ]; then
    echo "gpu_wheels: no wheel for $pin in $RAW" >&2
    exit 1
  fi
  case "$name" in
    unsloth)
      "$PY" scripts/trim_wheel.py "$RAW/$src" "$OUT/$src" --drop studio/ --drop unsloth_cli/ \
        --drop-glob '*.dist-info/entry_points.txt' ;;
    bitsandbytes)
      "$PY" scripts/trim_wheel.py "$RAW/$src" "$OUT/$src" --drop-glob 'bitsandbytes/libbitsandbytes_*' \
        --keep-glob 'bitsandbytes/libbitsandbytes_cuda130.so' --keep-glob 'bitsandbytes/libbitsandbytes_cpu.so' ;;
    *)
      cp "$RAW/$src" "$OUT/$src" ;;
  esac
done

"$PY" - "$OUT" "$LIMIT_MIB" <<'PYEOF'
import os, subprocess, sys
out, limit_mib = sys.argv[1], float(sys.argv[2])
wheels = sorted(os.listdir(out))
sizes = {w: os.path.getsize(os.path.join(out, w)) for w in wheels if w.endswith(".whl")}
files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       capture_output=True, check=True).stdout.split(b"\0")
tree = sum(os.path.getsize(f) for f in files if f and os.path.isfile(f))
print(f"\n| wheel | MB |\n|---|---|")
for w, s in sizes.items():
    print(f"| {w} | {s / 1e6:.2f} |")
total = sum(sizes.values()) + tree
print(f"| wheels, together | {sum(sizes.values()) / 1e6:.2f} |")
print(f"| working tree (tracked + untracked, not ignored) | {tree / 1e6:.2f} |")
print(f"| **total that travels** | **{total / 1e6:.2f}** ({total / 2**20:.1f} MiB of {limit_mib:.0f}) |")
if total > limit_mib * 2**20:
    print(f"gpu_wheels: {total / 2**20:.1f} MiB exceeds the {limit_mib:.0f} MiB limit", file=sys.stderr)
    sys.exit(1)
PYEOF
