"""What identifies a frozen network: a digest of its weights and the jax settings that drew them.

The same seed draws other weights under other settings: in a process with ``JAX_ENABLE_X64=1`` or
``JAX_THREEFRY_PARTITIONABLE=0`` the digits MLP's weights come out different
(``tests/test_fingerprint.py``), and another jax version may draw others too. So a ticket and a
checkpoint record

* ``weights_digest``: per leaf, the sha256 of its dtype, shape and bytes; whole, the sha256 of
  every leaf's name and digest in name order;
* ``current_settings``: the jax version, ``jax_enable_x64``, ``jax_threefry_partitionable``, the
  frozen dtype and the params file's sha256 (``frozen_from``), the settings the weights were drawn
  and rounded under;

and ``drawn_under(settings)`` redraws them under the recorded flags whatever the process's own are.
``mismatch_cause`` names, in one line, why regenerated weights are not the recorded ones.
"""
from __future__ import annotations

import contextlib
import hashlib
from typing import Any, Iterator

import jax
import numpy as np

from slt_jax import masking

# The jax flags that change the weights a seed draws, each with its context manager's name on ``jax``
# (jax 0.10 has both; the environment variable, JAX_ENABLE_X64=1, sets one for a whole process).
WEIGHT_FLAGS = {"jax_enable_x64": "enable_x64", "jax_threefry_partitionable": "threefry_partitionable"}


def leaf_sha256(leaf: Any) -> str:
    """sha256 of an array's dtype, shape and bytes: ``sha256(f"{dtype.str}{list(shape)}" + bytes)``."""
    a = np.ascontiguousarray(np.asarray(leaf))
    return hashlib.sha256(f"{a.dtype.str}{list(a.shape)}".encode() + a.tobytes()).hexdigest()


def weights_digest(params: Any) -> dict[str, Any]:
    """``{"sha256": whole, "leaves": {path name: leaf_sha256}}`` of a params tree; the whole digest
    hashes ``name\\0leaf digest\\n`` for every leaf, in name order."""
    leaves = {name: leaf_sha256(w) for name, w in sorted(masking.named_leaves(params).items())}
    whole = hashlib.sha256("".join(f"{name}\0{digest}\n" for name, digest in leaves.items()).encode())
    return {"sha256": whole.hexdigest(), "leaves": leaves}


def _flag(flag: str) -> bool | None:
    value = getattr(jax.config, flag, None)  # None: a jax without this flag
    return None if value is None else bool(value)


def current_settings(frozen_dtype: str = "float32", frozen_from_sha256: str | None = None) -> dict[str, Any]:
    """The settings weights drawn now, in this process, are drawn and rounded under."""
    return {"jax": jax.__version__, **{flag: _flag(flag) for flag in WEIGHT_FLAGS},
            "frozen_dtype": frozen_dtype, "frozen_from_sha256": frozen_from_sha256}


@contextlib.contextmanager
def drawn_under(settings: dict[str, Any] | None) -> Iterator[None]:
    """Within the block, the weight flags ``settings`` records (``jax_enable_x64``,
    ``jax_threefry_partitionable``) hold, whatever the process set: through jax's context manager
    for the flag, or, in a jax without one, ``jax.config.update`` undone at the end. A flag that
    ``settings`` does not record, or that this jax does not have, is left as it is (the digest
    check then names it)."""
    restore: dict[str, bool] = {}
    try:
        with contextlib.ExitStack() as stack:
            for flag, manager in WEIGHT_FLAGS.items():
                wanted, now = (settings or {}).get(flag), _flag(flag)
                if wanted is None or now is None or now == wanted:
                    continue
                context = getattr(jax, manager, None)
                if context is not None:
                    stack.enter_context(context(wanted))
                else:
                    restore[flag] = now
                    jax.config.update(flag, wanted)
            yield
    finally:
        for flag, value in restore.items():
            jax.config.update(flag, value)


def mismatch_cause(recorded: dict[str, Any], digest: dict[str, Any], now: dict[str, Any], what: str) -> str:
    """Why ``digest`` (weights drawn now, under the settings ``now``) is not ``recorded`` (a
    ``{"sha256", "leaves", "settings"}`` record), in one clause: the first differing leaf and the
    likely cause, the first of: a replaced params file, a weight flag set otherwise, another jax
    version; else ``what`` (the seed or the model)."""
    then = recorded.get("settings") or {}
    theirs, ours = recorded.get("leaves") or {}, digest["leaves"]
    differing = sorted(n for n in set(theirs) | set(ours) if theirs.get(n) != ours.get(n))
    leaf = (f"leaf {differing[0]!r}" + (f" (and {len(differing) - 1} more)" if len(differing) > 1 else "")
            if differing else "the whole digest")
    flags = [f for f in WEIGHT_FLAGS if then.get(f) is not None and then[f] != now[f]]
    if then.get("frozen_from_sha256") != now.get("frozen_from_sha256"):
        cause = (f"the params file (frozen_from) has sha256 {str(now.get('frozen_from_sha256'))[:12]}... now, "
                 f"{str(then.get('frozen_from_sha256'))[:12]}... then: it was replaced")
    elif flags:
        flag = flags[0]
        cause = (f"{flag}={now[flag]} now, {then[flag]} then, and the seed draws other weights under it; run with "
                 f"{flag.upper()}={int(then[flag])}")
    elif then.get("jax") not in (None, now["jax"]):
        cause = (f"they were drawn by jax {then['jax']}, this is jax {now['jax']}, whose initialisers draw other "
                 f"weights; use jax {then['jax']}")
    else:
        cause = what
    return f"{leaf} differs: {cause}"
