"""Lossless codes for a binary mask: one bit per gate, or a Golomb code of its run lengths.

A sparse mask is mostly one symbol. Writing it as the run lengths of the common symbol between
consecutive rare symbols, each run r coded by Golomb's code with parameter m (quotient r // m in
unary, remainder in truncated binary), costs within a few percent of the entropy
H(p) = -p log2 p - (1 - p) log2 (1 - p) bits per gate when runs are geometric, p being the rare
symbol's frequency: at 90% sparsity H = 0.469 bits instead of 1. Golomb's m is chosen by
(1 - p)^m ~ 1/2, optimal for geometric runs (Gallager & van Voorhis 1975).
"""
from __future__ import annotations

import math

import numpy as np


def binary_entropy(p: float) -> float:
    """H(p) in bits; the floor on bits per gate for any code of i.i.d. gates with density p."""
    return 0.0 if p <= 0.0 or p >= 1.0 else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def golomb_parameter(p_rare: float) -> int:
    """m with (1 - p)^m ~ 1/2, at least 1."""
    if p_rare <= 0.0 or p_rare >= 0.5:
        return 1
    return max(1, math.ceil(-math.log(2 - p_rare) / math.log1p(-p_rare)))


def golomb_encode(bits: np.ndarray) -> tuple[bytes, dict]:
    """Codes a flat bool array; returns the packed bytes and the header needed to decode them."""
    bits = np.asarray(bits, bool).ravel()
    n, ones = bits.size, int(bits.sum())
    rare = bool(ones <= n - ones)  # the symbol whose positions we code
    positions = np.flatnonzero(bits == rare)
    m = golomb_parameter(len(positions) / n if n else 0.0)
    b = max(1, math.ceil(math.log2(m))) if m > 1 else 0
    cutoff = (1 << b) - m
    out: list[int] = []
    previous = -1
    for pos in positions:
        run = int(pos - previous - 1)
        previous = pos
        q, r = divmod(run, m)
        out.extend([1] * q + [0])
        if m > 1:  # truncated binary: the first `cutoff` remainders take b - 1 bits, the rest b
            value, width = (r, b - 1) if r < cutoff else (r + cutoff, b)
            out.extend((value >> k) & 1 for k in reversed(range(width)))
    header = {"n": n, "rare": rare, "count": len(positions), "m": m, "nbits": len(out)}
    return np.packbits(np.asarray(out, np.uint8)).tobytes(), header


HEADER_KEYS = ("n", "rare", "count", "m", "nbits")


def check_header(header: object, nbytes: int) -> dict:
    """The header of a Golomb-coded mask of ``nbytes`` bytes, checked: every field present and of its
    type, ``count <= n``, ``m >= 1`` and ``nbits`` within the data. Raises ``ValueError`` saying
    which field is wrong, before anything is allocated."""
    if not isinstance(header, dict):
        raise ValueError(f"the Golomb header is {type(header).__name__}, not an object with {', '.join(HEADER_KEYS)}")
    missing = [k for k in HEADER_KEYS if k not in header]
    if missing:
        raise ValueError(f"the Golomb header lacks {', '.join(missing)}")
    for key in ("n", "count", "m", "nbits"):
        value = header[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"the Golomb header's {key}={value!r} is not a non-negative integer")
    if not isinstance(header["rare"], bool):
        raise ValueError(f"the Golomb header's rare={header['rare']!r} is not true or false")
    if header["m"] < 1:
        raise ValueError(f"the Golomb header's m={header['m']} is not at least 1")
    if header["count"] > header["n"]:
        raise ValueError(f"the Golomb header's count={header['count']} exceeds n={header['n']}")
    if header["nbits"] > 8 * nbytes or -(-header["nbits"] // 8) != nbytes:
        raise ValueError(f"the Golomb header's nbits={header['nbits']} does not match the {nbytes} bytes of code")
    if header["count"] > header["nbits"]:  # every coded position costs at least one bit
        raise ValueError(f"the Golomb header's count={header['count']} exceeds its nbits={header['nbits']}")
    return header


def golomb_decode(data: bytes, header: dict) -> np.ndarray:
    """Inverse of ``golomb_encode``: the flat bool array. A header or code that is not one
    ``golomb_encode`` wrote (a run past the end of the mask, a code that ends early or has bits
    left over) raises ``ValueError``."""
    header = check_header(header, len(data))
    nbits = header["nbits"]
    stream = np.unpackbits(np.frombuffer(data, np.uint8), count=nbits).tolist()
    m, rare, n = header["m"], header["rare"], header["n"]
    b = max(1, math.ceil(math.log2(m))) if m > 1 else 0
    cutoff = (1 << b) - m
    out = np.full(n, not rare, bool)
    i, pos = 0, -1
    try:
        for k in range(header["count"]):
            q = 0
            while stream[i]:
                q, i = q + 1, i + 1
            i += 1
            r = 0
            if m > 1:
                x = 0
                for _ in range(b - 1):
                    x, i = (x << 1) | stream[i], i + 1
                if x < cutoff:
                    r = x
                else:
                    x, i = (x << 1) | stream[i], i + 1
                    r = x - cutoff
            pos += q * m + r + 1
            if pos >= n:
                raise ValueError(f"the Golomb code's run {k} ends at gate {pos}, past the mask's {n} gates")
            out[pos] = rare
    except IndexError:
        raise ValueError(f"the Golomb code ends inside run {k} of {header['count']}") from None
    if i != nbits:
        raise ValueError(f"the Golomb code has {nbits - i} bits left over after its {header['count']} runs")
    return out
