"""SFT glue: load chat splits, and the trainer factory the training scripts share.

``build_sft_trainer`` has the factory signature the dataset cache wrapper
expects: ``(model, tokenizer, train_dataset, val_dataset, world_size, settings)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from opensloth.errors import UserInputError
from opensloth.log import log_rank0


@dataclass(frozen=True)
class SFTRunSettings:
    """Everything the SFT trainer factory needs besides model and data."""

    run_dir: str
    per_device_batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float = 2e-4
    warmup_steps: int = 0
    num_epochs: float = 1.0
    max_steps: int = -1
    logging_steps: int = 1
    eval_steps: int | None = None
    eval_batch_size: int | None = None
    save_steps: int = 0
    seed: int = 3407
    max_seq_length: int = 1024
    backend: str = "hf"
    dtype: str = "float32"
    gradient_checkpointing: bool = True
    assistant_only_loss: bool = False

    def __post_init__(self):
        if self.per_device_batch_size < 1:
            raise UserInputError(f"per_device_batch_size={self.per_device_batch_size} must be >= 1")
        if self.grad_accum < 1:
            raise UserInputError(f"grad_accum={self.grad_accum} must be >= 1")


def _select_sft_columns(ds, source: str):
    """Keep the one column TRL trains on: chat ``messages`` (preferred) or plain ``text``.

    Chat rows stay as messages: TRL applies the chat template itself, which
    adds the end-of-turn token once (rendering to text first and letting TRL
    append EOS doubles it) and allows ``assistant_only_loss``.
    """
    cols = ds.column_names
    if "messages" in cols:
        return ds.select_columns(["messages"])
    if "conversations" in cols:
        from opensloth.data.chat import sharegpt_to_messages

        return ds.map(lambda ex: {"messages": sharegpt_to_messages(ex["conversations"])},
                      remove_columns=cols, desc="ShareGPT -> messages")
    if "text" in cols:
        return ds.select_columns(["text"])
    raise UserInputError(
        f"dataset {source!r} has columns {cols}; expected 'messages' (chat turns, trl-lib/Capybara format), "
        "'conversations' (ShareGPT) or 'text' (already formatted)"
    )


def load_sft_splits(
    dataset: str,
    tokenizer,
    *,
    train_split: str = "train",
    test_split: str = "test",
    train_samples: int | None = None,
    test_samples: int = 0,
):
    """Load, subset and format the train (and optional eval) split of a chat dataset.

    Returns ``(train_dataset, val_dataset_or_None)`` with a ``messages`` or ``text`` column.
    """
    from opensloth.data import load_records

    train = load_records(dataset, train_split)
    if train_samples is not None:
        train = train.select(range(min(train_samples, len(train))))
    if len(train) == 0:
        raise UserInputError(f"dataset {dataset!r} split {train_split!r} is empty; nothing to train on")
    train = _select_sft_columns(train, dataset)
    val = None
    if test_samples:
        val = load_records(dataset, test_split)
        val = _select_sft_columns(val.select(range(min(test_samples, len(val)))), dataset)
    return train, val


def make_sft_config(settings: SFTRunSettings, world_size: int, has_eval: bool, dataset_kwargs: dict | None = None):
    """An ``SFTConfig`` for a run: fixed seeds, TensorBoard, no unused-parameter search under DDP.

    ``dataset_kwargs={"skip_prepare_dataset": True}`` when the data is already
    tokenized (dataset cache or ``precompute_dataset.py``).
    """
    from trl import SFTConfig

    eval_steps = settings.eval_steps or settings.logging_steps * 5
    return SFTConfig(
        output_dir=settings.run_dir,
        per_device_train_batch_size=settings.per_device_batch_size,
        per_device_eval_batch_size=settings.eval_batch_size or settings.per_device_batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=settings.warmup_steps,
        num_train_epochs=settings.num_epochs,
        max_steps=settings.max_steps,
        logging_steps=settings.logging_steps,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=eval_steps if has_eval else None,
        save_strategy="steps" if settings.save_steps else "no",
        save_steps=settings.save_steps or 500,
        seed=settings.seed,
        data_seed=settings.seed,
        max_length=settings.max_seq_length,
        dataset_text_field="text",
        dataset_kwargs=dataset_kwargs,
        assistant_only_loss=settings.assistant_only_loss,
        packing=False,
        # Explicit, never None: Unsloth's SFTTrainer (GPU path, unsloth/trainer.py) auto-enables
        # padding-free when `padding_free` is None and it tokenizes raw data itself (clearing
        # `max_length` as TRL demands), but turns it off when handed tokenized rows ("dataset is
        # already tokenized"). The dataset cache's builder and readers would then disagree, and
        # 1 rank would not train like N. An explicit False stops the auto choice
        # (`_should_auto_padding_free` needs None); opensloth's batch patch does the packing.
        padding_free=False,
        bf16=settings.dtype == "bfloat16",
        fp16=settings.dtype == "float16",
        # Unsloth applies its own checkpointing in get_peft_model.
        gradient_checkpointing=settings.gradient_checkpointing and settings.backend == "hf",
        gradient_checkpointing_kwargs={"use_reentrant": False},
        report_to=["tensorboard"],
        ddp_find_unused_parameters=False if world_size > 1 else None,
        dataloader_num_workers=0,
        dataset_num_proc=None,
        optim="adamw_torch",
        weight_decay=0.0,
    )


def build_sft_trainer(model, tokenizer, train_dataset, val_dataset, world_size: int, settings: SFTRunSettings):
    """Create the SFTTrainer in use (Unsloth's when Unsloth is imported, else stock TRL)."""
    import trl

    from opensloth.utils.dataset_cache import sft_dataset_kwargs

    config = make_sft_config(settings, world_size, val_dataset is not None,
                             dataset_kwargs=sft_dataset_kwargs(train_dataset))
    trainer = trl.SFTTrainer(
        model=model,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=val_dataset,
        processing_class=tokenizer,
    )
    log_rank0(f"SFTTrainer class in use: {type(trainer).__module__}.{type(trainer).__qualname__}")
    from opensloth.patching.batch_samples import PATCH_NAME
    from opensloth.patching.unsloth_compat import check_trainer_patched

    check_trainer_patched(trainer, "get_batch_samples", PATCH_NAME)  # the class Unsloth rebound, not a stale one
    return trainer
