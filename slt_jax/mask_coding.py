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


def golomb_decode(data: bytes, header: dict) -> np.ndarray:
    """Inverse of ``golomb_encode``: the flat bool array."""
    stream = np.unpackbits(np.frombuffer(data, np.uint8), count=header["nbits"])
    m, rare = header["m"], header["rare"]
    b = max(1, math.ceil(math.log2(m))) if m > 1 else 0
    cutoff = (1 << b) - m
    out = np.full(header["n"], not rare, bool)
    i, pos = 0, -1
    for _ in range(header["count"]):
        q = 0
        while stream[i]:
            q, i = q + 1, i + 1
        i += 1
        r = 0
        if m > 1:
            x = 0
            for _ in range(b - 1):
                x, i = (x << 1) | int(stream[i]), i + 1
            if x < cutoff:
                r = x
            else:
                x, i = (x << 1) | int(stream[i]), i + 1
                r = x - cutoff
        pos += q * m + r + 1
        out[pos] = rare
    return out
