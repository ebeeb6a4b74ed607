#!/usr/bin/env bash
# GPU check: the opensloth SFT flow with real Unsloth kernels on every visible GPU,
# on a randomly initialised model with the real Qwen3-0.6B architecture (no download).
# 4-bit base weights when bitsandbytes is installed. Prints tokens/s with and without
# opensloth's batch patches.
#
#   bash scripts/gpu_check.sh                # all visible GPUs
#   NGPU=2 MAX_STEPS=30 bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device visible; this check is for GPU machines (CPU runs: scripts/sanity_check_training.sh)" >&2
  exit 2
fi
NGPU=${NGPU:-$("$PY" -c "import torch; print(torch.cuda.device_count())")}
MAX_STEPS=${MAX_STEPS:-20}
OUT=${OUT_DIR:-outputs/gpu_check}
MODEL_DIR=${MODEL_DIR:-$OUT/qwen3-0.6b-random}
[ -f "$MODEL_DIR/config.json" ] || "$PY" scripts/make_random_model.py --arch qwen3-0.6b --out "$MODEL_DIR"
Q4=""
"$PY" -c "import bitsandbytes" 2>/dev/null && Q4="--load_in_4bit"
COMMON=(--model_name "$MODEL_DIR" --max_steps "$MAX_STEPS" --global_batch_size $((8 * NGPU)) --max_seq_length 2048
        --dtype bfloat16 --logging_steps 1 --output_dir "$OUT" $Q4)
for mode in patched plain; do
  extra=(); [ "$mode" = plain ] && extra=(--no_patches)
  "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" train_scripts/train_configurable.py \
    "${COMMON[@]}" --experiment_name "$mode" "${extra[@]}"
done
"$PY" - "$OUT" "$NGPU" <<'PYEOF'
import json, os, sys
out, ngpu = sys.argv[1], sys.argv[2]
print(f"\n| run | GPUs | steps | train s | tokens | tokens/s |\n|---|---|---|---|---|---|")
for mode in ("patched", "plain"):
    hist = json.load(open(os.path.join(out, f"{mode}_ws{ngpu}", "trainer_state.json")))["log_history"]
    runtime = next(r["train_runtime"] for r in hist if "train_runtime" in r)
    tokens = max(r.get("num_tokens", 0) for r in hist)
    steps = max(r["step"] for r in hist)
    print(f"| {mode} | {ngpu} | {steps} | {runtime:.1f} | {tokens:.0f} | {tokens / runtime:,.0f} |")
PYEOF
