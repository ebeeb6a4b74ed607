"""Controlled over-optimisation experiment: fixed-beta vs dynamic-beta DPO on a toy policy (CPU).

    nice python scripts/experiment_dynamic_beta.py --out_dir outputs/dynamic_beta \
        --fig_dir docs/img --update_doc docs/dynamic_beta.md                 # full run, ~4-7 min on 2 cores
    python scripts/experiment_dynamic_beta.py --quick --out_dir /tmp/dynamic_beta_quick   # smoke run, < 1 min

What it does, top to bottom (docs/dynamic_beta.md has the results and what they show):

1. World. ``num_prompts`` prompts; each has a set of "good" tokens and a mean
   response length. A known stochastic generator writes responses:
   ``2 + Poisson(mean_len[p])`` content tokens, each from the prompt's good
   set with probability ``p_good`` and otherwise uniform, with a FILLER token
   before each content token with probability ``p_filler`` (repeatedly).
   Gold reward ``= good tokens / all tokens - len_penalty * length``.
2. Reference. A tiny prompt-conditioned GRU is trained from scratch (maximum
   likelihood) on fresh generator samples.
3. Preferences. Pairs of responses are sampled from the reference and labelled
   by a length-biased proxy that is blind to FILLER,
   ``good tokens / content tokens + len_bonus * length``, with Bradley-Terry
   label noise: ``P(a > b) = sigmoid((proxy_a - proxy_b) / label_temp)``.
   The labels reward length (and so filler); the gold reward penalises both.
4. DPO. The policy starts as a copy of the reference and minimises
   ``-log sigmoid(beta * M)``, ``M = (logp_w - logp_l) - (ref_w - ref_l)``
   (sums over the response tokens and EOS), with the same optimiser, learning
   rate schedule, batch order and number of steps in every run. Fixed-beta
   runs sweep ``--fixed_betas``. Dynamic runs take beta from
   :class:`opensloth.dpo.controller.DynamicBetaController`, fed the step's batch
   margins once per optimiser step (beta for step t+1 comes from step t), for
   every rule in ``RISK_RULES``: first with the shipped defaults ("dynamic
   (default)", the no-tuning setting), then a clearly labelled faster variant
   ("dynamic (fast)": ``--fast_alpha``, ``--fast_warmup``, all else default).
   Fixed runs carry a shadow controller (defaults, alpha = 0) that records
   p_hat, tau and u without ever touching beta.
5. Checkpoints (every ``--eval_every`` steps): held-out preference accuracy
   against the noisy labels and the gold labels, Monte-Carlo KL(policy || ref)
   from ``--eval_samples`` policy samples, gold reward, length and filler share
   of those samples; every step: beta, p_hat, tau, u.
6. Output in ``--out_dir``: ``results.json`` (all histories) and ``table.md``
   (final numbers, mean ± std over seeds, the gap to the fixed-beta frontier
   at matched KL, controller statistics). Figures in ``--fig_dir``:
   ``dynamic_beta_frontier.png`` (gold reward and length against sqrt(KL)),
   ``dynamic_beta_traces.png`` (beta, p_hat, tau), ``dynamic_beta_training.png``
   (metrics against step). ``--update_doc`` rewrites the block between
   ``<!-- results:begin -->`` and ``<!-- results:end -->`` of a markdown file.

Deterministic given ``--seeds``: one torch thread, deterministic algorithms,
seeded generators; the controller is pure Python. The task (good sets, lengths)
is fixed; a seed picks the reference, the pairs, the batch order and the
evaluation samples, and all runs of a seed share them, so comparisons within a
seed are paired.
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

EOS = 0  # token 0 ends a response
FILLER = 1  # a content-free token: never good, only adds length (the cheap way to please a length-biased judge)


# --------------------------------------------------------------------------- world: generator and rewards


@dataclass(frozen=True)
class World:
    """The known generator and the two reward functions."""

    vocab: int  # tokens 1..vocab: FILLER, then the content tokens
    num_prompts: int
    good_sets: tuple  # per prompt, a tuple of good token ids
    mean_len: tuple  # per prompt, mean of the Poisson part of the length
    p_good: float
    p_filler: float
    max_len: int  # responses are cut at this many tokens
    len_penalty: float  # gold reward: - len_penalty * length
    len_bonus: float  # proxy reward: + len_bonus * length
    label_temp: float  # Bradley-Terry temperature of the noisy labels

    @property
    def num_tokens(self) -> int:
        """Input vocabulary: EOS, content tokens, then one token per prompt."""
        return 1 + self.vocab + self.num_prompts

    def prompt_token(self, prompts: torch.Tensor) -> torch.Tensor:
        return prompts + 1 + self.vocab


def make_world(args, task_seed: int = 1234) -> World:
    """The task is fixed across seeds (``task_seed``); seeds vary reference, data and training."""
    rng = np.random.default_rng(task_seed)
    content = np.arange(FILLER + 1, args.vocab + 1)  # FILLER is never good
    good_sets = tuple(tuple(int(t) for t in sorted(rng.choice(content, args.good_set_size, replace=False)))
                      for _ in range(args.num_prompts))
    mean_len = tuple(float(m) for m in rng.uniform(3.0, 8.0, args.num_prompts))
    return World(vocab=args.vocab, num_prompts=args.num_prompts, good_sets=good_sets, mean_len=mean_len,
                 p_good=args.p_good, p_filler=args.p_filler, max_len=args.max_len, len_penalty=args.len_penalty,
                 len_bonus=args.len_bonus, label_temp=args.label_temp)


def generator_sample(world: World, prompts: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Responses of the known generator: ``(tokens [B, max_len] padded with EOS, lengths [B])``.

    ``2 + Poisson(mean_len[p])`` content tokens, each from the prompt's good set
    with probability ``p_good`` and otherwise uniform over the non-filler
    tokens; before each content token, FILLER with probability ``p_filler``
    (repeatedly). Responses are cut at ``max_len``.
    """
    b, width = prompts.numel(), world.max_len
    n_content = 2 + torch.poisson(torch.tensor(world.mean_len)[prompts], generator=gen).long()
    is_filler = torch.rand(b, width, generator=gen) < world.p_filler
    # length = position of the n_content-th content token (+1), capped
    lengths = ((~is_filler).cumsum(1) < n_content[:, None]).sum(1).add(1).clamp(max=width)
    good = torch.tensor(world.good_sets)[prompts]  # [B, good_set_size]
    pick_good = torch.rand(b, width, generator=gen) < world.p_good
    good_tok = torch.gather(good, 1, torch.randint(0, good.shape[1], (b, width), generator=gen))
    any_tok = torch.randint(FILLER + 1, world.vocab + 1, (b, width), generator=gen)
    tokens = torch.where(pick_good, good_tok, any_tok)
    tokens[is_filler] = FILLER
    tokens[torch.arange(width)[None, :] >= lengths[:, None]] = EOS
    return tokens, lengths


def _good_and_content(world: World, prompts, tokens) -> tuple[torch.Tensor, torch.Tensor]:
    """Per response: number of good tokens, number of content (non-EOS, non-FILLER) tokens."""
    good = torch.zeros(world.num_prompts, world.vocab + 1, dtype=torch.bool)
    for p, s in enumerate(world.good_sets):
        good[p, list(s)] = True
    n_good = torch.gather(good[prompts], 1, tokens).sum(1)  # EOS and FILLER are never good
    n_content = ((tokens != EOS) & (tokens != FILLER)).sum(1)
    return n_good.double(), n_content.double()


def good_fraction(world: World, prompts, tokens, lengths) -> torch.Tensor:
    """Fraction of all the response's tokens that are good (FILLER dilutes it); 0 for an empty response."""
    n_good, _ = _good_and_content(world, prompts, tokens)
    return n_good / lengths.clamp(min=1).double()


def gold_reward(world: World, prompts, tokens, lengths) -> torch.Tensor:
    """What we actually want: good fraction minus a length penalty."""
    return good_fraction(world, prompts, tokens, lengths) - world.len_penalty * lengths.double()


def proxy_reward(world: World, prompts, tokens, lengths) -> torch.Tensor:
    """The labeller's view: good fraction among content tokens only (blind to FILLER) plus a length bonus."""
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


def pair_margins(policy: TinyPolicy, pairs: dict, idx: torch.Tensor | None = None) -> torch.Tensor:
    """``M = (logp_w - ref_w) - (logp_l - ref_l)`` for the pairs (all, or rows ``idx``)."""
    sel = (lambda k: pairs[k]) if idx is None else (lambda k: pairs[k][idx])
    prompts = sel("prompts")
    both_tokens = torch.cat([sel("chosen"), sel("rejected")])
    both_lengths = torch.cat([sel("len_chosen"), sel("len_rejected")])
    logp = policy.sequence_logp(torch.cat([prompts, prompts]), both_tokens, both_lengths)
    n = prompts.numel()
    return (logp[:n] - sel("ref_chosen")) - (logp[n:] - sel("ref_rejected"))


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
        "filler_frac": float(((tokens == FILLER).sum(1).double() / lengths.clamp(min=1).double()).mean()),
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
    group: str  # "fixed", "dynamic (default)" or "dynamic (fast)"
    beta: float | None = None
    controller: DynamicBetaConfig | None = None


def run_dpo(spec: RunSpec, ref: TinyPolicy, world: World, train: dict, heldout: dict, args, seed: int) -> dict:
    """Train one policy from the reference; returns per-step and per-checkpoint histories."""
    torch.manual_seed(seed)
    policy = copy.deepcopy(ref)
    for p in policy.parameters():
        p.requires_grad_(True)
    policy.train()
    opt = torch.optim.Adam(policy.parameters(), lr=args.lr)
    # Linear learning-rate warmup: without it Adam's first, full-size steps throw every run
    # (whatever its beta) through the same transient before beta matters.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / max(args.lr_warmup, 1)))
    ctrl = DynamicBetaController(spec.controller) if spec.controller is not None else None
    # Fixed-beta runs carry a shadow controller (defaults, alpha = 0: it never moves beta) so that
    # the statistics a controller would act on (p_hat, tau, u) can be compared across the sweep.
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
        margins = pair_margins(policy, train, idx)
        loss = -F.logsigmoid(beta * margins).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        rec = {"step": step, "beta": beta, "loss": float(loss.detach()), "margin_mean": float(margins.detach().mean())}
        out = (ctrl if ctrl is not None else shadow).observe_step(margins.detach().double().tolist())[-1]
        rec.update(p_hat=out["p_hat"], tau=out["tau"], u=out["u"], risk_over=out["risk_over"], phase=out["phase"])
        steps.append(rec)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            checkpoint(step + 1)
    final_beta = ctrl.beta if ctrl is not None else spec.beta
    return {"name": spec.name, "group": spec.group, "seed": seed, "steps": steps,
            "checkpoints": checkpoints, "final_beta": final_beta,
            "controller_state": None if ctrl is None else
            {k: v for k, v in ctrl.state_dict().items() if k != "warmup_margins"}}


def run_specs(args) -> list[RunSpec]:
    """Fixed-beta sweep; every risk rule with the controller defaults; the fast variant; both again from a low beta_0."""
    specs = [RunSpec(f"fixed beta={b:g}", "fixed", beta=b) for b in args.fixed_betas]
    default = DynamicBetaConfig()  # headline "without tuning" setting: the shipped defaults, beta_0 included
    fast = replace(default, alpha=args.fast_alpha, warmup_steps=args.fast_warmup)
    variants = [("dynamic", "dynamic (default)", default), ("dynamic-fast", "dynamic (fast)", fast)]
    if args.low_beta_0 > 0:
        # Same controllers started where a fixed beta over-optimises: can they pull back?
        tag = f"beta_0={args.low_beta_0:g}"
        variants += [(f"dynamic {tag}", f"dynamic (default, {tag})", replace(default, beta_0=args.low_beta_0)),
                     (f"dynamic-fast {tag}", f"dynamic (fast, {tag})", replace(fast, beta_0=args.low_beta_0))]
    for prefix, group, cfg in variants:
        for rule in RISK_RULES:
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
    """Per seed, ``frontier_gap`` = gold minus the fixed-beta frontier at the same sqrt(KL), on every checkpoint.

    A dynamic run is measured against the frontier of all fixed-beta runs of its
    seed; a fixed-beta run against the frontier of the *other* fixed betas
    (leave one out), which shows how far from the frontier a plain run sits and
    so gives the scale of the gaps.
    """
    for seed in sorted({r["seed"] for r in results}):
        fixed = [r for r in results if r["seed"] == seed and r["group"] == "fixed"]
        for r in results:
            if r["seed"] != seed:
                continue
            pts = [(sqrt_kl(c["kl"]), c["gold"]) for f in fixed if f is not r for c in f["checkpoints"]]
            for c in r["checkpoints"]:
                c["frontier_gap"] = c["gold"] - frontier_at(pts, sqrt_kl(c["kl"]))


def mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


TABLE_COLUMNS = [
    # (header, key of final_row, format)
    ("final beta", "final_beta", "{:.3g}"),
    ("KL", "kl", "{:.2f}"),
    ("sqrt KL", "sqrt_kl", "{:.2f}"),
    ("gold reward", "gold", "{:+.3f}"),
    ("length", "length", "{:.1f}"),
    ("filler frac", "filler_frac", "{:.3f}"),
    ("acc (noisy)", "acc_noisy", "{:.3f}"),
    ("acc (gold)", "acc_gold", "{:.3f}"),
    ("peak gold", "peak_gold", "{:+.3f}"),
    ("gap @ matched KL", "frontier_gap", "{:+.3f}"),
    ("gold - gold(fixed beta_0)", "gold_vs_beta0", "{:+.3f}"),
]


def final_row(run: dict) -> dict:
    """The final checkpoint's metrics plus final beta, sqrt(KL) and peak gold (and ``gold_vs_beta0`` if set)."""
    last = dict(run["checkpoints"][-1])
    last["final_beta"] = run["final_beta"]
    last["sqrt_kl"] = sqrt_kl(last["kl"])
    last["peak_gold"] = max(c["gold"] for c in run["checkpoints"])
    if "gold_vs_beta0" in run:
        last["gold_vs_beta0"] = run["gold_vs_beta0"]
    return last


def add_gold_vs_beta0(results: list[dict], specs: list[RunSpec]) -> None:
    """``gold_vs_beta0``: final gold minus that of the fixed run at the run's beta_0, same seed (paired).

    A dynamic run is compared with the fixed run at its own ``beta_0``; a fixed run with
    the one at the default ``beta_0``. Runs whose ``beta_0`` is not in the sweep get none.
    """
    start = {s.name: (s.controller or DynamicBetaConfig()).beta_0 for s in specs}
    for r in results:
        base = [f for f in results
                if f["seed"] == r["seed"] and f["group"] == "fixed" and f["final_beta"] == start[r["name"]]]
        if base:
            r["gold_vs_beta0"] = r["checkpoints"][-1]["gold"] - base[0]["checkpoints"][-1]["gold"]


def _cell(vals: list[float], fmt: str) -> str:
    mu, sd = mean_std(vals)
    if len(vals) == 1 or sd <= 1e-9 * max(abs(mu), 1.0):
        return fmt.format(mu)
    return f"{fmt.format(mu)} ± {fmt.format(sd).lstrip('+')}"


def results_table(results: list[dict], specs: list[RunSpec], ref_stats: dict) -> str:
    """Markdown table of the final checkpoint, mean ± std over seeds, one row per run spec."""
    head = "| run | group | " + " | ".join(h for h, _, _ in TABLE_COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(TABLE_COLUMNS) + 2)]
    ref_cells = [fmt.format(ref_stats[key]) if key in ref_stats else "" for _, key, fmt in TABLE_COLUMNS]
    lines.append("| reference (step 0) | - | " + " | ".join(ref_cells) + " |")
    for spec in specs:
        rows = [final_row(r) for r in results if r["name"] == spec.name]
        cells = [_cell([row[key] for row in rows], fmt) if all(key in row for row in rows) else "-"
                 for _, key, fmt in TABLE_COLUMNS]
        lines.append(f"| {spec.name} | {spec.group} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def controller_table(results: list[dict], specs: list[RunSpec]) -> str:
    """What each run's controller saw and did after warmup, mean ± std over seeds.

    Fixed-beta rows come from their shadow controller (default config, alpha = 0):
    the statistics a controller would have acted on, with beta left alone.
    """
    delta = DynamicBetaConfig().delta
    lines = [f"| run | alpha | warmup | mean p_hat | steps with p_hat > delta ({delta:g}) | steps with u > 0 "
             "| steps with u < 0 | steps over-risk | tau at end | final beta |", "|---|" + "---|" * 9]
    for spec in specs:
        cfg = spec.controller or replace(DynamicBetaConfig(), alpha=0.0)
        label = spec.name if spec.controller is not None else f"{spec.name} (shadow)"
        stats = {k: [] for k in ("p_hat", "above", "up", "down", "risk", "tau", "beta")}
        for r in results:
            dyn = [s for s in r["steps"] if s.get("p_hat") is not None] if r["name"] == spec.name else []
            if not dyn:
                continue
            stats["p_hat"].append(float(np.mean([s["p_hat"] for s in dyn])))
            stats["above"].append(float(np.mean([s["p_hat"] > delta for s in dyn])))
            stats["up"].append(float(np.mean([s["u"] > 0 for s in dyn])))
            stats["down"].append(float(np.mean([s["u"] < 0 for s in dyn])))
            stats["risk"].append(float(np.mean([bool(s["risk_over"]) for s in dyn])))
            stats["tau"].append(r["steps"][-1]["tau"])
            stats["beta"].append(r["final_beta"])
        head = f"| {label} | {cfg.alpha:g} | {cfg.warmup_steps} | "
        if not stats["p_hat"]:
            lines.append(head + "still in warmup |" + " |" * 6)
            continue
        fmts = {"p_hat": "{:.3f}", "above": "{:.0%}", "up": "{:.0%}", "down": "{:.0%}", "risk": "{:.0%}",
                "tau": "{:.2f}", "beta": "{:.3g}"}
        lines.append(head + " | ".join(_cell(stats[k], f) for k, f in fmts.items()) + " |")
    return "\n".join(lines)


def mean_curve(results: list[dict], name: str, key: str, source: str = "checkpoints") -> tuple[np.ndarray, np.ndarray]:
    """``(x, mean over seeds of key)`` along steps or checkpoints; None values (warmup p_hat) become NaN."""
    runs = [r for r in results if r["name"] == name]
    xs = np.array([c["step"] for c in runs[0][source]])
    ys = np.array([[np.nan if c.get(key) is None else c[key] for c in r[source]] for r in runs], dtype=float)
    with np.errstate(invalid="ignore"):
        counts = (~np.isnan(ys)).sum(0)
        mean = np.where(counts > 0, np.nansum(ys, axis=0) / np.maximum(counts, 1), np.nan)
    return xs, mean


# --------------------------------------------------------------------------- figures


def _style(spec: RunSpec, fixed_betas: list[float]):
    import matplotlib.pyplot as plt

    if spec.group == "fixed":
        rank = sorted(fixed_betas).index(spec.beta)
        return {"color": plt.cm.viridis(rank / max(len(fixed_betas) - 1, 1)), "ls": "-", "marker": "o", "lw": 1.6}
    rule_colors = {"hoeffding": "tab:red", "zscore": "tab:orange", "hoeffding_deadband": "tab:purple"}
    color = rule_colors.get(spec.controller.risk_rule, "k")
    fast = spec.group.startswith("dynamic (fast")
    if spec.controller.beta_0 != DynamicBetaConfig().beta_0:  # the low-beta_0 runs
        return {"color": color, "ls": "-." if fast else (0, (1, 3)), "marker": "D" if fast else "v", "lw": 1.4}
    return {"color": color, "ls": "--" if fast else ":", "marker": "^" if fast else "s", "lw": 2.0}


def plot_frontier(results, specs, args, path):
    """Gold reward, length and filler share against sqrt(KL): seed-mean checkpoints of every run as lines.

    The grey band on the left panel is the fixed-beta frontier drawn from the
    seed-mean checkpoints (the table's gaps use per-seed frontiers).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(19, 5.6))
    fixed_pts = []
    for spec in specs:
        st = _style(spec, args.fixed_betas)
        _, kl = mean_curve(results, spec.name, "kl")
        x = np.sqrt(np.clip(kl, 0, None))
        for ax, key in zip(axes, ("gold", "length", "filler_frac")):
            _, y = mean_curve(results, spec.name, key)
            if key == "gold" and spec.group == "fixed":
                fixed_pts += list(zip(x, y))
            ax.plot(x, y, color=st["color"], ls=st["ls"], marker=st["marker"], lw=st["lw"], ms=4, label=spec.name)
            ax.plot(x[-1:], y[-1:], color=st["color"], marker=st["marker"], ms=10, mec="k")  # final checkpoint
    grid = np.linspace(0, max(p[0] for p in fixed_pts), 200)
    axes[0].plot(grid, [frontier_at(fixed_pts, g) for g in grid], color="grey", lw=7, alpha=0.3, zorder=0,
                 label="fixed-beta frontier")
    axes[0].set_ylabel("gold reward of policy samples (mean over seeds)")
    axes[1].set_ylabel("mean response length of policy samples")
    axes[2].set_ylabel("FILLER share of policy samples")
    for ax in axes:
        ax.set_xlabel("sqrt(KL(policy || reference)), Monte-Carlo")
        ax.grid(alpha=0.3)
    axes[0].set_title("over-optimisation frontier (big marker = final step)")
    axes[1].set_title("length")
    axes[2].set_title("filler (the proxy's blind spot)")
    axes[0].legend(fontsize=7, loc="lower left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def trailing_mean(y: np.ndarray, k: int) -> np.ndarray:
    """Mean of the last ``k`` values up to each position (NaN stays NaN: the warmup has no p_hat)."""
    out = np.full(len(y), np.nan)
    for i in range(len(y)):
        if not np.isnan(y[i]):
            window = y[max(0, i - k + 1):i + 1]
            out[i] = np.nanmean(window)
    return out


def plot_traces(results, specs, args, path):
    """beta (log scale), p_hat (trailing mean over 10 steps) and tau of the dynamic runs, mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    for spec in specs:
        st = _style(spec, args.fixed_betas)
        x, beta = mean_curve(results, spec.name, "beta", "steps")
        if spec.group == "fixed":
            axes[0].plot(x, beta, color=st["color"], lw=0.8, alpha=0.6)
            _, p_hat = mean_curve(results, spec.name, "p_hat", "steps")
            axes[1].plot(x, trailing_mean(p_hat, 10), color=st["color"], lw=0.8, alpha=0.6)
            continue
        axes[0].plot(x, beta, color=st["color"], ls=st["ls"], lw=st["lw"], label=spec.name)
        _, p_hat = mean_curve(results, spec.name, "p_hat", "steps")
        axes[1].plot(x, trailing_mean(p_hat, 10), color=st["color"], ls=st["ls"], lw=1.4)
        _, tau = mean_curve(results, spec.name, "tau", "steps")
        axes[2].plot(x, tau, color=st["color"], ls=st["ls"], lw=1.4)
        axes[0].axvline(spec.controller.warmup_steps, color="grey", lw=0.6, ls=st["ls"])
    delta = DynamicBetaConfig().delta
    axes[1].axhline(delta, color="k", lw=0.8, label=f"delta = {delta}")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("beta (thin: fixed sweep)")
    axes[1].set_ylabel("p_hat (10-step mean)\nthin: fixed-beta shadow")
    axes[2].set_ylabel("tau")
    axes[2].set_xlabel("optimizer step")
    axes[0].legend(fontsize=7, ncol=2)
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_training(results, specs, args, path):
    """sqrt(KL), gold reward, length and gold-label accuracy against the step, mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("kl", "sqrt(KL)"), ("gold", "gold reward"), ("length", "mean length"),
            ("acc_gold", "held-out acc (gold labels)")]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    for spec in specs:
        st = _style(spec, args.fixed_betas)
        for ax, (key, label) in zip(axes.flat, keys):
            x, y = mean_curve(results, spec.name, key)
            if key == "kl":
                y = np.sqrt(np.clip(y, 0, None))
            ax.plot(x, y, color=st["color"], ls=st["ls"], marker=st["marker"], ms=3, lw=st["lw"], label=spec.name)
            ax.set_ylabel(label)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("optimizer step")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out_dir", default="outputs/dynamic_beta", help="results.json and table.md go here")
    p.add_argument("--fig_dir", default=None, help="PNG figures go here (default: --out_dir)")
    p.add_argument("--update_doc", default=None, help="markdown file whose results:begin/end block gets the new table")
    p.add_argument("--quick", action="store_true",
                   help="smoke run (< 1 min): first seed only, betas 0.01/0.1/1, 120 steps, small data; "
                        "the default-config dynamic runs then never leave warmup (120 steps)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="one reference, data set and batch order per seed")
    # world
    p.add_argument("--vocab", type=int, default=16, help="response tokens (FILLER + content tokens)")
    p.add_argument("--num_prompts", type=int, default=8, help="prompts (each with its own good set and length)")
    p.add_argument("--good_set_size", type=int, default=4, help="good tokens per prompt")
    p.add_argument("--p_good", type=float, default=0.4,
                   help="generator: probability that a content token is drawn from the good set")
    p.add_argument("--p_filler", type=float, default=0.15,
                   help="generator: probability of a FILLER token before each content token (repeated)")
    p.add_argument("--max_len", type=int, default=40, help="responses are cut at this many tokens")
    p.add_argument("--len_penalty", type=float, default=0.02, help="gold reward = good/all tokens - len_penalty * length")
    p.add_argument("--len_bonus", type=float, default=0.05,
                   help="proxy behind the labels = good/content tokens + len_bonus * length")
    p.add_argument("--label_temp", type=float, default=0.2, help="Bradley-Terry temperature of the noisy labels")
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
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (same for every run)")
    p.add_argument("--lr_warmup", type=int, default=50, help="steps of linear learning-rate warmup (same for every run)")
    p.add_argument("--fixed_betas", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3, 1.0], help="fixed-beta sweep")
    p.add_argument("--fast_alpha", type=float, default=0.02, help="'dynamic (fast)' variant: alpha (default config: 0.0015)")
    p.add_argument("--fast_warmup", type=int, default=30,
                   help="'dynamic (fast)' variant: warmup_steps (default config: 120)")
    p.add_argument("--low_beta_0", type=float, default=0.01,
                   help="also run both controller variants from this beta_0 (0 to skip)")
    p.add_argument("--eval_every", type=int, default=50, help="optimizer steps between checkpoints")
    p.add_argument("--eval_samples", type=int, default=512, help="policy samples per checkpoint (KL, gold, length)")
    args = p.parse_args(argv)
    if args.quick:  # every size shrinks; the world, the model and the controller defaults stay
        args.seeds = args.seeds[:1]
        args.fixed_betas = [0.01, 0.1, 1.0]
        args.ref_steps, args.train_pairs, args.heldout_pairs = 150, 2048, 256
        args.steps, args.eval_every, args.eval_samples = 120, 40, 256
        args.lr_warmup, args.fast_warmup = 20, 20
    args.fig_dir = args.fig_dir or args.out_dir
    return args


def update_doc(path: str, block: str) -> None:
    """Replace the text between the results markers of ``path``; raises ValueError when they are missing."""
    begin, end = "<!-- results:begin -->", "<!-- results:end -->"
    with open(path) as fh:
        text = fh.read()
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise ValueError(f"{path} has no '{begin}' ... '{end}' block to update")
    with open(path, "w") as fh:
        fh.write(pattern.sub(lambda _: f"{begin}\n{block}\n{end}", text))


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)  # determinism, and the machine is shared
    torch.use_deterministic_algorithms(True)
    os.makedirs(args.out_dir, exist_ok=True)
    os.makedirs(args.fig_dir, exist_ok=True)
    t0 = time.time()
    world = make_world(args)
    specs = run_specs(args)
    results, ref_stats_all = [], []

    for seed in args.seeds:
        ref = train_reference(world, args, seed)
        data_gen = torch.Generator().manual_seed(10_000 + seed)
        train = make_pairs(world, ref, args.train_pairs, data_gen)
        heldout = make_pairs(world, ref, args.heldout_pairs, data_gen)
        gen_stats = evaluate_generator(world, args.eval_samples, seed)
        print(f"[seed {seed}] reference trained ({time.time() - t0:.0f}s); generator length {gen_stats['length']:.2f} "
              f"gold {gen_stats['gold']:+.3f}; train pairs: gold agrees with noisy label on "
              f"{float((train['gold_agrees'] == 1).sum() / (train['gold_agrees'] >= 0).sum()):.3f}", flush=True)
        for spec in specs:
            run = run_dpo(spec, ref, world, train, heldout, args, seed)
            results.append(run)
            last = run["checkpoints"][-1]
            print(f"[seed {seed}] {spec.name:<32} beta {run['final_beta']:.4g}  KL {last['kl']:6.2f}  "
                  f"gold {last['gold']:+.3f}  len {last['length']:5.1f}  acc_gold {last['acc_gold']:.3f}  "
                  f"({time.time() - t0:.0f}s)", flush=True)
        ref_stats_all.append(results[-1]["checkpoints"][0])

    add_frontier_gaps(results)
    add_gold_vs_beta0(results, specs)
    ref_stats = {k: float(np.mean([s[k] for s in ref_stats_all]))
                 for k in ("kl", "gold", "length", "filler_frac", "acc_noisy", "acc_gold")}
    ref_stats.update(sqrt_kl=0.0, peak_gold=ref_stats["gold"])
    elapsed = time.time() - t0
    report = "\n\n".join([
        f"Final checkpoint (step {args.steps}), mean ± std over seeds {args.seeds}. 'gap @ matched KL': gold "
        "minus the fixed-beta frontier at the same sqrt(KL), per seed (fixed rows: frontier of the other fixed "
        "betas); 'gold - gold(fixed beta_0)': paired by seed against the fixed run at the run's beta_0 "
        "(fixed rows: at the default beta_0).",
        results_table(results, specs, ref_stats),
        "Controller statistics after warmup (u > 0 raises beta, u < 0 lowers it; fixed rows: shadow controller "
        "with the default config and alpha = 0, which watches but never moves beta):",
        controller_table(results, specs),
        f"Wall time {elapsed:.0f}s (`{' '.join(['python', 'scripts/experiment_dynamic_beta.py', *(argv or [])])}`).",
    ])
    print("\n" + report)

    with open(os.path.join(args.out_dir, "table.md"), "w") as fh:
        fh.write(report + "\n")
    with open(os.path.join(args.out_dir, "results.json"), "w") as fh:
        json.dump({"args": vars(args), "world": asdict(world), "elapsed_s": elapsed,
                   "specs": [{"name": s.name, "group": s.group, "beta": s.beta,
                              "controller": None if s.controller is None else asdict(s.controller)} for s in specs],
                   "runs": results}, fh)
    figs = [plot_frontier(results, specs, args, os.path.join(args.fig_dir, "dynamic_beta_frontier.png")),
            plot_traces(results, specs, args, os.path.join(args.fig_dir, "dynamic_beta_traces.png")),
            plot_training(results, specs, args, os.path.join(args.fig_dir, "dynamic_beta_training.png"))]
    if args.update_doc:
        update_doc(args.update_doc, report)
    print("wrote", os.path.join(args.out_dir, "results.json"), os.path.join(args.out_dir, "table.md"), *figs)
    return {"results": results, "report": report, "elapsed_s": elapsed}


if __name__ == "__main__":
    main(sys.argv[1:])
