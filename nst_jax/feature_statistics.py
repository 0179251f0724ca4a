"""Feature statistics that style terms compare: the Gram matrix, channel mean, covariance and std.

Each statistic takes one layer's activations (H, W, C) and optionally a spatial mask (H, W) that
weights positions, so a masked statistic is that of the region. :mod:`nst_jax.losses` stores them
of the reference image as targets (a term's ``statistic``) and recomputes them of the generated
image. Nothing here knows about terms or the total loss.

Every statistic here is a function of sums over positions (weighted counts, ``Σ w F``,
``Σ w F Fᵀ``), so it can also be accumulated over tiles of an image: :func:`gram_sums` and
:func:`moment_sums` give those sums over some positions, and :func:`gram_from_sums`,
:func:`mean_covariance_from_sums` and :func:`mean_std_from_sums` the statistic of all positions
from their totals (:mod:`nst_jax.tiling`).
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
  return with_sqrt_covariance({'mean': mean, 'covariance': (centred * weights[:, None]).T @ centred})


def with_sqrt_covariance(stats: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """``stats`` (mean, covariance) and the covariance's symmetric square root."""
  eigenvalues, eigenvectors = jnp.linalg.eigh(stats['covariance'])
  sqrt_covariance = (eigenvectors * jnp.sqrt(jnp.maximum(eigenvalues, 0.0))) @ eigenvectors.T
  return dict(stats, sqrt_covariance=sqrt_covariance)


def mean_std_statistic(features: jax.Array, *, mask: jax.Array | None = None,
                       **unused_options) -> dict[str, jax.Array]:
  """Channel mean and standard deviation (C,), the AdaIN statistic (weighted by a mask if given)."""
  flat, weights = positions_and_weights(features, mask)
  mean = weights @ flat
  variance = weights @ (flat - mean) ** 2
  return {'mean': mean, 'std': jnp.sqrt(variance + 1e-5)}


# --------------------------------------------------------------------------------------------
# The same statistics as sums over positions (for tiles).


def position_weights(valid: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Each position's weight (h, w): 1 inside the image (``valid``), times the mask if any."""
  return valid if mask is None else valid * mask


def gram_sums(features: jax.Array, *, weights: jax.Array) -> dict[str, jax.Array]:
  """``Σ (wF)(wF)ᵀ`` and ``Σ w²`` over the positions of ``features`` (h, w, C), weights (h, w)."""
  return {'gram': gram(features * weights[..., None]), 'count': jnp.sum(weights ** 2)}


def gram_from_sums(sums: dict[str, jax.Array]) -> jax.Array:
  """:func:`gram_statistic` from :func:`gram_sums` over all positions (the count is H·W unmasked,
  so clamping it as the masked statistic does changes nothing)."""
  return sums['gram'] / jnp.maximum(sums['count'], 1e-8)


def moment_sums(features: jax.Array, *, weights: jax.Array, outer: bool) -> dict[str, jax.Array]:
  """``Σ w``, ``Σ w F`` and ``Σ w F Fᵀ`` (or its diagonal, ``outer=False``) over the positions.

  Raw moments lose to float32 cancellation only where a channel's mean is large against its
  spread, which ReLU features' is not. (Moments about the style's mean, tried first, lost far
  more: a channel the generated image leaves dark while the style's is bright cancelled to a
  negative variance.)
  """
  flat = features.reshape(-1, features.shape[-1])
  flat_weights = weights.reshape(-1).astype(flat.dtype)
  weighted = flat * flat_weights[:, None]
  second = weighted.T @ flat if outer else jnp.sum(weighted * flat, axis=0)
  return {'weight': jnp.sum(flat_weights), 'first': jnp.sum(weighted, axis=0), 'second': second}


def mean_covariance_from_sums(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Mean and covariance of :func:`mean_covariance_statistic` from :func:`moment_sums`."""
  total = jnp.maximum(sums['weight'], 1e-8)
  mean = sums['first'] / total
  return {'mean': mean, 'covariance': sums['second'] / total - jnp.outer(mean, mean)}


def mean_std_from_sums(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """:func:`mean_std_statistic` from :func:`moment_sums` (``outer=False``)."""
  total = jnp.maximum(sums['weight'], 1e-8)
  mean = sums['first'] / total
  # Rounding can leave a constant channel's variance a hair below zero.
  variance = jnp.maximum(sums['second'] / total - mean ** 2, 0.0)
  return {'mean': mean, 'std': jnp.sqrt(variance + 1e-5)}
