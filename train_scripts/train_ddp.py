"""The minimal opensloth DDP recipe: Unsloth LoRA SFT on N ranks, top to bottom.

    torchrun --nproc_per_node=2 train_scripts/train_ddp.py
    python train_scripts/train_ddp.py            # 1 process, same script

Environment knobs (kept out of argparse to stay minimal; see
train_configurable.py for every flag): MODEL (default data/tiny-qwen3),
DATASET (default data/sft), MAX_STEPS (default 30), GLOBAL_BATCH (default 16),
OUTPUT_DIR (default outputs).
"""

import os
import sys

import unsloth  # noqa: F401  (first: Unsloth patches transformers and TRL on import)

from opensloth.distributed import distributed_env
from opensloth.errors import UserInputError
from opensloth.launch import claim_run_dir
from opensloth.patches.batch_samples import patch_optimize_sft_trainer_batch_samples
from opensloth.patches.ddp import ddp_patch

# 0. The run dir, before any rank writes: a folder holding another run's adapter is refused.
env = distributed_env()
try:
    run_dir = claim_run_dir(os.environ.get("OUTPUT_DIR", "outputs"), "train_ddp", env.world_size)
except UserInputError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)

# 1. One call per process: pins this rank's device, creates the process group
#    (gloo on CPU, nccl on CUDA) and fixes the trainer's cross-rank loss scaling.
device = ddp_patch()
# 2. Optional speed patch: every optimizer step is packed and balanced across ranks.
patch_optimize_sft_trainer_batch_samples()

from datasets import load_dataset  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402
from unsloth import FastLanguageModel  # noqa: E402

model_name = os.environ.get("MODEL", "data/tiny-qwen3")
dataset_dir = os.environ.get("DATASET", "data/sft")
global_batch = int(os.environ.get("GLOBAL_BATCH", "16"))
per_device = global_batch // env.world_size  # keep the global batch fixed across world sizes

# 3. Model + LoRA (q/k/v/o, r=8, alpha=16, Unsloth gradient checkpointing).
model, tokenizer = FastLanguageModel.from_pretrained(
    model_name=model_name, max_seq_length=1024, load_in_4bit=False, device_map={"": str(device)},
)
model = FastLanguageModel.get_peft_model(
    model, r=8, lora_alpha=16, lora_dropout=0.0, bias="none",
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    use_gradient_checkpointing="unsloth", random_state=3407,
)

# 4. Data: chat messages -> text with the model's chat template.
dataset = load_dataset("json", data_files=os.path.join(dataset_dir, "train.jsonl"), split="train")
dataset = dataset.map(
    lambda ex: {"text": tokenizer.apply_chat_template(ex["messages"], tokenize=False)},
    remove_columns=dataset.column_names,
)

# 5. Trainer. ddp_find_unused_parameters=False: every LoRA weight gets a gradient.
trainer = SFTTrainer(
    model=model,
    processing_class=tokenizer,
    train_dataset=dataset,
    args=SFTConfig(
        output_dir=run_dir,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=1,
        max_steps=int(os.environ.get("MAX_STEPS", "30")),
        learning_rate=2e-3,
        logging_steps=1,
        max_length=1024,
        dataset_text_field="text",
        padding_free=False,  # the batch patch packs; unset, Unsloth's GPU path would choose per data
        seed=3407,
        report_to=["tensorboard"],
        save_strategy="no",
        ddp_find_unused_parameters=False if env.world_size > 1 else None,
    ),
)

# 6. Train and save the adapter (rank 0 writes).
trainer.train()
trainer.save_state()
if trainer.is_world_process_zero():
    model.save_pretrained(run_dir)
    print(f"global batch {per_device * env.world_size}; adapter saved to {run_dir}")
