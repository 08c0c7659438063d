"""Forward+backward time of bnlab.BatchNorm2d against torch.nn.BatchNorm2d, measured in one run.

    python benchmarks/bench_batchnorm.py [--repeats 30] [--shapes 4x32x14x14,64x256x14x14]

Prints one row per shape with the median time of each and their ratio (bnlab / torch: below 1 is
faster), then the median ratio over shapes. Both layers run in training mode with running-stat
updates, in the same process, interleaved, so machine noise affects them alike.
"""

import argparse
import statistics
import time

import torch
from torch import nn

import bnlab

SHAPES = [(32, 64, 56, 56), (64, 256, 14, 14), (128, 512, 7, 7), (256, 1024, 1, 1), (64, 128, 28, 28)]


def step_time(layer, x, dy) -> float:
    start = time.perf_counter()
    y = layer(x)
    y.backward(dy)
    return time.perf_counter() - start


def compare(make_ours, make_theirs, shape, repeats):
    x = torch.randn(shape, requires_grad=True)
    dy = torch.randn(shape)
    ours, theirs = make_ours(shape[1]), make_theirs(shape[1])
    for _ in range(3):  # warm-up
        step_time(ours, x, dy), step_time(theirs, x, dy)
    t_ours, t_theirs = [], []
    for _ in range(repeats):
        t_ours.append(step_time(ours, x, dy))
        t_theirs.append(step_time(theirs, x, dy))
    return statistics.median(t_ours), statistics.median(t_theirs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--backend", default="auto", help="bnlab backend to time (auto, native, autograd)")
    parser.add_argument("--shapes", help="comma-separated (N, C, H, W) shapes such as 4x32x14x14 (default: SHAPES)")
    args = parser.parse_args()
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, backend={args.backend!r}")
    print(f"{'shape':>22} {'bnlab ms':>9} {'torch ms':>9} {'ratio':>6}")
    ratios = []
    for shape in shapes:
        ours, theirs = compare(lambda c: bnlab.BatchNorm2d(c, backend=args.backend), nn.BatchNorm2d, shape,
                               args.repeats)
        ratios.append(ours / theirs)
        print(f"{str(shape):>22} {ours * 1e3:9.3f} {theirs * 1e3:9.3f} {ours / theirs:6.2f}")
    print(f"median ratio bnlab/torch: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
