"""Compile a structured ticket to a physically smaller dense model.

In a structured ticket a closed gate removes a whole output unit (Dense) or channel (Conv),
bias included, so the unit's pre-activation is exactly 0 on every input. A unit is deleted (its
column in the layer, its row in the next) only where what it passes on is then exactly zero, or
a constant folded into the next layer, so the compact model computes the masked model's logits
(up to float summation order) with fewer multiply-accumulates. The classifier's outputs are never
deleted: a closed class unit keeps a zero column.

MLPs and ConvNets: a closed unit outputs relu(0) = 0 (an MLP's leaky_relu(0) = 0 too) and is
deleted; so is a unit whose every outgoing weight is closed (an input gate on the next layer), and
an MLP's input feature that no kept weight reads (input gates on the first layer: the compact model
selects the kept pixels).

ResNets (BasicBlock: ``resnet18``, ``resnet18_imagenet``), with non-affine BatchNorm applied with
its running statistics: a closed channel's conv output 0 becomes the constant
c = (0 - mean) * rsqrt(var + eps), which is not 0 in general. The running mean of a channel
that was always closed is exactly 0 (0.9 * 0 + 0.1 * 0 per step), but a ticket's statistics were
accumulated while the mask changed, so a channel closed late keeps a decayed, nonzero mean of
either sign. Hence:

* inner channels (a block's first conv): after ReLU a closed channel is the constant
  k = relu(c) >= 0 everywhere. It is deleted from that conv, its BatchNorm statistics and the
  second conv's input; its contribution to the second conv, k * W[:, :, channel, :] summed over
  the taps that fall inside the zero-padded image, is the same 3x3 conv applied to an all-ones
  image with kernel sum_channels k * W[:, :, channel, :], which the compact block adds (``folded``;
  k = 0 when mean >= 0, and then there is nothing to fold);
* residual channels (stem output, block outputs, added to the shortcut): channel j of a block's
  output relu(body_j + shortcut_j) is exactly 0 on every input when both summands are <= 0
  everywhere: the body's second conv closed at j with mean_j >= 0 (so c_j <= 0), and the shortcut
  either the block input, itself 0 at j, or a projection closed at j with mean_j >= 0. Identity
  shortcuts give all the blocks between two projections one channel set, so a residual channel
  is deleted only where it is 0 at every point of that set (stem or projection output and every
  block output up to the next projection). Every other residual channel is kept: one closed in
  every conv that adds into it but with a negative (or NaN) mean in one of their norms is a
  constant c > 0 there, carried on by the identity shortcuts.

ViTs (``vit_tiny``, ``vit_small``, ``vit_base``; heads gated as ``slt_jax.masking`` does): a head
whose value projection is closed (kernel and bias) attends to zeros, and one whose slice of the
output projection is closed passes nothing on, so either is deleted from all four projections;
a closed query or key alone leaves uniform attention over the values, and the head stays. An MLP
unit goes when its first-layer column and bias are closed (gelu(0) = 0) or its second-layer row
is. The residual stream keeps its width: the LayerNorms average over every channel, zeros
included. A block keeps at least one head (deleting the last would leave no attention module for
the output projection's bias); its output is exactly 0 all the same.

Supported: the MLPs (``digits_mlp``, ``lenet300``), ``conv2``..``conv8``, ``resnet18``,
``resnet18_imagenet`` and the ViTs; and a user's own Linen model whose Dense and Conv layers form a
chain (``slt_jax.chain_compaction``), any other refused in one line naming the layers it cannot take.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from slt_jax.models import create_model
from slt_jax.models.convnets import ConvNet
from slt_jax.models.mlp import MLP
from slt_jax.models.resnet import RESNETS
from slt_jax.models.vit import VITS

FEEDFORWARD = ("digits_mlp", "lenet300", "conv2", "conv4", "conv6", "conv8")
COMPACT_RESNETS = ("resnet18", "resnet18_imagenet")
COMPACTABLE = FEEDFORWARD + COMPACT_RESNETS + tuple(VITS)
BN_EPSILON = 1e-5  # slt_jax.models.resnet's BatchNorm epsilon: the compact ResNet normalises as it does
# Compact models are only applied to the params compaction makes; a zeros init (unlike a fan-scaled one)
# also initialises a layer that lost every unit, whose kernel has a 0-sized axis.
PLACEHOLDER_INIT = nn.initializers.zeros


def _layers(params: dict[str, Any], prefix: str) -> list[str]:
    return sorted((k for k in params if k.startswith(prefix + "_")), key=lambda k: int(k.split("_")[-1]))


def _live(layer: dict[str, np.ndarray]) -> np.ndarray:
    """Output units whose masked kernel column (or bias) has a nonzero: every other unit's
    pre-activation is exactly 0 on every input (a closed structured gate zeroes both)."""
    kernel = layer["kernel"]
    live = np.any(kernel != 0, axis=tuple(range(kernel.ndim - 1)))
    return live | (layer["bias"] != 0) if "bias" in layer else live


def _aligned(keep: np.ndarray, multiple: int) -> np.ndarray:
    """``keep`` and as many of the first dropped units as bring the count to a multiple of ``multiple``
    (or to all units): keeping a unit is always exact, it only costs its multiply-accumulates."""
    extra = np.flatnonzero(~keep)[: -int(keep.sum()) % multiple]
    out = keep.copy()
    out[extra] = True
    return out


def compact_ticket(ticket, multiple: int = 1) -> tuple[nn.Module, dict[str, Any]]:
    """(module, variables) of the smaller dense model; ``module.apply(variables, x)`` equals the
    ticket's masked model (in inference mode, with the ticket's BatchNorm statistics) on every
    input. ``variables`` holds ``params``, and ``batch_stats`` for a ResNet.

    ``multiple``: each layer keeps its first deleted units back until it has a multiple of this
    many (or all). Still exact, at the cost of their multiply-accumulates; XLA's CPU convolutions
    run markedly faster on channel counts that are multiples of 8."""
    if isinstance(multiple, bool) or not isinstance(multiple, (int, np.integer)) or multiple < 1:
        raise ValueError(f"multiple={multiple!r}; allowed: a positive integer (1: keep only the live units)")
    spec = ticket.meta.get("model")
    if spec is not None and spec["name"] not in COMPACTABLE:
        raise ValueError(f"model {spec['name']!r} cannot be compacted; allowed: {', '.join(COMPACTABLE)}")
    if not ticket.meta.get("structured"):
        raise ValueError("only a structured ticket (one gate per unit) can be compacted; this one gates each weight")
    if spec is None:  # a user's own model: its Dense and Conv layers, if they form a chain
        from slt_jax.chain_compaction import compact_chain

        return compact_chain(ticket, multiple)
    params = jax.tree.map(np.asarray, ticket.masked_params())
    if spec["name"] in COMPACT_RESNETS:
        return _compact_resnet(spec, params, jax.tree.map(np.asarray, ticket.model_state()["batch_stats"]), multiple)
    if spec["name"] in VITS:
        return _compact_vit(spec, params, multiple)
    return _compact_feedforward(spec, params, multiple)


def _rows_by_input(kernel: np.ndarray, channels: int | None) -> np.ndarray:
    """``kernel`` as (inputs, ..., outputs) with one leading entry per input unit: a Conv's input
    channels, a Dense's rows, or (``channels`` given) the channels of the flattened (h, w, c)
    features a Dense after the convolutions reads."""
    if kernel.ndim > 2:  # a Conv's kernel: (*window, inputs, outputs)
        return np.moveaxis(kernel, -2, 0)
    if channels is not None:
        return np.moveaxis(kernel.reshape(-1, channels, kernel.shape[-1]), 1, 0)
    return kernel


def _feedforward_keeps(params: dict[str, Any], layers: list[str], flattened: list[int | None]) -> list[np.ndarray]:
    """Kept units of the network input (MLPs: its features; ConvNets: its channels, all kept) and
    of every layer's output, by two sweeps over the masked kernels:

    * forward: a unit is live if its column has a nonzero on a live input, or it has a nonzero bias;
      any other unit outputs relu(0) = 0 on every input;
    * backward: a live unit is kept only if a kept unit of the next layer reads it with a nonzero
      weight (its row there, e.g. closed by an input gate); otherwise nothing depends on it.
    The classifier's outputs are always kept. ``flattened[i]``: the channels of the flattened
    features layer i reads (a Dense after the convolutions), else None."""
    def rows(i: int) -> np.ndarray:
        return _rows_by_input(params[layers[i]]["kernel"], flattened[i])

    n_in = rows(0).shape[0]
    live = [np.ones(n_in, bool)]
    for i, name in enumerate(layers):
        r = rows(i)[live[-1]]
        unit = np.any(r != 0, axis=tuple(range(r.ndim - 1)))
        live.append(unit | (params[name]["bias"] != 0) if "bias" in params[name] else unit)
    keeps = live[:]
    keeps[-1] = np.ones_like(live[-1])
    for i in range(len(layers) - 1, -1, -1):
        r = rows(i)[..., keeps[i + 1]]
        keeps[i] = live[i] & np.any(r != 0, axis=tuple(range(1, r.ndim)))
    if params[layers[0]]["kernel"].ndim > 2:
        keeps[0] = np.ones(n_in, bool)  # an image's channels are not deleted
    return keeps


def _narrowed_layers(params: dict[str, Any], layers: list[str], keeps: list[np.ndarray],
                     flattened: list[int | None]) -> dict[str, dict[str, np.ndarray]]:
    """Each layer's kernel (and bias) without the inputs and outputs ``keeps`` drops."""
    new: dict[str, dict[str, np.ndarray]] = {}
    for i, name in enumerate(layers):
        kernel, keep_in, keep = params[name]["kernel"], keeps[i], keeps[i + 1]
        if kernel.ndim > 2:
            kernel = kernel[..., keep_in, :]
        elif flattened[i] is not None:  # rows are the flattened (h, w, c) features
            kernel = kernel.reshape(-1, len(keep_in), kernel.shape[-1])[:, keep_in, :].reshape(-1, kernel.shape[-1])
        else:
            kernel = kernel[keep_in, :]
        new[name] = {"kernel": kernel[..., keep]}
        if "bias" in params[name]:
            new[name]["bias"] = params[name]["bias"][keep]
    return new


class SelectInputs(nn.Module):
    """The compact MLP of a ticket that closed input features (input gates on its first layer):
    the flattened input's kept features, ``features``, then ``body``."""

    features: tuple[int, ...]
    body: nn.Module

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        # int64: an empty tuple (every input closed) would otherwise index as float64.
        return self.body(x.reshape(x.shape[0], -1)[:, np.asarray(self.features, np.int64)], train)


def _compact_feedforward(spec: dict[str, Any], params: dict[str, Any],
                         multiple: int) -> tuple[nn.Module, dict[str, Any]]:
    convs, denses = _layers(params, "Conv"), _layers(params, "Dense")
    layers = convs + denses
    flattened: list[int | None] = [None] * len(layers)
    if convs:  # the first Dense reads the last conv's flattened (h, w, c) features
        flattened[len(convs)] = params[convs[-1]]["kernel"].shape[-1]
    keeps = _feedforward_keeps(params, layers, flattened)
    keeps = [keeps[0]] + [_aligned(k, multiple) for k in keeps[1:-1]] + [keeps[-1]]
    new = _narrowed_layers(params, layers, keeps, flattened)

    use_bias = spec.get("use_bias", False)
    hidden = tuple(int(new[d]["kernel"].shape[-1]) for d in denses[:-1])
    if convs:
        module = ConvNet(tuple(int(new[c]["kernel"].shape[-1]) for c in convs), spec["num_classes"],
                         dense=hidden, use_bias=use_bias, kernel_init=PLACEHOLDER_INIT)
        return module, {"params": new}
    module = MLP(hidden, spec["num_classes"], use_bias=use_bias, kernel_init=PLACEHOLDER_INIT,
                 activation=spec.get("activation", "relu"), negative_slope=spec.get("negative_slope"))
    if keeps[0].all():
        return module, {"params": new}
    features = tuple(int(i) for i in np.flatnonzero(keeps[0]))
    return SelectInputs(features, module), {"params": {"body": new}}


# --- ResNets ---------------------------------------------------------------------------------


class BlockWidths(NamedTuple):
    """One compact BasicBlock: output channels of its first conv (``inner``) and of its second conv
    and shortcut (``out``), its stride, whether it has a projection shortcut, and whether closed
    inner channels left a constant folded into its second conv."""

    inner: int
    out: int
    strides: int
    projection: bool
    folded: bool


def _conv(features: int, size: int, strides: int = 1, name: str | None = None) -> nn.Conv:
    # As slt_jax.models.resnet: symmetric padding (size - 1) // 2, no bias.
    return nn.Conv(features, (size, size), strides, padding=(size - 1) // 2, use_bias=False,
                   kernel_init=PLACEHOLDER_INIT, name=name)


def _norm(name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=True, use_scale=False, use_bias=False, epsilon=BN_EPSILON, name=name)


class CompactBasicBlock(nn.Module):
    """slt_jax.models.resnet.BasicBlock with its own inner width, and the folded constant of the
    inner channels it lost: ``folded``, a 3x3 conv of an all-ones image (zero-padded like the
    second conv's input, so border positions see fewer taps), added before the second norm."""

    widths: BlockWidths

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        w = self.widths
        y = nn.relu(_norm("BatchNorm_0")(_conv(w.inner, 3, w.strides, "Conv_0")(x)))
        z = _conv(w.out, 3, name="Conv_1")(y)
        if w.folded:
            z = z + _conv(w.out, 3, name="folded")(jnp.ones((1, *z.shape[1:3], 1), z.dtype))
        z = _norm("BatchNorm_1")(z)
        shortcut = _norm("shortcut_norm")(_conv(w.out, 1, w.strides, "shortcut_conv")(x)) if w.projection else x
        return nn.relu(z + shortcut)


class CompactResNet(nn.Module):
    """An inference-only BasicBlock ResNet (``slt_jax.models.resnet.ResNet``'s layers and names,
    BatchNorm on running statistics) with per-block widths."""

    stem: str
    stem_width: int
    blocks: tuple[BlockWidths, ...]
    num_classes: int
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # inference only: the ticket's statistics are fixed
        if self.stem == "cifar":
            x = nn.relu(_norm("BatchNorm_0")(_conv(self.stem_width, 3, name="Conv_0")(x)))
        else:
            x = nn.relu(_norm("BatchNorm_0")(_conv(self.stem_width, 7, 2, "Conv_0")(x)))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i, widths in enumerate(self.blocks):
            x = CompactBasicBlock(widths, name=f"BasicBlock_{i}")(x)
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes, use_bias=self.use_bias, kernel_init=PLACEHOLDER_INIT, name="Dense_0")(x)


def _nonpositive_when_closed(conv: dict[str, np.ndarray], stats: dict[str, np.ndarray]) -> np.ndarray:
    """Channels that BatchNorm leaves <= 0 on every input: the conv's output is 0 there (closed)
    and mean >= 0, so (0 - mean) * rsqrt(var + eps) <= 0 whatever the rounding. A NaN mean is
    not >= 0, so it is never called so."""
    return ~_live(conv) & (stats["mean"] >= 0)


def _closed_constant(stats: dict[str, np.ndarray]) -> np.ndarray:
    """relu((0 - mean) * rsqrt(var + eps)): what BatchNorm then ReLU make of a closed channel."""
    return np.maximum(-stats["mean"].astype(np.float64), 0.0) / np.sqrt(stats["var"].astype(np.float64) + BN_EPSILON)


def _residual_keep(params: dict[str, Any], stats: dict[str, Any], blocks: list[str], multiple: int) -> list[np.ndarray]:
    """Kept channels of the residual stream at the stem output and at each block's output.

    A channel is 0 at a block's output when body and shortcut are both <= 0 there (module
    docstring); a block without projection passes its input's channels through, so the stream
    between projections keeps one channel set, and a channel leaves it only if it is 0 at all of
    its points."""
    zero = _nonpositive_when_closed(params["Conv_0"], stats["BatchNorm_0"])  # ReLU (and max-pool) keep 0
    segments = [[zero]]  # zero channels at each stream point, grouped by channel set
    for b in blocks:
        body = _nonpositive_when_closed(params[b]["Conv_1"], stats[b]["BatchNorm_1"])
        if "shortcut_conv" in params[b]:
            segments.append([])
            zero = body & _nonpositive_when_closed(params[b]["shortcut_conv"], stats[b]["shortcut_norm"])
        else:
            zero = body & zero
        segments[-1].append(zero)
    return [_aligned(~np.logical_and.reduce(seg), multiple) for seg in segments for _ in seg]


def _take(stats: dict[str, np.ndarray], keep: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[keep] for k, v in stats.items()}


def _compact_block(p: dict[str, Any], s: dict[str, Any], keep_in: np.ndarray, keep_out: np.ndarray,
                   strides: int, multiple: int) -> tuple[BlockWidths, dict[str, Any], dict[str, Any]]:
    """One block's widths, params and statistics: inner channels that are closed are deleted (their
    constant folded into the second conv), residual channels outside ``keep_in`` / ``keep_out``
    (0 everywhere) deleted."""
    constant = _closed_constant(s["BatchNorm_0"])
    inner = _aligned(_live(p["Conv_0"]) | ~np.isfinite(constant), multiple)  # a NaN or inf is left in place
    conv2 = p["Conv_1"]["kernel"]
    params = {"Conv_0": {"kernel": p["Conv_0"]["kernel"][:, :, keep_in, :][..., inner]},
              "Conv_1": {"kernel": conv2[:, :, inner, :][..., keep_out]}}
    stats = {"BatchNorm_0": _take(s["BatchNorm_0"], inner), "BatchNorm_1": _take(s["BatchNorm_1"], keep_out)}
    constant = constant[~inner]
    folded = bool(np.any(constant > 0))
    if folded:
        kernel = np.einsum("c,hwco->hwo", constant, conv2[:, :, ~inner, :][..., keep_out].astype(np.float64))
        params["folded"] = {"kernel": kernel[:, :, None, :].astype(conv2.dtype)}  # one input channel: the ones
    projection = "shortcut_conv" in p
    if projection:
        params["shortcut_conv"] = {"kernel": p["shortcut_conv"]["kernel"][:, :, keep_in, :][..., keep_out]}
        stats["shortcut_norm"] = _take(s["shortcut_norm"], keep_out)
    widths = BlockWidths(int(inner.sum()), int(keep_out.sum()), strides, projection, folded)
    return widths, params, stats


def _compact_resnet(spec: dict[str, Any], params: dict[str, Any],
                    stats: dict[str, Any], multiple: int) -> tuple[nn.Module, dict[str, Any]]:
    base, imagenet = spec["name"].removesuffix("_imagenet"), spec["name"].endswith("_imagenet")
    # As ResNet strides its blocks: 2 in the first block of stages 2-4.
    strides = [2 if stage > 0 and i == 0 else 1 for stage, n in enumerate(RESNETS[base]["blocks"]) for i in range(n)]
    blocks = _layers(params, "BasicBlock")
    keeps = _residual_keep(params, stats, blocks, multiple)
    new_params = {"Conv_0": {"kernel": params["Conv_0"]["kernel"][..., keeps[0]]}}
    new_stats = {"BatchNorm_0": _take(stats["BatchNorm_0"], keeps[0])}
    widths = []
    for i, b in enumerate(blocks):
        w, new_params[b], new_stats[b] = _compact_block(params[b], stats[b], keeps[i], keeps[i + 1],
                                                        strides[i], multiple)
        widths.append(w)
    new_params["Dense_0"] = {k: v[keeps[-1]] if k == "kernel" else v for k, v in params["Dense_0"].items()}
    module = CompactResNet("imagenet" if imagenet else "cifar", int(keeps[0].sum()), tuple(widths),
                           spec["num_classes"], spec.get("use_bias", False))
    return module, {"params": new_params, "batch_stats": new_stats}


# --- ViTs --------------------------------------------------------------------------------------


def _closed(layer: dict[str, np.ndarray], axis: int) -> np.ndarray:
    """Entries of ``axis`` whose kernel slice (and bias slice, if any) is all zeros."""
    kernel = layer["kernel"]
    closed = ~np.any(kernel != 0, axis=tuple(a for a in range(kernel.ndim) if a != axis))
    if "bias" in layer and layer["bias"].ndim == kernel.ndim - 1:  # query/key/value: (heads, head_dim)
        closed &= ~np.any(layer["bias"] != 0, axis=tuple(range(1, layer["bias"].ndim)))
    return closed


def _compact_vit_block(p: dict[str, Any], multiple: int) -> tuple[tuple[int, int], dict[str, Any]]:
    attention = p["attention"]
    keep_heads = ~(_closed(attention["value"], 1) | _closed(attention["out"], 0))
    if not keep_heads.any():
        keep_heads[0] = True
    mlp_in, mlp_out = p["Dense_0"], p["Dense_1"]
    keep_units = _aligned(_live(mlp_in) & np.any(mlp_out["kernel"] != 0, axis=1), multiple)
    new_attention = {name: {k: v[keep_heads] if k == "bias" else v[:, keep_heads] for k, v in attention[name].items()}
                     for name in ("query", "key", "value")}
    new_attention["out"] = {k: v[keep_heads] if k == "kernel" else v for k, v in attention["out"].items()}
    new = {"attention": new_attention,
           "Dense_0": {k: v[..., keep_units] for k, v in mlp_in.items()},
           "Dense_1": {k: v[keep_units] if k == "kernel" else v for k, v in mlp_out.items()}}
    return (int(keep_heads.sum()), int(keep_units.sum())), new


def _compact_vit(spec: dict[str, Any], params: dict[str, Any], multiple: int) -> tuple[nn.Module, dict[str, Any]]:
    blocks = _layers(params, "block")
    new, widths = dict(params), []
    for b in blocks:
        w, new[b] = _compact_vit_block(params[b], multiple)
        widths.append(w)
    return create_model(spec).clone(block_widths=tuple(widths), kernel_init=PLACEHOLDER_INIT), {"params": new}


def count_macs(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass on one example: for every Dense, DenseGeneral and
    Conv call, its output elements (per example) times the inputs each sums (its fan-in), and for
    every Flax attention call its two products (queries x keys, weights x values: 2 * tokens^2 *
    heads * head_dim; Swin's window attention computes its own and is not counted). Found by tracing
    ``module.init`` on shapes only; nothing is computed. A compact ResNet's ``folded`` conv runs on
    one all-ones image per batch, so counting it per example overstates the compact model. A layer
    called inside another counted call (a compact chain's narrowed layer, ``slt_jax.chain_compaction``)
    is part of that call's count."""
    total, depth = 0, 0  # depth: Dense/Conv calls in progress
    layers = (nn.Dense, nn.Conv, nn.DenseGeneral)

    def count(next_fun, args, kwargs, context):
        nonlocal total, depth
        layer = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        inside = depth > 0
        depth += isinstance(layer, layers)
        try:
            out = next_fun(*args, **kwargs)
        finally:
            depth -= isinstance(layer, layers)
        if inside:
            return out
        if isinstance(layer, layers):
            fan_in = args[0].shape[-1]
            if isinstance(layer, nn.Conv):
                fan_in = fan_in * math.prod(layer.kernel_size) // layer.feature_group_count
            if isinstance(layer, nn.DenseGeneral):
                fan_in = math.prod(args[0].shape[a] for a in np.atleast_1d(layer.axis))
            total += math.prod(out.shape[1:]) * fan_in
        elif isinstance(layer, nn.MultiHeadDotProductAttention):
            tokens = args[0].shape[-2]
            total += 2 * tokens * tokens * (layer.qkv_features or args[0].shape[-1])
        return out

    with nn.intercept_methods(count):
        jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, *input_shape), jnp.float32))
    return total
