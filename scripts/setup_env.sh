#!/usr/bin/env bash
# Create .venv with the CPU stack opensloth is tested on, Unsloth included.
#
#   bash scripts/setup_env.sh            # full setup (idempotent, fast when done)
#   OPENSLOTH_NO_UNSLOTH=1 bash scripts/setup_env.sh   # transformers + PEFT only
#
# torch: `pip install torch==2.13.0` picks the local CPU wheel on these
# machines. On a CUDA machine install your CUDA torch first; this script keeps
# an already-installed torch that satisfies the pin range.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${OPENSLOTH_VENV:-.venv}
STAMP="$VENV/.opensloth-setup-v1"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"

if [ ! -f "$STAMP" ]; then
  # pip writes bytecode one file at a time; --no-compile and one compileall over all cores shortens the setup
  # (98 s -> 77 s on 2 cores). The bytecode must be written here: shells with PYTHONDONTWRITEBYTECODE=1 would
  # otherwise recompile torch, transformers and Unsloth at every start (7 s -> 16 s per process).
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    $PIP install --no-compile "torch==2.13.0"
  fi
  $PIP install --no-compile -r requirements/cpu.txt
  if [ "${OPENSLOTH_NO_UNSLOTH:-0}" != "1" ]; then
    $PIP install --no-compile -r requirements/unsloth-runtime.txt
    $PIP install --no-compile --no-deps "unsloth==2026.10.9" "unsloth_zoo==2026.10.9" "cut_cross_entropy==25.1.1"
  fi
  SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # A few test files of torch use newer syntax and do not compile (pip skips them too): not an error.
  "$VENV/bin/python" -m compileall -q -j 0 "$SITE" >/dev/null 2>&1 || true
  touch "$STAMP"
fi
if [ "${OPENSLOTH_WITH_TRITON:-0}" = "1" ]; then
  # Unsloth's native FSDP2 loads its model code, which imports triton (it imports without a GPU):
  # tests/test_fsdp.py runs on CPU ranks with it and is skipped without it. 285 MB, so opt-in.
  $PIP install --no-deps "triton==3.9.0"
fi
$PIP install --no-deps -e . 2>&1 | grep -v "^WARNING" || true
"$VENV/bin/python" - <<'PYEOF'
import importlib.util, torch
print(f"[setup_env] torch {torch.__version__} (cuda={torch.cuda.is_available()}), "
      f"unsloth={'yes' if importlib.util.find_spec('unsloth') else 'no'}")
PYEOF
