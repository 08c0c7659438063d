"""Test accuracy of small-batch runs over several seeds: the mean and half the range.

    python benchmarks/small_batch_seeds.py RUN_DIR [RUN_DIR ...]

Each RUN_DIR is a finished ``bnlab reproduce small-batch`` run (its ``metrics.json``); a method
and batch size enters the table with every run that has it. One seed cannot tell a difference
below about a point from seed noise; this prints what several can, as a Markdown table.
"""

import argparse
import json
import statistics
from pathlib import Path


def collect(run_dirs):
    """{method: {batch: [accuracy per run]}} and the batch sizes, in the first run's order."""
    runs = [json.loads((Path(d) / "metrics.json").read_text()) for d in run_dirs]
    batches = runs[0]["batch_sizes"]
    methods = list(dict.fromkeys(m for run in runs for m in run["methods"]))
    acc = {m: {b: [run["accuracy"][m][str(b)] for run in runs if m in run["accuracy"]] for b in batches}
           for m in methods}
    return acc, batches


def markdown(acc, batches) -> str:
    lines = ["| method (runs) | " + " | ".join(f"batch {b}" for b in batches) + " |",
             "| --- |" + " --- |" * len(batches)]
    for m, per_batch in acc.items():
        cells = []
        for b in batches:
            values = per_batch[b]
            spread = f" ± {(max(values) - min(values)) / 2:.4f}" if len(values) > 1 else ""
            cells.append(f"{statistics.mean(values):.4f}{spread}")
        lines.append(f"| {m} ({len(per_batch[batches[0]])}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+")
    args = parser.parse_args()
    print(markdown(*collect(args.run_dirs)))
    print("(mean ± half the range over the runs)")


if __name__ == "__main__":
    main()
