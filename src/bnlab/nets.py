"""Small networks of the papers' experiments, with hand-derived training steps where speed needs one.

``SigmoidMLP`` is the network of Ioffe & Szegedy 2015, section 4.1: fully connected sigmoid layers,
y = g(Wu + b), and with ``batch_norm=True`` the same network with BN inserted before every
nonlinearity, y = g(BN(Wu)) (the bias is dropped: beta replaces it).

``BinaryInputSGD`` trains it by plain SGD on the mean cross-entropy, with the backward pass
written out by hand (the paper's BN backward through :func:`bnlab.functional.batch_norm_backward`):
the section 4.1 protocol is 50,000 tiny steps, bound by per-op overhead and by the 784x100 first
layer, which binary inputs make a sparse sum.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bnlab import functional as F
from bnlab.kernels.binary_linear import binary_forward, binary_update
from bnlab.modules import BatchNorm1d


class SigmoidMLP(nn.Module):
    """Fully connected sigmoid network; BN before every sigmoid when ``batch_norm``.

    Args:
        sizes: layer widths from input to output, e.g. ``(784, 100, 100, 100, 10)``.
        batch_norm: insert :class:`bnlab.BatchNorm1d` before each sigmoid and drop the biases there.
        init_std: weights start from N(0, init_std^2), biases from 0 ("small random Gaussian").
        generator: the RNG for the weights (for reproducible initialization).
    """

    def __init__(self, sizes, batch_norm=False, init_std=0.1, generator=None, bn_kwargs=None):
        super().__init__()
        self.sizes = tuple(sizes)
        self.batch_norm = batch_norm
        hidden = len(sizes) - 2
        self.linears = nn.ModuleList(
            nn.Linear(i, o, bias=not (batch_norm and k < hidden))
            for k, (i, o) in enumerate(zip(sizes[:-1], sizes[1:]))
        )
        self.norms = nn.ModuleList(
            BatchNorm1d(o, **(bn_kwargs or {})) if batch_norm else nn.Identity() for o in sizes[1:-1]
        )
        with torch.no_grad():
            for linear in self.linears:
                linear.weight.normal_(0.0, init_std, generator=generator)
                if linear.bias is not None:
                    linear.bias.zero_()

    def forward(self, x, return_sigmoid_inputs: bool = False):
        """Logits ``(N, classes)``; with ``return_sigmoid_inputs`` also each hidden layer's ``(N, width)``."""
        return self.head(torch.mm(x, self.linears[0].weight.t()), return_sigmoid_inputs)

    def head(self, z1, return_sigmoid_inputs: bool = False):
        """The network after the first product: ``z1 = x W1^T`` (no bias yet) ``(N, width)``."""
        sigmoid_inputs, h = [], None
        for linear, norm in zip(self.linears[:-1], self.norms):
            z = z1 if h is None else torch.mm(h, linear.weight.t())
            u = norm(z if linear.bias is None else z + linear.bias)
            sigmoid_inputs.append(u)
            h = torch.sigmoid(u)
        logits = self.linears[-1](h)
        return (logits, sigmoid_inputs) if return_sigmoid_inputs else logits


def flat_active_inputs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary inputs ``(N, D)`` as one list of active positions ``(nnz,)`` and each row's start ``(N,)``."""
    if not bool(((x == 0) | (x == 1)).all()):
        raise ValueError("flat_active_inputs: the inputs must be binary (0 or 1)")
    rows, cols = x.nonzero(as_tuple=True)
    counts = torch.bincount(rows, minlength=x.shape[0])
    return cols, torch.cumsum(counts, 0) - counts


def _bn_refs(norm: BatchNorm1d):
    return (norm, norm.weight, norm.bias, norm.running_mean, norm.running_var, norm.num_batches_tracked)


class BinaryInputSGD:
    """Plain SGD for a :class:`SigmoidMLP` on binary inputs, the backward written out by hand.

    Forward per hidden layer: z = h W^T (+ b), u = BN(z) (training mode; the native kernel also
    updates the running statistics) or u = z, h' = sigmoid(u). Output p = softmax(h W^T + b), loss
    the mean cross-entropy. Backward (every gradient is linear in dlogits, so the 1/N is applied
    with the learning rate):
        dlogits = (p - onehot) / N
        dW = dz^T h,  db = sum dz,  dh = dz W
        du = dh * s * (1 - s)                                   (sigmoid, s = sigmoid(u))
        dz, dgamma, dbeta = BN backward (Ioffe & Szegedy 2015, section 3)
    then every parameter moves by -lr times its gradient: the same step as autograd followed by
    ``torch.optim.SGD`` (a test checks it), in about a third of the ops, with each weight update
    fused into its product (``addmm_``).

    The first layer exploits binary inputs (:mod:`bnlab.kernels.binary_linear`): its forward and
    its update are sums over each example's active inputs, read from the training set's
    ``index``/``starts`` lists (``active_lists``), on a transposed working copy ``w1t`` of the
    first weight. ``w1t`` is the master copy while training: :meth:`sync_` writes it back into the
    model (before evaluating or saving) and :meth:`reload_` reads it from the model (after loading
    a checkpoint).

    A batch with non-finite statistics is not guarded against here: the same step would carry the
    NaN into every weight, so the run is lost either way (the experiment stops on a NaN).
    """

    def __init__(self, model: SigmoidMLP, lr: float, index: torch.Tensor, starts: torch.Tensor):
        self.model = model
        self.lr = lr
        self.index, self.starts = index.numpy(), starts.numpy()  # views: shared, not copied
        self.w1t = model.linears[0].weight.detach().t().contiguous()  # (out, in) -> (in, out)
        self.scratch = np.empty(self.w1t.shape[1], self.w1t.numpy().dtype)
        # Plain references, looked up once: nn.Module attribute access costs a microsecond a time,
        # and a step is a few hundred microseconds. load_state_dict copies in place, so they hold.
        self.hidden = [
            (linear.weight, linear.bias, _bn_refs(norm) if model.batch_norm else None)
            for linear, norm in zip(model.linears[:-1], model.norms)
        ]
        self.out = (model.linears[-1].weight, model.linears[-1].bias)
        self.counts = [refs[2][5] for refs in self.hidden if refs[2] is not None]  # num_batches_tracked

    @torch.no_grad()
    def sync_(self) -> None:
        self.model.linears[0].weight.copy_(self.w1t.t())

    @torch.no_grad()
    def reload_(self) -> None:
        self.w1t.copy_(self.model.linears[0].weight.t())

    @torch.no_grad()
    def first_layer(self, index, offsets) -> torch.Tensor:
        """x W1^T ``(N, out)`` for any binary x given as ``flat_active_inputs(x)``."""
        return torch.nn.functional.embedding_bag(index, self.w1t, offsets, mode="sum")

    @torch.no_grad()
    def first_layer_of(self, ids: torch.Tensor) -> torch.Tensor:
        """x W1^T ``(B, out)`` for the training examples ``ids``."""
        z = torch.empty(len(ids), self.w1t.shape[1], dtype=self.w1t.dtype)
        binary_forward(ids.numpy(), self.index, self.starts, self.w1t.numpy(), z.numpy())
        return z

    @torch.no_grad()
    def step(self, ids: torch.Tensor, target_onehot: torch.Tensor) -> None:
        """One step on the training examples ``ids`` ``(B,)`` with their one-hot targets ``(B, classes)``."""
        n = len(ids)
        h = self.first_layer_of(ids)
        activations, saved = [None], []
        for k, (weight, bias, norm) in enumerate(self.hidden):
            z = h if k == 0 else torch.mm(h, weight.t())
            if norm is not None:
                module, gamma, beta, running_mean, running_var, _ = norm
                u, mean, invstd = torch.native_batch_norm(
                    z, gamma, beta, running_mean, running_var, True, module.batch_weight(), module.eps
                )
                saved.append((z, mean, invstd))
            else:
                u = z.add_(bias)
            h = u.sigmoid_()
            activations.append(h)
        out_weight, out_bias = self.out
        p = torch.softmax(torch.addmm(out_bias, h, out_weight.t()), dim=1)
        # dlogits = (p - onehot) / n; every gradient is linear in it, so 1/n joins lr at the end.
        dz = p.sub_(target_onehot)
        alpha = -self.lr / n
        params, grads = [out_bias], [dz.sum(0)]
        dh = torch.mm(dz, out_weight)  # before the weight moves: SGD uses the old weights
        out_weight.addmm_(dz.t(), h, alpha=alpha)  # W <- W - lr dW, the product fused into the update
        for k in reversed(range(len(self.hidden))):
            weight, bias, norm = self.hidden[k]
            du = torch.ops.aten.sigmoid_backward(dh, activations[k + 1])
            if norm is not None:
                z, mean, invstd = saved[k]
                dz, dgamma, dbeta = F.batch_norm_backward(du, z, mean, invstd, norm[1], backend="native")
                params += [norm[1], norm[2]]
                grads += [dgamma, dbeta]
            else:
                dz = du
                params.append(bias)
                grads.append(dz.sum(0))
            if k > 0:
                dh = torch.mm(dz, weight)
                weight.addmm_(dz.t(), activations[k], alpha=alpha)
            else:
                binary_update(ids.numpy(), self.index, self.starts, dz.contiguous().numpy(), self.w1t.numpy(),
                              alpha, self.scratch)
        torch._foreach_add_(params, grads, alpha=alpha)
        if self.counts:
            torch._foreach_add_(self.counts, 1)
