"""The fused Threefry draws: Random123's known answer, bit-equality with jax.random, shapes, bad keys."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from slt_jax import threefry

SHAPES = [(1,), (7,), (7, 5), (784, 300), (2, 3, 4)]


def test_threefry2x32_matches_the_random123_known_answer():
    # Threefry-2x32-20 known-answer vectors from the Random123 distribution (kat_vectors).
    zero = jnp.uint32(0)
    x0, x1 = threefry.threefry2x32(zero, zero, zero, zero)
    assert (int(x0), int(x1)) == (0x6B200159, 0x99BA4EFE)
    ones = jnp.uint32(0xFFFFFFFF)
    x0, x1 = threefry.threefry2x32(ones, ones, ones, ones)
    assert (int(x0), int(x1)) == (0x1CB996FC, 0xBB002BE7)
    x0, x1 = threefry.threefry2x32(jnp.uint32(0x13198A2E), jnp.uint32(0x03707344),
                                   jnp.uint32(0x243F6A88), jnp.uint32(0x85A308D3))
    assert (int(x0), int(x1)) == (0xC4923A9C, 0x483DF7A0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_draws_equal_jax_random_bit_for_bit(seed, shape):
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 7)
    pairs = {
        "bits": (lambda k: threefry.bits(k, shape), lambda k: jax.random.bits(k, shape)),
        "uniform": (lambda k: threefry.uniform(k, shape, 1e-6, 1 - 1e-6),
                    lambda k: jax.random.uniform(k, shape, jnp.float32, 1e-6, 1 - 1e-6)),
        "normal": (lambda k: threefry.normal(k, shape), lambda k: jax.random.normal(k, shape, jnp.float32)),
    }
    for name, (ours, theirs) in pairs.items():
        a, b = jax.jit(ours)(key), jax.jit(theirs)(key)
        assert a.shape == shape and a.dtype == b.dtype, name
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def test_typed_keys_draw_the_same_as_raw_keys():
    raw = jax.random.PRNGKey(3)
    typed = jax.random.wrap_key_data(raw)
    np.testing.assert_array_equal(jax.jit(lambda k: threefry.normal(k, (50,)))(raw),
                                  jax.jit(lambda k: threefry.normal(k, (50,)))(typed))


def test_a_vmapped_draw_is_each_keys_own_draw():
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    draws = jax.vmap(lambda k: threefry.normal(k, (3,)))(keys)
    for k, d in zip(keys, draws):
        np.testing.assert_array_equal(d, jax.jit(lambda k: threefry.normal(k, (3,)))(k))


def test_a_key_that_is_not_threefry_is_refused():
    with pytest.raises(ValueError, match="Threefry key"):
        threefry.bits(jnp.zeros(4, jnp.uint32), (3,))


def test_typed_threefry_keys_draw_exactly_what_jax_random_draws():
    for seed in (0, 9):
        typed = jax.random.fold_in(jax.random.key(seed), 3)
        for shape in ((7, 5), (300,)):
            np.testing.assert_array_equal(jax.jit(lambda k: threefry.normal(k, shape))(typed),
                                          jax.jit(lambda k: jax.random.normal(k, shape, jnp.float32))(typed))
            np.testing.assert_array_equal(jax.jit(lambda k: threefry.uniform(k, shape, 1e-6, 1 - 1e-6))(typed),
                                          jax.jit(lambda k: jax.random.uniform(k, shape, jnp.float32, 1e-6,
                                                                               1 - 1e-6))(typed))


def test_only_single_threefry_keys_take_the_fused_path():
    assert threefry.is_threefry(jax.random.PRNGKey(0))
    assert threefry.is_threefry(jax.random.key(0))
    assert threefry.is_threefry(jax.random.key(0, impl="threefry2x32"))
    assert not threefry.is_threefry(jax.random.key(0, impl="rbg"))
    assert not threefry.is_threefry(jax.random.key(0, impl="unsafe_rbg"))
    assert not threefry.is_threefry(jax.random.split(jax.random.key(0), 3))  # a batch of keys
    assert not threefry.is_threefry(jax.random.split(jax.random.PRNGKey(0), 3))
    assert not threefry.is_threefry(jax.random.key_data(jax.random.key(0, impl="rbg")))  # raw rbg data, uint32[4]
    with jax.default_prng_impl("rbg"):
        assert not threefry.is_threefry(jax.random.PRNGKey(0))


@pytest.mark.parametrize("impl", ["rbg", "unsafe_rbg"])
def test_other_key_implementations_fall_back_to_jax_random_exactly(impl):
    key = jax.random.fold_in(jax.random.key(4, impl=impl), 2)
    shape = (7, 5)
    for ours, theirs in (
        (lambda k: threefry.normal(k, shape), lambda k: jax.random.normal(k, shape, jnp.float32)),
        (lambda k: threefry.uniform(k, shape, 1e-6, 1 - 1e-6),
         lambda k: jax.random.uniform(k, shape, jnp.float32, 1e-6, 1 - 1e-6)),
    ):
        a, b = jax.jit(ours)(key), jax.jit(theirs)(key)
        assert a.shape == shape and a.dtype == jnp.float32
        np.testing.assert_array_equal(a, b)
    # The fused Threefry program would give something else for the same key data.
    with pytest.raises(ValueError, match="Threefry key"):
        threefry.bits(key, shape)


def test_raw_keys_of_a_non_threefry_default_fall_back_to_jax_random():
    with jax.default_prng_impl("rbg"):
        raw = jax.random.PRNGKey(5)
        assert raw.shape == (4,)
        np.testing.assert_array_equal(jax.jit(lambda k: threefry.normal(k, (9,)))(raw),
                                      jax.jit(lambda k: jax.random.normal(k, (9,), jnp.float32))(raw))
