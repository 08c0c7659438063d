"""Test accuracy of small-batch runs over several seeds: the mean and half the range.

    python benchmarks/small_batch_seeds.py RUN_DIR [RUN_DIR ...]

Each RUN_DIR is a finished ``bnlab reproduce small-batch`` run (its ``metrics.json``); a method
and batch size enters the table with every run that has it. One seed cannot tell a difference
below about a point from seed noise; this prints what several can, as Markdown tables: inference
with the running statistics, then with population statistics (Algorithm 2).
"""

import argparse
import json
import statistics
from pathlib import Path


def collect(run_dirs, key="accuracy"):
    """{method: {batch: [accuracy per run]}} and the batch sizes, in the first run's order."""
    runs = [json.loads((Path(d) / "metrics.json").read_text()) for d in run_dirs]
    batches = runs[0]["batch_sizes"]
    methods = list(dict.fromkeys(m for run in runs for m in run["methods"]))
    acc = {m: {b: [run[key][m][str(b)] for run in runs if m in run.get(key, {})] for b in batches}
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
    for key, title in (("accuracy", "running statistics"), ("accuracy_population", "population statistics")):
        print(f"Test accuracy, inference with {title} (mean ± half the range over the runs):\n")
        print(markdown(*collect(args.run_dirs, key)) + "\n")


if __name__ == "__main__":
    main()
