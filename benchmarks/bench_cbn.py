"""Training-step time of the small-batch experiment's network with CBN against BN, at batch 4.

    python benchmarks/bench_cbn.py [--batch 4] [--steps 300] [--threads N] [--parts] [--variants] [--norm-cost]
                                   [--moments] [--fixed-cost]

Three networks train on the same MNIST-sized random batches with SGD + momentum, measured in one
run, interleaved in blocks: bnlab's cross-iteration layers (window 4, past their burn-in), bnlab's
BN (the experiment's "bn") and torch.nn.BatchNorm1d/2d. Prints the median step times and the
ratios CBN / BN and CBN / torch's BN.

``--parts`` also prints where CBN's time goes: each piece of the layer's training step timed
inside the CBN network's steps (per step, summed over its four layers), each numba kernel call
inside the steps against the same call repeated alone, the OpenMP runtimes loaded, and one
isolated comparison behind a choice in the code (a Linear producer's d nu/dW).

``--norm-cost`` adds the same network without normalization layers (identities) to the run, and
prints what the normalization layers cost in each network's step (its step minus that one's).

``--threads N`` runs torch's ops and the numba kernels on N threads each (default: as they start).

``--fixed-cost`` times one layer's fixed cost, forward + backward on a tiny input where its
arithmetic is next to nothing (Python, autograd's bookkeeping, kernel calls): torch's BN, bnlab's
BN and CBN.

``--moments`` times a conv's d nu/dW both ways alone (torch's weight-gradient reduction, the
patches' second moments) on a few shapes.

``--variants`` adds six CBN networks to the same run, to say where CBN's cost lies: the layer
on torch ops (``backend="native"``); the same with the derivatives taken as the official code takes
them, two autograd passes per layer through the producer; the fused layer with its convs' d nu/dW
taken once and reused (stale derivatives: a timing of everything but that reduction, not a layer
to train with); the fused layer with every conv's d nu/dW on torch's weight-gradient kernel
(none from the patches' second moments); the fused layers with the Linear's layer uncompensated
(naive: a timing of everything but its window's derivatives); and that network plus what a
Linear's window kept as input rows would cost (:class:`RowsWindowCost`: a timing, not a layer).
"""

import argparse
import os
import statistics
import time

import numba
import numpy as np
import torch
from torch import nn

import bnlab
from bnlab import autograd, modules
from bnlab import functional as F
from bnlab.experiments.small_batch import Config, SmallConvNet
from bnlab.kernels import cpu_cbn
from bnlab.functional import moments_pay


KERNELS = {name: getattr(cpu_cbn, name) for name in ("pooled_forward", "commit", "store_conv", "store_conv_moments",
                                                       "store_linear", "pooled_backward")}  # (before --parts wraps)


def per_call_us(f, repeats=2000):
    for _ in range(min(50, repeats)):
        f()
    start = time.perf_counter()
    for _ in range(repeats):
        f()
    return (time.perf_counter() - start) / repeats * 1e6


class AutogradDerivatives:
    """The official implementation's derivatives: d mu/dW and d nu/dW by two autograd passes per
    layer through the producer (torch.autograd.grad of sum_j mu_j and of sum_j nu_j w.r.t. its
    weight: channel j's statistics depend on row j only), instead of the mean patch and one
    weight-gradient reduction. For the benchmark only."""

    def _capture(self, module, args, output):
        self.__dict__["_input"] = (args[0].detach(), output, None) if self.training else None

    def _derivatives(self, x, u, gradient):
        weight, groups = self.producer.weight, getattr(self.producer, "groups", 1)
        dims = [d for d in range(x.dim()) if d != 1]
        with torch.enable_grad():
            dmu, = torch.autograd.grad(x.mean(dims).sum(), weight, retain_graph=True)
            dnu, = torch.autograd.grad((x * x).mean(dims).sum(), weight, retain_graph=True)
        c = x.shape[1]
        return dmu.reshape(c, -1)[:: c // groups], dnu.reshape(c, -1)


class StaleSecondMoment:
    """The fused layer with each conv's d nu/dW taken once and reused: what CBN's step costs
    without that reduction (a timing, not a layer to train with)."""

    def _capture(self, module, args, output):
        if self.training:
            gradient = self.__dict__.get("_stale")
            if gradient is None and isinstance(module, nn.Conv2d):
                gradient = self.__dict__["_stale"] = F.conv_weight_gradient(output, args[0].detach(), module)
            self.__dict__["_input"] = (args[0].detach(), output, gradient)
        else:
            self.__dict__["_input"] = None


class WeightGradientOnly:
    """The fused layer with every conv's d nu/dW on torch's weight-gradient kernel, none from the
    patches' second moments (the layer until the tenth session: conv1 of this network takes them)."""

    def pair(self, producer):
        super().pair(producer)
        self.__dict__["_moments"] = False
        return self


@numba.njit(parallel=True, cache=True, fastmath=True)
def rows_products(weight, rows, scale, t_mu, t_nu):
    """For :class:`RowsWindowCost`: per channel c and window entry p, <d mu/dW_c, W_c> and <d nu/dW_c, W_c>
    from the entry's input rows ``u (P, N, F)`` and ``scale = 2/N x (P, N, C)`` instead of stored
    derivatives: mean_n (u_n . W_c) and sum_n scale[n, c] (u_n . W_c), summed in float64 as the layer's."""
    p_, n_, f_ = rows.shape
    for c in numba.prange(weight.shape[0]):
        w = weight[c]
        for p in range(p_):
            s_mu = 0.0
            s_nu = 0.0
            for n in range(n_):
                r = rows[p, n]
                dot = 0.0
                for f in range(f_):
                    dot += np.float64(r[f]) * np.float64(w[f])
                s_mu += dot
                s_nu += dot * scale[p, n, c]
            t_mu[p, c] = s_mu / n_
            t_nu[p, c] = s_nu


class RowsWindowCost:
    """What a Linear's window kept as its entries' input rows u and outputs x (N values a channel)
    would cost, instead of d nu/dW (C, F) an entry: d nu_c/dW_c = 2/N sum_n x[n, c] u_n, so
    <d nu/dW_c, W_c> = 2/N sum_n x[n, c] (u_n . W_c), one dot product of length F per row, channel
    and entry, and no (C, F) array read or written. Put on a naive layer, it adds the products of
    the window's entries and the new one with the current weights, and the entry's copy: a timing
    (a lower bound: no compensation applied), not a layer to train with."""

    def _capture(self, module, args, output):
        super()._capture(module, args, output)
        if self.training and isinstance(module, nn.Linear):
            u, x = args[0].detach().numpy(), output.detach().numpy()
            rows = self.__dict__.get("_rows")
            if rows is None:  # (entries 0..window-2: the past; the last: this batch)
                entries, n = self.window, u.shape[0]
                rows = self.__dict__["_rows"] = (np.zeros((entries, n, u.shape[1]), np.float32),
                                                 np.zeros((entries, n, x.shape[1]), np.float32),
                                                 np.zeros((entries, x.shape[1])), np.zeros((entries, x.shape[1])))
            u_rows, scale, t_mu, t_nu = rows
            u_rows[-1], scale[-1] = u, x * (2.0 / u.shape[0])
            rows_products(module.weight.detach().numpy(), u_rows, scale, t_mu, t_nu)
            slot = int(self.iteration) % (self.window - 1)
            u_rows[slot], scale[slot] = u_rows[-1], scale[-1]


def cbn_variant(mixin, backend: str, naive_fc: bool = False) -> nn.Module:
    """The experiment's network with bnlab's BN layers swapped for CBN layers (window 4, past
    their burn-in) made of ``mixin`` (or plain, None) on ``backend``; ``naive_fc``: the Linear's
    layer uncompensated."""
    net = network("bn")
    for name, producer, dims in (*((f"norms.{i}", conv, 2) for i, conv in enumerate(net.convs)),
                                 ("fc_norm", net.fc, 1)):
        base = (modules.CrossIterationBatchNorm1d, modules.CrossIterationBatchNorm2d)[dims - 1]
        cls = type(f"{mixin.__name__}{base.__name__}", (mixin, base), {}) if mixin else base
        layer = cls(producer.out_channels if dims == 2 else producer.out_features, window=4, backend=backend,
                    compensate=not (naive_fc and dims == 1))
        net.set_submodule(name, layer.pair(producer))
    return net


VARIANTS = {
    "CBN on torch ops": lambda: cbn_variant(None, "native"),
    "CBN on torch ops, derivatives by two autograd passes (the official code's way)":
        lambda: cbn_variant(AutogradDerivatives, "native"),
    "CBN, d nu/dW stale (timing only)": lambda: cbn_variant(StaleSecondMoment, "auto"),
    "CBN, every conv's d nu/dW on torch's weight-gradient kernel": lambda: cbn_variant(WeightGradientOnly, "auto"),
    "CBN, the Linear's layer uncompensated (timing only)": lambda: cbn_variant(None, "auto", naive_fc=True),
    "CBN, the Linear's layer uncompensated + its window's products from input rows (timing only)":
        lambda: cbn_variant(RowsWindowCost, "auto", naive_fc=True),
}

# (N, C_in, C_out, H = W, kernel, stride): convs on either side of each bound of the layer's rule for
# taking d nu/dW from the patches' second moments (functional.moments_pay)
MOMENT_SHAPES = ((4, 1, 16, 28, 3, 1), (64, 1, 16, 28, 3, 1), (8, 2, 32, 64, 3, 1), (16, 3, 64, 32, 3, 1),
                 (32, 3, 32, 112, 3, 1), (8, 3, 32, 224, 3, 2), (4, 8, 64, 28, 3, 1), (4, 3, 96, 32, 5, 1))


def moments(repeats: int = 20) -> None:
    """d nu/dW of one conv both ways, alone: torch's weight-gradient reduction (scaled by 2/m in the
    window) against cpu_cbn.store_conv_moments (the derivatives into the window, d mu/dW included)."""
    print("d nu/dW of a conv alone, torch's weight gradient against the patches' second moments:")
    for n, c_in, c_out, side, k, stride in MOMENT_SHAPES:
        conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, bias=False)
        u = torch.randn(n, c_in, side, side)
        x = conv(u).detach()
        fan_in = c_in * k * k
        weight, bias = conv.weight.detach().reshape(c_out, -1).numpy(), np.zeros(c_out, np.float32)
        dmu, dnu = np.zeros((1, 1, fan_in), np.float32), np.zeros((1, c_out, fan_in), np.float32)
        products = np.zeros((1, c_out)), np.zeros((1, c_out))
        moment = lambda: cpu_cbn.store_conv_moments(0, u.numpy(), k, k, stride, stride, k // 2, k // 2, 1, 1,  # noqa: E731
                                                    weight, bias, dmu, dnu, *products)
        reps = max(10, repeats * 3136 // (n * side * side))
        wgrad_us = per_call_us(lambda: F.conv_weight_gradient(x, u, conv), reps)
        moment_us = per_call_us(moment, reps)
        takes = "takes" if moments_pay(1, fan_in, c_out, stride) else "leaves"
        print(f"  u {(n, c_in, side, side)}, conv {c_in}->{c_out} {k}x{k} stride {stride} (F {fan_in}): "
              f"weight gradient {wgrad_us:8.1f} us, second moments {moment_us:8.1f} us "
              f"({wgrad_us / moment_us:.2f}x; the layer {takes} them)")


def network(method: str) -> nn.Module:
    if method == "none":  # the step without normalization: what the layers cost is the difference
        net = SmallConvNet("bn", steps=10**6, cfg=Config(burn_in=0.0), classes=10)
        net.norms = nn.ModuleList(nn.Identity() for _ in net.norms)
        net.fc_norm = nn.Identity()
        return net
    if method == "torch-bn":  # (torch.nn.BatchNorm2d/1d in place of bnlab's)
        return bnlab.to_torch(SmallConvNet("bn", steps=10**6, cfg=Config(burn_in=0.0), classes=10))
    return SmallConvNet(method, steps=10**6, cfg=Config(burn_in=0.0), classes=10)


def fixed_cost(rounds: int = 30, steps: int = 300) -> None:
    """What one normalization layer costs a training step where its arithmetic is next to nothing:
    forward + backward after a Linear(8, 8) at batch 4 (torch's BN, bnlab's BN, CBN with window 4
    past its burn-in), minus the same step without it. Rounds interleave the four."""
    u = torch.randn(4, 8)
    nets = {}
    for name in ("none", "torch's BN", "bnlab's BN", "CBN"):
        linear = nn.Linear(8, 8)
        norm = {"none": nn.Identity, "torch's BN": nn.BatchNorm1d, "bnlab's BN": bnlab.BatchNorm1d,
                "CBN": lambda c: bnlab.CrossIterationBatchNorm1d(c, window=4).pair(linear)}[name](8)
        nets[name] = nn.Sequential(linear, norm)
    times = {name: [] for name in nets}
    for _ in range(rounds):
        for name, net in nets.items():
            for _ in range(20):  # (CBN: past its first window - 1 steps, pooling)
                net(u).sum().backward()
            start = time.perf_counter()
            for _ in range(steps):
                net(u).sum().backward()
            times[name].append((time.perf_counter() - start) / steps)
    step = {name: statistics.median(t) for name, t in times.items()}
    cost = {name: (step[name] - step["none"]) * 1e6 for name in nets if name != "none"}
    extra = cost["CBN"] - cost["bnlab's BN"]
    print("one layer's fixed cost, forward + backward after Linear(8, 8) at batch 4 (median of "
          f"{rounds} rounds): " + ", ".join(f"{name} {us:.1f} us" for name, us in cost.items())
          + f"; CBN {extra:.1f} us more than bnlab's BN")


def parts(args, x, y) -> None:
    """Time the pieces of CBN's training step by wrapping them, inside real training steps."""
    spent = {}

    def timed(name, owner, attr, static=False):
        original = getattr(owner, attr)
        spent.setdefault(name, 0.0)  # (a name may sum several functions)

        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                spent[name] += time.perf_counter() - start

        setattr(owner, attr, staticmethod(wrapper) if static else wrapper)

    calls = {}  # (kernel, its first array's shape) -> [seconds in the steps, calls, the last call's arguments]

    def per_layer(kernel):
        original = getattr(cpu_cbn, kernel)

        def wrapper(*a):
            start = time.perf_counter()
            result = original(*a)
            seconds = time.perf_counter() - start
            record = calls.setdefault((kernel, next(t.shape for t in a if hasattr(t, "shape"))), [0.0, 0, a])
            record[0] += seconds
            record[1] += 1
            record[2] = a
            return result

        setattr(cpu_cbn, kernel, wrapper)

    for kernel in KERNELS:
        per_layer(kernel)
    fused = autograd.FusedCrossIterationNormFunction
    timed("whole layer forward (_train)", modules.CrossIterationBatchNorm, "_train")
    timed("  pooled normalization, forward (compensation, pooling)", fused, "forward", static=True)
    timed("    of which the kernel pooled_forward", cpu_cbn, "pooled_forward")
    timed("  running statistics and window entry (commit)", cpu_cbn, "commit")
    for kernel in ("store_conv", "store_conv_moments", "store_linear"):
        timed("  derivatives into the window (store_conv[_moments], store_linear)", cpu_cbn, kernel)
    timed("d nu/dW of conv2 and conv3, in the producers' hooks (torch's weight-gradient kernel)", F,
          "conv_weight_gradient")
    timed("pooled normalization, backward", fused, "backward", static=True)
    timed("  of which the kernel pooled_backward", cpu_cbn, "pooled_backward")
    net = network("cbn")
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    for s in range(args.steps):
        if s == 20:
            spent.update(dict.fromkeys(spent, 0.0))
            calls.clear()
        loss = nn.functional.cross_entropy(net(x[s]), y[s])
        opt.zero_grad()
        loss.backward()
        opt.step()
    print("CBN network, per step (four layers):")
    for name, total in spent.items():
        print(f"  {name:<80} {total / (args.steps - 20) * 1e3:.3f} ms")
    # Inside a step, torch's ops run between two kernel calls: caches are cold and the second thread
    # of numba's OpenMP pool (its own runtime, beside torch's) has to be woken, or finds the core
    # taken by torch's spinning thread.
    print("Each kernel call inside the steps against the same call repeated alone (the last step's arguments):")
    for (kernel, shape), (total, count, a) in calls.items():
        alone = per_call_us(lambda: KERNELS[kernel](*a), repeats=500)
        print(f"  {kernel:<16} {str(shape):<18} in the steps {total / count * 1e6:6.1f} us, alone {alone:6.1f} us")
    if os.path.exists("/proc/self/maps"):  # torch's OpenMP runtime, and numba's when it brought its own
        with open("/proc/self/maps") as maps:
            runtimes = sorted({line.split()[-1] for line in maps if "libgomp" in line})
        print("OpenMP runtimes loaded:", ", ".join(runtimes))
    u, h = torch.randn(args.batch, 1024), torch.randn(args.batch, 128)
    dmu, dnu = np.zeros((1, 1, 1024), np.float32), np.zeros((1, 128, 1024), np.float32)
    weight, products = torch.randn(128, 1024).numpy(), (np.zeros((1, 128)), np.zeros((1, 128)))
    store = lambda: cpu_cbn.store_linear(0, h.numpy(), u.numpy(), weight, dmu, dnu, *products)  # noqa: E731
    print(f"Linear(1024, 128) d nu/dW at batch {args.batch}: h^T @ u {per_call_us(lambda: h.t().mm(u)):.0f} us,"
          f" (u^T @ h)^T {per_call_us(lambda: u.t().mm(h).t()):.0f} us (transposed),"
          f" store_linear {per_call_us(store):.0f} us (with d mu/dW and both products with W, into the window)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, help="torch's and numba's threads (default: as they start)")
    parser.add_argument("--parts", action="store_true", help="also time the pieces of CBN's step")
    parser.add_argument("--variants", action="store_true", help="also time six CBN variants in the same run")
    parser.add_argument("--moments", action="store_true",
                        help="also time a conv's d nu/dW both ways alone, on a few shapes")
    parser.add_argument("--fixed-cost", action="store_true",
                        help="also time one layer's fixed cost (forward + backward) on a tiny input")
    parser.add_argument("--norm-cost", action="store_true",
                        help="also time the network without normalization: what the layers cost")
    args = parser.parse_args()
    if args.threads:
        import numba

        torch.set_num_threads(args.threads)
        numba.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.rand(args.steps, args.batch, 1, 28, 28)
    y = torch.randint(0, 10, (args.steps, args.batch))
    nets = {m: network(m) for m in ("bn", "torch-bn", "cbn")}
    if args.variants:
        nets.update((name, make()) for name, make in VARIANTS.items())
    if args.norm_cost:
        nets["none"] = network("none")
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
    bn, torch_bn, cbn = (statistics.median(times[m][20:]) for m in ("bn", "torch-bn", "cbn"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    print(f"BN step {bn * 1e3:.3f} ms, torch's BN step {torch_bn * 1e3:.3f} ms, CBN step {cbn * 1e3:.3f} ms; "
          f"ratio CBN/BN {cbn / bn:.2f}, CBN/torch's BN {cbn / torch_bn:.2f}")
    if args.norm_cost:
        none = statistics.median(times["none"][20:])
        cost = {m: statistics.median(times[m][20:]) - none for m in ("bn", "torch-bn", "cbn")}
        print(f"without normalization {none * 1e3:.3f} ms; the normalization layers cost BN {cost['bn'] * 1e3:.3f} ms, "
              f"torch's BN {cost['torch-bn'] * 1e3:.3f} ms, CBN {cost['cbn'] * 1e3:.3f} ms a step "
              f"({cost['cbn'] / cost['bn']:.2f}x BN's)")
    for name in VARIANTS if args.variants else ():
        step = statistics.median(times[name][20:])
        print(f"  {name}: {step * 1e3:.3f} ms, {step / bn:.2f}x BN")
    if args.parts:
        parts(args, x, y)
    if args.moments:
        moments()
    if args.fixed_cost:
        fixed_cost()


if __name__ == "__main__":
    main()
