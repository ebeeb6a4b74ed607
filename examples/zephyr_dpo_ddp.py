"""Template: LoRA DPO (fixed beta) with Unsloth + TRL on 1 or N ranks, in the original OpenSloth's shape.

    python examples/zephyr_dpo_ddp.py                          # 1 process: embedded tiny model and pairs, CPU is fine
    torchrun --nproc_per_node=4 examples/zephyr_dpo_ddp.py     # 4 GPUs (or 4 CPU ranks over gloo)
    MAX_STEPS=5 OUTPUT_DIR=/tmp/runs python examples/zephyr_dpo_ddp.py

Copy it and edit the constants. For the original's run: MODEL_NAME =
"unsloth/zephyr-sft-bnb-4bit", LOAD_IN_4BIT = True, DATASET =
"HuggingFaceH4/ultrafeedback_binarized" with TRAIN_SPLIT = "train_prefs[:1%]"
and TEST_SPLIT = "test_prefs", NUM_EPOCHS = 3, MAX_STEPS = -1. The data may be
prompt/chosen/rejected strings, chat-message pairs (UltraFeedback), Anthropic
HH transcripts or judged rollouts: ``opensloth.data.load_preference_dataset``
turns each into conversational prompt/chosen/rejected, and TRL applies the
chat template. For the dynamic-beta trainer use ``train_scripts/train_dpo.py``.

Only ``ddp_patch()`` is needed (no batch patch for DPO). The reference model
is the policy with its LoRA adapter disabled (``ref_model=None``).

What changed against the original's example, and why: TRL moved ``beta`` and
``max_length`` from ``DPOTrainer(...)`` into ``DPOConfig`` and dropped
``max_prompt_length`` (long prompts are cut by ``max_length`` as a whole);
``tokenizer=`` is ``processing_class=``; Unsloth's ``PatchDPOTrainer`` is
applied where Unsloth exports it (its CPU fallback does not); the whole
conversation before the reply is the prompt (the original kept only the first
user turn); the adapter is saved at the end; and a run dir that already holds
a run is refused instead of overwritten.
"""

import os
import sys

import unsloth  # first: Unsloth patches transformers and TRL on import
from unsloth import FastLanguageModel

if hasattr(unsloth, "PatchDPOTrainer"):  # Unsloth's GPU build; the CPU fallback has none
    unsloth.PatchDPOTrainer()

from trl import DPOConfig, DPOTrainer  # noqa: E402

from opensloth.data import load_preference_dataset  # noqa: E402
from opensloth.distributed import distributed_env  # noqa: E402
from opensloth.errors import run_cli  # noqa: E402
from opensloth.launch import claim_run_dir  # noqa: E402
from opensloth.patching.ddp_patch import ddp_patch  # noqa: E402

# ------------------------------------------------------------------ hyperparameters
MODEL_NAME = os.environ.get("MODEL_NAME", "data/tiny-qwen3")
LOAD_IN_4BIT = False  # True needs bitsandbytes and CUDA
DATASET = os.environ.get("DATASET", "data/preference")
TRAIN_SPLIT = "train[:256]"
TEST_SPLIT = "test[:16]"  # "" for no evaluation
MAX_LENGTH = 512  # prompt + reply tokens per pair
NUM_EPOCHS = 1
MAX_STEPS = int(os.environ.get("MAX_STEPS", "20"))  # -1: train NUM_EPOCHS
LEARNING_RATE = 5e-6
PER_DEVICE_BATCH_SIZE = 2
GRAD_ACCUM = 4
BETA = 0.1
EXPERIMENT_NAME = "zephyr_dpo"
OUTPUT_DIR = os.environ.get("OUTPUT_DIR", "outputs")


def init_model(device):
    """The base model on this rank's device, with LoRA adapters on every projection."""
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=MODEL_NAME,
        max_seq_length=MAX_LENGTH,
        load_in_4bit=LOAD_IN_4BIT,
        device_map={"": str(device)},
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=64,
        lora_alpha=64,
        lora_dropout=0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=3407,
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def prepare_datasets():
    """Conversational prompt/chosen/rejected pairs; the eval split only when TEST_SPLIT is set."""
    train_dataset, report = load_preference_dataset(DATASET, TRAIN_SPLIT, as_messages=True)
    print(report.summary())  # pairs read, dropped (and why)
    val_dataset = load_preference_dataset(DATASET, TEST_SPLIT, as_messages=True)[0] if TEST_SPLIT else None
    return train_dataset, val_dataset


def build_trainer(model, tokenizer, train_dataset, val_dataset, world_size, run_dir):
    config = DPOConfig(
        output_dir=run_dir,
        run_name=os.path.basename(run_dir),
        per_device_train_batch_size=PER_DEVICE_BATCH_SIZE,
        gradient_accumulation_steps=GRAD_ACCUM,
        num_train_epochs=NUM_EPOCHS,
        max_steps=MAX_STEPS,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="linear",
        warmup_steps=0.1,  # below 1: a fraction of the steps (the original's warmup_ratio)
        weight_decay=0.0,
        beta=BETA,
        max_length=MAX_LENGTH,
        logging_steps=1,
        eval_strategy="steps" if val_dataset is not None else "no",
        eval_steps=10,
        save_strategy="no",  # the adapter is saved once at the end
        report_to=["tensorboard"],
        seed=42,
        ddp_find_unused_parameters=False if world_size > 1 else None,
    )
    return DPOTrainer(model=model, ref_model=None, args=config, train_dataset=train_dataset,
                      eval_dataset=val_dataset, processing_class=tokenizer)


def main(argv=None):
    env = distributed_env()
    run_dir = claim_run_dir(OUTPUT_DIR, EXPERIMENT_NAME, env.world_size)  # before any rank writes
    device = ddp_patch()  # cuda:LOCAL_RANK on GPUs, cpu otherwise; process group; loss-scaling fix

    model, tokenizer = init_model(device)
    train_dataset, val_dataset = prepare_datasets()
    trainer = build_trainer(model, tokenizer, train_dataset, val_dataset, env.world_size, run_dir)
    trainer.train()
    trainer.save_state()
    if trainer.is_world_process_zero():
        model.save_pretrained(run_dir)
        tokenizer.save_pretrained(run_dir)
        print(f"adapter saved to {run_dir}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
