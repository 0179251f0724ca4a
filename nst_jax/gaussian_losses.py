"""The Gaussian distribution style terms: Wasserstein (mean and covariance) and mean/std (AdaIN).

Each fits a Gaussian (or its diagonal) to a layer's features, weighted by a style mask if given,
and compares it with the style's. Both statistics are functions of moments summed over positions
(:func:`nst_jax.feature_statistics.moment_sums`), so both terms are additive over positions and
tile exactly (:mod:`nst_jax.tiling`): ``sums`` accumulates the weighted moments, the ``finish``
functions turn the totals into the statistic and then the same distance as the term.
Registered into :mod:`nst_jax.terms`; importing :mod:`nst_jax.losses` imports this module.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from nst_jax import feature_statistics
from nst_jax import terms


def _moment_sums(outer: bool):
  """The ``sums`` of a Gaussian term: weighted moments (``outer``: second moments as a matrix)."""

  def sums(*, features: jax.Array, valid: jax.Array, mask: jax.Array | None = None, **unused
           ) -> dict[str, jax.Array]:
    return feature_statistics.moment_sums(
        features, weights=feature_statistics.position_weights(valid, mask), outer=outer)

  return sums


def _wasserstein_distance(stats: Mapping[str, jax.Array], target: Mapping[str, jax.Array], *,
                          normalization: str) -> jax.Array:
  cross = target['sqrt_covariance'] @ stats['covariance'] @ target['sqrt_covariance']
  # Clamped above zero: ReLU features have near-singular covariances, and the gradient of a square
  # root at zero is infinite (NaN after the chain rule).
  cross_trace = jnp.sum(jnp.sqrt(jnp.maximum(jnp.linalg.eigvalsh(cross), 1e-5)))
  distance = (jnp.sum((stats['mean'] - target['mean']) ** 2) + jnp.trace(stats['covariance'])
              + jnp.trace(target['covariance']) - 2.0 * cross_trace)
  channels = target['mean'].shape[-1]
  second_moment = (jnp.sum(target['mean'] ** 2) + jnp.trace(target['covariance'])) / channels
  scale = terms.distribution_scale(normalization, second_moment=second_moment)
  return distance / channels * scale


def _wasserstein_finish(*, sums: Mapping[str, jax.Array], target: Mapping[str, jax.Array],
                        normalization: str = 'gram', **unused) -> jax.Array:
  stats = feature_statistics.mean_covariance_from_sums(sums)
  return _wasserstein_distance(stats, target, normalization=normalization)


@terms.register('wasserstein', reference='style',
                statistic=feature_statistics.mean_covariance_statistic,
                additive=terms.Additive(
                    sums=_moment_sums(outer=True), finish=_wasserstein_finish,
                    statistic=lambda *, sums, **unused: feature_statistics.with_sqrt_covariance(
                        feature_statistics.mean_covariance_from_sums(sums))))
def wasserstein(*, features: jax.Array, target: Mapping[str, jax.Array],
                mask: jax.Array | None = None, normalization: str = 'gram', **unused
                ) -> jax.Array:
  """Squared 2-Wasserstein distance between Gaussians fitted to the features (crowsonkb).

  ``|μ − μ_s|² + tr Σ + tr Σ_s − 2 tr (Σ_s^½ Σ Σ_s^½)^½``, divided by the channel count, times
  :func:`nst_jax.terms.distribution_scale`. With a mask, μ and Σ are the masked region's.
  """
  stats = feature_statistics.mean_covariance_statistic(features, mask=mask)
  return _wasserstein_distance(stats, target, normalization=normalization)


def _mean_std_distance(stats: Mapping[str, jax.Array], target: Mapping[str, jax.Array], *,
                       normalization: str) -> jax.Array:
  distance = (jnp.mean((stats['mean'] - target['mean']) ** 2)
              + jnp.mean((stats['std'] - target['std']) ** 2))
  second_moment = jnp.mean(target['mean'] ** 2 + target['std'] ** 2)
  return distance * terms.distribution_scale(normalization, second_moment=second_moment)


def _mean_std_finish(*, sums: Mapping[str, jax.Array], target: Mapping[str, jax.Array],
                     normalization: str = 'gram', **unused) -> jax.Array:
  stats = feature_statistics.mean_std_from_sums(sums)
  return _mean_std_distance(stats, target, normalization=normalization)


@terms.register('mean_std', reference='style', statistic=feature_statistics.mean_std_statistic,
                additive=terms.Additive(
                    sums=_moment_sums(outer=False), finish=_mean_std_finish,
                    statistic=lambda *, sums, **unused: feature_statistics.mean_std_from_sums(sums)))
def mean_std(*, features: jax.Array, target: Mapping[str, jax.Array],
             mask: jax.Array | None = None, normalization: str = 'gram', **unused) -> jax.Array:
  """Channel mean and standard deviation matching (the AdaIN statistic): mean squared errors.

  Times :func:`nst_jax.terms.distribution_scale`; with a mask, the masked region's mean and
  deviation.
  """
  stats = feature_statistics.mean_std_statistic(features, mask=mask)
  return _mean_std_distance(stats, target, normalization=normalization)
