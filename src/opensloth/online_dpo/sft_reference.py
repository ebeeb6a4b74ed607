"""The SFT policy as a plain model folder: the frozen base and the reference of every DPO round.

See the package docstring of :mod:`opensloth.online_dpo` for why a LoRA SFT adapter
is merged into its base instead of being trained further.
"""

from __future__ import annotations

import json
import os
import shutil

from opensloth.distributed import gather_checked
from opensloth.errors import UserInputError
from opensloth.log import log_rank0
from opensloth.rollout.policy import describe_checkpoint

MERGED_DIR = "sft_merged"
MERGE_MARKER = "opensloth_merge.json"


def merge_adapter(base: str, adapter: str, out_dir: str) -> None:
    """Merge the LoRA ``adapter`` into ``base`` and save model and tokenizer to ``out_dir`` (atomically).

    Weights are merged in float32 and saved in the base model's dtype.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        stored = getattr(AutoConfig.from_pretrained(base), "dtype", None)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    except OSError as exc:
        raise UserInputError(f"the SFT adapter's base model {base!r} cannot be loaded: "
                             f"{str(exc).strip().splitlines()[0]}") from exc
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    saved_dtype = stored if isinstance(stored, torch.dtype) else torch.float32
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    has_tokenizer = any(os.path.isfile(os.path.join(adapter, f)) for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(adapter if has_tokenizer else base)
    tmp = f"{out_dir}.tmp.{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    merged.to(saved_dtype).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, MERGE_MARKER), "w") as fh:
        json.dump({"base": base, "adapter": os.path.abspath(adapter)}, fh, indent=1)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def prepare_reference(sft_model: str, output: str, env) -> dict:
    """Resolve ``--sft-model`` to a full model folder, merging a LoRA adapter once (rank 0).

    Returns ``{"path", "kind", "base", "adapter"}``: ``path`` is the folder to
    load as the frozen base / reference; ``kind`` is ``"full"`` or ``"adapter"``.

    Raises:
        UserInputError: the checkpoint is missing or not a model/adapter
            folder (raised on every rank), or the merge fails.
    """

    kind, base, adapter = describe_checkpoint(sft_model, "--sft-model", allow_hub=False)
    if kind == "full":
        return {"path": sft_model, "kind": kind, "base": base, "adapter": None}
    out_dir = os.path.join(output, MERGED_DIR)
    error = None
    if env.is_main:
        marker = os.path.join(out_dir, MERGE_MARKER)
        current = None
        if os.path.isfile(marker):
            with open(marker) as fh:
                current = json.load(fh)
        if current != {"base": base, "adapter": os.path.abspath(adapter)}:
            log_rank0(f"merging the SFT adapter {adapter} into {base} -> {out_dir} (reference = SFT policy)")
            try:
                os.makedirs(output, exist_ok=True)
                merge_adapter(base, adapter, out_dir)
            except UserInputError as exc:
                error = str(exc)
    gather_checked(None, error)
    return {"path": out_dir, "kind": kind, "base": base, "adapter": adapter}
