"""BN + activation, forward + backward: bnlab's fused layer against torch.nn.BatchNorm2d + ReLU.

    python benchmarks/bench_bn_act.py [--act relu] [--repeats 10] [--device cpu|cuda] [--dtype float32]
                                      [--backend auto] [--channels-last] [--eval] [--shapes 256x1024,64x64x14x14]

For each shape, in one run, interleaved: the median time of bnlab.BatchNormAct (training mode,
forward + backward) and of torch.nn.BatchNorm followed by the activation; their ratio (torch /
bnlab: above 1 means bnlab is faster); and bnlab's achieved bandwidth, counting the fused
kernels' traffic (forward: x read twice, y written once; backward: x and dy read twice, dx
written once: 8 tensor-sized transfers), as a fraction of a large device copy timed in the same
run (read + write counted).

``--eval`` times inference instead: eval mode under ``torch.no_grad()``, where bnlab's Triton path
is one pass (x read, y written: 2 transfers) and the others BN then the activation.
"""

import argparse
import statistics
import time

import torch
from torch import nn

import bnlab

SHAPES = [(64, 256, 56, 56), (256, 512, 14, 14), (1024, 4096), (32, 64, 56, 56), (64, 128, 28, 28)]
ACT = {"relu": nn.ReLU, "silu": nn.SiLU, "sigmoid": nn.Sigmoid, "leaky_relu": nn.LeakyReLU, "identity": nn.Identity}


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device, dtype):
    src = torch.empty(64 * 2**20 // torch.finfo(dtype).bits * 8, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), device, 10)
    return 2 * src.numel() * src.element_size() / t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--act", default="relu", choices=sorted(ACT))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--backend", default="auto", help="bnlab's backend: auto, fused, native, triton")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--channels-last", action="store_true", help="4-D inputs in channels_last memory")
    parser.add_argument("--eval", action="store_true", help="time inference (eval mode, no autograd) instead")
    parser.add_argument("--shapes", help="comma-separated shapes such as 256x1024,64x64x14x14 (default: SHAPES)")
    args = parser.parse_args()
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    dtype = getattr(torch, args.dtype)
    copy = copy_bandwidth(args.device, dtype)
    print(f"device {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}), "
          f"{args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} threads, act {args.act}"
          f"{', channels_last' if args.channels_last else ''}, {'inference' if args.eval else 'training'}")
    print(f"copy bandwidth: {copy / 1e9:.1f} GB/s (read + write)")
    print(f"{'shape':>22} {'bnlab ms':>9} {'torch ms':>9} {'speed-up':>9} {'GB/s':>7} {'of copy':>8}")
    ratios = []
    for shape in shapes:
        c = shape[1]
        x = torch.randn(shape, device=args.device, dtype=dtype)
        if args.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        dy = torch.randn(shape, device=args.device, dtype=dtype)
        kind = bnlab.BatchNormAct2d if len(shape) == 4 else bnlab.BatchNormAct1d
        ours = kind(c, act=args.act, backend=args.backend)
        norm = nn.BatchNorm2d(c) if len(shape) == 4 else nn.BatchNorm1d(c)
        theirs = nn.Sequential(norm, ACT[args.act]())
        ours.to(args.device), theirs.to(args.device)
        if args.eval:
            ours.eval(), theirs.eval()
            with torch.no_grad():
                t_ours = timed(lambda: ours(x), args.device, args.repeats)
                t_theirs = timed(lambda: theirs(x), args.device, args.repeats)
        else:
            t_ours = timed(lambda: ours(x).backward(dy), args.device, args.repeats)
            t_theirs = timed(lambda: theirs(x).backward(dy), args.device, args.repeats)
        x.grad = None
        bandwidth = (2 if args.eval else 8) * x.numel() * x.element_size() / t_ours
        ratios.append(t_theirs / t_ours)
        print(f"{str(shape):>22} {t_ours * 1e3:9.2f} {t_theirs * 1e3:9.2f} {t_theirs / t_ours:8.2f}x "
              f"{bandwidth / 1e9:7.1f} {bandwidth / copy:8.0%}")
    print(f"median speed-up of bnlab over torch: {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
