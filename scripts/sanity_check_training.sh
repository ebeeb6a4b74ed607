#!/usr/bin/env bash
# Do N ranks train like 1? Runs the world-size matrix on the embedded default with a
# fixed global batch, for SFT and for DPO:
#
#   SFT: 1 process, no patches (the reference) | 2 ranks, patches | 4 ranks, patches | 4 ranks, no patches
#   DPO: dynamic beta on 1 process (its reference), 2 and 4 ranks, all with opensloth's patches;
#        stock TRL (--no_patches, which for DPO means fixed beta) on 1 process and on 4 ranks.
#   DPOREF: SeanYHan888/dynamic_beta's own config (examples/reference_configs/dynamic_beta.yaml with
#        policy_name / ref_name / dataset_name pointed at the tiny model and the raw HH transcripts of
#        data/formats/hh_sample.jsonl): full fine-tuning against the frozen reference, preset
#        reference (beta from each batch, used in that batch's loss), on 1 process and on 2 ranks.
#
# The dynamic-beta controller is itself an opensloth patch of TRL's DPOTrainer, so
# "DPO without patches" cannot run dynamic beta; its rows check stock TRL instead.
#
# then prints the max deviation of every curve from the 1-process one and each run's
# wall-clock, draws all curves into one PNG, and exits 1 if a curve deviates beyond
# the tolerance.
#
#   bash scripts/sanity_check_training.sh                     # CPU: gloo, ~10 minutes on 2 cores
#   STEPS=40 TASKS="sft" bash scripts/sanity_check_training.sh
#   TASKS="dporef" bash scripts/sanity_check_training.sh    # the reference-config row alone
#
# On a CUDA machine it uses the GPUs it finds (rows needing more ranks than GPUs are
# skipped) in bfloat16, with a looser default tolerance.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${OUT:-outputs/sanity}
PNG=${PNG:-$OUT/sanity_check.png}
STEPS=${STEPS:-16}
GLOBAL_BATCH=${GLOBAL_BATCH:-16}
TASKS=${TASKS:-"sft dpo dporef"}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  MAX_RANKS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
  DTYPE=bfloat16; TOL=${TOL:-5e-2}
else
  MAX_RANKS=4; DTYPE=float32; TOL=${TOL:-1e-3}
fi

rm -rf "$OUT"; mkdir -p "$OUT"
: > "$OUT/walltimes.tsv"
run() {  # task nproc label extra-args...
  local task=$1 nproc=$2 label=$3; shift 3
  if [ "$nproc" -gt "$MAX_RANKS" ]; then echo "skip $task $label ws$nproc: only $MAX_RANKS device(s)"; return; fi
  local script=train_scripts/train_configurable.py common=(--global_batch_size "$GLOBAL_BATCH")
  if [ "$task" = dpo ]; then
    script=train_scripts/train_dpo.py
    # zscore: beta moves even at 16 pairs per step (the deadband default cannot lower it below ~150)
    common+=(--dynamic_beta.warmup_steps 4 --dynamic_beta.alpha 0.05 --dynamic_beta.risk_rule zscore --max_seq_length 384)
  elif [ "$task" = dporef ]; then
    script=train_scripts/train_dpo.py
    # Their config unchanged but for the model and data paths; flags shorten the run: the config's batch_size
    # becomes the per-rank share of the global batch, 32 training pairs (2 whole steps per epoch on any
    # world size), a warmup and alpha that move beta within STEPS, float32 and the logs inside the run dir.
    common=(--config "$OUT/dynamic_beta_local.yaml" --backend hf --train_split train --train_samples 32
            --per_device_batch_size $(( GLOBAL_BATCH / nproc )) --dynamic_beta.warmup_steps 4
            --dynamic_beta.alpha 0.05 --margins_log_dir "$OUT/${task}_${label}_ws${nproc}/logs/margins")
  else
    common+=(--max_seq_length 512 --cache_dir "$OUT/cache")
  fi
  local launcher=("$PY" "$script")
  [ "$nproc" -gt 1 ] && launcher=("$PY" -m torch.distributed.run --standalone --nproc_per_node="$nproc" "$script")
  echo "== $task $label on $nproc rank(s)"
  local start end
  start=$(date +%s%N)
  "${launcher[@]}" "${common[@]}" --dtype "$DTYPE" --max_steps "$STEPS" \
    --learning_rate 1e-3 --logging_steps 1 --test_samples 32 --eval_steps 4 --eval_batch_size 1 --seed 7 \
    --output_dir "$OUT" --experiment_name "${task}_${label}" "$@" > "$OUT/${task}_${label}_ws${nproc}.log" 2>&1 \
    || { echo "run failed: see $OUT/${task}_${label}_ws${nproc}.log"; tail -20 "$OUT/${task}_${label}_ws${nproc}.log"; exit 1; }
  end=$(date +%s%N)
  printf '%s\t%s\n' "${task}_${label}_ws${nproc}" "$(( (end - start) / 1000000 ))" >> "$OUT/walltimes.tsv"
}

"$PY" - "$OUT/dynamic_beta_local.yaml" <<'PYEOF'
import sys, yaml
config = yaml.safe_load(open("examples/reference_configs/dynamic_beta.yaml"))
config["policy_name"] = config["ref_name"] = "data/tiny-qwen3"
config["dataset"]["dataset_name"] = "data/formats/hh_sample.jsonl"
yaml.safe_dump(config, open(sys.argv[1], "w"), sort_keys=False)
PYEOF

for task in $TASKS; do
  if [ "$task" = dporef ]; then
    run "$task" 1 reference
    run "$task" 2 reference
    continue
  fi
  plain=(--no_patches)
  [ "$task" = dpo ] && plain+=(--beta_mode fixed)  # stock TRL DPO has no dynamic beta
  run "$task" 1 plain "${plain[@]}"
  [ "$task" = dpo ] && run "$task" 1 patched     # the dynamic-beta reference
  run "$task" 2 patched
  run "$task" 4 patched
  run "$task" 4 plain "${plain[@]}"
done
"$PY" scripts/sanity_report.py --root "$OUT" --tasks $TASKS --tolerance "$TOL" --png "$PNG"
