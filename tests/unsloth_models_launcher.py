"""Run a training script after importing Unsloth's model code, as a GPU machine always does.

    python -m torch.distributed.run --nproc_per_node=2 tests/unsloth_models_launcher.py train_scripts/train_dpo.py ...

On a CPU machine ``import unsloth`` takes its CPU fallback and leaves TRL's
trainers alone; ``UNSLOTH_FSDP2=1`` additionally loads ``unsloth.models``
(which needs ``triton``), and that rebinds TRL's trainers to Unsloth's. The
FSDP test runs its DDP baseline through this launcher so both runs use the
same trainer class.
"""

import runpy
import sys

import unsloth  # noqa: F401  (first, as in every opensloth entry point)
import unsloth.models  # noqa: F401,E402  (Unsloth's model code: patches TRL's trainers)

script, *args = sys.argv[1:]
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
