"""Training-step time of the small-batch experiment's network with CBN against BN, at batch 4.

    python benchmarks/bench_cbn.py [--batch 4] [--steps 300] [--parts]

Both networks (bnlab's cross-iteration layers with window 4 past their burn-in, and bnlab's BN)
train on the same MNIST-sized random batches with SGD + momentum, measured in one run,
interleaved in blocks; prints the median step times and their ratio (CBN / BN).

``--parts`` also prints where CBN's extra time goes: each piece of the layer's training step
timed inside the CBN network's steps (per step, summed over its four layers), and two isolated
comparisons behind choices in the code (the batch moments; a Linear producer's d nu/dW product).
"""

import argparse
import statistics
import time

import torch
from torch import nn

from bnlab import autograd, modules
from bnlab import functional as F
from bnlab.experiments.small_batch import Config, SmallConvNet


def per_call_us(f, repeats=2000):
    for _ in range(50):
        f()
    start = time.perf_counter()
    for _ in range(repeats):
        f()
    return (time.perf_counter() - start) / repeats * 1e6


def parts(args, x, y) -> None:
    """Time the pieces of CBN's training step by wrapping them, inside real training steps."""
    spent = {}

    def timed(name, owner, attr, static=False):
        original = getattr(owner, attr)
        spent[name] = 0.0

        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                spent[name] += time.perf_counter() - start

        setattr(owner, attr, staticmethod(wrapper) if static else wrapper)

    timed("whole layer forward (_train)", modules.CrossIterationBatchNorm, "_train")
    timed("  compensation of the window (_past_statistics)", modules.CrossIterationBatchNorm, "_past_statistics")
    timed("  pooled normalization, forward", autograd.CrossIterationNormFunction, "forward", static=True)
    timed("  running statistics update", F, "update_running_stats_")
    timed("  d mu/dW (mean_patches)", F, "mean_patches")
    timed("  d nu/dW (second_moment_derivative)", F, "second_moment_derivative")
    timed("pooled normalization, backward", autograd.CrossIterationNormFunction, "backward", static=True)
    net = SmallConvNet("cbn", steps=10**6, cfg=Config(burn_in=0.0), classes=10)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    for s in range(args.steps):
        if s == 20:
            spent.update(dict.fromkeys(spent, 0.0))
        loss = nn.functional.cross_entropy(net(x[s]), y[s])
        opt.zero_grad()
        loss.backward()
        opt.step()
    print("CBN network, per step (four layers):")
    for name, total in spent.items():
        print(f"  {name:<50} {total / (args.steps - 20) * 1e3:.3f} ms")
    a = torch.randn(4, 16, 28, 28)
    print(f"batch moments of a (4, 16, 28, 28) tensor: torch.var_mean {per_call_us(lambda: torch.var_mean(a, (0, 2, 3))):.0f} us,"
          f" mean and mean of squares {per_call_us(lambda: F.raw_moments(a)):.0f} us")
    u, h = torch.randn(args.batch, 1024), torch.randn(args.batch, 128)
    print(f"Linear(1024, 128) d nu/dW at batch {args.batch}: h^T @ u {per_call_us(lambda: h.t().mm(u)):.0f} us,"
          f" (u^T @ h)^T {per_call_us(lambda: u.t().mm(h).t()):.0f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--parts", action="store_true", help="also time the pieces of CBN's step")
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
    if args.parts:
        parts(args, x, y)


if __name__ == "__main__":
    main()
