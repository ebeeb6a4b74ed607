"""User template: Qwen3 LoRA SFT with Unsloth on N GPUs (or CPU ranks) with opensloth.

Copy this file and edit the CONFIG block.

    torchrun --nproc_per_node=4 examples/qwen_sft.py                  # 4 GPUs
    MODEL=unsloth/Qwen3-0.6B DATASET=trl-lib/Capybara torchrun --nproc_per_node=8 examples/qwen_sft.py
    python examples/qwen_sft.py                                       # 1 process, embedded tiny model

The order matters: import Unsloth first, then call ddp_patch() before any
model is created, then load the model onto this rank's device.
"""

import os

import unsloth  # noqa: F401  (must be the first heavy import)

from opensloth.patches.batch_samples import patch_optimize_sft_trainer_batch_samples
from opensloth.patches.ddp import ddp_patch

device = ddp_patch()  # cuda:{LOCAL_RANK} on GPUs, cpu otherwise; gloo/nccl; loss-scaling fix
patch_optimize_sft_trainer_batch_samples()  # pack + balance each step across ranks (optional)

from trl import SFTConfig, SFTTrainer  # noqa: E402
from unsloth import FastLanguageModel  # noqa: E402

from opensloth.data import load_records  # noqa: E402
from opensloth.distributed import distributed_env  # noqa: E402

# ---- CONFIG -----------------------------------------------------------------------------------
MODEL = os.environ.get("MODEL", "data/tiny-qwen3")  # e.g. unsloth/Qwen3-0.6B (hub) or a local folder
DATASET = os.environ.get("DATASET", "data/sft")  # e.g. trl-lib/Capybara, a .jsonl file, or a folder
SPLIT = os.environ.get("SPLIT", "train")  # slicing works: train[:1%]
MAX_SEQ_LENGTH = 1024
GLOBAL_BATCH = 16  # kept fixed whatever the number of ranks, so runs are comparable
GRAD_ACCUM = 1
MAX_STEPS = int(os.environ.get("MAX_STEPS", "20"))
LOAD_IN_4BIT = os.environ.get("LOAD_IN_4BIT", "0") == "1"  # needs bitsandbytes + CUDA
OUTPUT_DIR = os.environ.get("OUTPUT_DIR", "outputs")
# -----------------------------------------------------------------------------------------------

env = distributed_env()
per_device = GLOBAL_BATCH // (env.world_size * GRAD_ACCUM)

model, tokenizer = FastLanguageModel.from_pretrained(
    model_name=MODEL,
    max_seq_length=MAX_SEQ_LENGTH,
    load_in_4bit=LOAD_IN_4BIT,
    device_map={"": str(device)},  # one full copy per rank: this is DDP, not model parallelism
)
model = FastLanguageModel.get_peft_model(
    model, r=8, lora_alpha=16, lora_dropout=0.0, bias="none",
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    use_gradient_checkpointing="unsloth", random_state=3407,
)

dataset = load_records(DATASET, SPLIT)
dataset = dataset.map(
    lambda ex: {"text": tokenizer.apply_chat_template(ex["messages"], tokenize=False)},
    remove_columns=dataset.column_names,
)

run_dir = os.path.join(OUTPUT_DIR, f"qwen_sft_ws{env.world_size}")
trainer = SFTTrainer(
    model=model,
    processing_class=tokenizer,
    train_dataset=dataset,
    args=SFTConfig(
        output_dir=run_dir,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=GRAD_ACCUM,
        max_steps=MAX_STEPS,
        learning_rate=2e-3,
        logging_steps=1,
        max_length=MAX_SEQ_LENGTH,
        dataset_text_field="text",
        padding_free=False,  # the batch patch packs; unset, Unsloth's GPU path would choose per data
        seed=3407,
        report_to=["tensorboard"],
        save_strategy="no",
        ddp_find_unused_parameters=False if env.world_size > 1 else None,
    ),
)
trainer.train()
trainer.save_state()
if trainer.is_world_process_zero():
    model.save_pretrained(run_dir)
    tokenizer.save_pretrained(run_dir)
