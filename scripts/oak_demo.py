"""OaK-DPO on CPU, end to end: SFT warm-up, then rounds of rollouts, judged pairs and DPO.

    .venv/bin/python scripts/oak_demo.py                  # 1 rank, about 2 minutes on 2 CPU cores
    .venv/bin/python scripts/oak_demo.py --nproc 2        # the loop on 2 ranks (gloo)
    .venv/bin/python scripts/oak_demo.py --update-docs    # also refresh docs/benchmarks.md and docs/img/oak_*.png

Steps (each a plain command, printed before it runs):

1. ``scripts/make_task_data.py``: ProntoQA-style true/false tasks of the
   embedded generator (one or two rules, short answers ``Answer: True``):
   4000 SFT chats, 512 rollout prompts, 200 held-out prompts never seen in
   training.
2. ``scripts/oak_warmup_sft.py``: 15 steps of full-weight SFT of
   ``data/tiny-qwen3`` (why not LoRA: see that module). The result answers in
   the right format and leans the right way on the logic (0.72 greedy).
3. ``train_scripts/run_oak_dpo.py`` twice from that SFT model, 3 iterations
   each, 4 samples per prompt, verifier judge:
   (a) ``examples/config_oak_dpo.yaml``: fixed beta, DPO + NLL of the chosen reply;
   (b) the same with ``--beta_mode dynamic --nll_weight 0``: plain DPO, dynamic beta.
4. Tables and plots from the run folders (``scripts/oak_report.py``).

Runs use one thread per process (``OMP_NUM_THREADS=1``): on a small shared
CPU, torch's default thread pool spins against other processes and a
0.2-second generation takes 9 seconds.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTION_TEMPLATE = """\
## Iterative DPO (OaK-DPO) on CPU (`scripts/oak_demo.py`)

`.venv/bin/python scripts/oak_demo.py --update-docs` wrote this section: {{TIMING}}. Machine: 2 shared
CPU cores, no GPU. The loop itself is `train_scripts/run_oak_dpo.py` (the demo prints every command it runs).

- **Task**: the ProntoQA-style true/false task of `opensloth.tasks` with one or two rules
  ("Every wumpus is not a yumpus. Max is a wumpus. True or false: Max is a yumpus."), short-answer
  subset (the reply is `Answer: True` or `Answer: False`); chance is 50%. 4000 SFT chats, 512
  rollout prompts, 200 held-out prompts that occur in neither.
- **SFT policy**: `data/tiny-qwen3` after 15 steps of full-weight SFT (`scripts/oak_warmup_sft.py`,
  batch 32, lr 3e-3). It answers in the right format and leans the right way: 0.72 greedy, 0.61 sampled.
- **Each iteration**: 4 candidates per rollout prompt at temperature 1 from the current policy,
  verifier judge, best vs worst candidate (ties skipped and counted), one epoch of LoRA DPO (q/k/v/o,
  r 8, lr 2e-3, 16 pairs per step) on top of the SFT weights; the reference is the SFT policy.
  Backend auto: Unsloth's CPU fallback, bf16.
- **Held-out accuracy**: *greedy* is the temperature-0 answer; *sampled* is the mean verifier score
  of 4 answers per prompt at the rollout temperature (fixed seeds: every iteration is scored on the
  same random draws), i.e. how often the policy answers right.

**(a) DPO + NLL of the chosen reply, fixed beta** (`examples/config_oak_dpo.yaml`):

{{TABLE_dpo_nll}}

**(b) plain DPO, dynamic beta** (`--beta_mode dynamic --nll_weight 0`):

{{TABLE_dpo_dynamic}}

![held-out accuracy per iteration, DPO + NLL](img/oak_accuracy_dpo_nll.png)
![held-out accuracy per iteration, plain DPO with dynamic beta](img/oak_accuracy_dpo_dynamic.png)

What the numbers say:

- With DPO + NLL the greedy answer is (almost) always right after the first round: the SFT model
  leans the right way on most prompts by a small margin, and once DPO pushes that margin past zero the
  greedy answer flips for whole classes of prompts at once. The sampled accuracy, the probability of a
  right answer, climbs from 0.61 to 0.95 in two rounds; in round 3 almost every prompt's four samples
  agree (456 of 512 are ties), so only 56 pairs are left and it moves no further (0.92).
- Plain DPO with dynamic beta gains as much in round 1, then loses it: by round 3 the greedy accuracy
  is back at the SFT policy's. DPO only separates chosen from rejected and lets both lose probability
  (likelihood displacement); in this 64-wide model the freed mass spreads over other tokens. The NLL
  term on the chosen reply (RPO, as in iterative reasoning preference optimisation) keeps the chosen
  answers likely. The dynamic-beta controller supports the plain sigmoid loss only, so run (a) uses a
  fixed beta.
- On 2 ranks (`python scripts/oak_demo.py --nproc 2`, re-measured on this base 2026-11-28: 74 s in
  total, against 106 s on 1 rank) iteration 1 saw exactly the same rollouts as on 1 rank (415 pairs,
  97 ties, rollout mean score 0.585: candidate seeds do not depend on the world size). The DPO rounds
  then differ in the last digits (bf16, reduction order), and the rounds after them see slightly
  different rollouts. Sampled accuracy per iteration, 2 ranks: (a) 0.606, 0.859, 0.965, 0.927;
  (b) 0.606, 0.853, 0.868, 0.718 (1 rank: 0.859, 0.945, 0.924 and 0.854, 0.871, 0.726). Same shape:
  (a) holds its gain, (b) loses it in round 3.

What did not work (exploratory runs, transformers + PEFT backend, float32):

- **LoRA SFT of the earlier, random-init tiny model** (`train_configurable.py`, 150 steps, lr 2e-3):
  loss 7.37 to 6.84 with entropy 7.61 nats, about ln 2048, so sampled candidates were noise. Hence the
  full-weight warm-up, kept with the pretrained base because it reaches a "partly right" policy in 15
  steps.
- **One-digit addition** (`--kind add --max-operand-digits 1`): SFT to 0.375 greedy / 0.133 sampled;
  three rounds of DPO (lr 1e-3 to 3e-3, 4 or 8 samples, with and without NLL, LoRA on attention or on
  all linear layers) kept the sampled accuracy at 0.11-0.15 and moved the greedy accuracy between 0.17
  and 0.41. The sums live in the MLPs and the answers spread over 19 values; ~200 pairs per round of LoRA
  DPO are too weak a signal for this model. More pairs per round, a larger model or full-weight DPO are
  the likely fixes.
- **Where the SFT stops matters**: the pretrained base learns the true/false rule abruptly (warm-up
  steps -> greedy / sampled held-out accuracy: 10 -> 0.50 / 0.58, 15 -> 0.72 / 0.61, 20 -> 0.82 / 0.71,
  25 -> 1.0 / 0.86, 30 -> 1.0 / 0.97). At 195 steps, the earlier base's choice, the policy is always right
  and every rollout is a tie: no pairs. "Partly right" means "leans the right way with little
  confidence", which is what the DPO rounds then sharpen.
"""

RUNS = {
    "dpo_nll": ("DPO + NLL(chosen), fixed beta 0.1 (examples/config_oak_dpo.yaml)", []),
    "dpo_dynamic": ("plain DPO, dynamic beta (--beta_mode dynamic --nll_weight 0)",
                    ["--beta_mode", "dynamic", "--nll_weight", "0"]),
}


def run(cmd: list[str], env: dict) -> float:
    print("+ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/oak_demo", help="work folder (removed and recreated)")
    p.add_argument("--nproc", type=int, default=1, help="ranks of the DPO loop (torchrun, gloo on CPU)")
    p.add_argument("--iterations", type=int, default=3, help="rollout + DPO rounds per run")
    p.add_argument("--sft-steps", type=int, default=15, help="full-weight SFT warm-up steps")
    p.add_argument("--backend", default="auto", help="backend of the loop: auto (unsloth if installed), unsloth, hf")
    p.add_argument("--update-docs", action="store_true",
                   help="write docs/img/oak_accuracy*.png and the oak_dpo section of docs/benchmarks.md")
    args = p.parse_args()

    py = sys.executable
    out = os.path.join(REPO, args.out)
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    data, sft = os.path.join(args.out, "data"), os.path.join(args.out, "sft")
    seconds = {}
    total = time.perf_counter()
    seconds["data"] = run([py, "scripts/make_task_data.py", "--kind", "prontoqa", "--size", "16", "--response",
                           "answer", "--out", data], env)
    seconds["sft"] = run([py, "scripts/oak_warmup_sft.py", "--data", os.path.join(data, "sft"),
                          "--max_steps", str(args.sft_steps), "--out", sft], env)
    launcher = [py] if args.nproc == 1 else [py, "-m", "torch.distributed.run", "--standalone",
                                             f"--nproc_per_node={args.nproc}"]
    loop = [*launcher, "train_scripts/run_oak_dpo.py", "--config", "examples/config_oak_dpo.yaml",
            "--iterations", str(args.iterations), "--samples", "4",
            "--train-data", os.path.join(data, "prompts.jsonl"), "--eval-data", os.path.join(data, "heldout.jsonl"),
            "--sft-model", sft, "--dataset-type", "prontoqa", "--backend", args.backend]
    for name, (_, extra) in RUNS.items():
        seconds[name] = run([*loop, "--output", os.path.join(args.out, name), *extra], env)
    total = time.perf_counter() - total

    sys.path.insert(0, os.path.join(REPO, "src"))
    from opensloth.markdown import update_markdown_block
    from opensloth.online_dpo.report import SECTION, summary_markdown, write_reports

    tables = {}
    for name, (label, _) in RUNS.items():
        png = os.path.join(REPO, "docs", "img", f"oak_accuracy_{name}.png") if args.update_docs else None
        result = write_reports(os.path.join(out, name), png, title=f"OaK-DPO on CPU: {label.split(' (')[0]}")
        tables[name] = summary_markdown(result["rows"])
        print(f"\n{label}:\n{tables[name]}plot: {result['png']}")
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
    print(f"\ntotal {total:.0f} s ({timing})")
    if args.update_docs:
        body = (SECTION_TEMPLATE.replace("{{TABLE_dpo_nll}}", tables["dpo_nll"].rstrip())
                    .replace("{{TABLE_dpo_dynamic}}", tables["dpo_dynamic"].rstrip())
                    .replace("{{TIMING}}", f"{total:.0f} s in total ({timing}); {args.nproc} rank(s), "
                                           f"backend {args.backend}"))
        update_markdown_block(os.path.join(REPO, "docs", "benchmarks.md"), SECTION, body)
        print("updated docs/benchmarks.md (oak_dpo section) and docs/img/oak_accuracy_*.png")


if __name__ == "__main__":
    main()
