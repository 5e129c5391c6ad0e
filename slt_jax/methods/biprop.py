"""biprop / multi-prize tickets (Diffenderfer & Kailkhura, ICLR 2021), MPT-1/32: edge-popup's masks
over binarised weights.

The scores, their top-k (per layer or global) and the straight-through gradient are edge-popup's
(``slt_jax.methods.edgepopup``), as is the recipe (SGD, momentum 0.9, weight decay 1e-4, cosine).
What the network computes with differs: on each gated leaf::

    w_eff = m * sign(w0) * alpha,    alpha = sum(|w0| m) / sum(m)

the kept weights' signs, scaled by their mean magnitude (a per-layer gain the mask sets; the
gradient reaches the scores through alpha too). Activations stay float (MPT-1/32). The ticket
stores no floats: its ``frozen_params()`` are ``sign(w0) * alpha``
(``slt_jax.frozen.binarized_weights``), a function of the seed and the mask, so every weight the
ticket uses is exactly its frozen value or 0.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from slt_jax import masking
from slt_jax.frozen import binarized_weights
from slt_jax.methods.edgepopup import EdgePopup

GateTree = Any  # params-shaped: an array per gated leaf, None elsewhere


@dataclasses.dataclass(frozen=True)
class Biprop(EdgePopup):
    """Edge-popup's scores and top-k over binarised weights; see the module docstring."""

    name: str = "biprop"
    ticket_weights: ClassVar[str | None] = "binarized"  # slt_jax.frozen.MASKED_WEIGHTS: the ticket replays it

    def masked_params(self, params: Any, masks: GateTree) -> Any:
        """``m * sign(w0) * alpha`` on gated leaves, alpha the kept weights' mean magnitude."""
        return masking.apply_masks(binarized_weights(params, masks), masks)
