"""Accuracy per iteration of an OaK-DPO run, as a table and a plot, rebuilt from the run folder.

    python scripts/oak_report.py outputs/oak_demo --png docs/img/oak_accuracy.png

Everything is read back from disk (see :mod:`opensloth.online_dpo.report`), so a
resumed run reports the same as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import os
import sys

from opensloth.errors import UserInputError, run_cli
from opensloth.online_dpo.report import summary_markdown, write_reports


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", help="the --output folder of run_oak_dpo.py")
    p.add_argument("--png", default=None, help="where to write the plot (default <output>/oak_accuracy.png)")
    args = p.parse_args(argv)
    if not os.path.isdir(args.output):
        raise UserInputError(f"{args.output!r} is not a run folder of run_oak_dpo.py")
    result = write_reports(args.output, args.png)
    print(summary_markdown(result["rows"]), end="")
    if result["png"]:
        print(f"plot: {result['png']}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
