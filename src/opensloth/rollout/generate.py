"""Batched generation of rollout candidates (torch + transformers; imported lazily by callers)."""

from __future__ import annotations

from opensloth.rollout.seeding import derive_seed
from opensloth.rollout.settings import RolloutSettings


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer, prompt: str) -> str:
    """The text the model continues: the chat template with a generation prompt, or the raw prompt."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of the rendered prompt (the chat template already holds any special tokens it needs)."""
    return list(tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=not has_chat_template(tokenizer))
                ["input_ids"])


def stop_token_ids(model, tokenizer) -> list[int]:
    """Token ids that end a candidate: the tokenizer's eos and the model's generation eos ids."""
    ids = set()
    for source in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if source is None:
            continue
        ids.update(source if isinstance(source, (list, tuple)) else [source])
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation config defines an eos token")
    return sorted(ids)


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def generate_candidates(model, tokenizer, prompts: list[dict], settings: RolloutSettings, *, iteration: int,
                        backend: str = "hf") -> list[dict]:
    """Sample ``settings.samples`` candidates for each prompt of this rank's shard.

    Args:
        model: a causal LM (PEFT-wrapped or not) on its device.
        tokenizer: its tokenizer; a chat template is applied when it has one.
        prompts: ``[{"index", "id", "prompt"}]`` (see :func:`opensloth.rollout.traces.load_prompts`).
        settings: sampling settings; ``temperature=0`` decodes greedily.
        iteration: enters every candidate's seed, so iterations sample afresh.
        backend: ``"unsloth"`` switches Unsloth's inference mode on for the call.

    Returns:
        One rollout record per prompt, in input order (format in :mod:`opensloth.rollout.traces`).
    """
    import torch

    from opensloth.rollout.sampling import PerRowSampler

    stops = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    records, rows = [], []
    for item in prompts:
        prompt_ids = encode_prompt(tokenizer, item["prompt"])
        record = {"index": item["index"], "id": item["id"], "prompt": item["prompt"],
                  "prompt_text": _decode(tokenizer, prompt_ids), "candidates": []}
        records.append(record)
        for sample in range(settings.samples):
            seed = derive_seed(settings.seed, iteration, item["index"], sample)
            rows.append((record, prompt_ids, sample, seed))

    device = next(model.parameters()).device
    was_training = model.training
    fast = None
    if backend == "unsloth":
        from unsloth import FastLanguageModel

        fast = FastLanguageModel
        fast.for_inference(model)
    model.eval()
    try:
        for start in range(0, len(rows), settings.batch_size):
            batch = rows[start:start + settings.batch_size]
            width = max(len(r[1]) for r in batch)
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for i, (_, ids, _, _) in enumerate(batch):
                input_ids[i, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
                attention[i, width - len(ids):] = 1
            processors = None
            if not settings.greedy:
                from transformers import LogitsProcessorList

                processors = LogitsProcessorList([PerRowSampler([r[3] for r in batch], settings.temperature,
                                                                settings.top_k, settings.top_p)])
            with torch.no_grad():
                out = model.generate(
                    input_ids=input_ids.to(device), attention_mask=attention.to(device),
                    do_sample=False, max_new_tokens=settings.max_new_tokens, logits_processor=processors,
                    pad_token_id=pad_id, eos_token_id=stops, use_cache=True,
                    temperature=None, top_p=None, top_k=None,
                )
            new = out[:, width:].tolist()
            for (record, ids, sample, seed), tokens in zip(batch, new):
                cut = next((j for j, t in enumerate(tokens) if t in stops), None)
                kept = tokens if cut is None else tokens[:cut]
                record["candidates"].append({
                    "sample": sample, "seed": seed, "trace": _decode(tokenizer, ids + kept),
                    "finish": "length" if cut is None else "eos", "new_tokens": len(kept),
                })
    finally:
        if fast is not None:
            fast.for_training(model)
        model.train(was_training)
    return records
