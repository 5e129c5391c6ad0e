"""The model zoo: plain Flax Linen modules that know nothing of gates.

``create_model(spec)`` builds a model from a JSON-able spec (the dict a ticket stores)::

    {"name": "lenet300", "num_classes": 10, "weight_init": "signed_kaiming", "init_scale": None,
     "use_bias": False, "width": 1.0, "activation": "relu", "negative_slope": None}

``activation`` (``relu``, or ``leaky_relu`` with a fixed ``negative_slope``, None: 0.25;
``slt_jax.models.mlp``) is the MLPs' only; a spec without it (a ticket saved before it existed)
means ``relu``, and any other model refuses a value but ``relu``.

Every model is called as ``model.apply(variables, x, train=...)`` on NHWC float images.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn

from slt_jax.models.convnets import ConvNet, conv_channels
from slt_jax.models.inits import weight_init
from slt_jax.models.mlp import MLP, negative_slope_of
from slt_jax.models.resnet import RESNETS, ResNet
from slt_jax.models.swin import SWINS, Swin
from slt_jax.models.vit import VITS, ViT


def _mlp(hidden):
    return lambda spec, kinit: MLP(tuple(int(h * spec.get("width", 1.0)) for h in hidden),
                                   spec["num_classes"], spec.get("use_bias", False), kinit,
                                   spec.get("activation", "relu"), spec.get("negative_slope"))


def _conv(depth):
    def build(spec, kinit):
        width = spec.get("width", 1.0)
        return ConvNet(conv_channels(depth, width), spec["num_classes"], (int(256 * width),) * 2,
                       spec.get("use_bias", False), kinit)

    return build


def _resnet(name, stem):
    return lambda spec, kinit: ResNet(**RESNETS[name], num_classes=spec["num_classes"], stem=stem,
                                      width=spec.get("width", 1.0), use_bias=spec.get("use_bias", False),
                                      kernel_init=kinit)


def _transformer(cls, arch):
    return lambda spec, kinit: cls(**arch, num_classes=spec["num_classes"], width=spec.get("width", 1.0),
                                   use_bias=spec.get("use_bias", False), kernel_init=kinit)


MODELS: dict[str, Callable[[dict[str, Any], Any], nn.Module]] = {
    "digits_mlp": _mlp((256, 256)),
    "lenet300": _mlp((300, 100)),
    "conv2": _conv(2),
    "conv4": _conv(4),
    "conv6": _conv(6),
    "conv8": _conv(8),
    # ResNets: the name picks the stem (CIFAR 3x3 stride 1; "_imagenet": 7x7 stride 2 + max-pool).
    **{name: _resnet(name, "cifar") for name in RESNETS},
    **{f"{name}_imagenet": _resnet(name, "imagenet") for name in RESNETS},
    # Transformers pick patch (and Swin window) sizes from the input size.
    **{name: _transformer(ViT, arch) for name, arch in VITS.items()},
    **{name: _transformer(Swin, arch) for name, arch in SWINS.items()},
}
# The models whose hidden nonlinearity ``activation`` picks; the others are ReLU (or GELU) networks.
ACTIVATION_MODELS = ("digits_mlp", "lenet300")


def check_activation(name: str, activation: str, negative_slope: float | None) -> None:
    """Raises ValueError, in one line naming the value and what is allowed, for an activation or slope
    no MLP takes, or an activation but ReLU on a model other than the MLPs."""
    negative_slope_of(activation, negative_slope)
    if activation != "relu" and name not in ACTIVATION_MODELS:
        raise ValueError(f"activation={activation!r} with model {name!r}; allowed: activation='relu', or a model "
                         f"of {', '.join(ACTIVATION_MODELS)}")


def create_model(spec: dict[str, Any]) -> nn.Module:
    """The Flax module named ``spec["name"]``, with its weight initialisation."""
    name = spec["name"]
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(sorted(MODELS))}")
    check_activation(name, spec.get("activation", "relu"), spec.get("negative_slope"))
    kinit = weight_init(spec.get("weight_init", "signed_kaiming"), spec.get("init_scale"))
    return MODELS[name](spec, kinit)
