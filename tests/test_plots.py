"""Every run with ``plots=True`` leaves readable, non-empty PNG figures in its workdir."""
import json

import matplotlib.image
import numpy as np

from slt_jax.plots import PLOT_FILES
from slt_jax.train import train_and_evaluate

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE, path
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100, (path, image.shape)
    assert np.ptp(image[..., :3]) > 0, f"{path} is a blank image"


def test_run_writes_plots(tiny_config, tmp_path):
    tiny_config.plots = True
    summary = train_and_evaluate(tiny_config, str(tmp_path))
    assert summary["plots"] == list(PLOT_FILES)
    assert json.load(open(tmp_path / "summary.json"))["plots"] == list(PLOT_FILES)
    for name in PLOT_FILES:
        _assert_png(tmp_path / name)
