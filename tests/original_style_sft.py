"""An SFT script written for the original OpenSloth (its examples' shape and API), run by tests/test_compat.py.

    python tests/original_style_sft.py OUT_DIR CACHE_DIR [simple|config]
    torchrun --nproc_per_node=2 tests/original_style_sft.py OUT_DIR CACHE_DIR config

Only what this machine forces differs from the original's
examples/qwen_sft_cache_dataset.py: a local model without 4-bit, local data
through the same ``load_dataset`` call, and TRL's rename of
``SFTConfig(max_seq_length=)`` to ``max_length``. Everything opensloth-specific
is the original's: import lines, ``ddp_patch()`` then
``patch_optimize_sft_trainer_batch_samples()``, the wrapper keywords
(``simple``: ``simple_cache_dataset_wrapper(cache_dir, timeout_minutes,
**key)``; ``config``: ``cache_dataset_wrapper(cache_config=CacheConfig(...),
cache_key_params=..., validate_cache=True)`` plus the deterministic sampler),
``SFTTrainer(tokenizer=...)``, the 3-tuple of ``_check_distributed_environment``
and the old ``pack`` call. Rank 0 prints one ``RESULT {json}`` line.
"""

import json
import os
import sys
from typing import Any, Optional, Tuple

from unsloth import FastLanguageModel
from datasets import Dataset, load_dataset
from trl import SFTConfig, SFTTrainer
from opensloth.patching.ddp_patch import ddp_patch, patch_optimize_sft_trainer_batch_samples
from opensloth.patching.ddp_patch import patch_trainer_loss_scaling, patch_trainer_deterministic_sampler
from opensloth import simple_cache_dataset_wrapper, cache_dataset_wrapper, CacheConfig, OPENSLOTH_DATA_DIR
from opensloth.utils.dataset_cache import _check_distributed_environment
from opensloth.utils.packing import pack

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR, CACHE_DIR = sys.argv[1], sys.argv[2]
WRAPPER = sys.argv[3] if len(sys.argv) > 3 else "simple"

MODEL_NAME = os.path.join(REPO, "data", "tiny-qwen3")  # was unsloth/Qwen3-0.6B-bnb-4bit
MAX_SEQ_LENGTH = 1024
NUM_EPOCHS = 1
TRAIN_SAMPLES = 16
VAL_SAMPLES = 4
LEARNING_RATE = 2e-4
PER_DEVICE_BATCH_SIZE = 2
GRAD_ACCUM = 2
EXPERIMENT_NAME = "opensloth_sanity"
KEY = dict(model_name=MODEL_NAME, max_seq_length=MAX_SEQ_LENGTH, train_samples=TRAIN_SAMPLES, val_samples=VAL_SAMPLES)


def init_model(local_rank: int) -> Tuple[Any, Any]:
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=MODEL_NAME, max_seq_length=MAX_SEQ_LENGTH, load_in_4bit=False,
        device_map={"": "cpu"},  # was cuda:{local_rank}
    )
    model = FastLanguageModel.get_peft_model(
        model, r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_alpha=16,
        use_gradient_checkpointing="unsloth", random_state=42,
    )
    return model, tokenizer


def prepare_datasets(tokenizer: Any) -> Tuple[Dataset, Optional[Dataset]]:
    files = os.path.join(REPO, "data", "sft", "train.jsonl")  # was the hub id trl-lib/Capybara
    train_dataset = load_dataset("json", data_files=files, split=f"train[:{TRAIN_SAMPLES}]")
    val_dataset = load_dataset("json", data_files=files, split=f"train[{TRAIN_SAMPLES}:{TRAIN_SAMPLES + VAL_SAMPLES}]")

    def format_messages(examples):
        return {"text": [tokenizer.apply_chat_template(msgs, tokenize=False) for msgs in examples["messages"]]}

    train_dataset = train_dataset.map(format_messages, batched=True, remove_columns=train_dataset.column_names)
    val_dataset = val_dataset.map(format_messages, batched=True, remove_columns=val_dataset.column_names)
    return train_dataset, val_dataset


def build_trainer(model: Any, tokenizer: Any, train_dataset: Dataset, val_dataset: Optional[Dataset],
                  world_size: int) -> SFTTrainer:
    run_name = f"{EXPERIMENT_NAME}_ws{world_size}"
    training_config = {
        "per_device_train_batch_size": PER_DEVICE_BATCH_SIZE,
        "gradient_accumulation_steps": GRAD_ACCUM,
        "num_train_epochs": NUM_EPOCHS,
        "learning_rate": LEARNING_RATE,
        "logging_steps": 1,
        "save_strategy": "epoch",
        "output_dir": os.path.join(OUT_DIR, run_name),
        "report_to": "tensorboard",
        "run_name": run_name,
        "eval_strategy": "epoch",
        "dataset_num_proc": 2,
        "max_length": MAX_SEQ_LENGTH,  # was max_seq_length (renamed by TRL)
    }
    if world_size > 1:
        training_config["ddp_find_unused_parameters"] = False
    return SFTTrainer(model=model, tokenizer=tokenizer, train_dataset=train_dataset, eval_dataset=val_dataset,
                      args=SFTConfig(**training_config))


if WRAPPER == "simple":
    cached_build_trainer = simple_cache_dataset_wrapper(cache_dir=CACHE_DIR, timeout_minutes=60, **KEY)(build_trainer)
else:
    config = CacheConfig(cache_dir=CACHE_DIR, timeout_seconds=3600)
    cached_build_trainer = cache_dataset_wrapper(cache_config=config, cache_key_params=KEY,
                                                 validate_cache=True)(build_trainer)


if __name__ == "__main__":
    local_rank, world_size, global_rank = _check_distributed_environment()

    ddp_patch()
    patch_optimize_sft_trainer_batch_samples()
    if WRAPPER == "config":
        patch_trainer_deterministic_sampler()

    packed = pack({"input_ids": [[1, 2, 3], [4, 5]], "labels": [[1, 2, 3], [4, 5]]}, max_seql=16,
                  pad_token_id=0, device="cpu", return_token_mask=True, attn_mode="tri")

    model, tokenizer = init_model(local_rank)
    train_dataset, val_dataset = prepare_datasets(tokenizer)
    trainer = cached_build_trainer(model, tokenizer, train_dataset, val_dataset, world_size)
    trainer.train()

    if global_rank == 0:
        from opensloth.patches import applied_patches

        print("RESULT " + json.dumps({
            "env": [local_rank, world_size, global_rank],
            "steps": trainer.state.global_step,
            "losses": [r["loss"] for r in trainer.state.log_history if "loss" in r],
            "patches": [p.name for p in applied_patches()],
            "pack_keys": sorted(packed),
            "sampler": type(trainer._get_train_sampler()).__name__,
            "data_dir": str(OPENSLOTH_DATA_DIR),
            "loss_scaling": callable(patch_trainer_loss_scaling),
        }), flush=True)
