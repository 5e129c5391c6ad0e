"""Learning-rate schedules shared by the methods, chosen by name in the config."""
from __future__ import annotations

import optax

SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(name: str, lr: float, num_steps: int, warmup_steps: int = 0) -> optax.Schedule:
    """``constant`` or ``cosine`` decay to 0 over ``num_steps``, after a linear warm-up."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown lr_schedule {name!r}; allowed: {', '.join(SCHEDULES)}")
    if name == "constant":
        main = optax.constant_schedule(lr)
    else:
        main = optax.cosine_decay_schedule(lr, max(num_steps - warmup_steps, 1))
    if warmup_steps <= 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), main], [warmup_steps])
