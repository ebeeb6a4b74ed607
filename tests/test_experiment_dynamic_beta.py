"""scripts/experiment_dynamic_beta.py: hand-checked pieces (fast) and a --quick smoke run (slow)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys

import pytest
import torch

from helpers import REPO, run

SCRIPT = "scripts/experiment_dynamic_beta.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("experiment_dynamic_beta", REPO / SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # no side effects at import: torch settings are made in main()
    return module


E = _load_script()


# --------------------------------------------------------------------------- pure pieces (fast)


def test_frontier_at_hand_values():
    # Pareto set of (sqrt_kl, gold): (0, .3) -> (1, .5) -> (2, .6); (1.5, .4) is dominated and ignored.
    pts = [(0.0, 0.3), (1.0, 0.5), (1.5, 0.4), (2.0, 0.6)]
    assert E.frontier_at(pts, 0.0) == pytest.approx(0.3)
    assert E.frontier_at(pts, 0.5) == pytest.approx(0.4)  # halfway between (0, .3) and (1, .5)
    assert E.frontier_at(pts, 1.5) == pytest.approx(0.55)  # halfway between (1, .5) and (2, .6)
    assert E.frontier_at(pts, 9.0) == pytest.approx(0.6)  # flat after the last point


def test_rewards_hand_values():
    args = E.parse_args(["--num_prompts", "2", "--vocab", "6", "--good_set_size", "2"])
    world = E.make_world(args, "filler")
    g0 = world.good_sets[0]
    bad = next(t for t in range(2, world.vocab + 1) if t not in g0)
    F = E.FILLER
    # prompt 0, response [good, bad, FILLER, good] (length 4), padded with EOS
    tokens = torch.tensor([[g0[0], bad, F, g0[1]] + [E.EOS] * (world.max_len - 4)])
    prompts, lengths = torch.tensor([0]), torch.tensor([4])
    # gold: 2 good of 4 tokens - penalty * 4; proxy: 2 good of 3 content tokens + bonus * 4
    assert float(E.gold_reward(world, prompts, tokens, lengths)) == pytest.approx(0.5 - 4 * world.len_penalty)
    assert float(E.proxy_reward(world, prompts, tokens, lengths)) == pytest.approx(2 / 3 + 4 * world.len_bonus)


def test_repetition_rewards_hand_values():
    args = E.parse_args(["--num_prompts", "2", "--vocab", "6", "--good_set_size", "2"])
    world = E.make_world(args, "repetition")
    g0 = world.good_sets[0]
    bad = next(t for t in range(2, world.vocab + 1) if t not in g0)
    # [good, good (repeat), good (repeat), bad, good'] (length 5): 2 fresh good tokens, 3 fresh tokens
    tokens = torch.tensor([[g0[0], g0[0], g0[0], bad, g0[1]] + [E.EOS] * (world.max_len - 5)])
    prompts, lengths = torch.tensor([0]), torch.tensor([5])
    assert E.repeat_mask(tokens)[0, :5].tolist() == [False, True, True, False, False]
    assert float(E.gold_reward(world, prompts, tokens, lengths)) == pytest.approx(2 / 5 - 5 * world.len_penalty)
    assert float(E.proxy_reward(world, prompts, tokens, lengths)) == pytest.approx(2 / 3 + 5 * world.len_bonus)
    # the proxy is blind to repetition: the same response without repeats scores the same minus the length bonus
    short = torch.tensor([[g0[0], bad, g0[1]] + [E.EOS] * (world.max_len - 3)])
    assert float(E.proxy_reward(world, prompts, short, torch.tensor([3]))) == pytest.approx(2 / 3 + 3 * world.len_bonus)


def test_generators_write_the_blind_spot_token():
    args = E.parse_args([])
    gen = torch.Generator().manual_seed(0)
    prompts = torch.arange(2000) % args.num_prompts
    filler = E.make_world(args, "filler")
    tokens, lengths = E.generator_sample(filler, prompts, gen)
    assert (tokens == E.FILLER).sum() > 0 and not E.repeat_mask(tokens).all()
    rep = E.make_world(args, "repetition")
    tokens, lengths = E.generator_sample(rep, prompts, gen)
    assert (tokens == E.FILLER).sum() == 0  # FILLER only exists in the filler world
    inside = torch.arange(rep.max_len)[None, :] < lengths[:, None]
    share = float((E.repeat_mask(tokens) & inside).sum() / inside.sum())
    # p_repeat 0.15 per content token (repeated) plus chance repeats of equal tokens: between 0.1 and 0.3
    assert 0.1 < share < 0.3
    assert ((tokens != E.EOS) == inside).all()  # responses are EOS-padded exactly after their length


def test_sequence_logp_matches_token_by_token_sum():
    world = E.make_world(E.parse_args(["--quick", "--max_len", "8"]))  # short: the brute force is quadratic
    torch.manual_seed(0)
    policy = E.TinyPolicy(world, emb=8, hidden=8)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.tensor([0, 1, 2, 3, 4, 5])
    tokens, lengths = policy.sample(prompts, gen)
    cut = lengths == world.max_len
    assert cut.any() and (~cut).any()  # both kinds: with EOS, and cut at max_len (no EOS term)
    got = policy.sequence_logp(prompts, tokens, lengths).detach()
    for i in range(len(prompts)):
        # brute force: feed the prefix, read the next-token log-prob, one position at a time
        total, L = 0.0, int(lengths[i])
        seq = [int(world.prompt_token(prompts[i:i + 1]))] + tokens[i, :L].tolist()
        targets = tokens[i, :L].tolist() + ([E.EOS] if L < world.max_len else [])
        with torch.no_grad():
            for t, target in enumerate(targets):
                hidden, _ = policy.rnn(policy.embed(torch.tensor([seq[:t + 1]])))
                total += float(torch.log_softmax(policy.head(hidden[0, -1]), -1)[target])
        assert float(got[i]) == pytest.approx(total, abs=1e-4)


# --------------------------------------------------------------------------- --quick run (slow)


@pytest.mark.slow
@pytest.mark.heavy
def test_quick_run_outputs(tmp_path):
    out = tmp_path / "out"
    proc = run(["python", SCRIPT, "--quick", "--out_dir", str(out)], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("results.json", "table.md", "dynamic_beta_frontier.png", "dynamic_beta_traces.png",
                 "dynamic_beta_signals.png"):
        assert (out / name).stat().st_size > 0, name
    data = json.loads((out / "results.json").read_text())
    runs, max_len = data["runs"], data["worlds"]["filler"]["max_len"]
    assert {r["name"] for r in runs} == {s["name"] for s in data["specs"]}
    assert {r["world"] for r in runs} == {"filler", "repetition"}
    assert len(runs) == len(data["specs"]) * len(data["args"]["seeds"]) * 2
    rules = {s["controller"]["risk_rule"] for s in data["specs"] if s["controller"]}
    assert rules == {"hoeffding", "zscore", "hoeffding_deadband", "beta_dpo", "beta_dpo_filter", "kl_target",
                     "calibration_floor"}

    for r in runs:
        assert r["checkpoints"][0]["kl"] == 0.0  # the policy starts as an exact copy of the reference
        for c in r["checkpoints"]:
            assert c["kl"] > -0.05, (r["name"], c)  # Monte-Carlo KL: >= 0 up to sampling noise
            assert 0.0 <= c["acc_noisy"] <= 1.0 and 0.0 <= c["acc_gold"] <= 1.0
            assert 1.0 <= c["length"] <= max_len and math.isfinite(c["gold"])
        spec = next(s for s in data["specs"] if s["name"] == r["name"])
        if spec["controller"] is None:
            assert all(s["beta"] == spec["beta"] for s in r["steps"])
            continue
        cfg = spec["controller"]
        for s in r["steps"]:
            assert math.isfinite(s["beta"]) and cfg["beta_min"] <= s["beta"] <= cfg["beta_max"], s
            acts_in_warmup = cfg["risk_rule"] in ("beta_dpo", "beta_dpo_filter", "kl_target")
            if s["step"] < cfg["warmup_steps"]:
                assert s["p_hat"] is None
                assert acts_in_warmup or s["beta"] == cfg["beta_0"]
            else:
                assert 0.0 <= s["p_hat"] <= 1.0 and math.isfinite(s["tau"])
        if cfg["risk_rule"] == "beta_dpo_filter":
            assert 0.5 < sum(s["kept_frac"] for s in r["steps"]) / len(r["steps"]) <= 1.0

    def final_kl(name, world="filler"):
        kls = [r["checkpoints"][-1]["kl"] for r in runs if r["name"] == name and r["world"] == world]
        return sum(kls) / len(kls)

    # the fixed-beta sweep: a weaker KL penalty ends further from the reference
    assert final_kl("fixed beta=0.01") > final_kl("fixed beta=1") + 0.5
    assert final_kl("fixed beta=0.1") > final_kl("fixed beta=1") + 0.5
    assert final_kl("fixed beta=0.01") > final_kl("fixed beta=0.1") - 0.5  # both small: nearly the same run
    table = (out / "table.md").read_text()
    assert "fixed beta=0.01" in table and "dynamic beta_0=0.01 calibration_floor" in table
    assert "Summary per rule" in table and "Wall time" in table
