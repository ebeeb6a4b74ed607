"""Online (iterative) DPO, OaK-DPO style: rollouts, judged pairs and one DPO round per iteration.

OaK-DPO is this project's name for the loop of online (on-policy, iterative)
DPO: each iteration samples candidates from the current policy, judges them
(a verifier or a reward model), turns the best and worst candidate of every
prompt into a preference pair, and trains one DPO round on those pairs with
the SFT policy as the fixed reference.

``train_scripts/run_oak_dpo.py`` is the entry point; this package holds its
parts. ``import opensloth.online_dpo`` is cheap.

The reference model, and why the SFT adapter is merged
=======================================================

In OaK-DPO the reference of every round is the SFT policy. TRL's
``DPOTrainer`` with a PEFT model and ``ref_model=None`` computes reference
log-probs with the adapter disabled, i.e. with the *base* weights. If the SFT
model were itself a LoRA adapter and DPO simply continued that adapter, the
reference would be the pre-SFT base model -- the wrong anchor. (TRL also
copies a pretrained adapter into a frozen ``"ref"`` adapter, which would make
the reference the policy at the start of the round instead.)

So the loop does this (:mod:`opensloth.online_dpo.sft_reference`):

1. ``--sft-model`` is a full model folder: it is the reference as is.
   ``--sft-model`` is a LoRA adapter folder: it is merged into its base once,
   on rank 0, into ``<output>/sft_merged/`` (written atomically).
2. Every iteration loads the merged SFT weights and puts the DPO LoRA adapter
   on top: a fresh adapter in iteration 1, the adapter saved by iteration
   ``k`` in iteration ``k + 1``. The policy therefore accumulates all rounds.
3. TRL's ``"ref"`` adapter copy is removed, so "adapter disabled" is the
   reference: exactly the SFT policy, in every iteration.

Each round is one DPO epoch over that round's pairs, with a fresh copy of the
DPO settings and, with dynamic beta, a fresh controller (warm-up included).
An optional NLL term on the chosen replies (``oak.nll_weight``, fixed beta
only) keeps the chosen answers likely: plain DPO can lower the probability
of both replies (see ``docs/benchmarks.md``).

Layout of ``--output`` (one level of ``iter_<k>``, never nested)::

    oak_run.json                    settings of the first start (a resume must match them)
    sft_merged/                     merged SFT weights (only for an adapter --sft-model)
    eval/sft.json                   held-out accuracy of the SFT policy (iteration 0)
    rollout_output/iter_<k>/        rollouts.jsonl, judged.jsonl, pairs.jsonl, manifest.json
    dpo/iter_<k>/                   LoRA adapter, trainer_state.json, settings, margins log,
                                    eval.json, iteration_complete.json (written last)
    oak_summary.json, oak_summary.md, oak_accuracy.png   accuracy per iteration

Modules: :mod:`~opensloth.online_dpo.layout` (paths, markers),
:mod:`~opensloth.online_dpo.config` (YAML + flags), :mod:`~opensloth.online_dpo.run_record`,
:mod:`~opensloth.online_dpo.sft_reference` (SFT merge), :mod:`~opensloth.online_dpo.round`
(one DPO round), :mod:`~opensloth.online_dpo.evaluate` (held-out accuracy),
:mod:`~opensloth.online_dpo.report` (table, plot). Demo drivers: ``scripts/make_task_data.py``
(task data, :mod:`opensloth.tasks.task_data`), ``scripts/oak_warmup_sft.py`` (full-weight SFT),
``scripts/oak_report.py``, ``scripts/oak_demo.py`` (all of it).
"""
