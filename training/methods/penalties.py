"""The consolidation math of the regularization baselines: EWC's diagonal Fisher and the
quadratic penalty that EWC and SI share (pure functions of tensors and a network)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from hnet_serve.errors import InputError
from hnet_serve.targets import TargetNet


def quadratic_penalty(
    params: Sequence[torch.Tensor],
    anchors: Sequence[torch.Tensor],
    importance: Sequence[torch.Tensor],
) -> torch.Tensor:
    """``sum_i Omega_i (theta_i - theta*_i)^2`` over every tensor (EWC: Omega = Fisher)."""
    if not (len(params) == len(anchors) == len(importance)) or not params:
        raise InputError("params, anchors and importance must be equally long, non-empty lists")
    total = params[0].new_zeros(())
    for p, a, w in zip(params, anchors, importance):
        total = total + (w * (p - a).pow(2)).sum()
    return total


def diagonal_fisher(
    net: TargetNet,
    x: torch.Tensor,
    *,
    head: int = 0,
    num_classes: int | None = None,
    generator: torch.Generator | None = None,
    chunk: int = 64,
) -> list[torch.Tensor]:
    """Diagonal Fisher ``E_x E_{y ~ p(y|x)} [(d log p(y|x) / d theta)^2]`` of ``net``'s parameters.

    One label per example is sampled from the network's own prediction (the Fisher, not the
    "empirical Fisher" of the true labels). Per-example gradients come from ``vmap(grad(...))``
    in chunks of ``chunk`` rows; the network is evaluated in eval mode. Returns one tensor per
    parameter, in ``net.parameters()`` order.
    """
    if x.shape[0] == 0:
        raise InputError("the Fisher needs at least one example")
    names = [n for n, _ in net.named_parameters()]
    params = {n: p.detach() for n, p in net.named_parameters()}
    buffers = {n: b for n, b in net.named_buffers()}
    c = num_classes or net.config.num_classes

    def log_prob(p: dict[str, torch.Tensor], xi: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        out = functional_call(net, (p, buffers), (xi.unsqueeze(0),), {"head": head})  # (1, C)
        return (F.log_softmax(out[0, :c], dim=-1) * onehot).sum()  # log p(y | x)

    per_example = vmap(grad(log_prob), in_dims=(None, 0, 0))
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    was_training = net.training
    net.eval()
    try:
        for start in range(0, x.shape[0], chunk):
            xb = x[start : start + chunk]
            with torch.no_grad():
                probs = F.softmax(net(xb, head=head)[:, :c], dim=-1)  # (B, c)
            yb = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # (B,)
            grads = per_example(params, xb, F.one_hot(yb, c).to(xb.dtype))  # name -> (B, *shape)
            for n in names:
                fisher[n] += grads[n].pow(2).sum(0)
    finally:
        net.train(was_training)
    return [fisher[n] / x.shape[0] for n in names]
