"""The BN paper's MNIST protocol: bnlab's full run against a plain PyTorch loop, in one run.

    python benchmarks/bench_bn_mnist.py [--steps 50000] [--data-dir ../shared/data/mnist]
                                        [--threads N] [--plain-only] [--per-net]

The plain loop is what a PyTorch user would write for the same work: for each network (without
and with torch.nn.BatchNorm1d), nn.Sequential, torch.optim.SGD, one step at a time on batches of
60 indexed from the training tensors, and every 500 steps the test accuracy plus the percentiles
of one last-layer sigmoid input on the same held-out batch. bnlab's time is the whole
`bnlab reproduce bn-mnist` run: data loading, both networks, evaluations, checkpoints,
Algorithm 2 recalibration, metrics and the figure. Prints both wall times and their ratio.

``--threads N`` runs the plain loop with N torch threads (default: torch's); ``--plain-only``
times the plain loop alone. ``--per-net`` also times each of bnlab's two networks alone in one
thread, as its training process does, with the evaluations every 500 steps and with one at the end.
"""

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from bnlab.data import load_dataset
from bnlab.experiments import bn_mnist


def plain_loop(cfg: bn_mnist.Config) -> dict:
    data = load_dataset(cfg.data_dir)
    x_train = torch.from_numpy(data.x_train >= cfg.threshold).float()
    y_train = torch.from_numpy(data.y_train)
    x_test = torch.from_numpy(data.x_test >= cfg.threshold).float()
    y_test = torch.from_numpy(data.y_test)
    probe = x_test[: cfg.probe_examples]
    results = {}
    for batch_norm in (False, True):
        torch.manual_seed(cfg.seed)
        layers, width = [], x_train.shape[1]
        for _ in range(cfg.depth):
            layers += [nn.Linear(width, cfg.width, bias=not batch_norm)]
            layers += [nn.BatchNorm1d(cfg.width)] if batch_norm else []
            layers += [nn.Sigmoid()]
            width = cfg.width
        layers.append(nn.Linear(width, 10))
        model = nn.Sequential(*layers)
        for m in model.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, cfg.init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
        loss_fn = nn.CrossEntropyLoss()
        last_pre_sigmoid = len(layers) - 3  # the layer feeding the last sigmoid
        curve = []
        for step in range(cfg.steps + 1):
            if step % cfg.eval_every == 0:
                model.eval()
                with torch.no_grad():
                    acc = (model(x_test).argmax(1) == y_test).float().mean().item()
                    u = model[: last_pre_sigmoid + 1](probe)[:, cfg.unit]
                    q = torch.quantile(u, torch.tensor([0.15, 0.5, 0.85])).tolist()
                curve.append((step, acc, *q))
                model.train()
            if step == cfg.steps:
                break
            idx = torch.randint(0, len(x_train), (cfg.batch_size,))
            loss = loss_fn(model(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        results["bn" if batch_norm else "baseline"] = curve[-1][1]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50_000)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the plain loop")
    parser.add_argument("--plain-only", action="store_true")
    parser.add_argument("--per-net", action="store_true")
    args = parser.parse_args()
    cfg = dataclasses.replace(bn_mnist.Config(), steps=args.steps, data_dir=args.data_dir)
    default_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.steps} steps per network")
    start = time.perf_counter()
    plain = plain_loop(cfg)
    t_plain = time.perf_counter() - start
    print(f"plain PyTorch loop: {t_plain:.1f} s (final test accuracy {plain})")
    torch.set_num_threads(default_threads)
    if args.plain_only:
        return
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        bn_mnist.run(dataclasses.replace(cfg, out=tmp))
        t_bnlab = time.perf_counter() - start
    print(f"bnlab reproduce bn-mnist: {t_bnlab:.1f} s")
    print(f"speed-up of bnlab over the plain loop: {t_plain / t_bnlab:.2f}x")
    if args.per_net:
        per_net(cfg)


def per_net(cfg: bn_mnist.Config) -> None:
    """Each network alone in one thread, as in its training process."""
    data = bn_mnist.Tensors.build(load_dataset(cfg.data_dir), cfg.threshold)
    bn_mnist.warm_up()
    torch.set_num_threads(1)
    for name in bn_mnist.NETS:
        times = []
        for every in (cfg.eval_every, cfg.steps):
            with tempfile.TemporaryDirectory() as tmp:
                run_cfg = dataclasses.replace(cfg, out=str(Path(tmp)), eval_every=every)
                start = time.perf_counter()
                bn_mnist._train_one(run_cfg, name, False, data, progress=lambda n: None)
                times.append(time.perf_counter() - start)
        print(f"{name} alone, one thread: {times[0]:.1f} s with evaluations every {cfg.eval_every} steps, "
              f"{times[1]:.1f} s with one at the end")


if __name__ == "__main__":
    main()
