"""Compile a structured ticket to a physically smaller dense model.

In a structured ticket a closed gate removes a whole output unit (Dense) or channel (Conv),
bias included, so the unit outputs relu(0) = 0 and nothing downstream can tell it exists.
Deleting it (its column in the layer, its row in the next layer) therefore changes no output:
the compact model computes exactly the masked model's logits, with fewer FLOPs.
The classifier's outputs are never deleted: a closed class unit keeps a zero column.

Supported: the MLPs (``digits_mlp``, ``lenet300``) and ``conv2``..``conv8``.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import numpy as np

from slt_jax import masking
from slt_jax.models.convnets import ConvNet
from slt_jax.models.mlp import MLP

COMPACTABLE = ("digits_mlp", "lenet300", "conv2", "conv4", "conv6", "conv8")


def _layers(params: dict[str, Any], prefix: str) -> list[str]:
    return sorted((k for k in params if k.startswith(prefix + "_")), key=lambda k: int(k.split("_")[-1]))


def _unit_keep(ticket, layer: str, width: int) -> np.ndarray:
    gate = masking.named_leaves(ticket.gate_masks).get(f"{layer}/kernel")
    if gate is None:
        return np.ones(width, bool)
    return np.asarray(gate, bool).reshape(-1)


def compact_ticket(ticket) -> tuple[nn.Module, dict[str, Any]]:
    """(module, params) of the smaller dense model; ``module.apply({"params": params}, x)`` equals
    the ticket's masked model on every input."""
    spec = ticket.meta["model"]
    if spec["name"] not in COMPACTABLE:
        raise ValueError(f"model {spec['name']!r} cannot be compacted; allowed: {', '.join(COMPACTABLE)}")
    if not ticket.meta["structured"]:
        raise ValueError("only a structured ticket (one gate per unit) can be compacted; this one gates each weight")
    params = {k: {n: np.asarray(v) for n, v in layer.items()} for k, layer in ticket.masked_params().items()}
    convs, denses = _layers(params, "Conv"), _layers(params, "Dense")
    new: dict[str, dict[str, np.ndarray]] = {}
    keep_in = None  # kept input channels / features of the current layer

    for name in convs:
        kernel = params[name]["kernel"]
        keep = _unit_keep(ticket, name, kernel.shape[-1])
        kernel = kernel if keep_in is None else kernel[:, :, keep_in, :]
        new[name] = {"kernel": kernel[..., keep]}
        if "bias" in params[name]:
            new[name]["bias"] = params[name]["bias"][keep]
        keep_in = keep

    for i, name in enumerate(denses):
        kernel = params[name]["kernel"]
        last = i == len(denses) - 1
        keep = np.ones(kernel.shape[-1], bool) if last else _unit_keep(ticket, name, kernel.shape[-1])
        if keep_in is not None:
            if i == 0 and convs:  # rows of the first Dense are the flattened (h, w, c) features
                channels = len(keep_in)
                kernel = kernel.reshape(-1, channels, kernel.shape[-1])[:, keep_in, :].reshape(-1, kernel.shape[-1])
            else:
                kernel = kernel[keep_in, :]
        new[name] = {"kernel": kernel[:, keep]}
        if "bias" in params[name]:
            new[name]["bias"] = params[name]["bias"][keep]
        keep_in = keep

    use_bias = spec.get("use_bias", False)
    hidden = tuple(int(new[d]["kernel"].shape[-1]) for d in denses[:-1])
    if convs:
        module = ConvNet(tuple(int(new[c]["kernel"].shape[-1]) for c in convs), spec["num_classes"],
                         dense=hidden, use_bias=use_bias)
    else:
        module = MLP(hidden, spec["num_classes"], use_bias=use_bias)
    return module, new


def count_macs(params: dict[str, Any], input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass of an MLP or ConvNet with these params."""
    h, w = input_shape[0], input_shape[1]
    total = 0
    convs = _layers(params, "Conv")
    for i, name in enumerate(convs):
        total += int(np.prod(params[name]["kernel"].shape)) * h * w
        if i % 2 == 1:  # a 2x2 max-pool after every pair of convolutions
            h, w = h // 2, w // 2
    total += sum(int(math.prod(params[d]["kernel"].shape)) for d in _layers(params, "Dense"))
    return total


