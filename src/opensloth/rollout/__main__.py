"""``python -m opensloth.rollout``: an alias of ``train_scripts/rollout.py`` (run from a source checkout)."""

import os
import runpy

runpy.run_path(os.path.join(os.path.dirname(__file__), *[os.pardir] * 3, "train_scripts", "rollout.py"),
               run_name="__main__")
