"""IteRand (Chijiwa et al., NeurIPS 2021): edge-popup, and every K steps the pruned weights are re-drawn.

The scores, their top-k, the straight-through gradient and the recipe are edge-popup's
(``slt_jax.methods.edgepopup``). In addition, after every ``redraw_every`` steps (the paper's
K_per = 300) each weight that the current top-k prunes is, with probability ``redraw_fraction``
(r = 0.1, the paper's partial "bernoulli" re-randomisation), replaced by a fresh draw from its
initial distribution; kept weights never change::

    after step j K:   w <- w^(j)  if m = 0 and u < r  (u ~ U[0, 1), one per weight)
                      w <- w      otherwise

w^(j) is the network's initialiser run again on its own key, ``fold_in(weights_key(seed), j)``
(``slt_jax.frozen.init_variables(..., generation=j)``), so every weight is a pure function of the
seed and its *generation*: the index j of its last re-draw, 0 if never re-drawn. The method's
state holds the generation of every gated weight (int32, shaped like the gates). The ticket
stores the kept weights' generations (small integers, no floats) and its ``frozen_params()``
replays them (``slt_jax.frozen.redrawn_weights``): every weight the ticket uses is exactly its
regenerated value, as for every other method.

The re-draw runs between steps, outside the jitted train step (in the paper it follows an
optimiser step): when ``is_redraw_step(t)``, a loop calls ``redraw`` and feeds the returned weights
to the following steps. Needs one gate per weight (a pruned unit's weights are not "pruned
weights" of the reference).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from slt_jax import masking
from slt_jax.methods.edgepopup import EdgePopup

Array = jax.Array
GateTree = Any  # params-shaped: an array per gated leaf, None elsewhere


@dataclasses.dataclass(frozen=True)
class IteRand(EdgePopup):
    """Edge-popup with partial re-draws of the pruned weights; see the module docstring."""

    redraw_every: int = 300
    redraw_fraction: float = 0.1
    name: str = "iterand"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.redraw_every, bool) or not isinstance(self.redraw_every, int) or self.redraw_every < 1:
            raise ValueError(f"redraw_every={self.redraw_every!r}; allowed: an integer >= 1 (steps between re-draws)")
        if not 0.0 < self.redraw_fraction <= 1.0:
            raise ValueError(f"redraw_fraction={self.redraw_fraction!r}; allowed: a number in (0, 1]")

    def init_state(self, gates: GateTree | None = None) -> dict[str, Any]:
        """Every gated weight's generation, 0 (the seed's own weights); shaped like ``gates``."""
        if gates is None:
            raise ValueError("IteRand's state holds a generation per weight: call init_state(gates)")
        return {"generation": jax.tree.map(lambda g: jnp.zeros(jnp.shape(g), jnp.int32), gates)}

    def is_redraw_step(self, step: int) -> bool:
        """Whether a re-draw follows step ``step`` (1-based count of steps done): every ``redraw_every``
        steps, none after the last step (it would change no weight the ticket uses)."""
        return 0 < step < self.num_steps and step % self.redraw_every == 0

    def redraw(self, key: Array, gates: GateTree, state: dict[str, Any], params: Any, candidate: Any,
               event: int | Array) -> tuple[dict[str, Any], Any]:
        """The ``event``-th re-draw: ``(state, params)`` after it. Traceable.

        ``params``: the weights the network computes with now; ``candidate``: the initialiser's
        weights of generation ``event`` (same tree). A gated weight that ``binary_masks(gates)``
        prunes takes its candidate value with probability ``redraw_fraction`` (coin from
        ``fold_in(fold_in(key, event), leaf index)``) and its generation becomes ``event``.
        """
        masks = self.binary_masks(gates)
        index = {name: i for i, name in enumerate(masking.named_leaves(masks))}
        event_key = jax.random.fold_in(key, event)
        is_none = lambda x: x is None  # noqa: E731 - ungated leaves keep their weights and have no generation

        def taken(path, m):  # the pruned weights this re-draw replaces
            coin = jax.random.bernoulli(jax.random.fold_in(event_key, index[masking.path_name(path)]),
                                        self.redraw_fraction, jnp.shape(m))
            return coin & ~m

        take = jax.tree_util.tree_map_with_path(taken, masks)
        generation = jax.tree.map(lambda t, g: g if t is None else jnp.where(t, event, g), take, state["generation"],
                                  is_leaf=is_none)
        weights = jax.tree.map(lambda t, w, c: w if t is None else jnp.where(t, c, w), take, params, candidate,
                               is_leaf=is_none)
        return {**state, "generation": generation}, weights
