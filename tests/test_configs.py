"""Every committed config validates, and a config said to be a benchmark's recipe is that recipe."""
import importlib
import pathlib

import pytest

from benchmarks import lenet_structured
from slt_jax.data import TFDS_NAMES
from slt_jax.run_config import validate_config

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
