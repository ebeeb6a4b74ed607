"""A ``config_dpo.yaml`` of the dynamic-DPO reference repositories -> opensloth's DPO settings.

Two public repositories keep their whole run in one YAML file with the same
sections (``policy_name``, ``ref_name``, ``precision`` at the top level;
``dataset``, ``dpo_training``, ``risk_test``, ``beta_update``, ``margin_log``):

- ``dynamic_beta`` (SeanYHan888/dynamic_beta, the older one): a hand-written
  loop; ``dpo_training.warmup_steps`` is the **beta** warmup, the risk test is
  Hoeffding's (``risk_test.eplison_0``), no gradient accumulation, constant LR,
  torch AdamW's weight decay 0.01; a ``test:`` section for its evaluation script.
- ``dynamic-dpo-v1`` (SeanYHan888/dynamic-dpo-v1, the newer one): a TRL
  ``DPOTrainer`` subclass; ``dpo_training.warmup_steps`` is the **LR** warmup,
  the beta warmup is ``risk_test.beta_warmup``, a z-score risk statistic,
  ``gradient_accumulation``, and an ``sft_training:`` section for its SFT stage.

:func:`translate_reference_config` detects the variant from the keys (or takes
``reference_variant``), maps every key with that variant's meaning onto the
fields of :class:`~opensloth.dpo.run.DPORunSettings` and
:class:`~opensloth.dpo.controller.DynamicBetaConfig`, types each value through
those dataclasses (``learning_rate: 5e-7`` is the float 5e-07; ``abc`` is one
error line naming their key), sets what the reference's code fixes without a
key (full fine-tuning against the frozen ``ref_name``, the risk rule, the
schedule, ...), and explains each key it leaves alone in one line. A key that
cannot be honoured is refused in one line that says why and what to use; an
unknown key is refused with the list of known ones. The table of
:func:`mapping_rows` is the one in TRAINING_README.

Only the standard library and opensloth's config layer are imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from opensloth.config import coerce
from opensloth.dpo.controller import DynamicBetaConfig
from opensloth.errors import UserInputError

__all__ = [
    "SECTIONS_OF_REFERENCE",
    "VARIANT_NEW",
    "VARIANT_OLD",
    "Translation",
    "detect_variant",
    "is_reference_config",
    "mapping_rows",
    "mapping_table_markdown",
    "translate_reference_config",
]

VARIANT_OLD = "dynamic_beta"
VARIANT_NEW = "dynamic-dpo-v1"
VARIANTS = (VARIANT_OLD, VARIANT_NEW)
DYNAMIC = "dynamic_beta"  # our section
SECTIONS_OF_REFERENCE = ("dataset", "dpo_training", "risk_test", "beta_update", "margin_log", "test", "sft_training")

# Keys only one variant has (its code reads them); they decide the variant when it is not given.
_MARKERS = {
    VARIANT_OLD: ("risk_test.eplison_0", "test", "dataset.num_works"),
    VARIANT_NEW: ("sft_training", "risk_test.beta_warmup", "dpo_training.gradient_accumulation",
                  "dpo_training.eval_steps", "dpo_training.eval_batch_size", "dpo_training.report",
                  "margin_log.jsonl_sample_size", "margin_log.save_per_rank", "dataset.generated_data",
                  "dataset.chat_template", "use_fsdp"),
}


@dataclass
class Translation:
    """The result of :func:`translate_reference_config`.

    Attributes:
        variant: ``"dynamic_beta"`` or ``"dynamic-dpo-v1"``.
        values: our YAML shape: run keys at the top level, controller keys under ``dynamic_beta``.
        notes: one line per key that was left alone or whose meaning differs in part, for the log.
    """

    variant: str
    values: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


# --------------------------------------------------------------------------- key rules


@dataclass(frozen=True)
class _Rule:
    """What one key of a reference config becomes.

    ``target`` is our key (``"learning_rate"``, ``"dynamic_beta.alpha"``) or
    None; ``ignore`` explains a key that training does not need; ``convert``
    computes several of our keys from the value (``{our_key: value}``);
    ``meaning`` is the reference's meaning, for the mapping table.
    """

    meaning: str
    target: str | None = None
    ignore: str | None = None
    convert: Callable[[Any, str], dict] | None = None
    note: str | None = None  # how ours differs in part (logged when the key is present)


def _to(target: str, meaning: str, note: str | None = None) -> _Rule:
    return _Rule(meaning, target=target, note=note)


def _ignored(meaning: str, why: str) -> _Rule:
    return _Rule(meaning, ignore=why)


def _delta(value, where, typed):
    delta = typed(DYNAMIC + ".delta", value, where)
    return {DYNAMIC + ".delta": delta, DYNAMIC + ".q": 1.0 - delta}


def _old_precision(value, where, typed):
    # training.py compares with the exact string "bf16": bf16 weights and bf16 autocast; anything else is float32.
    return {"dtype": "bfloat16" if value == "bf16" else "float32", "mixed_precision": "auto"}


def _new_precision(value, where, typed):
    # training.py lower-cases it and sets DPOConfig(bf16=/fp16=): HF autocast over float32 weights.
    amp = {"bf16": "bf16", "fp16": "fp16"}.get(str(value).lower(), "no")
    return {"dtype": "float32", "mixed_precision": amp}


def _beta_warmup(value, where, typed):
    steps = typed(DYNAMIC + ".warmup_steps", value, where)
    if steps < 1:
        raise UserInputError(
            f"{where}: {steps} never ends the beta warmup in the reference code (beta stays beta_0 for the whole "
            "run); set it >= 1, or train with a fixed beta (--beta_mode fixed --beta <beta_0>)")
    return {DYNAMIC + ".warmup_steps": steps}


def _sample_size(value, where, typed):
    return {"reference_log_sample": max(typed("reference_log_sample", value, where), 0)}


def _save_per_rank(value, where, typed):
    if typed("reference_logs", value, where):
        raise UserInputError(
            f"{where}: true asks for one margins log per rank from per-rank controllers; opensloth gathers every "
            "rank's margins into one controller, so only the global log exists. Set save_per_rank: false")
    return {}


def _log_dir(value, where, typed):
    return {"margins_log_dir": typed("margins_log_dir", value, where), "reference_logs": True}


_MODEL = "model to fully fine-tune (every weight), and the tokenizer"
_REF = "separate frozen reference model"
_WANDB = "opensloth logs to TensorBoard (<run_dir>/runs) and JSONL; wandb is not used"

_COMMON = {
    "policy_name": _to("model_name", _MODEL),
    "ref_name": _to("ref_model", _REF),
    "run_name": _to("experiment_name", "run name (wandb)"),
    "wandb_project": _ignored("wandb project", _WANDB),
    "dataset.dataset_name": _to("dataset", "hub id (or local file) of raw Anthropic HH data, parsed by their HH "
                                           "parser (hh_parser: reference)"),
    "dataset.subset": _to("train_split", "split with slicing, e.g. train[:20%]"),
    "dataset.val_ratio": _to("val_ratio", "fraction of the parsed pairs held out for evaluation"),
    "dataset.seed": _to("split_seed", "seed of that split only (training seed is 42)"),
    "dpo_training.epochs": _to("num_epochs", "epochs"),
    "dpo_training.batch_size": _to("per_device_batch_size", "pairs per micro-batch per process"),
    "dpo_training.learning_rate": _to("learning_rate", "AdamW learning rate"),
    "dpo_training.log_steps": _to("logging_steps", "log every N steps"),
    "dpo_training.max_grad_norm": _to("max_grad_norm", "gradient-norm clipping"),
    "dpo_training.save_dpo_dir": _ignored("output folder of a static-beta run",
                                          "their static-beta baseline's folder; --beta_mode fixed is that baseline "
                                          "here"),
    "risk_test.delta": _Rule("target tail fraction; q = 1 - delta", convert=_delta),
    "risk_test.lambda": _to(DYNAMIC + ".ema_lambda", "EMA weight of the batch quantile in tau"),
    "beta_update.beta_0": _to(DYNAMIC + ".beta_0", "start beta"),
    "beta_update.gamma": _to(DYNAMIC + ".gamma", "slope of tanh(gamma u)"),
    "beta_update.alpha": _to(DYNAMIC + ".alpha", "step of log beta per update"),
    "beta_update.beta_max": _to(DYNAMIC + ".beta_max", "upper clip of beta"),
    "beta_update.beta_min": _to(DYNAMIC + ".beta_min", "lower clip of beta"),
    "margin_log.log_dir": _Rule("folder of the margins logs", convert=_log_dir),
    "margin_log.dpo_log_dir": _ignored("margins folder of a static-beta run", "their static-beta baseline's logs"),
}

_RULES: dict[str, dict[str, _Rule]] = {
    VARIANT_OLD: {
        **_COMMON,
        "precision": _Rule("'bf16': bf16 weights and bf16 autocast; anything else float32", convert=_old_precision),
        "dataset.max_len": _to("max_seq_length", "token budget of prompt + response",
                               note="they cut prompt + response from the right and pad to max_len; opensloth cuts "
                                    "the prompt from the left and pads to the longest pair of the batch"),
        "dataset.num_works": _ignored("DataLoader workers", "data loading runs in the training process"),
        "dataset.num_workers": _ignored("DataLoader workers", "data loading runs in the training process"),
        "dpo_training.warmup_steps": _Rule("beta warmup: batches pooled for tau_0 while beta stays beta_0",
                                           convert=_beta_warmup),
        "dpo_training.save_dir": _to("output_dir", "folder of the final model",
                                     note="the model is saved in <save_dir>/<experiment_name>_ws<world_size>"),
        "test": _ignored("settings of their evaluation script", "read only by their gen_hh_answer.py, not by "
                                                                 "training"),
        "risk_test.eplison_0": _to(DYNAMIC + ".eps0", "confidence level of the Hoeffding bound"),
    },
    VARIANT_NEW: {
        **_COMMON,
        "precision": _Rule("'bf16' / 'fp16': autocast over float32 weights; else float32", convert=_new_precision),
        "dataset.max_len": _ignored("token budget", "read but unused by their training.py; max_seq_length stays "
                                                    "1024, TRL's max_length there"),
        "dataset.generated_data": _ignored("judged-rollout data instead of HH",
                                           "the data's format is detected from its rows (judged prompt_messages "
                                           "rows are recognised)"),
        "dataset.chat_template": _to("chat_template", "render prompt and replies with the tokenizer's chat "
                                                      "template"),
        "dpo_training.eval_batch_size": _to("eval_batch_size", "per-device evaluation batch"),
        "dpo_training.eval_steps": _to("eval_steps", "evaluate every N optimizer steps"),
        "dpo_training.save_steps": _to("save_steps", "checkpoint every N optimizer steps"),
        "dpo_training.gradient_accumulation": _to("grad_accum", "gradient accumulation steps"),
        "dpo_training.warmup_steps": _to("lr_warmup_steps", "learning-rate warmup (optimizer steps)"),
        "dpo_training.report": _ignored("wandb project (truthy: report to wandb)", _WANDB),
        "dpo_training.wandb_project": _ignored("wandb project", _WANDB),
        "dpo_training.run_name": _to("experiment_name", "run name"),
        "dpo_training.save_dir": _to("output_dir", "checkpoint folder",
                                     note="checkpoints and the final model go to "
                                          "<save_dir>/<experiment_name>_ws<world_size>"),
        "use_fsdp": _to("fsdp", "shard the policy with FSDP (their FSDP trainer, accelerate launch)"),
        "sft_training": _ignored("their SFT stage (train_sft.py)",
                                 "train_dpo.py runs DPO only; run the SFT stage with train_configurable.py and "
                                 "point policy_name / ref_name at its result"),
        "risk_test.beta_warmup": _Rule("beta warmup in micro-batches (compute_loss calls)", convert=_beta_warmup),
        "margin_log.jsonl_sample_size": _Rule("length of 'sample' in the margins JSONL", convert=_sample_size),
        "margin_log.save_per_rank": _Rule("false: rank 0 writes; true: one log per rank", convert=_save_per_rank),
    },
}

# What the reference code fixes without a key (applied before the keys, so a key can still change it).
_IMPLIED: dict[str, dict[str, Any]] = {
    VARIANT_OLD: {
        "full_finetune": True, "grad_accum": 1, "lr_scheduler_type": "constant", "lr_warmup_steps": 0,
        "weight_decay": 0.01, "seed": 42, "hh_parser": "reference", "eval_strategy": "epoch",
        "test_samples": 0, DYNAMIC + ".preset": "reference",
    },
    VARIANT_NEW: {
        "full_finetune": True, "lr_scheduler_type": "linear", "weight_decay": 0.0,
        "seed": 42, "hh_parser": "reference", "eval_strategy": "steps", "max_seq_length": 1024, "test_samples": 0,
        DYNAMIC + ".preset": "reference_v1",
    },
}
_IMPLIED_WHY = {
    VARIANT_OLD: "full fine-tuning against ref_name, constant LR without warmup, torch AdamW weight decay 0.01, "
                 "seed 42, one evaluation per epoch on the val_ratio split; dynamic_beta.preset reference (Hoeffding, "
                 "q = 1 - delta, p_hat with >=, beta updated from each batch and used in that batch's loss)",
    VARIANT_NEW: "full fine-tuning against ref_name, HF's linear LR schedule and weight decay 0, seed 42, "
                 "max_length 1024; dynamic_beta.preset reference_v1 (z-score statistic, q = 1 - delta, p_hat with >=, "
                 "beta updated per micro-batch and used from the next one, beta_warmup in micro-batches)",
}


def _typer(run_cls):
    """``typed(target, value, where)``: ``value`` as the type of our field ``target`` (run or controller)."""

    def typed(target: str, value, where: str):
        if target.startswith(DYNAMIC + "."):
            return coerce(DynamicBetaConfig, target.split(".", 1)[1], value, where)
        return coerce(run_cls, target, value, where)

    return typed


# --------------------------------------------------------------------------- detection


def _flat_keys(data: Mapping) -> dict[str, Any]:
    """``{"dpo_training.learning_rate": value, "policy_name": value, ...}`` of a reference config.

    Sections are flattened one level; an empty (or null) section contributes nothing.
    """
    out = {}
    for key, value in data.items():
        if key in SECTIONS_OF_REFERENCE and (value is None or isinstance(value, Mapping)):
            for sub, sub_value in (value or {}).items():
                out[f"{key}.{sub}"] = sub_value
        else:
            out[key] = value
    return out


def is_reference_config(data: Mapping) -> bool:
    """True for the layout of the dynamic-DPO repositories (``policy_name`` or their sections)."""
    return ("policy_name" in data or "ref_name" in data or isinstance(data.get("dataset"), Mapping)
            or any(k in data for k in ("dpo_training", "risk_test", "beta_update", "margin_log")))


def detect_variant(data: Mapping, where: str, given: str = "auto") -> str:
    """``"dynamic_beta"`` or ``"dynamic-dpo-v1"`` from the keys only one of them has (or ``given``).

    Raises:
        UserInputError: the keys fit both or neither; the message names them and the flag to pass.
    """
    if given != "auto":
        if given not in VARIANTS:
            raise UserInputError(f"reference_variant={given!r} is not one of {('auto', *VARIANTS)}")
        return given
    flat = _flat_keys(data)
    hits = {v: [k for k in keys if k in flat or any(f.startswith(k + ".") for f in flat)]
            for v, keys in _MARKERS.items()}
    if hits[VARIANT_OLD] and hits[VARIANT_NEW]:
        raise UserInputError(
            f"{where} has keys of both dynamic-DPO repositories ({hits[VARIANT_OLD]} of {VARIANT_OLD}, "
            f"{hits[VARIANT_NEW]} of {VARIANT_NEW}); pass --reference_variant {VARIANT_OLD} or {VARIANT_NEW}")
    for variant in VARIANTS:
        if hits[variant]:
            return variant
    raise UserInputError(
        f"{where} looks like a dynamic-DPO config but has none of the keys that tell the two repositories apart "
        f"(risk_test.eplison_0 for {VARIANT_OLD}; risk_test.beta_warmup or dpo_training.gradient_accumulation for "
        f"{VARIANT_NEW}); pass --reference_variant {VARIANT_OLD} or {VARIANT_NEW}")


# --------------------------------------------------------------------------- translation


def _nest(flat: Mapping[str, Any]) -> dict:
    out: dict = {}
    for key, value in flat.items():
        if key.startswith(DYNAMIC + "."):
            out.setdefault(DYNAMIC, {})[key.split(".", 1)[1]] = value
        else:
            out[key] = value
    return out


def translate_reference_config(data: Mapping, where: str, run_cls, variant: str = "auto") -> Translation:
    """Map a reference ``config_dpo.yaml`` onto opensloth's DPO settings.

    Args:
        data: the file's mapping (``yaml.safe_load``).
        where: the file name, for messages.
        run_cls: the run settings dataclass (``DPORunSettings``); values are typed by its fields.
        variant: ``"auto"`` (from the keys), ``"dynamic_beta"`` or ``"dynamic-dpo-v1"``.

    Returns:
        A :class:`Translation`: our YAML shape (typed values) and the notes to log.

    Raises:
        UserInputError: an unknown key (listing the known ones), a key that
            cannot be honoured (why, and what to use), a value of the wrong type
            (naming their key), or keys of opensloth's own layout mixed in.
    """
    ours = ({DYNAMIC} | set(run_cls.__dataclass_fields__)) - {"dataset"}
    mixed = sorted(k for k in data if k in ours)
    if mixed:
        raise UserInputError(f"{where} mixes opensloth keys {mixed} into a dynamic-DPO reference config; use one "
                             "layout (flags still override either)")
    variant = detect_variant(data, where, variant)
    rules = _RULES[variant]
    flat = _flat_keys(data)
    whole_sections = {r for r in rules if r in SECTIONS_OF_REFERENCE}  # "test", "sft_training": left alone whole
    unknown = sorted(k for k in flat if k not in rules and k.split(".", 1)[0] not in whole_sections)
    if unknown:
        raise UserInputError(f"unknown keys {unknown} in {where} (a {variant} config); known: {sorted(rules)}")
    typed = _typer(run_cls)
    values: dict[str, Any] = dict(_IMPLIED[variant])
    notes = [f"{where}: a {variant} reference config; implied by its code: {_IMPLIED_WHY[variant]}"]
    ignored_sections = set()
    for key, value in flat.items():
        section = key.split(".", 1)[0]
        rule = rules.get(key) or rules[section]
        here = f"{where}: {key}"
        if rule.ignore is not None:
            if section in ignored_sections:
                continue
            if rule is rules.get(section):
                ignored_sections.add(section)
                notes.append(f"{where}: ignored '{section}:' ({rule.meaning}): {rule.ignore}")
            else:
                notes.append(f"{where}: ignored {key} ({rule.meaning}): {rule.ignore}")
            continue
        if rule.convert is not None:
            values.update(rule.convert(value, here, typed))
        else:
            values[rule.target] = typed(rule.target, value, f"{here} (-> {rule.target})")
        if rule.note:
            notes.append(f"{where}: {key} -> {rule.target}: {rule.note}")
    if "ref_model" in values and values.get("ref_model") == values.get("model_name"):
        notes.append(f"{where}: ref_name equals policy_name: the frozen reference is a second copy of that "
                     "checkpoint")
    values["reference_variant"] = variant
    return Translation(variant=variant, values=_nest(values), notes=notes)


def mapping_rows() -> list[tuple[str, str, str, str]]:
    """``(their key, variant, meaning there, opensloth)`` for every key both translators know (the README table)."""
    rows = []
    order = {name: i for i, name in enumerate(SECTIONS_OF_REFERENCE)}
    keys = sorted(set(_RULES[VARIANT_OLD]) | set(_RULES[VARIANT_NEW]),
                  key=lambda k: (order.get(k.split(".")[0], -1), k))
    for key in keys:
        per_variant = [(v, _RULES[v].get(key)) for v in VARIANTS]
        present = [(v, r) for v, r in per_variant if r is not None]
        same = len(present) == 2 and present[0][1] == present[1][1]
        for variant, rule in ([("both", present[0][1])] if same else present):
            if rule.ignore is not None:
                target = f"ignored: {rule.ignore}"
            elif rule.target is not None:
                target = f"`{rule.target}`" + (f" ({rule.note})" if rule.note else "")
            else:
                target = _CONVERT_DOC[rule.convert.__name__]
            rows.append((key, variant, rule.meaning, target))
    return rows


_CONVERT_DOC = {
    "_delta": "`dynamic_beta.delta`, and `dynamic_beta.q` = 1 - delta",
    "_old_precision": "`dtype: bfloat16` (bf16 autocast follows) for 'bf16', else `float32`",
    "_new_precision": "`dtype: float32` + `mixed_precision: bf16` / `fp16` / `no`",
    "_beta_warmup": "`dynamic_beta.warmup_steps` (0 refused: their loop never ends that warmup)",
    "_sample_size": "`reference_log_sample` (<= 0: every margin)",
    "_save_per_rank": "false: accepted (rank 0 writes the gathered log); true: refused (one controller over all "
                      "ranks here)",
    "_log_dir": "`margins_log_dir`, and `reference_logs: true`",
}


def mapping_table_markdown() -> str:
    """:func:`mapping_rows` as the markdown table of TRAINING_README (between ``reference_config`` markers)."""
    lines = ["| their key | repository | meaning there | opensloth |", "| --- | --- | --- | --- |"]
    for key, variant, meaning, target in mapping_rows():
        lines.append(f"| `{key}` | {variant} | {meaning} | {target.replace('<', '&lt;')} |")
    return "\n".join(lines)
