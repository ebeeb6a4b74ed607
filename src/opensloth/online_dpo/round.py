"""One DPO round of the loop: judged pairs in, the continued LoRA adapter out.

Built from the same helpers as ``train_scripts/train_dpo.py``: the pairs go
through the one preference pipeline (:func:`opensloth.data.preference.pairs_to_dataset`),
the trainer is made by :mod:`opensloth.dpo.run` (``make_dpo_config``,
``dpo_trainer_class``, ``build_dpo_trainer``, ``write_settings``), the
dynamic-beta controller comes from :mod:`opensloth.patches.dpo_dynamic_beta`,
and :func:`opensloth.launch.train_and_save` trains and saves. What differs
from that script is the model: the loop passes in the policy it has just
generated with (SFT weights plus the previous iteration's adapter), and the
reference is forced to be the adapter-disabled model, i.e. the SFT policy
(see :mod:`opensloth.online_dpo`).
"""

from __future__ import annotations

import dataclasses
import os

from opensloth.data.preference import pairs_to_dataset
from opensloth.dpo.lora_reference import REF_ADAPTER, use_base_model_as_reference
from opensloth.dpo.run import build_dpo_trainer, dpo_trainer_class, make_dpo_config, write_settings
from opensloth.launch import model_dtype_name, resolve_per_device_batch, train_and_save
from opensloth.log import log_rank0
from opensloth.rollout.generate import has_chat_template


def use_sft_as_reference(trainer) -> str:
    """Make the DPO reference the adapter-disabled model (the merged SFT weights).

    :func:`opensloth.dpo.lora_reference.use_base_model_as_reference` removes TRL's
    ``"ref"`` copy of a fresh adapter; for a continued adapter it keeps the
    copy (the right reference when re-training an adapter from its own start).
    The loop wants the SFT policy in every round, so that copy is removed too.

    Returns what was done: ``"no_ref_adapter"``, ``"deleted_ref_adapter"`` or
    ``"deleted_ref_adapter_of_continued_policy"``.
    """
    status = use_base_model_as_reference(trainer)
    if status == "kept_ref_adapter":
        model = trainer.accelerator.unwrap_model(trainer.model)
        model.delete_adapter(REF_ADAPTER)
        status = "deleted_ref_adapter_of_continued_policy"
        log_rank0("OaK reference: removed TRL's 'ref' copy of the continued adapter; reference log-probs use the "
                  "adapter-disabled model = the SFT policy")
    if status == "not_peft":
        raise ValueError("the OaK loop trains a LoRA adapter; the policy passed to the DPO round is not a PEFT model")
    return status


def run_dpo_round(model, tokenizer, pairs: list[dict], settings, dynamic_cfg, *, run_dir: str, env,
                  backend: str, nll_weight: float = 0.0) -> dict:
    """Train ``model``'s adapter on ``pairs`` for one round and save it to ``run_dir``.

    Args:
        model, tokenizer: the policy (PEFT model) and its tokenizer, identical on every rank.
        pairs: best-vs-worst pairs (identical on every rank).
        settings: this round's :class:`opensloth.dpo.run.DPORunSettings` (a fresh copy).
        dynamic_cfg: :class:`opensloth.dpo.controller.DynamicBetaConfig` (a fresh controller per round).
        run_dir: ``<output>/dpo/iter_<k>``: adapter, tokenizer, ``trainer_state.json``,
            ``opensloth_dpo_settings.json`` and, with dynamic beta, the margins log and controller state.
        nll_weight: weight of an NLL term on the chosen replies added to the sigmoid DPO loss
            (TRL ``loss_type=["sigmoid", "sft"]``); 0 is plain DPO. Fixed beta only.

    Returns:
        ``{"steps", "train_loss", "final_beta", "reference", "seconds", "pairs"}``.
    """
    dynamic = settings.beta_mode == "dynamic"
    per_device = resolve_per_device_batch(settings.per_device_batch_size, settings.global_batch_size,
                                          settings.grad_accum, env.world_size)
    train_ds = pairs_to_dataset(pairs, as_messages=has_chat_template(tokenizer))
    config = make_dpo_config(settings, dynamic_cfg, run_dir=run_dir, per_device=per_device,
                             world_size=env.world_size, backend=backend, dtype=model_dtype_name(model),
                             has_eval=False)
    if nll_weight:
        # DPO + NLL of the chosen reply (RPO, as in iterative reasoning preference optimisation): the NLL
        # term keeps the chosen answers likely while DPO separates them from the rejected ones.
        config = dataclasses.replace(config, loss_type=["sigmoid", "sft"], loss_weights=[1.0, nll_weight])
    trainer_cls = dpo_trainer_class(dynamic=dynamic, backend=backend)
    trainer = build_dpo_trainer(trainer_cls, model, tokenizer, train_ds, None, config,
                                left_truncate_to=None if settings.no_patches else settings.max_seq_length)
    reference = use_sft_as_reference(trainer)
    runtime = None
    if dynamic:
        from opensloth.patches.dpo_dynamic_beta import attach_dynamic_beta  # imports transformers

        runtime = attach_dynamic_beta(trainer, dynamic_cfg,
                                      margins_log_path=os.path.join(run_dir, "logs", "margins", "margins.jsonl"))
    if env.is_main:
        write_settings(run_dir, settings, dynamic_cfg)
    nll_note = f" + {nll_weight} x NLL(chosen)" if nll_weight else ""
    log_rank0(f"DPO round: {len(pairs)} pairs, {per_device} per device x {settings.grad_accum} accum x "
              f"{env.world_size} rank(s), beta_mode={settings.beta_mode}{nll_note}, run dir {run_dir}")
    seconds = train_and_save(trainer, model, tokenizer, run_dir,
                             save_extra=runtime.save if runtime is not None else None)
    losses = [rec["loss"] for rec in trainer.state.log_history if "loss" in rec]
    return {
        "pairs": len(pairs),
        "steps": trainer.state.global_step,
        "train_loss": sum(losses) / len(losses) if losses else None,
        "final_beta": runtime.beta if runtime is not None else settings.beta,
        "reference": reference,
        "seconds": round(seconds, 3),
    }
