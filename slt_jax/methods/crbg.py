"""CRBG: continuously relaxed Bernoulli gates (Tsayag & Lindenbaum 2026).

Loss, with d = mean over gates of P(z > 0) (the expected density, see ``slt_jax.gates``)::

    L = CE(f(x; W0 * z)) + lambda * (d - d_target) + beta_t * mean g (1 - g)

Densities count weights (given ``param_shapes``), as the ticket and the verifier count them
(``slt_jax.masking.kept_fraction``): one gate per weight counts 1, a unit's gate its fan-in and
bias, an input gate its row (and the column of the unit it closes), and a weight two gates touch
is kept with probability the product of theirs, so ``sparsity`` means the fraction of gated
weights removed either way.

* ``lambda_mode="dual"``: the ticket's density b (the fraction of weights the binary rule keeps)
  must not exceed d_target = 1 - sparsity, and lambda >= 0 is the multiplier. b is piecewise
  constant in the gates, so the gates' gradient comes from the smooth expected density d (a
  proxy constraint, Cotter et al. 2019; Gallego-Posada et al. 2022) while the multiplier answers
  to b itself, so the ticket lands on the requested sparsity rather than on a surrogate of it.
  The multiplier is a PI controller of the violation e = b - d_target
  (``slt_jax.methods.multiplier``); with ``dual_kp = 0`` (plain dual ascent) it overshot the
  target by several points.
  ``"fixed"``: lambda = ``lam`` throughout (d_target only shifts the loss).
* The temperature (sigma for the Gaussian gate) anneals geometrically from ``temp_start`` to
  ``temp_end``: less noise late in training lets gates settle.
* The decision term (g = deterministic gate) ramps linearly from 0 to ``decision_weight`` over
  the second half of training; it pushes gates to exactly 0 or 1 so that the binary ticket
  computes what the trained stochastic network computed.
* The ticket (``binary_rule``): ``"threshold"`` keeps a weight iff its deterministic gate exceeds
  1/2; ``"rank"`` keeps the round((1 - sparsity) n) gates with the largest parameters over all
  gated leaves (counting gates, so meant for one gate per weight), which hits the target exactly.
  The multiplier answers to the threshold rule's density either way.
* How the budget is spread over the gated leaves (``density_constraint``). Leaf l holds n_l gated
  weights (``slt_jax.masking.weights_per_gate`` times its gates), a share s_l = n_l / sum_k n_k; d_l and b_l are
  its expected and binary densities, so d = sum_l s_l d_l and b = sum_l s_l b_l.

  - ``"global"``: the one constraint b <= d_target above; the split over leaves is learnt.
  - ``"per_layer"``: b_l <= t_l = d_target for every leaf (per-layer edge-popup's allocation).
  - ``"erk"``: b_l <= t_l = min(1, eps (sum of leaf l's dims) / (product of its dims)), the
    Erdos-Renyi-kernel allocation (Mocanu et al. 2018; Evci et al. 2020), eps solved so that
    sum_l s_l t_l = d_target; a dense layer's t_l ~ eps (1/fan_in + 1/fan_out), so small and
    lopsided layers (a classifier) are kept denser. Computed on the gate leaves' shapes: unit gates
    (1-D leaves) all get the same t_l, i.e. ``"per_layer"``.
  - ``"fan_in"``: b_l <= t_l = clip(1 - c sqrt(fan_in_l), 0, 1), c solved so that
    sum_l s_l t_l = d_target, fan_in_l = the product of leaf l's dims but the last (a 1-D leaf:
    its length): what a global top-k over scores |s| ~ U(0, 1/sqrt(fan_in_l)) keeps, i.e. global
    edge-popup's allocation at its initialisation. It can empty a leaf (t_l = 0) whose fan-in is
    large.

  The per-leaf modes have a multiplier per leaf, each a PI controller of e_l = b_l - t_l, and::

      L = CE + sum_l lambda_l (d_l - t_l) + beta_t mean g (1 - g)

  Each term is in density units, as the global one, so the controller's gains act on every leaf's
  density as on the total; a gate's penalty gradient is lambda_l / n_l dP(z > 0)/dmu, so a small
  leaf (a classifier) is held with a small lambda_l. (Weighting each term by s_l instead would give
  the global penalty at equal multipliers, but a small leaf then needs lambda_l ~ 1/s_l, which the
  controller reaches too slowly: LeNet's classifier stayed at 68% sparsity for a 90% target.)

* ``gate_margin`` m > 0 (Gaussian family): after every Adam step mu is projected into
  [-m, 1 + m]. Unbounded, Adam's normalised steps carry the penalty's small but steady gradient
  lambda/N phi(mu/sigma)/sigma on a closed gate at up to the full learning rate, so mu sinks
  below -3 sigma, where z > 0 (the only case in which the data loss reaches the gate) has
  probability Phi(mu/sigma) < 0.1%: the gate is out of the search (61-88% of the gates of
  LeNet-300-100 tickets at 90%). The bound keeps every gate within reach of the noise,
  P(z > 0) >= Phi(-m/sigma); on LeNet it did not raise accuracy (benchmarks/crbg_study.py).

Only the gate parameters are optimised, by Adam. The defaults are the recipe ``run.py`` uses
(``configs/default.py`` reads them from this class).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from slt_jax import gates as gates_lib
from slt_jax import masking
from slt_jax.methods.edgepopup import top_k_masks
from slt_jax.methods.multiplier import init_multiplier, update_multiplier
from slt_jax.methods.schedules import learning_rate_schedule

Array = jax.Array
GateTree = Any  # params-shaped: an array per gated leaf, None elsewhere
LAMBDA_MODES = ("dual", "fixed")
BINARY_RULES = ("threshold", "rank")
DENSITY_CONSTRAINTS = ("global", "per_layer", "erk", "fan_in")


def erk_densities(shapes: list[tuple[int, ...]], counts: list[float], density: float) -> np.ndarray:
    """t_l = min(1, eps sum(shape_l) / prod(shape_l)) with sum_l n_l t_l = density sum_l n_l.

    Leaves whose t_l would pass 1 are kept dense and eps is solved again over the rest; capping
    only raises eps, so a leaf capped once stays capped."""
    factor = np.array([sum(s) / math.prod(s) for s in shapes])
    n = np.asarray(counts, np.float64)
    dense = np.zeros(len(n), bool)
    while True:
        free = density * n.sum() - n[dense].sum()
        eps = free / np.sum(n[~dense] * factor[~dense]) if (~dense).any() else 0.0
        t = np.where(dense, 1.0, eps * factor)
        if np.all(t <= 1.0):
            return t
        dense |= t > 1.0


def fan_in_densities(shapes: list[tuple[int, ...]], counts: list[float], density: float) -> np.ndarray:
    """t_l = clip(1 - c sqrt(fan_in_l), 0, 1) with sum_l n_l t_l = density sum_l n_l, c by bisection
    (the kept count falls monotonically in c, from all at c = 0 to none at c = 1 / min sqrt(fan_in))."""
    root = np.sqrt([math.prod(s[:-1]) if len(s) > 1 else s[0] for s in shapes])
    n = np.asarray(counts, np.float64)
    lo, hi = 0.0, 1.0 / root.min()
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if n @ np.clip(1.0 - mid * root, 0.0, 1.0) > density * n.sum() else (lo, mid)
    return np.clip(1.0 - lo * root, 0.0, 1.0)


def project_into(low: float, high: float) -> optax.GradientTransformation:
    """Updates u that land the params in [low, high]: u' = clip(p + u, low, high) - p (needs params)."""
    def update(updates, state, params=None):
        return jax.tree.map(lambda u, p: jnp.clip(p + u, low, high) - p, updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def leaf_targets(shapes: list[tuple[int, ...]], counts: list[float], density: float, rule: str) -> np.ndarray:
    """Each gated leaf's target density t_l under ``rule`` (``"per_layer"``, ``"erk"``, ``"fan_in"``)."""
    if rule == "erk":
        return erk_densities(shapes, counts, density)
    if rule == "fan_in":
        return fan_in_densities(shapes, counts, density)
    return np.full(len(shapes), density)


@dataclasses.dataclass(frozen=True)
class CRBG:
    """CRBG over a gate tree of mu (Gaussian family) or logits; see the module docstring.

    ``num_steps`` sets the temperature anneal, the decision term's ramp and the learning-rate
    schedule. ``param_shapes``, the gated model's parameters (arrays or ``jax.ShapeDtypeStruct``s),
    makes densities count weights (``slt_jax.masking.kept_fraction``); None counts gates.
    """

    num_steps: int
    sparsity: float = 0.9
    family: str = "gaussian"
    lambda_mode: str = "dual"
    lam: float = 0.0
    dual_lr: float = 0.05
    dual_kp: float = 100.0
    temp_start: float = 0.5
    temp_end: float = 0.5  # no anneal by default: the penalty keeps its gradient for open gates
    decision_weight: float = 1.0
    binary_rule: str = "threshold"
    density_constraint: str = "global"
    gate_margin: float = 0.0  # 0: unbounded gates
    learning_rate: float = 0.05
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    param_shapes: Any = dataclasses.field(default=None, compare=False)
    name: str = "crbg"
    ticket_weights: ClassVar[str | None] = None  # the ticket computes with the frozen weights themselves

    def __post_init__(self):
        gates_lib.get_family(self.family)
        if self.lambda_mode not in LAMBDA_MODES:
            raise ValueError(f"unknown lambda_mode {self.lambda_mode!r}; allowed: {', '.join(LAMBDA_MODES)}")
        if self.binary_rule not in BINARY_RULES:
            raise ValueError(f"unknown binary_rule {self.binary_rule!r}; allowed: {', '.join(BINARY_RULES)}")
        if self.density_constraint not in DENSITY_CONSTRAINTS:
            raise ValueError(f"unknown density_constraint {self.density_constraint!r}; "
                             f"allowed: {', '.join(DENSITY_CONSTRAINTS)}")
        if self.binary_rule == "rank" and self.density_constraint != "global":
            raise ValueError(f"binary_rule 'rank' keeps a count over all leaves; density_constraint "
                             f"{self.density_constraint!r} needs binary_rule 'threshold'")
        if self.gate_margin < 0 or (self.gate_margin > 0 and self.family != "gaussian"):
            raise ValueError(f"gate_margin must be >= 0 and bounds only the gaussian family's mu, got "
                             f"{self.gate_margin} with family {self.family!r}")
        if not all(0 < t < math.inf for t in (self.temp_start, self.temp_end)):
            raise ValueError(f"temperatures must be finite and > 0, got temp_start={self.temp_start}, "
                             f"temp_end={self.temp_end}")

    def temp(self, step: Array) -> Array:
        """The gate temperature (sigma for the Gaussian gate) at ``step``: geometric anneal."""
        frac = jnp.clip(step / max(self.num_steps - 1, 1), 0.0, 1.0)
        return self.temp_start * (self.temp_end / self.temp_start) ** frac

    def init(self, key: Array, shapes: Any) -> GateTree:
        """Gate parameters for ``shapes`` (``slt_jax.masking.gate_shapes``): mu ~ 0.5 + 0.01 N(0, 1)."""
        return gates_lib.init_gates(key, shapes, family=self.family)

    def init_state(self, gates: GateTree | None = None) -> dict[str, Array]:
        """The multiplier: ``lambda`` and its controller's ``integral``, both ``lam`` at the start
        (per-leaf constraints: one of each per gated leaf, so ``gates`` is needed)."""
        if self.density_constraint == "global":
            return init_multiplier(self.lam)
        if gates is None:
            raise ValueError(f"density_constraint {self.density_constraint!r} holds a multiplier per gated "
                             "leaf: call init_state(gates)")
        return init_multiplier(self.lam, (len(jax.tree.leaves(gates)),))

    def leaf_budget(self, gates: GateTree) -> tuple[list[str], np.ndarray, np.ndarray]:
        """The gated leaves' names (sorted: the order of the multipliers), weight shares s_l and
        target densities t_l."""
        named = masking.named_leaves(gates)
        names = sorted(named)
        per_gate = (dict.fromkeys(names, 1.0) if self.param_shapes is None
                    else masking.named_leaves(masking.weights_per_gate(self.param_shapes, gates)))
        counts = [per_gate[name] * named[name].size for name in names]
        shapes = [tuple(named[name].shape) for name in names]
        targets = leaf_targets(shapes, counts, 1.0 - self.sparsity, self.density_constraint)
        return names, np.asarray(counts) / sum(counts), targets

    def density(self, per_gate: GateTree) -> Array:
        """The fraction of gated weights kept, for per-gate values in [0, 1] (bool gates: the ticket's
        density; P(z > 0): the expected density)."""
        if self.param_shapes is None:
            return gates_lib.gate_mean(per_gate)
        return masking.kept_fraction(self.param_shapes, per_gate)

    def train_masks(self, gates: GateTree, key: Array, step: Array) -> GateTree:
        """One noisy gate sample z in [0, 1] per gate (differentiable w.r.t. the gates)."""
        return gates_lib.sample_gates(key, gates, self.temp(step), family=self.family)

    def penalty(self, gates: GateTree, state: dict[str, Array], step: Array) -> tuple[Array, dict[str, Array]]:
        """``lambda (d - d_target) + beta_t indecision`` (per-leaf constraints:
        ``sum_l lambda_l (d_l - t_l) + ...``) and the values ``update_state`` and logs need (per-leaf:
        ``violation/NAME`` = b_l - t_l and ``lambda/NAME``; d and b are the weight-counted totals)."""
        indecision = gates_lib.indecision(gates, family=self.family)
        ramp = jnp.clip(2.0 * step / max(self.num_steps, 1) - 1.0, 0.0, 1.0)
        decision = self.decision_weight * ramp * indecision
        logs = {"indecision": indecision, "temp": self.temp(step)}
        binary_masks = gates_lib.binary_mask(gates, family=self.family)
        if self.density_constraint == "global":
            prob_open = gates_lib.get_family(self.family).prob_open
            density = self.density(jax.tree.map(lambda g: prob_open(g, self.temp(step)), gates))
            binary = self.density(binary_masks)
            return state["lambda"] * (density - (1.0 - self.sparsity)) + decision, {
                "expected_density": density, "binary_density": binary, "lambda": state["lambda"], **logs}
        names, shares, targets = self.leaf_budget(gates)
        shares, targets = jnp.asarray(shares, jnp.float32), jnp.asarray(targets, jnp.float32)
        prob_open = gates_lib.get_family(self.family).prob_open
        leaves, masks = masking.named_leaves(gates), masking.named_leaves(binary_masks)
        expected = jnp.stack([jnp.mean(prob_open(leaves[name], self.temp(step))) for name in names])
        binary = jnp.stack([jnp.mean(masks[name]) for name in names])
        total = jnp.sum(state["lambda"] * (expected - targets)) + decision
        per_leaf = {f"{key}/{name}": value for key, values in (("violation", binary - targets),
                                                                ("lambda", state["lambda"]))
                    for name, value in zip(names, values)}
        return total, {"expected_density": jnp.dot(shares, expected), "binary_density": jnp.dot(shares, binary),
                       **per_leaf, **logs}

    def update_state(self, state: dict[str, Array], aux: dict[str, Array]) -> dict[str, Array]:
        """One step of the multiplier's PI controller on the binary density (per-leaf constraints: on
        each leaf's ``violation/NAME``, b_l - t_l; ``fixed``: unchanged)."""
        if self.lambda_mode == "fixed":
            return state
        if self.density_constraint == "global":
            violation = aux["binary_density"] - (1.0 - self.sparsity)
        else:
            violation = jnp.stack([aux[k] for k in sorted(aux) if k.startswith("violation/")])
        return update_multiplier(state, violation, self.dual_lr, self.dual_kp)

    def masked_params(self, params: Any, masks: GateTree) -> Any:
        """``params`` times ``masks`` on gated leaves (``slt_jax.masking.apply_masks``)."""
        return masking.apply_masks(params, masks)

    def binary_masks(self, gates: GateTree) -> GateTree:
        """The ticket (bool, shaped like ``gates``): deterministic gate > 1/2, or the top-ranked gates."""
        if self.binary_rule == "threshold":
            return gates_lib.binary_mask(gates, family=self.family)
        # Every family's deterministic gate rises with its parameter, so rank the parameters
        # (shifted to >= 0, which the bisection on float bits needs; the order is unchanged).
        low = min(jnp.min(g) for g in jax.tree.leaves(gates))
        return top_k_masks(jax.tree.map(lambda g: g - low, gates), 1.0 - self.sparsity, "global")

    def optimizer(self) -> optax.GradientTransformation:
        """The recipe's optimiser for the gates: Adam with the learning-rate schedule, then, with
        ``gate_margin`` > 0, the projection of mu into [-m, 1 + m]."""
        lr = learning_rate_schedule(self.lr_schedule, self.learning_rate, self.num_steps, self.warmup_steps)
        adam = optax.adam(lr)
        if self.gate_margin == 0:
            return adam
        return optax.chain(adam, project_into(-self.gate_margin, 1.0 + self.gate_margin))
