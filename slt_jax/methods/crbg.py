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
* Landing on the target (issue 21). A ticket at the wrong sparsity is a wrong answer, and the
  threshold rule's density responds to lambda slowly and one way (a gate the clip has closed gets
  no data gradient, so a density below target does not come back). Three pieces, each optional:

  - ``target_ramp`` r > 0: the constraint holds the density t_s at step s to the cubic ramp of
    gradual pruning (Zhu & Gupta 2017), t_s = d_T + (d_0 - d_T)(1 - s / (r T))^3 for s < r T and
    d_T after, d_0 = max(d_T, 1/2) (the initial ticket's density: gates start at test gate ~1/2), T
    = ``num_steps``; the target is met at r T and held for the rest of the budget.
  - ``controller="geometric"``: the multiplier's integral runs on log lambda and on the relative
    violation (b - t_s) / t_s, with gain ``geometric_gain`` / T per step, so the gain follows the
    budget and lambda reaches whatever scale the model needs (``slt_jax.methods.multiplier``);
    ``"pi"`` is the controller in lambda's own units above.
  - ``project_on_miss``: when the threshold rule's ticket is further than ``landing_tolerance`` from
    d_T, the ticket is the weight-counted rank projection instead (``projected_masks``), and
    ``landing`` reports it; a ticket still off target (a unit gate's share of the weights exceeds
    the tolerance, or ties) is reported as a miss, never as reached.
  - ``shift_onto_target`` (Gaussian families, global constraint): after every optimiser step all
    gate parameters move by one constant, mu <- mu + 1/2 - c_s, where c_s lies midway between the
    smallest parameter the rank projection onto t_s keeps and the largest it closes. A common shift
    keeps the gates' order, so the threshold rule's ticket *is* the rank projection at every step:
    it lands on t_s by construction (to a gate's share of the weights), and training sees the ticket
    it will be scored on, as edge-popup's top-k does, instead of a projection applied once at the end
    to gates the training had closed. The binary density then equals t_s, so the multiplier sees no
    violation and stays at ``lam``: the shift, not lambda, holds the density.

  The default is the shift with the ramp over the first 30% of the budget (``target_ramp=0.3``,
  ``shift_onto_target=True``): in ``benchmarks/sparsity_landing.py`` it is the one control that lands
  on every model and budget, and on LeNet-300-100 it is ahead of the PI multiplier alone at every
  budget; with a per-leaf ``density_constraint`` each leaf is shifted onto its own target (as
  per-layer top-k holds each layer). The geometric controller and the projection stay off: with the
  ramp the controller overshot the target on LeNet-300-100 and Conv4 (threshold rule 0.3-2 points
  past it) and its projected tickets lost accuracy where the PI controller lands. With
  ``shift_onto_target=False`` and ``target_ramp=0`` the recipe is the PI multiplier of the paper's
  objective alone.
* The temperature (sigma for the Gaussian gate) anneals geometrically from ``temp_start`` to
  ``temp_end``: less noise late in training lets gates settle.
* The decision term (g = deterministic gate) ramps linearly from 0 to ``decision_weight`` over
  the second half of training; it pushes gates to exactly 0 or 1 so that the binary ticket
  computes what the trained stochastic network computed.
* The ticket (``binary_rule``): ``"threshold"`` keeps a weight iff its deterministic gate exceeds
  1/2; ``"rank"`` keeps the gates with the largest parameters over all gated leaves, as many as
  bring the weight-counted density nearest to 1 - sparsity (``projected_masks``; one gate per
  weight: exactly round((1 - sparsity) n) weights). The multiplier answers to the threshold rule's
  density either way.
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
from slt_jax.methods.multiplier import init_log_multiplier, init_multiplier, update_log_multiplier, update_multiplier
from slt_jax.methods.schedules import learning_rate_schedule
from slt_jax.optim import on_gate_tree

Array = jax.Array
GateTree = Any  # params-shaped: an array per gated leaf, None elsewhere
LAMBDA_MODES = ("dual", "fixed")
BINARY_RULES = ("threshold", "rank")
CONTROLLERS = ("pi", "geometric")
SMALLEST_RELATIVE_TARGET = 0.01  # the geometric controller divides by max(t, this): a leaf may get t = 0
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


def cut_between(lowest_kept: Array, highest_closed: Array) -> Array:
    """The cut midway between the smallest kept and the largest closed parameter; when all are kept
    (none closed: -inf) just below the smallest, when none are, just above the largest."""
    return jnp.where(jnp.isfinite(highest_closed),
                     jnp.where(jnp.isfinite(lowest_kept), (lowest_kept + highest_closed) / 2, highest_closed + 1e-3),
                     lowest_kept - 1e-3)


def leaf_cut(g: Array, density: Array) -> Array:
    """The cut that keeps the round(density n) largest of the leaf's n parameters."""
    values = jnp.sort(g.ravel())[::-1]
    n = values.size
    k = jnp.clip(jnp.round(density * n).astype(jnp.int32), 0, n)
    lowest_kept = jnp.where(k > 0, values[jnp.maximum(k - 1, 0)], jnp.inf)
    highest_closed = jnp.where(k < n, values[jnp.minimum(k, n - 1)], -jnp.inf)
    return cut_between(lowest_kept, highest_closed)


def shift_onto(method: "CRBG") -> optax.GradientTransformation:
    """Updates u that land the params on ``method.shifted_onto_target(p + u, s)`` at step s; its state
    counts the steps (needs params)."""
    def update(updates, step, params=None):
        moved = jax.tree.map(jnp.add, params, updates)
        return jax.tree.map(jnp.subtract, method.shifted_onto_target(moved, step), params), step + 1

    return optax.GradientTransformation(lambda params: jnp.zeros((), jnp.int32), update)


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
    target_ramp: float = 0.3  # fraction of the budget over which the target density falls from 1/2 (0: no ramp)
    controller: str = "pi"
    geometric_gain: float = 20.0  # the geometric controller's integral gain over the whole budget
    geometric_kp: float = 5.0  # and its proportional gain on log lambda
    project_on_miss: bool = False
    landing_tolerance: float = 0.003  # the ticket's largest allowed |sparsity - target|
    shift_onto_target: bool = True
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
        if self.controller not in CONTROLLERS:
            raise ValueError(f"unknown controller {self.controller!r}; allowed: {', '.join(CONTROLLERS)}")
        if not 0.0 <= self.target_ramp <= 1.0:
            raise ValueError(f"target_ramp={self.target_ramp}; allowed: a fraction of the budget in [0, 1]")
        if not (self.geometric_gain > 0 and self.geometric_kp >= 0):
            raise ValueError(f"geometric_gain={self.geometric_gain}, geometric_kp={self.geometric_kp}; allowed: "
                             "geometric_gain > 0 and geometric_kp >= 0")
        if not isinstance(self.project_on_miss, bool):
            raise ValueError(f"project_on_miss={self.project_on_miss!r}; allowed: True or False")
        if not isinstance(self.shift_onto_target, bool):
            raise ValueError(f"shift_onto_target={self.shift_onto_target!r}; allowed: True or False")
        if self.shift_onto_target and not self.family.startswith("gaussian"):
            raise ValueError(f"shift_onto_target (on by default) moves mu onto the target: family {self.family!r}; "
                             "allowed: a gaussian family, or shift_onto_target=False")
        if not 0.0 <= self.landing_tolerance < 1.0:
            raise ValueError(f"landing_tolerance={self.landing_tolerance}; allowed: a number in [0, 1)")
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
        """The multiplier: ``lambda`` and its controller's ``integral`` (``"pi"``: both ``lam``;
        ``"geometric"``: lambda = max(lam, e^-7), integral = log lambda); per-leaf constraints: one of
        each per gated leaf, so ``gates`` is needed."""
        init = init_log_multiplier if self.controller == "geometric" else init_multiplier
        if self.density_constraint == "global":
            return init(self.lam)
        if gates is None:
            raise ValueError(f"density_constraint {self.density_constraint!r} holds a multiplier per gated "
                             "leaf: call init_state(gates)")
        return init(self.lam, (len(jax.tree.leaves(gates)),))

    def target_density(self, final: Array | float, step: Array) -> Array:
        """The density the controller holds at ``step``: ``final`` once the ramp is over, before that
        final + (start - final) (1 - step / (target_ramp num_steps))^3 (Zhu & Gupta 2017), with
        start = max(final, 1/2): every family's gates start at test gate ~1/2, about half of them
        above it, so the ramp starts at the initial ticket's density."""
        final = jnp.asarray(final, jnp.float32)
        if self.target_ramp == 0:
            return final
        frac = jnp.clip(step / (self.target_ramp * self.num_steps), 0.0, 1.0)
        return final + (jnp.maximum(final, 0.5) - final) * (1.0 - frac) ** 3

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
            target = self.target_density(1.0 - self.sparsity, step)
            return state["lambda"] * (density - target) + decision, {
                "expected_density": density, "binary_density": binary, "target_density": target,
                "lambda": state["lambda"], **logs}
        names, shares, targets = self.leaf_budget(gates)
        shares = jnp.asarray(shares, jnp.float32)
        targets = self.target_density(jnp.asarray(targets, jnp.float32), step)
        prob_open = gates_lib.get_family(self.family).prob_open
        leaves, masks = masking.named_leaves(gates), masking.named_leaves(binary_masks)
        expected = jnp.stack([jnp.mean(prob_open(leaves[name], self.temp(step))) for name in names])
        binary = jnp.stack([jnp.mean(masks[name]) for name in names])
        total = jnp.sum(state["lambda"] * (expected - targets)) + decision
        per_leaf = {f"{key}/{name}": value for key, values in (("violation", binary - targets),
                                                                ("target", targets), ("lambda", state["lambda"]))
                    for name, value in zip(names, values)}
        return total, {"expected_density": jnp.dot(shares, expected), "binary_density": jnp.dot(shares, binary),
                       "target_density": jnp.dot(shares, targets), **per_leaf, **logs}

    def update_state(self, state: dict[str, Array], aux: dict[str, Array]) -> dict[str, Array]:
        """One step of the multiplier's controller on the binary density's violation b - t of the
        target at that step (per-leaf constraints: on each leaf's ``violation/NAME``, b_l - t_l;
        ``"geometric"``: on (b - t) / max(t, 1%); ``fixed``: unchanged)."""
        if self.lambda_mode == "fixed":
            return state
        if self.density_constraint == "global":
            violation, target = aux["binary_density"] - aux["target_density"], aux["target_density"]
        else:
            names = sorted(k[len("violation/"):] for k in aux if k.startswith("violation/"))
            violation = jnp.stack([aux[f"violation/{n}"] for n in names])
            target = jnp.stack([aux[f"target/{n}"] for n in names])
        if self.controller == "geometric":
            relative = violation / jnp.maximum(target, SMALLEST_RELATIVE_TARGET)
            return update_log_multiplier(state, relative, self.geometric_gain / max(self.num_steps, 1),
                                         self.geometric_kp)
        return update_multiplier(state, violation, self.dual_lr, self.dual_kp)

    def masked_params(self, params: Any, masks: GateTree) -> Any:
        """``params`` times ``masks`` on gated leaves (``slt_jax.masking.apply_masks``)."""
        return masking.apply_masks(params, masks)

    def binary_masks(self, gates: GateTree) -> GateTree:
        """The ticket (bool, shaped like ``gates``): ``"threshold"``: deterministic gate > 1/2, or,
        with ``project_on_miss`` and that ticket's sparsity further than ``landing_tolerance`` from
        the target, the projection (``projected_masks``); ``"rank"``: always the projection. Jit-safe."""
        threshold = gates_lib.binary_mask(gates, family=self.family)
        if self.binary_rule == "rank":
            return self.projected_masks(gates)
        if not self.project_on_miss:
            return threshold
        miss = jnp.abs(self.density(threshold) - (1.0 - self.sparsity)) > self.landing_tolerance
        return jax.lax.cond(miss, lambda: self.projected_masks(gates), lambda: threshold)

    def projected_masks(self, gates: GateTree, density: Array | float | None = None) -> GateTree:
        """The gates whose parameter is >= tau, tau chosen so that the density (counting weights, as
        ``density``) is the nearest reachable to 1 - sparsity.

        Every family's deterministic gate rises with its parameter, so this is a global rank of the
        gates, weighted by the weights each closes (a unit gate its fan-in; a weight two gates touch
        is kept iff both are). The density falls monotonically in tau, so tau is found by bisection
        on the float bits of the parameters shifted to >= 0 (where the bit order is the value order):
        tau_lo, the largest tau keeping >= 1 - sparsity, or the next value up, whichever lands nearer.
        One gate per weight: round((1 - sparsity) n) weights. A gate's share of the weights bounds
        the precision (a unit gate of LeNet-300-100's first layer: 0.3 points). ``density``: the
        target density, 1 - sparsity unless given."""
        target = 1.0 - self.sparsity if density is None else density
        low = jnp.min(jnp.stack([jnp.min(g) for g in jax.tree.leaves(gates)]))
        bits = jax.tree.map(lambda g: jax.lax.bitcast_convert_type((g - low).astype(jnp.float32), jnp.int32), gates)

        def kept(tau):
            return self.density(jax.tree.map(lambda b: b >= tau, bits))

        def body(_, lo_hi):
            lo, hi = lo_hi  # invariant: kept(lo) >= target > kept(hi)
            mid = lo + (hi - lo) // 2
            ok = kept(mid) >= target
            return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

        lo, hi = jax.lax.fori_loop(0, 32, body, (jnp.int32(0), jnp.int32(0x7F800001)))
        tau = jnp.where(kept(lo) - target <= target - kept(hi), lo, hi)
        return jax.tree.map(lambda b: b >= tau, bits)

    def shifted_onto_target(self, gates: GateTree, step: Array) -> GateTree:
        """``gates`` moved by a constant so that the threshold rule keeps the rank projection onto the
        target of ``step`` (``target_density``): globally, all gates by 1/2 - c, c midway between the
        smallest parameter ``projected_masks(gates, t_s)`` keeps and the largest it closes; with a
        per-leaf constraint, each leaf by its own constant onto its own t_l(s) (its top
        round(t_l(s) n_l) gates, counting the leaf's gates as its ``violation`` does)."""
        if self.density_constraint != "global":
            names, _, targets = self.leaf_budget(gates)
            leaf_target = dict(zip(names, self.target_density(jnp.asarray(targets, jnp.float32), step)))
            return jax.tree_util.tree_map_with_path(
                lambda path, g: g + (gates_lib.BINARY_THRESHOLD - leaf_cut(g, leaf_target[masking.path_name(path)])),
                gates)
        keep = self.projected_masks(gates, self.target_density(1.0 - self.sparsity, step))
        leaves, kept = jax.tree.leaves(gates), jax.tree.leaves(keep)
        lowest_kept = jnp.min(jnp.stack([jnp.min(jnp.where(k, g, jnp.inf)) for g, k in zip(leaves, kept)]))
        highest_closed = jnp.max(jnp.stack([jnp.max(jnp.where(k, -jnp.inf, g)) for g, k in zip(leaves, kept)]))
        return jax.tree.map(lambda g: g + (gates_lib.BINARY_THRESHOLD - cut_between(lowest_kept, highest_closed)),
                            gates)

    def landing(self, gates: GateTree) -> dict[str, Any]:
        """How the ticket met its target, as Python values: ``threshold_sparsity`` (the threshold
        rule's ticket), ``projected`` (the ticket is not the threshold rule's) and ``target_reached``
        (|ticket sparsity - sparsity| <= ``landing_tolerance``). Counts weights as ``density``."""
        threshold = gates_lib.binary_mask(gates, family=self.family)
        ticket = self.binary_masks(gates)
        projected = any(bool(jnp.any(a != b)) for a, b in zip(jax.tree.leaves(threshold), jax.tree.leaves(ticket)))
        reached = abs(float(self.density(ticket)) - (1.0 - self.sparsity)) <= self.landing_tolerance
        return {"threshold_sparsity": 1.0 - float(self.density(threshold)), "projected": projected,
                "target_reached": reached}

    def constraints(self) -> tuple[optax.GradientTransformation, ...]:
        """What follows any optimiser's step on the gates (``slt_jax.optim.on_gate_tree``: the gate
        tree alone or in a variables dict): with ``shift_onto_target``, the shift onto the target
        density of each step (``shift_onto``); with ``gate_margin`` > 0, the projection of mu into
        [-m, 1 + m]."""
        steps = []
        if self.shift_onto_target:
            steps.append(on_gate_tree(shift_onto(self)))
        if self.gate_margin > 0:
            steps.append(on_gate_tree(project_into(-self.gate_margin, 1.0 + self.gate_margin)))
        return tuple(steps)

    def optimizer(self) -> optax.GradientTransformation:
        """The recipe's optimiser for the gates: Adam with the learning-rate schedule, then the
        ``constraints``."""
        lr = learning_rate_schedule(self.lr_schedule, self.learning_rate, self.num_steps, self.warmup_steps)
        constraints = self.constraints()
        return optax.chain(optax.adam(lr), *constraints) if constraints else optax.adam(lr)
