"""Mask codes are lossless, and Golomb's code approaches the entropy on sparse masks."""
import numpy as np
import pytest

from slt_jax.mask_coding import binary_entropy, golomb_decode, golomb_encode
from slt_jax.ticket import decode_masks, encode_masks


@pytest.mark.parametrize("p", [0.0, 0.001, 0.02, 0.1, 0.3, 0.5, 0.7, 0.98, 1.0])
@pytest.mark.parametrize("n", [1, 9, 5000])
def test_golomb_round_trip(p, n):
    bits = np.random.default_rng(n).random(n) < p
    data, header = golomb_encode(bits)
    assert (golomb_decode(data, header) == bits).all()


@pytest.mark.parametrize("density", [0.1, 0.02, 0.9])
def test_golomb_near_entropy_on_iid_masks(density):
    bits = np.random.default_rng(0).random(200_000) < density
    data, header = golomb_encode(bits)
    per_gate = header["nbits"] / bits.size
    h = binary_entropy(bits.mean())
    assert h <= per_gate <= 1.03 * h + 1e-3
    if density in (0.1, 0.9):
        assert per_gate < 0.5  # 90% sparsity: under half a bit per weight


@pytest.mark.parametrize("coding", ["packbits", "golomb"])
def test_ticket_mask_codings_round_trip(coding):
    rng = np.random.default_rng(1)
    # Params-shaped, None where a leaf is not gated; decoded by path name.
    masks = {"Conv_0": {"kernel": rng.random((1, 1, 1, 7)) < 0.5, "bias": None},
             "Dense_0": {"kernel": rng.random((64, 30)) < 0.1, "bias": None}}
    decoded = decode_masks(encode_masks(masks, coding))
    expected = {"Conv_0/kernel": masks["Conv_0"]["kernel"], "Dense_0/kernel": masks["Dense_0"]["kernel"]}
    assert decoded.keys() == expected.keys()
    for name, m in expected.items():
        assert decoded[name].shape == m.shape and (decoded[name] == m).all()


def test_unknown_coding_is_refused():
    with pytest.raises(ValueError, match="allowed: packbits, golomb"):
        encode_masks({"a": np.ones(3, bool)}, "zip")
