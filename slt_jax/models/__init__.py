"""The model zoo: plain Flax Linen modules that know nothing of gates.

``create_model(spec)`` builds a model from a JSON-able spec (the dict a ticket stores)::

    {"name": "lenet300", "num_classes": 10, "weight_init": "signed_kaiming", "init_scale": None,
     "use_bias": False, "width": 1.0}

Every model is called as ``model.apply(variables, x, train=...)`` on NHWC float images.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn

from slt_jax.models.convnets import CONV_WIDTHS, ConvNet
from slt_jax.models.inits import weight_init
from slt_jax.models.mlp import MLP


def _mlp(hidden):
    return lambda spec, kinit: MLP(tuple(int(h * spec.get("width", 1.0)) for h in hidden),
                                   spec["num_classes"], spec.get("use_bias", False), kinit)


def _conv(depth):
    return lambda spec, kinit: ConvNet(CONV_WIDTHS[depth], spec["num_classes"], spec.get("width", 1.0),
                                       spec.get("use_bias", False), kinit)


MODELS: dict[str, Callable[[dict[str, Any], Any], nn.Module]] = {
    "digits_mlp": _mlp((256, 256)),
    "lenet300": _mlp((300, 100)),
    "conv2": _conv(2),
    "conv4": _conv(4),
    "conv6": _conv(6),
    "conv8": _conv(8),
}


def create_model(spec: dict[str, Any]) -> nn.Module:
    """The Flax module named ``spec["name"]``, with its weight initialisation."""
    name = spec["name"]
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(sorted(MODELS))}")
    kinit = weight_init(spec.get("weight_init", "signed_kaiming"), spec.get("init_scale"))
    return MODELS[name](spec, kinit)
