"""Inference time of the small-batch experiment's network before and after bnlab.fuse, in one run.

    python benchmarks/bench_fuse.py [--batches 1,64] [--repeats 2000]

Four versions of the same trained network (three conv-norm-ReLU stages and a Linear-norm, the
experiment's "bn" with bnlab's layers) run in eval mode without autograd, interleaved in blocks of 20 passes:
bnlab's layers as they are, ``bnlab.fuse`` of it, the same network with torch.nn.BatchNorm, and
torch's fx fuser (``torch.fx.experimental.optimization.fuse``) of that one. Prints the median
forward time of each and the ratios against bnlab's unfused network, and the largest difference
between the fused and the unfused outputs.
"""

import argparse
import copy
import statistics
import time
import warnings

import torch
from torch import nn

import bnlab
from bnlab.experiments.small_batch import Config, SmallConvNet


def trained_networks():
    torch.manual_seed(0)
    ours = SmallConvNet("bn", steps=10**6, cfg=Config(burn_in=0.0), classes=10)
    opt = torch.optim.SGD(ours.parameters(), lr=0.05, momentum=0.9)
    for _ in range(30):  # running statistics and affine parameters away from their initial values
        x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
        opt.zero_grad()
        nn.functional.cross_entropy(ours(x), y).backward()
        opt.step()
    theirs = bnlab.to_torch(copy.deepcopy(ours))  # (torch.nn.BatchNorm2d/1d, the same state)
    ours.eval(), theirs.eval()
    example = (torch.rand(2, 1, 28, 28),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # (the fx fuser imports torch.jit.script_method)
        from torch.fx.experimental.optimization import fuse as fx_fuse
    return {"bnlab, eval": ours, "bnlab.fuse": bnlab.fuse(ours, example_inputs=example),
            "torch.nn BN, eval": theirs, "torch fx fuse": fx_fuse(theirs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,64", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=2000,
                        help="forward passes per network at batch 1 (at batch B, repeats / B, 200 at least)")
    args = parser.parse_args()
    nets = trained_networks()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for batch in (int(b) for b in args.batches.split(",")):
        x = torch.rand(batch, 1, 28, 28)
        times, repeats = {name: [] for name in nets}, max(200, args.repeats // batch)
        with torch.no_grad():
            reference = nets["bnlab, eval"](x)
            difference = (nets["bnlab.fuse"](x) - reference).abs().max().item()
            for block in range(0, repeats, 20):
                for name, net in nets.items():
                    for _ in range(min(20, repeats - block)):
                        start = time.perf_counter()
                        net(x)
                        times[name].append(time.perf_counter() - start)
        median = {name: statistics.median(t[20:]) for name, t in times.items()}
        base = median["bnlab, eval"]
        row = ", ".join(f"{name} {t * 1e6:.1f} us ({t / base:.2f}x)" for name, t in median.items())
        print(f"batch {batch}: {row}; fused output differs by {difference:.1e} at most")


if __name__ == "__main__":
    main()
