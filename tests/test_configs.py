"""Every committed config validates, and a config said to be a benchmark's recipe is that recipe."""
import importlib
import pathlib

import jax
import jax.numpy as jnp
import pytest

from benchmarks import lenet_structured, mnist_zoo as zoo_benchmark
from configs import mnist_zoo
from slt_jax.data import TFDS_NAMES
from slt_jax.models import create_model
from slt_jax.run_config import model_spec, validate_config

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"
DATASETS = ("digits", "synthetic", *TFDS_NAMES)
NAMES = sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in ("__init__", "mnist_zoo"))


@pytest.mark.parametrize("name", NAMES)
def test_config_validates(name):
    validate_config(importlib.import_module(f"configs.{name}").get_config())


@pytest.mark.parametrize("name", NAMES + ["mnist_zoo"])
def test_config_names_its_dataset_not_a_file_a_clone_lacks(name):
    dataset = importlib.import_module(f"configs.{name}").get_config().dataset
    assert dataset in DATASETS, f"configs/{name}.py: dataset={dataset!r}; allowed: a name of {DATASETS}"


@pytest.mark.parametrize("arg", [f"{m},{k}" for m in mnist_zoo.MODELS for k in mnist_zoo.METHODS])
def test_every_mnist_zoo_cell_validates_and_builds_on_mnist(arg):
    """Each MODEL,METHOD validates and its model, at the config's width, maps 28x28x1 images to 10
    logits (abstractly: a width the model rejects fails here, not minutes into a benchmark)."""
    c = mnist_zoo.get_config(arg)
    validate_config(c)
    net = create_model(model_spec(c, 10))
    x = jnp.zeros((2, 28, 28, 1))
    variables = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), x, train=False))
    assert jax.eval_shape(lambda v: net.apply(v, x, train=False), variables).shape == (2, 10)
    assert c.model in zoo_benchmark.MODEL_NAMES


def test_structured_lenet_config_is_the_benchmarks_winning_recipe():
    config = importlib.import_module("configs.mnist_lenet300_crbg_structured").get_config()
    recipe = lenet_structured.recipe_config("pixels_units_wide_lr0.02", config.sparsity, config.seed, config.num_epochs,
                                            config.dataset)
    for key in ("progress", "plots", "checkpoint_every"):  # the benchmark's own bookkeeping
        recipe[key] = config[key]
    # The benchmark's rows were measured with the PI multiplier alone; the config lands by CRBG's default shift.
    assert (recipe.crbg.shift_onto_target, recipe.crbg.target_ramp) == (False, 0.0)
    for key in ("shift_onto_target", "target_ramp"):
        recipe.crbg[key] = config.crbg[key]
    assert recipe.to_dict() == config.to_dict()
