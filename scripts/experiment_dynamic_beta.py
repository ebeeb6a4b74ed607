"""Controlled over-optimisation experiment: fixed-beta vs dynamic-beta DPO on a toy policy, two worlds (CPU).

    nice python scripts/experiment_dynamic_beta.py --out_dir outputs/dynamic_beta \
        --fig_dir docs/img --update_doc docs/dynamic_beta.md        # 2 worlds x 5 seeds x 19 runs: 51 min measured on 2 cores shared with other jobs
    python scripts/experiment_dynamic_beta.py --quick --out_dir /tmp/dynamic_beta_quick   # smoke run, ~1 min

What it does, top to bottom (docs/dynamic_beta.md has the results and what they show):

1. Worlds. ``num_prompts`` prompts; each has a set of "good" tokens and a mean
   response length. A known stochastic generator writes ``2 + Poisson(mean_len[p])``
   content tokens, each from the prompt's good set with probability ``p_good``
   and otherwise uniform. Two worlds differ in the cheap token the labeller
   cannot see:
   - ``filler``: before each content token, a FILLER token with probability
     ``p_filler`` (repeatedly). Gold ``= good / all tokens - len_penalty * length``;
     the labeller's proxy ``= good / content tokens + len_bonus * length`` is blind
     to FILLER.
   - ``repetition``: after each content token, a copy of it with probability
     ``p_repeat`` (repeatedly). A token equal to the one before it is a repeat.
     Gold counts only non-repeated good tokens, ``good non-repeats / all tokens -
     len_penalty * length``; the proxy collapses repeats,
     ``good non-repeats / non-repeated tokens + len_bonus * length``, so it is blind to them.
   Both proxies reward length; both golds penalise it.
2. Reference. A tiny prompt-conditioned GRU is trained from scratch (maximum
   likelihood) on fresh generator samples.
3. Preferences. Pairs of responses are sampled from the reference and labelled
   by the proxy with Bradley-Terry noise, ``P(a > b) = sigmoid((proxy_a - proxy_b) / label_temp)``.
4. DPO. The policy starts as a copy of the reference and minimises
   ``mean_i w_i * -log sigmoid(beta * M_i)``, ``M = (logp_w - ref_w) - (logp_l - ref_l)``
   (sums over the response tokens and EOS; ``w_i = 1`` unless the rule filters
   pairs), with the same optimiser, schedule, batch order and number of steps in
   every run of a world. Fixed-beta runs sweep ``--fixed_betas``. Dynamic runs
   take beta from :class:`opensloth.dpo.controller.DynamicBetaController`, fed
   the step's margins and chosen/rejected log-ratios once per optimiser step
   (beta for step t+1 comes from step t), for every rule in ``RISK_RULES`` with
   the config left at its defaults, started at the default ``beta_0`` and at
   ``--low_beta_0``.
5. Checkpoints (every ``--eval_every`` steps): held-out preference accuracy
   against the noisy and the gold labels, Monte-Carlo KL(policy || ref) from
   ``--eval_samples`` policy samples, gold reward, length, FILLER share and
   repeat share of those samples. Every step: beta, the controller's record,
   and the signals a controller could use (p_hat of a shadow controller, the
   calibrated temperature, chosen/rejected log-ratios, in-step KL estimates).
6. Output in ``--out_dir``: ``results.json`` (all histories) and ``table.md``.
   Figures in ``--fig_dir``: ``dynamic_beta_frontier.png``, ``dynamic_beta_traces.png``,
   ``dynamic_beta_signals.png``. ``--update_doc`` rewrites the block between
   ``<!-- results:begin -->`` and ``<!-- results:end -->`` of a markdown file.

Deterministic given ``--seeds``: one torch thread, deterministic algorithms,
seeded generators; the controller is pure Python. The task (good sets, lengths)
is fixed; a seed picks the reference, the pairs, the batch order and the
evaluation samples, and all runs of a seed and world share them, so
comparisons within a seed are paired.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from opensloth.dpo.controller import RISK_RULES, DynamicBetaConfig, DynamicBetaController
from opensloth.dpo.rules import calibrated_temperature, kl_estimate
from opensloth.markdown import update_markdown_block

EOS = 0  # token 0 ends a response
FILLER = 1  # a content-free token: never good, only adds length (the cheap way to please a length-biased judge)

# World parameters. "filler" is the world of the first version of this experiment, unchanged.
# "repetition" was set up afterwards with fixed-beta runs only (seeds 0 and 1), until its smallest
# beta over-optimised; it needs twice the learning rate for that within the same 600 steps.
# Neither world was changed after any dynamic-beta run was made in it.
WORLD_PRESETS = {
    "filler": {"kind": "filler", "p_filler": 0.15, "p_repeat": 0.0, "len_penalty": 0.02, "len_bonus": 0.05,
               "label_temp": 0.2, "lr": 1e-3},
    "repetition": {"kind": "repetition", "p_filler": 0.0, "p_repeat": 0.15, "len_penalty": 0.02, "len_bonus": 0.05,
                   "label_temp": 0.2, "lr": 2e-3},
}
HACK_KEY = {"filler": "filler_frac", "repetition": "repeat_frac"}  # the share of the world's blind-spot token


# --------------------------------------------------------------------------- world: generator and rewards


@dataclass(frozen=True)
class World:
    """The known generator and the two reward functions."""

    name: str
    kind: str  # "filler" or "repetition"
    vocab: int  # tokens 1..vocab: FILLER, then the content tokens
    num_prompts: int
    good_sets: tuple  # per prompt, a tuple of good token ids
    mean_len: tuple  # per prompt, mean of the Poisson part of the length
    p_good: float
    p_filler: float
    p_repeat: float
    max_len: int  # responses are cut at this many tokens
    len_penalty: float  # gold reward: - len_penalty * length
    len_bonus: float  # proxy reward: + len_bonus * length
    label_temp: float  # Bradley-Terry temperature of the noisy labels
    lr: float  # Adam learning rate of every DPO run in this world

    @property
    def num_tokens(self) -> int:
        """Input vocabulary: EOS, content tokens, then one token per prompt."""
        return 1 + self.vocab + self.num_prompts

    def prompt_token(self, prompts: torch.Tensor) -> torch.Tensor:
        return prompts + 1 + self.vocab


def world_params(args, name: str) -> dict:
    """The preset of world ``name`` with any world flag given on the command line on top."""
    params = dict(WORLD_PRESETS[name])
    for key in ("p_filler", "p_repeat", "len_penalty", "len_bonus", "label_temp", "lr"):
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    return params


def make_world(args, name: str = "filler", task_seed: int = 1234) -> World:
    """The task is fixed across seeds (``task_seed``); seeds vary reference, data and training."""
    params = world_params(args, name)
    rng = np.random.default_rng(task_seed)
    content = np.arange(FILLER + 1, args.vocab + 1)  # FILLER is never good
    good_sets = tuple(tuple(int(t) for t in sorted(rng.choice(content, args.good_set_size, replace=False)))
                      for _ in range(args.num_prompts))
    mean_len = tuple(float(m) for m in rng.uniform(3.0, 8.0, args.num_prompts))
    return World(name=name, kind=params["kind"], vocab=args.vocab, num_prompts=args.num_prompts, good_sets=good_sets,
                 mean_len=mean_len, p_good=args.p_good, p_filler=params["p_filler"], p_repeat=params["p_repeat"],
                 max_len=args.max_len, len_penalty=params["len_penalty"], len_bonus=params["len_bonus"],
                 label_temp=params["label_temp"], lr=params["lr"])


def generator_sample(world: World, prompts: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Responses of the known generator: ``(tokens [B, max_len] padded with EOS, lengths [B])``.

    ``2 + Poisson(mean_len[p])`` content tokens, each from the prompt's good set
    with probability ``p_good`` and otherwise uniform over the non-filler
    tokens. Filler world: FILLER before each content token with probability
    ``p_filler`` (repeatedly). Repetition world: after each content token, a
    copy of it with probability ``p_repeat`` (repeatedly). Cut at ``max_len``.
    """
    b, width = prompts.numel(), world.max_len
    n_content = 2 + torch.poisson(torch.tensor(world.mean_len)[prompts], generator=gen).long()
    p_extra = world.p_filler if world.kind == "filler" else world.p_repeat
    is_extra = torch.rand(b, width, generator=gen) < p_extra
    if world.kind == "repetition":
        is_extra[:, 0] = False  # the first token has nothing to repeat
    # length = position of the n_content-th content token (+1), capped
    lengths = ((~is_extra).cumsum(1) < n_content[:, None]).sum(1).add(1).clamp(max=width)
    good = torch.tensor(world.good_sets)[prompts]  # [B, good_set_size]
    pick_good = torch.rand(b, width, generator=gen) < world.p_good
    good_tok = torch.gather(good, 1, torch.randint(0, good.shape[1], (b, width), generator=gen))
    any_tok = torch.randint(FILLER + 1, world.vocab + 1, (b, width), generator=gen)
    tokens = torch.where(pick_good, good_tok, any_tok)
    if world.kind == "filler":
        tokens[is_extra] = FILLER
    else:  # a repeat copies the last content token before it
        source = torch.where(is_extra, torch.zeros_like(tokens), torch.arange(width).expand(b, width)).cummax(1).values
        tokens = torch.gather(tokens, 1, source)
    tokens[torch.arange(width)[None, :] >= lengths[:, None]] = EOS
    return tokens, lengths


def repeat_mask(tokens: torch.Tensor) -> torch.Tensor:
    """True where a (non-EOS) token equals the token before it."""
    rep = torch.zeros_like(tokens, dtype=torch.bool)
    rep[:, 1:] = (tokens[:, 1:] == tokens[:, :-1]) & (tokens[:, 1:] != EOS)
    return rep


def _good_mask(world: World, prompts, tokens) -> torch.Tensor:
    good = torch.zeros(world.num_prompts, world.vocab + 1, dtype=torch.bool)
    for p, s in enumerate(world.good_sets):
        good[p, list(s)] = True
    return torch.gather(good[prompts], 1, tokens)  # EOS and FILLER are never good


def _good_and_content(world: World, prompts, tokens) -> tuple[torch.Tensor, torch.Tensor]:
    """Per response: tokens the gold reward counts as good, tokens the proxy counts as content.

    Filler world: good tokens, and non-EOS non-FILLER tokens. Repetition
    world: good tokens that are not repeats, and non-EOS non-repeat tokens.
    """
    if world.kind == "filler":
        n_good = _good_mask(world, prompts, tokens).sum(1)
        n_content = ((tokens != EOS) & (tokens != FILLER)).sum(1)
    else:
        fresh = ~repeat_mask(tokens)
        n_good = (_good_mask(world, prompts, tokens) & fresh).sum(1)
        n_content = ((tokens != EOS) & fresh).sum(1)
    return n_good.double(), n_content.double()


def good_fraction(world: World, prompts, tokens, lengths) -> torch.Tensor:
    """Fraction of all the response's tokens that count as good (the blind-spot token dilutes it)."""
    n_good, _ = _good_and_content(world, prompts, tokens)
    return n_good / lengths.clamp(min=1).double()


def gold_reward(world: World, prompts, tokens, lengths) -> torch.Tensor:
    """What we actually want: good fraction minus a length penalty."""
    return good_fraction(world, prompts, tokens, lengths) - world.len_penalty * lengths.double()


def proxy_reward(world: World, prompts, tokens, lengths) -> torch.Tensor:
    """The labeller's view: good fraction among the tokens it sees (blind to the hack) plus a length bonus."""
    n_good, n_content = _good_and_content(world, prompts, tokens)
    return n_good / n_content.clamp(min=1) + world.len_bonus * lengths.double()


# --------------------------------------------------------------------------- policy


class TinyPolicy(nn.Module):
    """Prompt-conditioned GRU language model over responses.

    Input at position 0 is the prompt token, then the response tokens; the
    output at position ``t`` predicts response token ``t`` (EOS ends it).
    """

    def __init__(self, world: World, emb: int, hidden: int):
        super().__init__()
        self.world = world
        self.embed = nn.Embedding(world.num_tokens, emb)
        self.rnn = nn.GRU(emb, hidden, batch_first=True)
        self.head = nn.Linear(hidden, world.vocab + 1)

    def sequence_logp(self, prompts: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Sum of log-probs of the response tokens and, unless cut at ``max_len``, of its EOS. Shape [B]."""
        width = min(int(lengths.max()) + 1, self.world.max_len)
        targets = tokens[:, :width]
        inputs = torch.cat([self.world.prompt_token(prompts)[:, None], targets[:, :-1]], dim=1)
        hidden, _ = self.rnn(self.embed(inputs))
        logp = torch.log_softmax(self.head(hidden), dim=-1)
        token_logp = torch.gather(logp, 2, targets[:, :, None]).squeeze(2)
        pos = torch.arange(width)[None, :]
        mask = (pos <= lengths[:, None]) & (pos < self.world.max_len)
        return (token_logp * mask).sum(1)

    @torch.no_grad()
    def sample(self, prompts: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Ancestral samples ``(tokens [B, max_len] padded with EOS, lengths [B])``."""
        b, max_len = prompts.numel(), self.world.max_len
        tokens = torch.zeros(b, max_len, dtype=torch.long)
        lengths = torch.full((b,), max_len, dtype=torch.long)
        done = torch.zeros(b, dtype=torch.bool)
        x, h = self.world.prompt_token(prompts), None
        for t in range(max_len):
            out, h = self.rnn(self.embed(x)[:, None, :], h)
            probs = torch.softmax(self.head(out[:, 0]), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
            ended = (nxt == EOS) & ~done
            lengths[ended] = t
            done |= ended
            nxt = torch.where(done, torch.full_like(nxt, EOS), nxt)
            tokens[:, t] = nxt
            x = nxt
            if bool(done.all()):
                break
        return tokens, lengths


def train_reference(world: World, args, seed: int) -> TinyPolicy:
    """Maximum likelihood on fresh generator samples every step."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = TinyPolicy(world, args.emb, args.hidden)
    opt = torch.optim.Adam(model.parameters(), lr=args.ref_lr)
    for _ in range(args.ref_steps):
        prompts = torch.randint(0, world.num_prompts, (args.ref_batch,), generator=gen)
        tokens, lengths = generator_sample(world, prompts, gen)
        loss = -model.sequence_logp(prompts, tokens, lengths).sum() / (lengths + 1).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# --------------------------------------------------------------------------- preference data


def make_pairs(world: World, ref: TinyPolicy, n: int, gen: torch.Generator) -> dict:
    """``n`` pairs ``(a, b)`` sampled from the reference, with noisy proxy labels and gold labels.

    Returns tensors: ``prompts``; ``chosen``/``rejected`` tokens and lengths
    by the noisy label (what DPO trains on); ``gold_agrees`` (1 when the gold
    reward prefers the noisy-chosen response, 0 when it prefers the rejected
    one, -1 for a gold tie); the reference log-probs of both.
    """
    prompts = torch.randint(0, world.num_prompts, (n,), generator=gen)
    ta, la = ref.sample(prompts, gen)
    tb, lb = ref.sample(prompts, gen)
    p_a = torch.sigmoid((proxy_reward(world, prompts, ta, la) - proxy_reward(world, prompts, tb, lb)) / world.label_temp)
    a_wins = torch.rand(n, generator=gen, dtype=torch.float64) < p_a
    chosen = torch.where(a_wins[:, None], ta, tb)
    rejected = torch.where(a_wins[:, None], tb, ta)
    len_c, len_r = torch.where(a_wins, la, lb), torch.where(a_wins, lb, la)
    g_c, g_r = gold_reward(world, prompts, chosen, len_c), gold_reward(world, prompts, rejected, len_r)
    gold_agrees = torch.where(g_c > g_r + 1e-9, 1, torch.where(g_r > g_c + 1e-9, 0, -1))
    with torch.no_grad():
        ref_c, ref_r = ref.sequence_logp(prompts, chosen, len_c), ref.sequence_logp(prompts, rejected, len_r)
    return {"prompts": prompts, "chosen": chosen, "len_chosen": len_c, "rejected": rejected,
            "len_rejected": len_r, "gold_agrees": gold_agrees, "ref_chosen": ref_c, "ref_rejected": ref_r}


def pair_logratios(policy: TinyPolicy, pairs: dict, idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp_w - ref_w, logp_l - ref_l)`` for the pairs (all, or rows ``idx``)."""
    sel = (lambda k: pairs[k]) if idx is None else (lambda k: pairs[k][idx])
    prompts = sel("prompts")
    both_tokens = torch.cat([sel("chosen"), sel("rejected")])
    both_lengths = torch.cat([sel("len_chosen"), sel("len_rejected")])
    logp = policy.sequence_logp(torch.cat([prompts, prompts]), both_tokens, both_lengths)
    n = prompts.numel()
    return logp[:n] - sel("ref_chosen"), logp[n:] - sel("ref_rejected")


def pair_margins(policy: TinyPolicy, pairs: dict, idx: torch.Tensor | None = None) -> torch.Tensor:
    """``M = (logp_w - ref_w) - (logp_l - ref_l)`` for the pairs (all, or rows ``idx``)."""
    chosen, rejected = pair_logratios(policy, pairs, idx)
    return chosen - rejected


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(policy: TinyPolicy, ref: TinyPolicy, world: World, heldout: dict, n_samples: int, sample_seed: int) -> dict:
    """Checkpoint metrics: held-out accuracies, MC KL(policy || ref), gold reward and length of policy samples."""
    m = pair_margins(policy, heldout)
    decided = heldout["gold_agrees"] >= 0
    # A pair with M == 0 (the untrained policy) counts as half right: no preference expressed.
    right_noisy = (m > 0).double() + 0.5 * (m == 0).double()
    right_gold = torch.where(heldout["gold_agrees"] == 1, right_noisy, 1.0 - right_noisy)
    gen = torch.Generator().manual_seed(sample_seed)
    prompts = torch.arange(n_samples) % world.num_prompts
    tokens, lengths = policy.sample(prompts, gen)
    log_ratio = policy.sequence_logp(prompts, tokens, lengths) - ref.sequence_logp(prompts, tokens, lengths)
    per_len = lengths.clamp(min=1).double()
    return {
        "acc_noisy": float(right_noisy.mean()),
        "acc_gold": float(right_gold[decided].mean()),
        "kl": float(log_ratio.mean()),
        "kl_se": float(log_ratio.std() / math.sqrt(n_samples)),
        "gold": float(gold_reward(world, prompts, tokens, lengths).mean()),
        "proxy": float(proxy_reward(world, prompts, tokens, lengths).mean()),
        "good_frac": float(good_fraction(world, prompts, tokens, lengths).mean()),
        "length": float(lengths.double().mean()),
        "judged_good_frac": float((lambda g, c: (g / c.clamp(min=1)).mean())(*_good_and_content(world, prompts, tokens))),
        "filler_frac": float(((tokens == FILLER).sum(1).double() / per_len).mean()),
        "repeat_frac": float((repeat_mask(tokens).sum(1).double() / per_len).mean()),
        "cut_frac": float((lengths == world.max_len).double().mean()),
        "heldout_margin_mean": float(m.mean()),
    }


def evaluate_generator(world: World, n: int, seed: int) -> dict:
    """Gold reward and length of the known generator's own samples (what the reference imitates)."""
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.arange(n) % world.num_prompts
    tokens, lengths = generator_sample(world, prompts, gen)
    return {"gold": float(gold_reward(world, prompts, tokens, lengths).mean()), "length": float(lengths.double().mean())}


# --------------------------------------------------------------------------- one DPO run


@dataclass(frozen=True)
class RunSpec:
    """One training configuration: a fixed beta, or a controller config."""

    name: str
    group: str  # "fixed", "dynamic" or "dynamic, beta_0=<low>"
    beta: float | None = None
    controller: DynamicBetaConfig | None = None

    @property
    def beta_0(self) -> float:
        return self.beta if self.controller is None else self.controller.beta_0

    @property
    def rule(self) -> str | None:
        return None if self.controller is None else self.controller.risk_rule


def step_signals(beta: float, margins: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    """Per-step statistics a controller could act on (stored for every run, fixed ones included)."""
    m = margins.tolist()
    rho = chosen.tolist() + rejected.tolist()
    return {
        "margin_mean": float(margins.mean()),
        "chosen_lr": float(chosen.mean()),  # mean chosen log-ratio: < 0 is likelihood displacement
        "rejected_lr": float(rejected.mean()),
        "acc": float((margins > 0).double().mean()),
        "beta_star": calibrated_temperature(m),
        "kl_reverse": kl_estimate(rho, "reverse"),
        "kl_importance": kl_estimate(rho, "importance"),
        "loss_weight_mean": float(torch.sigmoid(-beta * margins).mean()),
    }


def run_dpo(spec: RunSpec, ref: TinyPolicy, world: World, train: dict, heldout: dict, args, seed: int) -> dict:
    """Train one policy from the reference; returns per-step and per-checkpoint histories."""
    torch.manual_seed(seed)
    policy = copy.deepcopy(ref)
    for p in policy.parameters():
        p.requires_grad_(True)
    policy.train()
    opt = torch.optim.Adam(policy.parameters(), lr=world.lr)
    # Linear learning-rate warmup: without it Adam's first, full-size steps throw every run
    # (whatever its beta) through the same transient before beta matters.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / max(args.lr_warmup, 1)))
    ctrl = DynamicBetaController(spec.controller) if spec.controller is not None else None
    # Fixed-beta runs carry a shadow controller (defaults, alpha = 0: it never moves beta) so that
    # p_hat, tau and u can be compared across the sweep.
    shadow = DynamicBetaController(replace(DynamicBetaConfig(), alpha=0.0)) if ctrl is None else None
    order_gen = torch.Generator().manual_seed(seed + 7)  # same batch order for every run of a seed
    n_train = train["prompts"].numel()
    perm, cursor = torch.randperm(n_train, generator=order_gen), 0
    steps, checkpoints = [], []

    def checkpoint(step):
        rec = evaluate(policy, ref, world, heldout, args.eval_samples, sample_seed=seed * 100_003 + step)
        rec["step"] = step
        checkpoints.append(rec)

    checkpoint(0)
    for step in range(args.steps):
        if cursor + args.batch > n_train:
            perm, cursor = torch.randperm(n_train, generator=order_gen), 0
        idx = perm[cursor:cursor + args.batch]
        cursor += args.batch
        beta = ctrl.beta if ctrl is not None else spec.beta  # fixed before the step starts
        chosen, rejected = pair_logratios(policy, train, idx)
        margins = chosen - rejected
        weights = ctrl.pair_weights(margins.detach().double().tolist()) if ctrl is not None else None
        if weights is None:
            loss = -F.logsigmoid(beta * margins).mean()
        else:  # filtered pairs keep their place in the mean with weight 0 (the trainer does the same)
            loss = (torch.tensor(weights, dtype=margins.dtype) * -F.logsigmoid(beta * margins)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        md, cd, rd = margins.detach().double(), chosen.detach().double(), rejected.detach().double()
        rec = {"step": step, "beta": beta, "loss": float(loss.detach()), **step_signals(beta, md, cd, rd)}
        if weights is not None:
            rec["kept_frac"] = sum(1 for w in weights if w > 0) / len(weights)
        extras = {"chosen_logratios": cd.tolist(), "rejected_logratios": rd.tolist()}
        out = (ctrl if ctrl is not None else shadow).observe_step(md.tolist(), extras)[-1]
        rec.update(p_hat=out["p_hat"], tau=out["tau"], u=out["u"], risk_over=out["risk_over"], phase=out["phase"])
        steps.append(rec)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            checkpoint(step + 1)
    final_beta = ctrl.beta if ctrl is not None else spec.beta
    return {"name": spec.name, "group": spec.group, "world": world.name, "seed": seed, "steps": steps,
            "checkpoints": checkpoints, "final_beta": final_beta,
            "controller_state": None if ctrl is None else
            {k: v for k, v in ctrl.state_dict().items() if k != "warmup_margins"}}


def run_specs(args) -> list[RunSpec]:
    """Fixed-beta sweep; every rule with the controller defaults, from the default beta_0 and from ``--low_beta_0``."""
    specs = [RunSpec(f"fixed beta={b:g}", "fixed", beta=b) for b in args.fixed_betas]
    default = DynamicBetaConfig()  # headline "without tuning" setting: the shipped defaults, beta_0 included
    variants = [("dynamic", "dynamic", default)]
    if args.low_beta_0 > 0:
        # The same controllers started where a fixed beta over-optimises: can they pull back?
        tag = f"beta_0={args.low_beta_0:g}"
        variants.append((f"dynamic {tag}", f"dynamic, {tag}", replace(default, beta_0=args.low_beta_0)))
    for prefix, group, cfg in variants:
        for rule in args.rules:
            specs.append(RunSpec(f"{prefix} {rule}", group, controller=replace(cfg, risk_rule=rule)))
    return specs


# --------------------------------------------------------------------------- analysis


def frontier_at(points: list[tuple[float, float]], x: float) -> float:
    """Best gold reward the fixed-beta runs reach at ``sqrt(KL) <= x``, linearly interpolated.

    ``points`` are ``(sqrt_kl, gold)`` of every fixed-beta checkpoint. The
    frontier keeps the points that beat every point of smaller KL (the Pareto
    set), joins them with straight lines and is flat after the last one.
    """
    pareto, best = [], -math.inf
    for px, py in sorted(points):
        if py > best:
            pareto.append((px, py))
            best = py
    if x <= pareto[0][0]:
        return pareto[0][1]
    for (x0, y0), (x1, y1) in zip(pareto, pareto[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y1
    return pareto[-1][1]


def sqrt_kl(kl: float) -> float:
    return math.sqrt(max(kl, 0.0))  # the MC estimate can dip just below 0


def add_frontier_gaps(results: list[dict]) -> None:
    """Per world and seed, ``frontier_gap`` = gold minus the fixed-beta frontier at the same sqrt(KL).

    A dynamic run is measured against the frontier of all fixed-beta runs of its
    world and seed; a fixed-beta run against the frontier of the *other* fixed
    betas (leave one out), which gives the scale of the gaps.
    """
    for key in sorted({(r["world"], r["seed"]) for r in results}):
        mine = [r for r in results if (r["world"], r["seed"]) == key]
        fixed = [r for r in mine if r["group"] == "fixed"]
        for r in mine:
            pts = [(sqrt_kl(c["kl"]), c["gold"]) for f in fixed if f is not r for c in f["checkpoints"]]
            for c in r["checkpoints"]:
                c["frontier_gap"] = c["gold"] - frontier_at(pts, sqrt_kl(c["kl"]))


def add_paired_differences(results: list[dict], specs: list[RunSpec], args) -> None:
    """Final gold minus that of fixed runs of the same world and seed (paired).

    ``gold_vs_beta0``: against the fixed run at the run's own ``beta_0`` (fixed rows:
    the default ``beta_0``); ``gold_vs_low``: against the fixed run at ``--low_beta_0``.
    """
    start = {s.name: (s.controller.beta_0 if s.controller else DynamicBetaConfig().beta_0) for s in specs}
    for r in results:
        fixed = {f["final_beta"]: f["checkpoints"][-1]["gold"] for f in results
                 if (f["world"], f["seed"]) == (r["world"], r["seed"]) and f["group"] == "fixed"}
        gold = r["checkpoints"][-1]["gold"]
        if start[r["name"]] in fixed:
            r["gold_vs_beta0"] = gold - fixed[start[r["name"]]]
        if args.low_beta_0 in fixed:
            r["gold_vs_low"] = gold - fixed[args.low_beta_0]


def mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def _cell(vals: list[float], fmt: str) -> str:
    mu, sd = mean_std(vals)
    if len(vals) == 1 or sd <= 1e-9 * max(abs(mu), 1.0):
        return fmt.format(mu)
    return f"{fmt.format(mu)} ± {fmt.format(sd).lstrip('+')}"


def final_row(run: dict) -> dict:
    """The final checkpoint's metrics plus final beta, sqrt(KL), peak gold and the paired differences."""
    last = dict(run["checkpoints"][-1])
    last["final_beta"] = run["final_beta"]
    last["sqrt_kl"] = sqrt_kl(last["kl"])
    last["peak_gold"] = max(c["gold"] for c in run["checkpoints"])
    last["hack_frac"] = last[HACK_KEY[run["world"]]] if run["world"] in HACK_KEY else last["filler_frac"]
    for key in ("gold_vs_beta0", "gold_vs_low"):
        if key in run:
            last[key] = run[key]
    return last


TABLE_COLUMNS = [
    # (header, key of final_row, format)
    ("final beta", "final_beta", "{:.3g}"),
    ("KL", "kl", "{:.2f}"),
    ("sqrt KL", "sqrt_kl", "{:.2f}"),
    ("gold reward", "gold", "{:+.3f}"),
    ("length", "length", "{:.1f}"),
    ("hack share", "hack_frac", "{:.3f}"),
    ("acc (noisy)", "acc_noisy", "{:.3f}"),
    ("acc (gold)", "acc_gold", "{:.3f}"),
    ("peak gold", "peak_gold", "{:+.3f}"),
    ("gap @ matched KL", "frontier_gap", "{:+.3f}"),
    ("gold - fixed(beta_0)", "gold_vs_beta0", "{:+.3f}"),
]


def results_table(results: list[dict], specs: list[RunSpec], world: str, ref_stats: dict) -> str:
    """Markdown table of the final checkpoint in one world, mean ± std over seeds, one row per run spec."""
    head = "| run | " + " | ".join(h for h, _, _ in TABLE_COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(TABLE_COLUMNS) + 1)]
    ref_cells = [fmt.format(ref_stats[key]) if key in ref_stats else "" for _, key, fmt in TABLE_COLUMNS]
    lines.append("| reference (step 0) | " + " | ".join(ref_cells) + " |")
    for spec in specs:
        rows = [final_row(r) for r in results if r["name"] == spec.name and r["world"] == world]
        if not rows:
            continue
        cells = [_cell([row[key] for row in rows], fmt) if all(key in row for row in rows) else "-"
                 for _, key, fmt in TABLE_COLUMNS]
        lines.append(f"| {spec.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rule_summary(results: list[dict], specs: list[RunSpec], worlds: list[str], args) -> tuple[str, dict]:
    """The headline: per rule and world, gap from the default beta_0, recovery from the low one, hack share.

    Target (docs/dynamic_beta.md): gap >= 0 within one std from the default
    beta_0 in every world, and from ``--low_beta_0`` a paired gain over fixed
    ``--low_beta_0`` larger than its std in every world.
    """
    verdict = {}
    lines = ["| rule | world | gap @ matched KL (beta_0 default) | gold - fixed(beta_0 default) "
             f"| gold - fixed {args.low_beta_0:g} (from beta_0 = {args.low_beta_0:g}) "
             f"| gap (from {args.low_beta_0:g}) | final beta (default / low) | hack share (default / low) "
             "| length (default / low) | target met |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for rule in args.rules:
        by_group = {}
        for s in specs:
            if s.rule == rule:
                by_group["low" if s.controller.beta_0 != DynamicBetaConfig().beta_0 else "default"] = s.name
        ok_all = True
        for world in worlds:
            rows = {g: [final_row(r) for r in results if r["name"] == name and r["world"] == world]
                    for g, name in by_group.items()}
            if not rows.get("default"):
                continue
            gap_mu, gap_sd = mean_std([r["frontier_gap"] for r in rows["default"]])
            on_frontier = gap_mu + gap_sd >= 0
            low = rows.get("low") or []
            if low and all("gold_vs_low" in r for r in low):
                rec_mu, rec_sd = mean_std([r["gold_vs_low"] for r in low])
                recovers = rec_mu > max(rec_sd, 0.0) and rec_mu > 0
            else:
                recovers = False
            met = on_frontier and recovers
            ok_all &= met
            verdict[(rule, world)] = {"on_frontier": on_frontier, "recovers": recovers}

            def cells(key, fmt, group):
                vals = [r[key] for r in rows.get(group, []) if key in r]
                return _cell(vals, fmt) if vals else "-"

            lines.append(
                f"| {rule} | {world} | {cells('frontier_gap', '{:+.3f}', 'default')} "
                f"| {cells('gold_vs_beta0', '{:+.3f}', 'default')} | {cells('gold_vs_low', '{:+.3f}', 'low')} "
                f"| {cells('frontier_gap', '{:+.3f}', 'low')} "
                f"| {cells('final_beta', '{:.3g}', 'default')} / {cells('final_beta', '{:.3g}', 'low')} "
                f"| {cells('hack_frac', '{:.3f}', 'default')} / {cells('hack_frac', '{:.3f}', 'low')} "
                f"| {cells('length', '{:.1f}', 'default')} / {cells('length', '{:.1f}', 'low')} "
                f"| {'yes' if met else 'no'} ({'on' if on_frontier else 'below'} frontier, "
                f"{'recovers' if recovers else 'no clear recovery'}) |")
        verdict[rule] = ok_all
    return "\n".join(lines), verdict


def ema(values: list[float | None], lam: float, log: bool = False) -> list[float | None]:
    """Exponential moving average that skips None values (in log space with ``log``)."""
    out, acc = [], None
    for v in values:
        if v is not None and v > 0 if log else v is not None:
            x = math.log(v) if log else v
            acc = x if acc is None else (1 - lam) * acc + lam * x
        out.append(None if acc is None else (math.exp(acc) if log else acc))
    return out


def derived_signals(run: dict, lam: float) -> dict:
    """Per-step signals derived with EMAs: calibration ratio beta / beta*, displacement ratio D."""
    steps = run["steps"]
    bstar = ema([s["beta_star"] for s in steps], lam, log=True)
    chosen = ema([s["chosen_lr"] for s in steps], lam)
    margin = ema([s["margin_mean"] for s in steps], lam)
    return {
        "calib_ratio": [None if b is None else s["beta"] / b for s, b in zip(steps, bstar)],
        "displacement": [None if m is None or m <= 0 else -c / m for c, m in zip(chosen, margin)],
    }


SIGNALS = [
    # (key, label, source) -- source "steps" or "derived"
    ("p_hat", "p_hat (shadow controller)", "steps"),
    ("calib_ratio", "beta / beta* (calibration ratio)", "derived"),
    ("displacement", "D = -chosen log-ratio / margin", "derived"),
    ("chosen_lr", "chosen log-ratio (nats)", "steps"),
    ("kl_reverse", "KL(ref||policy) estimate", "steps"),
    ("acc", "batch accuracy (M > 0)", "steps"),
]


def signal_table(results: list[dict], specs: list[RunSpec], world: str, args) -> str:
    """What each fixed run shows a controller after warmup, and how well it separates beta_0 = low from the best beta.

    Fixed runs only. ``separation`` = |mean(low beta) - mean(best fixed beta)|
    over the steps after warmup, divided by the signal's step-to-step noise
    (the std of its first differences / sqrt 2, a one-step standard error).
    """
    warm = DynamicBetaConfig().warmup_steps
    fixed = [s for s in specs if s.group == "fixed"]
    finals = {s.name: mean_std([r["checkpoints"][-1]["gold"] for r in results
                                if r["name"] == s.name and r["world"] == world])[0] for s in fixed}
    best = max(finals, key=finals.get)
    low = f"fixed beta={args.low_beta_0:g}"
    series = {}
    for s in fixed:
        for r in results:
            if r["name"] != s.name or r["world"] != world:
                continue
            derived = derived_signals(r, DynamicBetaConfig().ema_lambda)
            for key, _, source in SIGNALS:
                vals = derived[key] if source == "derived" else [st.get(key) for st in r["steps"]]
                series.setdefault((s.name, key), []).append([v for v in vals[warm:] if v is not None])
    lines = ["| fixed run | final gold | " + " | ".join(label for _, label, _ in SIGNALS) + " |",
             "|---|---|" + "---|" * len(SIGNALS)]
    for s in fixed:
        cells = []
        for key, _, _ in SIGNALS:
            per_seed = [float(np.mean(v)) for v in series.get((s.name, key), []) if v]
            cells.append(_cell(per_seed, "{:.3g}") if per_seed else "-")
        tag = " (best)" if s.name == best else (" (over-optimises)" if s.name == low else "")
        lines.append(f"| {s.name}{tag} | {finals[s.name]:+.3f} | " + " | ".join(cells) + " |")
    sep = []
    for key, _, _ in SIGNALS:
        a = [float(np.mean(v)) for v in series.get((low, key), []) if v]
        b = [float(np.mean(v)) for v in series.get((best, key), []) if v]
        noise = [float(np.std(np.diff(v)) / math.sqrt(2)) for v in series.get((best, key), []) if len(v) > 2]
        if a and b and noise and np.mean(noise) > 0:
            sep.append(f"{abs(np.mean(a) - np.mean(b)) / np.mean(noise):.2f}")
        else:
            sep.append("-")
    lines.append(f"| separation ({low} vs {best}, in one-step standard errors) | | " + " | ".join(sep) + " |")
    return "\n".join(lines)


def rank(values: list[float]) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    return ranks


def kl_tracking(results: list[dict], world: str, window: int) -> str:
    """How the in-step KL estimates follow the Monte-Carlo KL(policy || ref) at the checkpoints.

    For every run and checkpoint after step 0: the mean of the per-step
    estimate over the ``window`` steps before it, against the checkpoint's
    Monte-Carlo KL. Pearson and Spearman correlations, and the median ratio.
    """
    lines = ["| estimate (in-step, from the pair log-ratios) | Pearson r | Spearman r | median estimate / true KL "
             "| median at true KL > 3 |", "|---|---|---|---|---|"]
    for key, label in (("kl_reverse", "reverse: -mean(rho), KL(ref || policy)"),
                       ("kl_importance", "importance: mean(w rho - w + 1), KL(policy || ref)")):
        est, true = [], []
        for r in results:
            if r["world"] != world:
                continue
            for c in r["checkpoints"][1:]:
                win = [s[key] for s in r["steps"][max(0, c["step"] - window):c["step"]]]
                est.append(float(np.mean(win)))
                true.append(c["kl"])
        est, true = np.asarray(est), np.asarray(true)
        pearson = float(np.corrcoef(est, true)[0, 1])
        spearman = float(np.corrcoef(rank(est), rank(true))[0, 1])
        pos = true > 0.1
        ratio = float(np.median(est[pos] / true[pos]))
        high = true > 3
        ratio_high = float(np.median(est[high] / true[high])) if high.any() else float("nan")
        lines.append(f"| {label} | {pearson:.3f} | {spearman:.3f} | {ratio:.2f} | {ratio_high:.2f} |")
    return "\n".join(lines)


def mean_curve(results: list[dict], name: str, key: str, world: str, source: str = "checkpoints",
               derived: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(x, mean over seeds of key)`` along steps or checkpoints; None values become NaN."""
    runs = [r for r in results if r["name"] == name and r["world"] == world]
    xs = np.array([c["step"] for c in runs[0][source]])
    if derived:
        rows = [derived_signals(r, DynamicBetaConfig().ema_lambda)[key] for r in runs]
    else:
        rows = [[c.get(key) for c in r[source]] for r in runs]
    ys = np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)
    with np.errstate(invalid="ignore"):
        counts = (~np.isnan(ys)).sum(0)
        mean = np.where(counts > 0, np.nansum(ys, axis=0) / np.maximum(counts, 1), np.nan)
    return xs, mean


# --------------------------------------------------------------------------- figures

RULE_COLORS = {"hoeffding": "tab:red", "zscore": "tab:orange", "hoeffding_deadband": "tab:purple",
               "beta_dpo": "tab:brown", "beta_dpo_filter": "tab:pink", "kl_target": "tab:cyan",
               "calibration_floor": "tab:green"}


def _style(spec: RunSpec, fixed_betas: list[float]):
    import matplotlib.pyplot as plt

    if spec.group == "fixed":
        rank_ = sorted(fixed_betas).index(spec.beta)
        return {"color": plt.cm.Greys(0.35 + 0.6 * rank_ / max(len(fixed_betas) - 1, 1)), "ls": "-", "marker": "o",
                "lw": 1.2}
    color = RULE_COLORS.get(spec.rule, "k")
    if spec.controller.beta_0 != DynamicBetaConfig().beta_0:  # the low-beta_0 runs
        return {"color": color, "ls": "--", "marker": "v", "lw": 1.4}
    return {"color": color, "ls": "-", "marker": "s", "lw": 1.8}


def plot_frontier(results, specs, args, worlds, path):
    """Per world: gold reward, length and hack share against sqrt(KL), seed-mean checkpoints of every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(worlds), 3, figsize=(19, 5.4 * len(worlds)), squeeze=False)
    for row, world in zip(axes, worlds):
        fixed_pts = []
        for spec in specs:
            st = _style(spec, args.fixed_betas)
            _, kl = mean_curve(results, spec.name, "kl", world)
            x = np.sqrt(np.clip(kl, 0, None))
            for ax, key in zip(row, ("gold", "length", HACK_KEY[world])):
                _, y = mean_curve(results, spec.name, key, world)
                if key == "gold" and spec.group == "fixed":
                    fixed_pts += list(zip(x, y))
                ax.plot(x, y, color=st["color"], ls=st["ls"], marker=st["marker"], lw=st["lw"], ms=3,
                        label=spec.name, alpha=0.9)
                ax.plot(x[-1:], y[-1:], color=st["color"], marker=st["marker"], ms=9, mec="k")
        grid = np.linspace(0, max(p[0] for p in fixed_pts), 200)
        row[0].plot(grid, [frontier_at(fixed_pts, g) for g in grid], color="grey", lw=7, alpha=0.3, zorder=0,
                    label="fixed-beta frontier")
        row[0].set_ylabel(f"[{world}] gold reward of policy samples")
        row[1].set_ylabel("mean response length")
        row[2].set_ylabel(f"{HACK_KEY[world].replace('_frac', '')} share of tokens")
        for ax in row:
            ax.set_xlabel("sqrt(KL(policy || reference)), Monte-Carlo")
            ax.grid(alpha=0.3)
        row[0].set_title(f"{world} world: over-optimisation frontier (big marker = final step)")
    axes[0, 0].legend(fontsize=6, loc="lower left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_traces(results, specs, args, worlds, path):
    """Beta of every dynamic run (seed mean, log scale) per world; thin grey lines are the fixed sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(worlds), figsize=(8 * len(worlds), 5.5), squeeze=False)
    for ax, world in zip(axes[0], worlds):
        for spec in specs:
            st = _style(spec, args.fixed_betas)
            x, beta = mean_curve(results, spec.name, "beta", world, "steps")
            if spec.group == "fixed":
                ax.plot(x, beta, color="grey", lw=0.6, alpha=0.6)
            else:
                ax.plot(x, beta, color=st["color"], ls=st["ls"], lw=st["lw"], label=spec.name)
        ax.axvline(DynamicBetaConfig().warmup_steps, color="grey", lw=0.6, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("beta (seed mean)")
        ax.set_title(f"{world} world")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_signals(results, specs, args, worlds, path):
    """Shadow signals of the fixed runs against the step: p_hat, calibration ratio, displacement D, KL estimate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("p_hat", "p_hat (10-step mean)", False), ("calib_ratio", "beta / beta* (EMA)", True),
            ("displacement", "D = -chosen log-ratio / margin", True), ("kl_reverse", "KL(ref||policy) estimate", False)]
    fig, axes = plt.subplots(len(worlds), len(keys), figsize=(5 * len(keys), 4.2 * len(worlds)), squeeze=False)
    for row, world in zip(axes, worlds):
        for spec in specs:
            if spec.group != "fixed":
                continue
            st = _style(spec, args.fixed_betas)
            for ax, (key, label, derived) in zip(row, keys):
                x, y = mean_curve(results, spec.name, key, world, "steps", derived=derived)
                if key == "p_hat":
                    y = np.array([np.nanmean(y[max(0, i - 9):i + 1]) if not np.isnan(y[i]) else np.nan
                                  for i in range(len(y))])
                ax.plot(x, y, color=st["color"], lw=1.4, label=spec.name)
                ax.set_ylabel(label)
        row[1].set_yscale("log")
        for ax in row:
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
            ax.set_title(f"{world} world")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out_dir", default="outputs/dynamic_beta", help="results.json and table.md go here")
    p.add_argument("--fig_dir", default=None, help="PNG figures go here (default: --out_dir)")
    p.add_argument("--update_doc", default=None, help="markdown file whose results:begin/end block gets the new tables")
    p.add_argument("--quick", action="store_true",
                   help="smoke run (about a minute): first seed only, betas 0.01/0.1/1, 160 steps, small data")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                   help="one reference, data set and batch order per seed")
    p.add_argument("--worlds", nargs="+", default=list(WORLD_PRESETS), choices=list(WORLD_PRESETS),
                   help="which worlds to run")
    p.add_argument("--rules", nargs="+", default=list(RISK_RULES), choices=list(RISK_RULES),
                   help="risk rules to run (each with the default config)")
    # world (shared)
    p.add_argument("--vocab", type=int, default=16, help="response tokens (FILLER + content tokens)")
    p.add_argument("--num_prompts", type=int, default=8, help="prompts (each with its own good set and length)")
    p.add_argument("--good_set_size", type=int, default=4, help="good tokens per prompt")
    p.add_argument("--p_good", type=float, default=0.4,
                   help="generator: probability that a content token is drawn from the good set")
    p.add_argument("--max_len", type=int, default=40, help="responses are cut at this many tokens")
    # world (per preset; a flag overrides the preset of every world run)
    p.add_argument("--p_filler", type=float, default=None, help="filler world: FILLER probability before each content token")
    p.add_argument("--p_repeat", type=float, default=None, help="repetition world: repeat probability after each content token")
    p.add_argument("--len_penalty", type=float, default=None, help="gold reward = good/all tokens - len_penalty * length")
    p.add_argument("--len_bonus", type=float, default=None, help="proxy = good/visible tokens + len_bonus * length")
    p.add_argument("--label_temp", type=float, default=None, help="Bradley-Terry temperature of the noisy labels")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate of the DPO runs")
    # reference
    p.add_argument("--emb", type=int, default=16, help="GRU embedding size")
    p.add_argument("--hidden", type=int, default=32, help="GRU hidden size")
    p.add_argument("--ref_steps", type=int, default=400, help="reference MLE steps")
    p.add_argument("--ref_batch", type=int, default=128, help="reference MLE batch (fresh generator samples)")
    p.add_argument("--ref_lr", type=float, default=3e-3, help="reference Adam learning rate")
    # DPO
    p.add_argument("--train_pairs", type=int, default=16384, help="preference pairs to train on")
    p.add_argument("--heldout_pairs", type=int, default=1024, help="held-out pairs for the accuracies")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per run (same for every run)")
    p.add_argument("--batch", type=int, default=64, help="pairs per optimizer step (the controller's n)")
    p.add_argument("--lr_warmup", type=int, default=50, help="steps of linear learning-rate warmup (same for every run)")
    p.add_argument("--fixed_betas", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3, 1.0], help="fixed-beta sweep")
    p.add_argument("--low_beta_0", type=float, default=0.01,
                   help="also run every rule from this beta_0 (0 to skip); it must be in --fixed_betas for the recovery")
    p.add_argument("--eval_every", type=int, default=50, help="optimizer steps between checkpoints")
    p.add_argument("--eval_samples", type=int, default=512, help="policy samples per checkpoint (KL, gold, length)")
    args = p.parse_args(argv)
    if args.quick:  # every size shrinks; the worlds, the model and the controller defaults stay
        args.seeds = args.seeds[:1]
        args.fixed_betas = [0.01, 0.1, 1.0]
        args.ref_steps, args.train_pairs, args.heldout_pairs = 150, 2048, 256
        args.steps, args.eval_every, args.eval_samples = 160, 40, 256
        args.lr_warmup = 20
    args.fig_dir = args.fig_dir or args.out_dir
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)  # determinism, and the machine is shared
    torch.use_deterministic_algorithms(True)
    os.makedirs(args.out_dir, exist_ok=True)
    os.makedirs(args.fig_dir, exist_ok=True)
    t0 = time.time()
    specs = run_specs(args)
    results, ref_stats, worlds = [], {}, {}

    for world_name in args.worlds:
        world = make_world(args, world_name)
        worlds[world_name] = world
        ref_rows = []
        for seed in args.seeds:
            ref = train_reference(world, args, seed)
            data_gen = torch.Generator().manual_seed(10_000 + seed)
            train = make_pairs(world, ref, args.train_pairs, data_gen)
            heldout = make_pairs(world, ref, args.heldout_pairs, data_gen)
            gen_stats = evaluate_generator(world, args.eval_samples, seed)
            agree = float((train["gold_agrees"] == 1).sum() / (train["gold_agrees"] >= 0).sum())
            print(f"[{world_name} seed {seed}] reference trained ({time.time() - t0:.0f}s); generator length "
                  f"{gen_stats['length']:.2f} gold {gen_stats['gold']:+.3f}; gold agrees with noisy label on {agree:.3f}",
                  flush=True)
            for spec in specs:
                run = run_dpo(spec, ref, world, train, heldout, args, seed)
                run["label_gold_agreement"] = agree
                results.append(run)
                last = run["checkpoints"][-1]
                print(f"[{world_name} seed {seed}] {spec.name:<36} beta {run['final_beta']:.4g}  KL {last['kl']:6.2f}  "
                      f"gold {last['gold']:+.3f}  len {last['length']:5.1f}  hack {last[HACK_KEY[world_name]]:.3f}  "
                      f"({time.time() - t0:.0f}s)", flush=True)
            ref_rows.append(results[-1]["checkpoints"][0])
        stats = {k: float(np.mean([s[k] for s in ref_rows]))
                 for k in ("kl", "gold", "length", "acc_noisy", "acc_gold", "filler_frac", "repeat_frac")}
        stats.update(sqrt_kl=0.0, peak_gold=stats["gold"], hack_frac=stats[HACK_KEY[world_name]])
        ref_stats[world_name] = stats

    add_frontier_gaps(results)
    add_paired_differences(results, specs, args)
    elapsed = time.time() - t0
    summary, verdict = rule_summary(results, specs, args.worlds, args)
    winners = [r for r in args.rules if verdict.get(r)]
    parts = [
        f"Mean ± std over seeds {args.seeds}, final checkpoint (step {args.steps}). Every rule runs with "
        f"`DynamicBetaConfig()` untouched except `risk_rule` (and `beta_0` for the low start). 'gap @ matched KL': "
        "gold minus the fixed-beta frontier of the same world and seed at the run's own sqrt(KL) (fixed rows: "
        "frontier of the other fixed betas). 'gold - fixed(...)': paired by seed. Target: gap + std >= 0 from the "
        f"default beta_0 and gain over fixed {args.low_beta_0:g} > its std from beta_0 = {args.low_beta_0:g}, "
        "in every world.",
        "**Summary per rule**",
        summary,
        f"Rules meeting the target in every world: {', '.join(winners) if winners else 'none'}.",
    ]
    for world_name in args.worlds:
        w = worlds[world_name]
        parts += [
            f"**{world_name} world** (lr {w.lr:g}; hack share = {HACK_KEY[world_name]}; gold agrees with the "
            f"noisy label on {np.mean([r['label_gold_agreement'] for r in results if r['world'] == world_name]):.3f} "
            "of training pairs)",
            results_table(results, specs, world_name, ref_stats[world_name]),
            f"Signals after warmup (steps {DynamicBetaConfig().warmup_steps}-{args.steps}), fixed runs, mean ± std "
            "over seeds:",
            signal_table(results, specs, world_name, args),
            "In-step KL estimates against the Monte-Carlo KL(policy || ref) at every checkpoint of every run:",
            kl_tracking(results, world_name, args.eval_every),
        ]
    parts.append(f"Wall time {elapsed:.0f}s for {len(results)} runs "
                 f"(`{' '.join(['python', 'scripts/experiment_dynamic_beta.py', *(argv or [])])}`).")
    report = "\n\n".join(parts)
    print("\n" + report)

    with open(os.path.join(args.out_dir, "table.md"), "w") as fh:
        fh.write(report + "\n")
    with open(os.path.join(args.out_dir, "results.json"), "w") as fh:
        json.dump({"args": vars(args), "worlds": {k: asdict(v) for k, v in worlds.items()}, "elapsed_s": elapsed,
                   "specs": [{"name": s.name, "group": s.group, "beta": s.beta,
                              "controller": None if s.controller is None else asdict(s.controller)} for s in specs],
                   "verdict": {k if isinstance(k, str) else "/".join(k): v for k, v in verdict.items()},
                   "runs": results}, fh)
    figs = [plot_frontier(results, specs, args, args.worlds, os.path.join(args.fig_dir, "dynamic_beta_frontier.png")),
            plot_traces(results, specs, args, args.worlds, os.path.join(args.fig_dir, "dynamic_beta_traces.png")),
            plot_signals(results, specs, args, args.worlds, os.path.join(args.fig_dir, "dynamic_beta_signals.png"))]
    if args.update_doc:
        update_markdown_block(args.update_doc, ("<!-- results:begin -->", "<!-- results:end -->"), report,
                              missing="error")
    print(f"wall time {elapsed:.0f}s; wrote", os.path.join(args.out_dir, "results.json"),
          os.path.join(args.out_dir, "table.md"), *figs)
    return {"results": results, "report": report, "elapsed_s": elapsed, "verdict": verdict}


if __name__ == "__main__":
    main(sys.argv[1:])
