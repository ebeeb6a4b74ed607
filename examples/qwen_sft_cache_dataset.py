"""Template: LoRA SFT where one rank tokenizes and every rank (and every later launch) reuses the result.

    python examples/qwen_sft_cache_dataset.py                          # 1 process, embedded default, CPU is fine
    torchrun --nproc_per_node=4 examples/qwen_sft_cache_dataset.py     # 4 GPUs: rank 0 tokenizes, 3 wait and load
    MAX_STEPS=5 OUTPUT_DIR=/tmp/runs CACHE_DIR=/tmp/cache python examples/qwen_sft_cache_dataset.py

The same run as ``examples/qwen_sft.py``, with ``build_trainer`` decorated by
``simple_cache_dataset_wrapper``: the first launch tokenizes on global rank 0
and publishes ``<CACHE_DIR>/<key>/`` atomically; the other ranks wait for it
and load it memory-mapped; a later launch on 1, 2 or 8 ranks with the same
data, tokenizer and key parameters tokenizes nothing. The keywords other than
``cache_dir`` and ``timeout_minutes`` go into the cache key.

What changed against the original's example, and why: the world size is not
part of the cache key (a 1-rank and a 4-rank run share one cache), the key
also covers the data's content and the tokenizer (the original's held only
the row counts, so edited data silently reused a stale cache), and
``train_samples``/``val_samples`` as key parameters no longer collide with the
wrapper's own (the original's example failed on them with a TypeError).
``sft_dataset_kwargs`` tells TRL not to prepare the cached rows again; without
it the wrapper restores the cached splits and logs a warning. The TRL renames
and the saved adapter are as in ``examples/qwen_sft.py``.
"""

import os
import sys

from unsloth import FastLanguageModel  # first: Unsloth patches transformers and TRL on import

from trl import SFTConfig, SFTTrainer

from opensloth import simple_cache_dataset_wrapper
from opensloth.cache import sft_dataset_kwargs
from opensloth.data import load_records
from opensloth.distributed import distributed_env
from opensloth.errors import run_cli
from opensloth.launch import claim_run_dir
from opensloth.patching.ddp_patch import ddp_patch, patch_optimize_sft_trainer_batch_samples

# ------------------------------------------------------------------ hyperparameters
MODEL_NAME = os.environ.get("MODEL_NAME", "data/tiny-qwen3")  # local folder or hub id
LOAD_IN_4BIT = False  # True needs bitsandbytes and CUDA
DATASET = os.environ.get("DATASET", "data/sft")  # chat "messages" records: folder, .jsonl, or hub id
MAX_SEQ_LENGTH = 1024
NUM_EPOCHS = 1
MAX_STEPS = int(os.environ.get("MAX_STEPS", "20"))  # -1: train NUM_EPOCHS
TRAIN_SAMPLES = 256
VAL_SAMPLES = 16  # 0: no evaluation
LEARNING_RATE = 2e-4
PER_DEVICE_BATCH_SIZE = 4
GRAD_ACCUM = 1
EXPERIMENT_NAME = "qwen_sft_cache"
OUTPUT_DIR = os.environ.get("OUTPUT_DIR", "outputs")
CACHE_DIR = os.environ.get("CACHE_DIR")  # None: $OPENSLOTH_CACHE_DIR or ~/.cache/opensloth/datasets


def init_model(device):
    """The base model on this rank's device, with LoRA adapters (same init on every rank)."""
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=MODEL_NAME,
        max_seq_length=MAX_SEQ_LENGTH,
        load_in_4bit=LOAD_IN_4BIT,
        device_map={"": str(device)},  # a full copy per rank: DDP, not model parallelism
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        use_gradient_checkpointing="unsloth",
        random_state=42,
    )
    return model, tokenizer


def prepare_datasets(tokenizer):
    """The first TRAIN_SAMPLES records for training and the next VAL_SAMPLES for evaluation, as chat text."""
    train_dataset = load_records(DATASET, f"train[:{TRAIN_SAMPLES}]")
    val_dataset = (load_records(DATASET, f"train[{TRAIN_SAMPLES}:{TRAIN_SAMPLES + VAL_SAMPLES}]")
                   if VAL_SAMPLES > 0 else None)

    def to_text(batch):
        return {"text": [tokenizer.apply_chat_template(m, tokenize=False) for m in batch["messages"]]}

    train_dataset = train_dataset.map(to_text, batched=True, remove_columns=train_dataset.column_names)
    if val_dataset is not None:
        val_dataset = val_dataset.map(to_text, batched=True, remove_columns=val_dataset.column_names)
    return train_dataset, val_dataset


@simple_cache_dataset_wrapper(
    cache_dir=CACHE_DIR,
    timeout_minutes=60,
    model_name=MODEL_NAME,
    max_seq_length=MAX_SEQ_LENGTH,
    train_samples=TRAIN_SAMPLES,
    val_samples=VAL_SAMPLES,
)
def build_trainer(model, tokenizer, train_dataset, val_dataset, world_size, run_dir):
    """Called with the raw text on the rank that tokenizes, with the cached token ids on the others."""
    config = SFTConfig(
        output_dir=run_dir,
        run_name=os.path.basename(run_dir),
        per_device_train_batch_size=PER_DEVICE_BATCH_SIZE,
        gradient_accumulation_steps=GRAD_ACCUM,
        num_train_epochs=NUM_EPOCHS,
        max_steps=MAX_STEPS,
        learning_rate=LEARNING_RATE,
        logging_steps=1,
        eval_strategy="steps" if val_dataset is not None else "no",
        eval_steps=10,
        save_strategy="no",  # the adapter is saved once at the end
        report_to=["tensorboard"],
        max_length=MAX_SEQ_LENGTH,
        dataset_text_field="text",
        dataset_kwargs=sft_dataset_kwargs(train_dataset),  # cached rows are tokenized: TRL skips its preparation
        padding_free=False,  # the batch patch packs; left unset, Unsloth's GPU path decides per dataset
        seed=3407,
        ddp_find_unused_parameters=False if world_size > 1 else None,
    )
    return SFTTrainer(model=model, processing_class=tokenizer, train_dataset=train_dataset,
                      eval_dataset=val_dataset, args=config)


def main(argv=None):
    env = distributed_env()  # RANK / LOCAL_RANK / WORLD_SIZE, checked
    run_dir = claim_run_dir(OUTPUT_DIR, EXPERIMENT_NAME, env.world_size)  # before any rank writes
    device = ddp_patch()  # cuda:LOCAL_RANK on GPUs, cpu otherwise
    patch_optimize_sft_trainer_batch_samples()  # optional: pack and balance each step across ranks

    model, tokenizer = init_model(device)
    train_dataset, val_dataset = prepare_datasets(tokenizer)
    trainer = build_trainer(model, tokenizer, train_dataset, val_dataset, env.world_size, run_dir)
    trainer.train()
    trainer.save_state()
    if trainer.is_world_process_zero():
        model.save_pretrained(run_dir)  # the LoRA adapter
        tokenizer.save_pretrained(run_dir)
        print(f"adapter saved to {run_dir}; merge it with: python -m opensloth.export {run_dir} {run_dir}_merged")


if __name__ == "__main__":
    sys.exit(run_cli(main))
