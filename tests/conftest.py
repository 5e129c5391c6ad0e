"""Test setup: 8 simulated CPU devices, set before JAX is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    + ["--xla_force_host_platform_device_count=8"]
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

from configs import default  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tiny_config():
    """The default config shrunk to a few seconds of CPU: digits, a small MLP, no progress bar."""
    c = default.get_config()
    c.num_epochs = 0
    c.num_steps = 60
    c.batch_size = 64
    c.log_every = 10
    c.eval_every = 30
    c.checkpoint_every = 0
    c.num_devices = 1
    c.progress = False
    c.plots = False
    return c
