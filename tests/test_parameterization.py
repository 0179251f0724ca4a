"""The Laplacian pyramid parameterisation: exact round trips, band-pass levels, linearity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nst_jax import parameterization


@pytest.mark.parametrize('shape', [(64, 64), (37, 50), (16, 90)])
def test_pyramid_round_trip_is_exact(shape):
  image = jnp.asarray(np.random.default_rng(0).uniform(0, 255, (*shape, 3)), jnp.float32)
  pyramid = parameterization.analyse(image, levels=4)
  assert [level.shape[:2] for level in pyramid] == parameterization.level_shapes(*shape, levels=4)
  np.testing.assert_allclose(parameterization.synthesise(pyramid), image, atol=1e-3)
  vector = parameterization.encode(image, levels=4)
  assert vector.shape == (parameterization.parameter_count(*shape, levels=4),)
  np.testing.assert_allclose(parameterization.decode(vector, height=shape[0], width=shape[1],
                                                     levels=4), image, atol=1e-3)


def test_levels_stop_at_the_smallest_side():
  assert parameterization.level_shapes(64, 64, levels=5) == [(64, 64), (32, 32), (16, 16),
                                                               (8, 8)]
  assert parameterization.level_shapes(37, 50, levels=1) == [(37, 50), (19, 25)]
  assert parameterization.level_shapes(12, 400, levels=3) == [(12, 400)]


def test_band_levels_of_a_smooth_image_are_small_and_its_residual_holds_the_mean():
  y, x = np.mgrid[0:64, 0:64] / 64.0
  smooth = jnp.asarray(np.stack([100 + 50 * x, 80 + 40 * y, 120 + 0 * x], -1), jnp.float32)
  pyramid = parameterization.analyse(smooth, levels=3)
  assert max(float(jnp.abs(band[4:-4, 4:-4]).max()) for band in pyramid[:-1]) < 2.0
  np.testing.assert_allclose(pyramid[-1].mean(axis=(0, 1)), smooth.mean(axis=(0, 1)), atol=1.0)


def test_decode_is_linear_so_its_gradient_is_the_transposed_synthesis():
  rng = np.random.default_rng(1)
  size = parameterization.parameter_count(32, 32, levels=2)
  a, b = (jnp.asarray(rng.normal(size=size), jnp.float32) for _ in range(2))
  decode = lambda v: parameterization.decode(v, height=32, width=32, levels=2)
  np.testing.assert_allclose(decode(2 * a + b), 2 * decode(a) + decode(b), atol=1e-3)
  probe = jnp.asarray(rng.normal(size=(32, 32, 3)), jnp.float32)
  grad = jax.grad(lambda v: jnp.sum(decode(v) * probe))(a)
  # <decode(e_i), probe> for a few basis vectors, against the gradient's entries.
  for index in (0, 5, size - 1):
    basis = jnp.zeros(size).at[index].set(1.0)
    np.testing.assert_allclose(grad[index], jnp.sum(decode(basis) * probe), rtol=1e-4, atol=1e-5)
