"""Diagnostic: how the weights and gammas of the small-batch network grow under BN and under CBN.

    python benchmarks/cbn_weight_norms.py [--data-dir ../shared/data/mnist] [--batch 4] [--examples 20000]
                                          [--window 4] [--burn-in 0.1]

Trains the small-batch experiment's network (bnlab.experiments.small_batch, default config but
``examples``, ``window`` and ``burn_in``; burn-in 10% by default, the setting where CBN's weights
grow) with each method at one batch size and prints, every 500 steps, the Frobenius norm
of each conv / fully connected weight and the mean |gamma| of each normalization layer. Under BN
the layers are invariant to the scale of their weights, so the norms grow slowly; under CBN the
gradient flows through the current iteration's share of the statistics only.
"""

import argparse

from bnlab.data import load_dataset
from bnlab.experiments import small_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--examples", type=int, default=20_000)
    parser.add_argument("--methods", default="bn,cbn")
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--burn-in", type=float, default=0.1, help="fraction of the steps run as BN first")
    args = parser.parse_args()
    data = load_dataset(args.data_dir)
    cfg = small_batch.Config(examples=args.examples, window=args.window, burn_in=args.burn_in)
    for method in args.methods.split(","):
        task = small_batch.RunTask(cfg, method, args.batch, data)
        net = task.model
        print(f"{method}, batch {args.batch}, window {args.window}: weight norms (conv1..3, fc) | mean |gamma|")
        for step in range(task.steps):
            if step % 500 == 0 or step == task.steps - 1:
                norms = " ".join(f"{p.norm():5.1f}" for p in [c.weight for c in net.convs] + [net.fc.weight])
                gammas = " ".join(f"{m.weight.abs().mean():4.2f}" for m in [*net.norms, net.fc_norm])
                print(f"  step {step:>6}: {norms} | {gammas}")
            task.train_step(step)
        print(f"  test accuracy {task.evaluate(task.steps)['test_accuracy']:.4f}")


if __name__ == "__main__":
    main()
