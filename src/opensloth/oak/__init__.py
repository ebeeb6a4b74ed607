"""Iterative (online) DPO, OaK-DPO style: rollouts, judged pairs and one DPO round per iteration.

``train_scripts/run_oak_dpo.py`` is the entry point; this package holds its parts.
``import opensloth.oak`` is cheap.

The reference model, and why the SFT adapter is merged
=======================================================

In OaK-DPO the reference of every round is the SFT policy. TRL's
``DPOTrainer`` with a PEFT model and ``ref_model=None`` computes reference
log-probs with the adapter disabled, i.e. with the *base* weights. If the SFT
model were itself a LoRA adapter and DPO simply continued that adapter, the
reference would be the pre-SFT base model -- the wrong anchor. (TRL also
copies a pretrained adapter into a frozen ``"ref"`` adapter, which would make
the reference the policy at the start of the round instead.)

So the loop does this (:mod:`opensloth.oak.reference`):

1. ``--sft-model`` is a full model folder: it is the reference as is.
   ``--sft-model`` is a LoRA adapter folder: it is merged into its base once,
   on rank 0, into ``<output>/sft_merged/`` (written atomically).
2. Every iteration loads the merged SFT weights and puts the DPO LoRA adapter
   on top: a fresh adapter in iteration 1, the adapter saved by iteration
   ``k`` in iteration ``k + 1``. The policy therefore accumulates all rounds.
3. TRL's ``"ref"`` adapter copy is removed, so "adapter disabled" is the
   reference: exactly the SFT policy, in every iteration.

Layout of ``--output`` (one level of ``iter_<k>``, never nested)::

    sft_merged/                     merged SFT weights (only for an adapter --sft-model)
    eval/sft.json                   held-out accuracy of the SFT policy (iteration 0)
    rollout_output/iter_<k>/        rollouts.jsonl, judged.jsonl, pairs.jsonl, manifest.json
    dpo/iter_<k>/                   LoRA adapter, trainer_state.json, settings, margins log,
                                    eval.json, iteration_complete.json (written last)
    oak_summary.json, oak_summary.md  accuracy per iteration
"""
