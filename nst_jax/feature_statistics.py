"""Feature statistics that style terms compare: the Gram matrix, channel mean, covariance and std.

Each statistic takes one layer's activations (H, W, C) and optionally a spatial mask (H, W) that
weights positions, so a masked statistic is that of the region. :mod:`nst_jax.losses` stores them
of the reference image as targets (a term's ``statistic``) and recomputes them of the generated
image. Nothing here knows about terms or the total loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def gram(features: jax.Array) -> jax.Array:
  """Gram matrix ``FᵀF`` of features reshaped to (positions, channels): (C, C).

  Its custom gradient is one matmul, ``F (dG + dGᵀ)``, instead of the two autodiff makes.
  """
  flat = features.reshape(-1, features.shape[-1])
  return flat.T @ flat


def _gram_fwd(features):
  return gram(features), features


def _gram_bwd(features, cotangent):
  flat = features.reshape(-1, features.shape[-1])
  return ((flat @ (cotangent + cotangent.T)).reshape(features.shape),)


gram.defvjp(_gram_fwd, _gram_bwd)


def gram_statistic(features: jax.Array, *, mask: jax.Array | None = None,
                   **unused_options) -> jax.Array:
  """Gram matrix per position, ``FᵀF / M`` (masked: ``(mF)ᵀ(mF) / Σm²``), for layer sizes to cancel."""
  if mask is not None:
    features = features * mask[..., None]
    positions = jnp.maximum(jnp.sum(mask ** 2), 1e-8)
  else:
    positions = features.shape[0] * features.shape[1]
  return gram(features) / positions


def positions_and_weights(features: jax.Array, mask: jax.Array | None
                          ) -> tuple[jax.Array, jax.Array]:
  """Features as (positions, channels) and each position's weight, summing to one.

  Args:
    features: one layer's activations (H, W, C).
    mask: (H, W) weights of the positions (a region), or None for equal weights.

  Returns:
    ``(flat, weights)``: (H·W, C) and (H·W,).
  """
  flat = features.reshape(-1, features.shape[-1])
  if mask is None:
    return flat, jnp.full((flat.shape[0],), 1.0 / flat.shape[0], flat.dtype)
  weights = mask.reshape(-1).astype(flat.dtype)
  return flat, weights / jnp.maximum(jnp.sum(weights), 1e-8)


def mean_covariance_statistic(features: jax.Array, *, mask: jax.Array | None = None,
                              **unused_options) -> dict[str, jax.Array]:
  """Channel mean (C,), covariance (C, C) and the covariance's square root, for Wasserstein terms.

  With a mask (H, W) the mean and covariance are weighted by it: the statistics of the region.
  """
  flat, weights = positions_and_weights(features, mask)
  mean = weights @ flat
  centred = flat - mean
  covariance = (centred * weights[:, None]).T @ centred
  eigenvalues, eigenvectors = jnp.linalg.eigh(covariance)
  sqrt_covariance = (eigenvectors * jnp.sqrt(jnp.maximum(eigenvalues, 0.0))) @ eigenvectors.T
  return {'mean': mean, 'covariance': covariance, 'sqrt_covariance': sqrt_covariance}


def mean_std_statistic(features: jax.Array, *, mask: jax.Array | None = None,
                       **unused_options) -> dict[str, jax.Array]:
  """Channel mean and standard deviation (C,), the AdaIN statistic (weighted by a mask if given)."""
  flat, weights = positions_and_weights(features, mask)
  mean = weights @ flat
  variance = weights @ (flat - mean) ** 2
  return {'mean': mean, 'std': jnp.sqrt(variance + 1e-5)}
