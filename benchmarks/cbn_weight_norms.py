"""Diagnostic: how the weights, gammas and layer outputs of the small-batch network move under BN and under CBN.

    python benchmarks/cbn_weight_norms.py [--data-dir ../shared/data/mnist] [--batch 4] [--examples 20000]
                                          [--window 4] [--burn-in 0.1] [--lr-drop 1] [--every 500]

Trains the small-batch experiment's network (bnlab.experiments.small_batch, default config but
``examples``, ``window``, ``burn_in`` and ``lr_drop``; burn-in 10% by default, the setting where
CBN's weights grow) with each method at one batch size and prints, every ``--every`` steps:

- the Frobenius norm of each conv / fully connected weight and the mean |gamma| of each
  normalization layer. Under BN the layers are invariant to the scale of their weights, so the
  norms grow slowly; under CBN the gradient flows through the current iteration's share of the
  statistics only;
- the drift of each producer's output (conv1..3, fc): the median over its channels of
  |change of the channel's mean| / its standard deviation per training step, on 256 fixed
  training images in inference mode, averaged over the 10 steps that follow. Under BN a shift of
  a channel's mean gets no gradient (the batch mean is subtracted); under CBN it gets (1 - 1/k) of
  one, and the next steps' compensated window follows the shift, so nothing pulls it back.
"""

import argparse

import bnlab
from bnlab.data import load_dataset
from bnlab.experiments import small_batch

DRIFT_STEPS = 10  # steps the drift is averaged over
PROBE = 256  # training images the drift is measured on


def producer_moments(net, probe):
    """Each producer's per-channel output mean and standard deviation on ``probe``, in inference mode."""
    outputs = []
    producers = [*net.convs, net.fc]
    hooks = [p.register_forward_hook(lambda module, args, out: outputs.append(out.detach())) for p in producers]
    try:
        with bnlab.evaluating(net):
            net(probe)
    finally:
        for hook in hooks:
            hook.remove()
    dims = lambda out: [d for d in range(out.dim()) if d != 1]  # noqa: E731
    return [(out.mean(dims(out)), out.std(dims(out))) for out in outputs]


def drift(before, after) -> list[float]:
    return [float(((a_mu - b_mu).abs() / b_sd.clamp_min(1e-12)).median()) for (b_mu, b_sd), (a_mu, _) in
            zip(before, after)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--examples", type=int, default=20_000)
    parser.add_argument("--methods", default="bn,cbn")
    parser.add_argument("--window", type=int, default=4)
    parser.add_argument("--burn-in", type=float, default=0.1, help="fraction of the steps run as BN first")
    parser.add_argument("--lr-drop", type=float, default=1.0, help="learning rate factor after the burn-in")
    parser.add_argument("--every", type=int, default=500, help="steps between reports")
    args = parser.parse_args()
    data = load_dataset(args.data_dir)
    cfg = small_batch.Config(examples=args.examples, window=args.window, burn_in=args.burn_in, lr_drop=args.lr_drop)
    for method in args.methods.split(","):
        task = small_batch.RunTask(cfg, method, args.batch, data)
        net, probe = task.model, task.x_train[:PROBE]
        print(f"{method}, batch {args.batch}, window {args.window}, burn-in to step {task.drop_at}: "
              "weight norms (conv1..3, fc) | mean |gamma| | drift per step (conv1..3, fc)")
        report, moments, drifts = None, None, []
        for step in range(task.steps):
            if step % args.every == 0 or step == task.steps - 1:
                norms = " ".join(f"{p.norm():5.1f}" for p in [c.weight for c in net.convs] + [net.fc.weight])
                gammas = " ".join(f"{m.weight.abs().mean():4.2f}" for m in [*net.norms, net.fc_norm])
                report, moments, drifts = f"  step {step:>6}: {norms} | {gammas} |", producer_moments(net, probe), []
            task.train_step(step)
            if moments is not None:
                after = producer_moments(net, probe)
                drifts.append(drift(moments, after))
                moments = after
                if len(drifts) == DRIFT_STEPS or step == task.steps - 1:
                    mean = [sum(d[k] for d in drifts) / len(drifts) for k in range(len(drifts[0]))]
                    print(report, " ".join(f"{d:5.3f}" for d in mean))
                    moments = None
        print(f"  test accuracy {task.evaluate(task.steps)['test_accuracy']:.4f}")


if __name__ == "__main__":
    main()
