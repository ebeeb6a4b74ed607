"""Task data for an OaK-DPO run on the synthetic tasks: SFT chats, rollout prompts, held-out prompts.

    python scripts/make_task_data.py --kind prontoqa --size 16 --response answer --out outputs/oak_demo/data

Writes, from :func:`opensloth.tasks.make_task` with fixed seeds:

- ``sft/train.jsonl``: chat ``messages`` (user prompt, assistant reply) for the SFT warm-up;
- ``prompts.jsonl``: ``{"id", "prompt"}`` rows the loop samples candidates for;
- ``heldout.jsonl``: ``{"id", "prompt", "answer"}`` rows for the accuracy report. A
  held-out prompt never occurs verbatim among the SFT or rollout prompts
  (unless ``--heldout-may-repeat``: needed for tiny prompt spaces such as
  one-digit sums, where every prompt is seen in training).

``--response answer`` makes the reply just ``Answer: <value>`` (a short-answer
subset of the task: cheap to sample and to train on CPU); ``full`` keeps the
worked reasoning of the shipped data.
"""

from __future__ import annotations

import argparse
import os
import sys

from opensloth.atomic import write_jsonl_atomic
from opensloth.errors import run_cli
from opensloth.tasks import TASK_KINDS
from opensloth.tasks.task_data import make_tasks, reply


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", default="prontoqa", choices=TASK_KINDS, help="task kind")
    p.add_argument("--size", type=int, default=16, help="target tokens per task (small = shallow/short tasks)")
    p.add_argument("--max-operand-digits", type=int, default=None, help="arithmetic: largest operand width")
    p.add_argument("--response", choices=("answer", "full"), default="answer",
                   help="SFT reply: 'Answer: <value>' only, or the full worked reply")
    p.add_argument("--n-sft", type=int, default=4000, help="SFT conversations")
    p.add_argument("--n-prompts", type=int, default=512, help="rollout prompts")
    p.add_argument("--n-heldout", type=int, default=200, help="held-out prompts")
    p.add_argument("--heldout-may-repeat", action="store_true",
                   help="allow held-out prompts that also occur in the SFT or rollout prompts")
    p.add_argument("--seed", type=int, default=0, help="seed (SFT, prompts and held-out use seed, seed+1, seed+2)")
    p.add_argument("--out", required=True, help="output folder")
    args = p.parse_args(argv)

    sft = make_tasks(args.kind, args.n_sft, args.seed, size=args.size, max_operand_digits=args.max_operand_digits)
    prompts = make_tasks(args.kind, args.n_prompts, args.seed + 1, size=args.size,
                         max_operand_digits=args.max_operand_digits)
    seen = set() if args.heldout_may_repeat else {t.prompt for t in sft} | {t.prompt for t in prompts}
    heldout = make_tasks(args.kind, args.n_heldout, args.seed + 2, size=args.size,
                         max_operand_digits=args.max_operand_digits, exclude=seen)
    write_jsonl_atomic(os.path.join(args.out, "sft", "train.jsonl"), (
        {"messages": [{"role": "user", "content": t.prompt}, {"role": "assistant", "content": reply(t, args.response)}],
         "source": t.kind} for t in sft))
    write_jsonl_atomic(os.path.join(args.out, "prompts.jsonl"),
                       ({"id": f"{args.kind}-{i:05d}", "prompt": t.prompt} for i, t in enumerate(prompts)))
    write_jsonl_atomic(os.path.join(args.out, "heldout.jsonl"), (
        {"id": f"{args.kind}-heldout-{i:05d}", "prompt": t.prompt, "answer": t.answer} for i, t in enumerate(heldout)))
    distinct = len({t.prompt for t in sft})
    print(f"{args.out}: {len(sft)} SFT chats ({distinct} distinct prompts), {len(prompts)} rollout prompts, "
          f"{len(heldout)} held-out prompts" + ("" if args.heldout_may_repeat else " (none seen in SFT or rollouts)"))


if __name__ == "__main__":
    sys.exit(run_cli(main))
