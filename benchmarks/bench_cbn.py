"""Training-step time of the small-batch experiment's network with CBN against BN, at batch 4.

    python benchmarks/bench_cbn.py [--batch 4] [--steps 300]

Both networks (bnlab.CrossIterationBatchNorm2d with window 4 past its burn-in, and
bnlab.BatchNorm2d) train on the same MNIST-sized random batches with SGD + momentum, measured
in one run, interleaved in blocks; prints the median step times and their ratio (CBN / BN).
"""

import argparse
import statistics
import time

import torch
from torch import nn

from bnlab.experiments.small_batch import Config, SmallConvNet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.manual_seed(0)
    x = torch.rand(args.steps, args.batch, 1, 28, 28)
    y = torch.randint(0, 10, (args.steps, args.batch))
    nets = {m: SmallConvNet(m, steps=10**6, cfg=Config(burn_in=0.0), classes=10) for m in ("bn", "cbn")}
    opts = {m: torch.optim.SGD(n.parameters(), lr=0.01, momentum=0.9) for m, n in nets.items()}
    times = {m: [] for m in nets}
    for block in range(0, args.steps, 50):
        for m, net in nets.items():
            for s in range(block, min(block + 50, args.steps)):
                start = time.perf_counter()
                loss = nn.functional.cross_entropy(net(x[s]), y[s])
                opts[m].zero_grad()
                loss.backward()
                opts[m].step()
                times[m].append(time.perf_counter() - start)
    bn, cbn = (statistics.median(times[m][20:]) for m in ("bn", "cbn"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    print(f"BN step {bn * 1e3:.3f} ms, CBN step {cbn * 1e3:.3f} ms, ratio CBN/BN {cbn / bn:.2f}")


if __name__ == "__main__":
    main()
