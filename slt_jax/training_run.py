"""``Run``: the pieces of one training run, built from a validated config.

The data and the step counts it resolves (``num_steps``, ``warmup_steps`` from epochs and the
dataset's size), the device mesh, the model, the frozen weights' storage, the gate shapes, the
method and its optimiser, the loss, and the random streams; then what the loop does with them:
the initial state, the jitted step (``slt_jax.step``), IteRand's re-draws, and evaluation
(``slt_jax.evaluation``). It writes nothing: ``slt_jax.train`` drives it and writes the workdir.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections

from slt_jax import evaluation
from slt_jax import frozen as frozen_lib
from slt_jax import masking, sharding
from slt_jax.data import load_dataset
from slt_jax.methods import create_method
from slt_jax.models import create_model
from slt_jax.run_config import ConfigError, check_model_fits, check_model_memory, model_spec, validate_config
from slt_jax.step import TrainState, classification_loss, make_eval_fn, make_train_step
from slt_jax.ticket import ZOO_INIT_KWARGS
from slt_jax.weights_fingerprint import current_settings, weights_digest


class Run:
    """The pieces of one training run, built from a validated config; ``train_and_evaluate`` drives it.

    ``num_steps`` and ``warmup_steps`` are resolved here from epochs and the dataset's size."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        validate_config(config)
        self.config = config
        self.workdir = workdir
        self.dataset = load_dataset(config)
        steps_per_epoch = self.dataset.steps_per_epoch(config.batch_size)
        if config.batch_size > self.dataset.num_train:
            raise ConfigError(f"batch_size={config.batch_size} exceeds the {self.dataset.num_train} training examples; "
                              f"allowed: 1 to {self.dataset.num_train}")
        self.num_steps = int(config.num_steps or round(config.num_epochs * steps_per_epoch))
        self.warmup_steps = int(config.warmup_epochs * steps_per_epoch)
        try:  # both raise ValueError only about num_devices and batch_size
            self.mesh = sharding.make_mesh(config.num_devices)
            sharding.check_batch_size(config.batch_size, self.mesh)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.spec = model_spec(config, self.dataset.num_classes)
        self.model = create_model(self.spec)
        input_shape = self.dataset.input_shape
        # Pooling that empties the images, or a width that leaves a layer no units: refused here.
        check_model_fits(self.model, self.spec, input_shape, ZOO_INIT_KWARGS)
        check_model_memory(self.model, self.spec, input_shape, ZOO_INIT_KWARGS)  # e.g. num_classes=10**9
        variables = frozen_lib.init_variables(self.model, input_shape, config.seed, ZOO_INIT_KWARGS)
        params = variables.pop("params")
        if config.frozen_from:
            self.frozen_sha256 = frozen_lib.file_sha256(config.frozen_from) if os.path.isfile(config.frozen_from) else None
            try:
                params = frozen_lib.load_params_file(config.frozen_from, params)
            except frozen_lib.FrozenWeightsError as e:
                raise ConfigError(str(e)) from None
        params = frozen_lib.round_frozen(params, config.frozen_dtype)
        # What the checkpoints record of these weights: a resume on others (another jax flag, a
        # replaced params file, changed initialisers) is refused (slt_jax.checkpoint).
        self.weights_record = {**weights_digest(jax.device_get(params)), "settings": current_settings(
            config.frozen_dtype, self.frozen_sha256 if config.frozen_from else None)}
        self.storage = frozen_lib.frozen_storage(self.model, params, input_shape, config.seed, config.frozen_dtype,
                                                 config.regenerate_frozen, ZOO_INIT_KWARGS)
        self.frozen = sharding.replicate(self.storage.stored, self.mesh)  # the step's ``frozen`` input
        self.frozen_params = jax.jit(self.storage.to_params)
        self.initial_model_state = variables
        frozen_shapes = jax.eval_shape(self.frozen_params, self.frozen)
        try:  # a policy that matches nothing: the one ValueError gate_shapes raises
            self.shapes = masking.gate_shapes(frozen_shapes, config.gate_policy, config.structured,
                                              config.structured_policy, config.structured_inputs)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.method = create_method(config, num_steps=self.num_steps, warmup_steps=self.warmup_steps,
                                    param_shapes=frozen_shapes)
        self.optimizer = self.method.optimizer()
        # The method as built, every default resolved: config.json and the checkpoints record it, so
        # a default changed in the code between a run and its resumption is refused, not taken.
        self.method_settings = {f.name: getattr(self.method, f.name) for f in dataclasses.fields(self.method)
                                if f.compare}
        self.loss = classification_loss(config.label_smoothing, config.logit_scale)
        self.eval_fn = make_eval_fn(self.model.apply, {"train": False})
        # Three independent streams, none of them the weights' key: gate init, training noise
        # (folded with the step), and the evaluation's sample of the training masks. Raw key data
        # of the default PRNG (threefry, rbg, ...), so Orbax can checkpoint the training key.
        self.init_key, self.train_key, self.eval_key = jax.random.split(
            jax.random.fold_in(jax.random.PRNGKey(config.seed), 1), 3)
        # A method that re-draws pruned weights (IteRand) draws them from the seed's generations
        # (slt_jax.frozen.generation_key), its coins from a fourth stream.
        self.redraws = hasattr(self.method, "redraw")
        if self.redraws:
            self.draw = frozen_lib.params_by_generation(self.model, input_shape, config.seed, ZOO_INIT_KWARGS,
                                                        config.frozen_dtype)
            self.redraw_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 2)
            self._redraw = jax.jit(self.method.redraw)

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint records beyond the config and the data: the frozen weights' digest and
        the settings they were drawn under (``frozen_weights``), and the method with its defaults
        resolved (``method``)."""
        return {"frozen_weights": self.weights_record, "method": self.method_settings}

    def current_weights(self) -> Any:
        """The frozen weights the step computes with now (after IteRand's re-draws), on the host."""
        return jax.device_get(self.frozen_params(self.frozen))

    def initial_state(self) -> TrainState:
        gates = self.method.init(self.init_key, self.shapes)
        # A copy of the key: the step donates the state's buffers.
        return TrainState.create(self.method, self.optimizer, gates, jax.numpy.array(self.train_key),
                                 self.initial_model_state)

    def train_step(self):
        """The jitted step of ``slt_jax.step`` for this run's model, method, loss and frozen storage."""
        return make_train_step(self.model.apply, self.method, self.optimizer, loss_fn=self.loss,
                               apply_kwargs={"train": True}, frozen_fn=self.storage.to_params)

    def redraw(self, state: TrainState, step: int) -> TrainState:
        """After step ``step``, when ``method.is_redraw_step(step)``: re-draws pruned weights (the
        step's ``frozen`` input changes); returns the state with the new generations."""
        event = step // self.method.redraw_every
        method_state, params = self._redraw(self.redraw_key, state.gates, state.method_state,
                                            self.frozen_params(self.frozen), self.draw(event), event)
        self._set_weights(params)
        return state.replace(method_state=method_state)

    def restore_weights(self, state: TrainState) -> None:
        """The weights of a resumed run: the seed's, or, after re-draws, replayed from the generations."""
        if self.redraws:
            self._set_weights(frozen_lib.redrawn_weights(self.draw, jax.device_get(state.method_state["generation"])))

    def _set_weights(self, params: Any) -> None:
        self.storage = frozen_lib.frozen_storage(self.model, params, self.dataset.input_shape, self.config.seed,
                                                 self.config.frozen_dtype, False, ZOO_INIT_KWARGS)
        self.frozen = sharding.replicate(self.storage.stored, self.mesh)

    def recalibrated(self, state: TrainState) -> TrainState:
        """The state with BatchNorm's running statistics recomputed on the binary ticket
        (``slt_jax.evaluation.recalibrated``)."""
        return evaluation.recalibrated(self, state)

    def evaluate(self, state: TrainState, splits: tuple[str, ...] = ("val",)) -> dict[str, Any]:
        """Binary-ticket accuracy per split, sparsity, and the stochastic network's accuracy
        (``slt_jax.evaluation.evaluate``)."""
        return evaluation.evaluate(self, state, splits)
