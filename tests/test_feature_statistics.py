"""Feature statistics against NumPy: the Gram matrix, its gradient, masked mean/covariance/std."""

import jax
import jax.numpy as jnp
import numpy as np

from nst_jax import feature_statistics


def numpy_gram(features):
  flat = features.reshape(-1, features.shape[-1]).astype(np.float64)  # M x N
  return flat.T @ flat


def test_gram_statistic_is_the_gram_per_position(rng):
  features = rng.standard_normal((6, 5, 4)).astype(np.float32)
  np.testing.assert_allclose(feature_statistics.gram_statistic(jnp.asarray(features)),
                             numpy_gram(features) / 30, rtol=1e-5)


def test_gram_custom_gradient_matches_autodiff(rng):
  features = jnp.asarray(rng.standard_normal((6, 5, 4)), jnp.float32)
  probe = jnp.asarray(np.random.default_rng(5).standard_normal((4, 4)), jnp.float32)
  plain = lambda f: jnp.sum((f.reshape(-1, 4).T @ f.reshape(-1, 4)) * probe)
  ours = lambda f: jnp.sum(feature_statistics.gram(f) * probe)
  np.testing.assert_allclose(jax.grad(ours)(features), jax.grad(plain)(features),
                             rtol=1e-5, atol=1e-5)


def test_masked_gram_uses_only_the_region(rng):
  features = rng.standard_normal((8, 8, 3)).astype(np.float32)
  mask = np.zeros((8, 8), np.float32)
  mask[:, :4] = 1.0
  got = feature_statistics.gram_statistic(jnp.asarray(features), mask=jnp.asarray(mask))
  left = features[:, :4]
  np.testing.assert_allclose(got, numpy_gram(left) / left[..., 0].size, rtol=1e-5)


def test_masked_mean_covariance_and_mean_std_are_the_weighted_statistics(rng):
  features = rng.uniform(0, 3, (6, 8, 4)).astype(np.float32)
  mask = rng.uniform(0, 1, (6, 8)).astype(np.float32)
  mask[:, 5:] = 0.0
  f, w = features.reshape(-1, 4).astype(np.float64), mask.reshape(-1).astype(np.float64)
  w = w / w.sum()
  mean = w @ f
  covariance = (f - mean).T @ np.diag(w) @ (f - mean)
  got = feature_statistics.mean_covariance_statistic(jnp.asarray(features), mask=jnp.asarray(mask))
  np.testing.assert_allclose(got['mean'], mean, rtol=1e-5)
  np.testing.assert_allclose(got['covariance'], covariance, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(got['sqrt_covariance'] @ got['sqrt_covariance'], covariance,
                             rtol=1e-3, atol=1e-5)
  got = feature_statistics.mean_std_statistic(jnp.asarray(features), mask=jnp.asarray(mask))
  np.testing.assert_allclose(got['mean'], mean, rtol=1e-5)
  np.testing.assert_allclose(got['std'], np.sqrt(np.diag(covariance) + 1e-5), rtol=1e-5)
