"""Worker for tests/test_patches_batch_samples.py, launched with ``torchrun --nproc_per_node=2``.

One epoch of SFT on 11 samples, batch 2 x accum 2 per rank, learning rate 0,
with opensloth's batch patch, once per layout given on the command line. Per
optimizer step each rank saves: the gradients after the DDP all-reduce, the
step window (dataset indices of the stock step), the token sequences it
trained on, ``num_items_in_batch`` and the number of forward/backward passes.

    torchrun --standalone --nproc_per_node=2 tests/packing_ddp_worker.py OUT_DIR varlen padded rows4d
"""

from __future__ import annotations

import sys

import torch


def sequences_of(inputs: dict, pad_token_id: int = 0) -> list[tuple[int, ...]]:
    """Token sequences in a micro-batch, split at position 0; padding tails and fillers dropped."""
    ids = inputs["input_ids"]
    pos = inputs.get("position_ids")
    mask = inputs.get("attention_mask")
    out = []
    for r in range(ids.shape[0]):
        if mask is not None and mask.dim() == 2:
            keep = mask[r] != 0
            row_ids, row_pos = ids[r][keep], torch.arange(int(keep.sum()))
        else:
            row_ids, row_pos = ids[r], pos[r]
        starts = (row_pos == 0).nonzero().flatten().tolist() + [row_ids.numel()]
        for a, b in zip(starts[:-1], starts[1:]):
            if bool((row_ids[a:b] != pad_token_id).any()):  # padding tails and fillers are all padding
                out.append(tuple(row_ids[a:b].tolist()))
    return out


def main(out_dir: str, layouts: list[str]) -> None:
    torch.set_num_threads(1)
    from opensloth.patches.ddp import ddp_patch

    ddp_patch()
    import trl
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from opensloth.patches.batch_samples import patch_optimize_sft_trainer_batch_samples, settings_for
    from opensloth.distributed import distributed_env

    patch_optimize_sft_trainer_batch_samples()
    rank = distributed_env().rank
    tok = AutoTokenizer.from_pretrained("data/tiny-qwen3")
    data = load_dataset("json", data_files="data/sft/train.jsonl", split="train").select(range(11))

    class Recorder(trl.SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None, *args, **kwargs):
            self._rec_seqs.extend(sequences_of(inputs))
            self._rec_items = int(num_items_in_batch)
            self._rec_passes += 1
            return super().training_step(model, inputs, num_items_in_batch, *args, **kwargs)

    class GradCatcher(TrainerCallback):
        def __init__(self):
            self.steps = []
            self.trainer = None

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            t = self.trainer
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
            self.steps.append({
                "grads": grads,
                "window": list(t._opensloth_packing_stats.history[-1]),
                "seqs": list(t._rec_seqs),
                "num_items": t._rec_items,
                "passes": t._rec_passes,
            })
            t._rec_seqs, t._rec_passes = [], 0

    result = {}
    for layout in layouts:
        model = AutoModelForCausalLM.from_pretrained("data/tiny-qwen3", dtype=torch.float32)
        config = trl.SFTConfig(
            output_dir=f"{out_dir}/run_{layout}", per_device_train_batch_size=2, gradient_accumulation_steps=2,
            num_train_epochs=1, learning_rate=0.0, max_grad_norm=0.0, max_length=256, seed=0, data_seed=0,
            report_to="none", save_strategy="no", logging_steps=1, bf16=False, gradient_checkpointing=False,
            ddp_find_unused_parameters=False, disable_tqdm=True, dataloader_num_workers=0,
        )
        catcher = GradCatcher()
        trainer = Recorder(model=model, args=config, train_dataset=data, processing_class=tok, callbacks=[catcher])
        trainer._opensloth_packing_settings = settings_for(trainer, layout=layout)
        trainer._rec_seqs, trainer._rec_passes = [], 0
        catcher.trainer = trainer
        trainer.train()
        rows = {i: (list(trainer.train_dataset[i]["input_ids"]), list(trainer.train_dataset[i]["labels"]))
                for step in catcher.steps for i in step["window"]}
        result[layout] = {"steps": catcher.steps, "rows": rows, "layout": trainer._opensloth_packing_stats.layout}
    torch.save(result, f"{out_dir}/rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
