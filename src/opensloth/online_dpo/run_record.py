"""The settings a run folder was started with; a resume with other settings is refused.

Resuming mixes iterations of two runs when the SFT model, the prompts, the
judge or the training settings change, so the first start writes
``<output>/oak_run.json`` and later starts compare against it. The number of
iterations and the world size may change (candidates do not depend on the
world size).
"""

from __future__ import annotations

import json
import os

from opensloth.atomic import write_json_atomic
from opensloth.distributed import gather_checked
from opensloth.online_dpo.layout import RUN_FILE


def _normalised(value):
    return json.loads(json.dumps(value, sort_keys=True))


def differing_keys(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested mappings."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(differing_keys(a, b, f"{prefix}{key}."))
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


def check_run_record(output: str, env, fingerprint: dict) -> None:
    """Write the run record on the first start; on later starts raise if the settings changed.

    Raises:
        UserInputError: on every rank, naming the changed settings.
    """

    error = None
    if env.is_main:
        path = os.path.join(output, RUN_FILE)
        current = _normalised(fingerprint)
        if os.path.isfile(path):
            with open(path) as fh:
                saved = json.load(fh)
            changed = differing_keys(saved, current)
            if changed:
                error = (f"{output} was started with other settings ({', '.join(changed[:6])} differ, see {path}); "
                         "resume with the same settings or pick a new --output")
        else:
            write_json_atomic(path, current)
    gather_checked(None, error)
