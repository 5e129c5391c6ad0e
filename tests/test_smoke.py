"""The default job end to end, shrunk: a ticket well above chance, the files every run leaves."""
import json
import os

from slt_jax import load_ticket
from slt_jax.train import train_and_evaluate


def test_default_run_writes_ticket_and_metrics(tiny_config, tmp_path):
    summary = train_and_evaluate(tiny_config, str(tmp_path))
    assert summary["val_accuracy"] > 0.5  # chance is 0.1
    for name in ("config.json", "metrics.jsonl", "summary.json", "ticket/ticket.json", "ticket/mask.npz"):
        assert os.path.exists(tmp_path / name), name
    records = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert records[-1]["step"] == 60 and "expected_density" in records[-1] and "val_accuracy" in records[-1]
    ticket = load_ticket(str(tmp_path / "ticket"))
    assert ticket.meta["metrics"]["val_accuracy"] == summary["val_accuracy"]
