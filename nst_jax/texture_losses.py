"""Style terms from texture synthesis: sliced Wasserstein, histogram and MRF-patch matching.

* ``sliced_wasserstein`` (Heitz et al. 2021): the features' distribution along random directions,
  redrawn every step.
* ``histogram`` (Risser et al. 2017): each channel's distribution, by histogram matching.
* ``mrf`` (Li & Wand 2016): every 3x3 feature patch against its most similar style patch.

All three accept spatial masks and, by default, put their distance on the Gram term's scale
(:func:`nst_jax.terms.distribution_scale`), so the default ``style_weight`` stylises with each
(tests/test_pipeline.py measures it). They register into :mod:`nst_jax.terms`; importing
:mod:`nst_jax.losses` imports this module.

The distribution terms compare one-dimensional distributions through their quantile functions. A
sorted sample with position weights ``w`` (a mask, or equal weights) has its i-th value at the
quantile level ``Σ_{j<i} w_j + w_i / 2`` (weights summing to one); the style's quantile at any level
is read off its own sorted values by linear interpolation. With equal weights and equal position
counts this pairs the i-th smallest result value with the i-th smallest style value, the exact
one-dimensional optimal transport; otherwise the style's quantiles are interpolated.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from nst_jax import errors
from nst_jax import feature_statistics
from nst_jax import terms


def _sorted_with_levels(values: jax.Array, weights: jax.Array
                        ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Each column of ``values`` (M, K) sorted, with its weights, quantile levels and order.

  Returns:
    ``(sorted_values, sorted_weights, levels, order)``, each (M, K): ``order`` the (stable)
    argsort, ``levels`` the midpoint of each sorted value's cumulative weight.
  """
  # One sort carrying the positions along, along the minor axis: XLA's CPU sort is ~1.7x faster
  # that way than argsort plus gathers down the columns (measured at relu1_1, 256 px).
  # The order is found without gradient and the values gathered by it: the gradient is then one
  # scatter, not a second sort (which is how JAX differentiates a sort).
  rows = values.T
  positions = jnp.broadcast_to(jnp.arange(values.shape[0], dtype=jnp.int32), rows.shape)
  _, order = jax.lax.sort((jax.lax.stop_gradient(rows), positions), dimension=1, num_keys=1)
  sorted_rows = jnp.take_along_axis(rows, order, axis=1)
  sorted_weights = weights[order]
  levels = jnp.cumsum(sorted_weights, axis=1) - 0.5 * sorted_weights
  return sorted_rows.T, sorted_weights.T, levels.T, order.T


def _quantiles(levels: jax.Array, sorted_target: jax.Array, target_levels: jax.Array
               ) -> jax.Array:
  """The target's quantile function at ``levels`` (M, K), column by column (linear interpolation;
  beyond the target's first and last levels, its smallest and largest values)."""
  return jax.vmap(jnp.interp, in_axes=1, out_axes=1)(levels, target_levels, sorted_target)


def _second_moment(flat: jax.Array, weights: jax.Array) -> jax.Array:
  """Mean squared activation ``E|s|² / C`` (the Gram-scale factor's input)."""
  return weights @ jnp.mean(flat ** 2, axis=1)


# --------------------------------------------------------------------------------------------
# Sliced Wasserstein.


def style_samples(features: jax.Array, *, mask: jax.Array | None = None,
                  **unused_options) -> dict[str, jax.Array]:
  """The style's activations as samples: (M, C) features, (M,) weights summing to one, and the
  mean second moment. Terms that redraw projections or positions every step store these."""
  flat, weights = feature_statistics.positions_and_weights(features, mask)
  return {'features': flat, 'weights': weights, 'second_moment': _second_moment(flat, weights)}


def random_directions(key: jax.Array, *, channels: int, count: int) -> jax.Array:
  """``count`` directions uniform on the unit sphere of R^channels, as columns (C, count)."""
  directions = jax.random.normal(key, (channels, count))
  return directions / jnp.linalg.norm(directions, axis=0, keepdims=True)


@terms.register('sliced_wasserstein', reference='style', statistic=style_samples)
def sliced_wasserstein(*, features: jax.Array, target: Mapping[str, jax.Array], key: jax.Array,
                       mask: jax.Array | None = None, projections: int = 0,
                       normalization: str = 'gram', **unused) -> jax.Array:
  """Sliced Wasserstein distance between the features and the style's.

  Heitz, Vanhoey, Chambon, Belcour, "A Sliced Wasserstein Loss for Neural Texture Synthesis",
  CVPR 2021: project both sets of activations on random unit directions (drawn afresh from
  ``key`` every step), sort each projection and take the mean squared difference of the sorted
  values: the squared 1-D Wasserstein distance per direction, averaged over directions. When the
  position counts differ (or with a mask) the style's sorted projections are interpolated at the
  result's quantile levels (module docstring); with a mask the result's positions are weighted
  by it. Times :func:`nst_jax.terms.distribution_scale` (``normalization``).

  Args:
    features: the result's activations (H, W, C).
    target: :func:`style_samples` of the style.
    key: this step's key for the directions.
    mask: (H, W) region of the result this style covers, or None.
    projections: number of directions; 0 means as many as channels (the paper's choice).
    normalization: ``gram`` (default) or ``none``.

  Returns:
    The scalar loss.
  """
  flat, weights = feature_statistics.positions_and_weights(features, mask)
  channels = flat.shape[1]
  directions = random_directions(key, channels=channels, count=projections or channels)
  ours, our_weights, levels, _ = _sorted_with_levels(flat @ directions, weights)
  theirs, _, their_levels, _ = _sorted_with_levels(target['features'] @ directions,
                                                    target['weights'])
  matched = _quantiles(levels, theirs, their_levels)
  distance = jnp.sum(our_weights * (ours - matched) ** 2) / directions.shape[1]
  return distance * terms.distribution_scale(normalization,
                                             second_moment=target['second_moment'])


# --------------------------------------------------------------------------------------------
# Histogram.


def sorted_channels(features: jax.Array, *, mask: jax.Array | None = None,
                    **unused_options) -> dict[str, jax.Array]:
  """Each channel's sorted activations (M, C) and their quantile levels, and the mean second
  moment: the style's per-channel histograms, exactly."""
  flat, weights = feature_statistics.positions_and_weights(features, mask)
  sorted_values, _, levels, _ = _sorted_with_levels(flat, weights)
  return {'sorted': sorted_values, 'levels': levels,
          'second_moment': _second_moment(flat, weights)}


@terms.register('histogram', reference='style', statistic=sorted_channels)
def histogram(*, features: jax.Array, target: Mapping[str, jax.Array],
              mask: jax.Array | None = None, normalization: str = 'gram', **unused
              ) -> jax.Array:
  """Histogram loss: squared distance to the activations remapped to the style's histograms.

  Risser, Wilmot, Barnes, "Stable and Controllable Neural Texture Synthesis and Style Transfer
  Using Histogram Losses", arXiv 1701.08893 (2017): each channel of the result is histogram-matched
  to the style's (every activation replaced by the style's value at its rank; here the exact
  quantile, not a 256-bin histogram), and the loss is ``‖O − R(O)‖²`` with the remapped ``R(O)``
  held constant. Not the colour-preservation mode ``preserve_color=histogram``: this term matches
  VGG activations, that mode recolours the style image. The distance is the mean over positions
  (mask-weighted) and channels, times :func:`nst_jax.terms.distribution_scale`.

  Args:
    features: the result's activations (H, W, C).
    target: :func:`sorted_channels` of the style.
    mask: (H, W) region of the result this style covers, or None.
    normalization: ``gram`` (default) or ``none``.

  Returns:
    The scalar loss.
  """
  flat, weights = feature_statistics.positions_and_weights(features, mask)
  # The remapping is held constant: no gradient flows through the sort.
  _, _, levels, order = _sorted_with_levels(jax.lax.stop_gradient(flat), weights)
  matched = _quantiles(levels, target['sorted'], target['levels'])
  # Back to each position: the style's value at that activation's rank.
  remapped = jnp.zeros_like(flat).at[order, jnp.arange(flat.shape[1])].set(matched)
  remapped = jax.lax.stop_gradient(remapped)
  distance = jnp.sum(weights[:, None] * (flat - remapped) ** 2) / flat.shape[1]
  return distance * terms.distribution_scale(normalization,
                                             second_moment=target['second_moment'])


# --------------------------------------------------------------------------------------------
# MRF patches.

#: Most result-patch x style-patch correlations held at once when matching (64 MB of float32).
_MATCH_BLOCK_ELEMENTS = 2 ** 24


def patches(features: jax.Array) -> jax.Array:
  """Every 3x3 patch of features (H, W, C), stride 1, no padding: ((H-2)(W-2), 9C)."""
  height, width, _ = features.shape
  if height < 3 or width < 3:
    raise errors.UserError(f'the mrf term needs layers of at least 3x3 positions, got '
                           f'{height}x{width}; use shallower layers or a larger --config.size')
  shifted = [features[dy:height - 2 + dy, dx:width - 2 + dx]
             for dy in range(3) for dx in range(3)]
  return jnp.concatenate(shifted, axis=-1).reshape((height - 2) * (width - 2), -1)


def _patch_weights(mask: jax.Array | None, count: int) -> jax.Array:
  """Each patch's weight: the mask at its centre (equal weights without a mask)."""
  if mask is None:
    return jnp.ones((count,), jnp.float32)
  return mask[1:-1, 1:-1].reshape(-1).astype(jnp.float32)


def style_patches(features: jax.Array, *, mask: jax.Array | None = None,
                  **unused_options) -> dict[str, jax.Array]:
  """The style's 3x3 patches, the same divided by their norms (for normalised cross-correlation),
  a penalty that rules out patches centred outside a mask, and the mean second moment."""
  style = patches(features)
  normalized = style / jnp.maximum(jnp.linalg.norm(style, axis=1, keepdims=True), 1e-8)
  inside = _patch_weights(mask, style.shape[0]) > 0.5
  return {'patches': style, 'normalized': normalized,
          'penalty': jnp.where(inside, 0.0, -4.0),  # correlations lie in [-1, 1]
          'second_moment': jnp.mean(features ** 2)}


def nearest_patches(ours: jax.Array, target: Mapping[str, jax.Array]) -> jax.Array:
  """Index of each result patch's most correlated style patch (normalised cross-correlation).

  Dividing by the result patch's own norm does not change which style patch is best, so only the
  style's patches are normalised. Blocks of result patches bound the memory to
  :data:`_MATCH_BLOCK_ELEMENTS` correlations.
  """
  style_count = target['normalized'].shape[0]
  block = max(1, min(ours.shape[0], _MATCH_BLOCK_ELEMENTS // style_count))
  return jax.lax.map(lambda patch: jnp.argmax(target['normalized'] @ patch + target['penalty']),
                     ours, batch_size=block)


@terms.register('mrf', reference='style', statistic=style_patches)
def mrf(*, features: jax.Array, target: Mapping[str, jax.Array], mask: jax.Array | None = None,
        normalization: str = 'gram', **unused) -> jax.Array:
  """MRF loss: each 3x3 feature patch against its nearest style patch.

  Li & Wand, "Combining Markov Random Fields and Convolutional Neural Networks for Image
  Synthesis", CVPR 2016: ``E_s = Σ_i ‖Ψ_i(F) − Ψ_NN(i)(F_s)‖²``, the nearest style patch chosen by
  normalised cross-correlation (held fixed: no gradient flows through the choice). Here divided by
  the number of patches (mask-weighted: a patch's weight is the mask at its centre) and the patch
  size, so a distance per activation, times a quarter of
  :func:`nst_jax.terms.distribution_scale`: with the default ``normalization='gram'`` it is
  0.3-2x the Gram term per layer (measured as there), and the default style weight stylises. The
  paper's layers are relu3_1 and relu4_1 (configs/mrf.py); every step compares all pairs of
  patches, ``(H-2)(W-2) x (H_s-2)(W_s-2) x 9C`` multiply-adds per layer, which rules out the
  shallow layers at large sizes. The paper's rotated and scaled copies of the style are not made.

  Args:
    features: the result's activations (H, W, C), at least 3x3.
    target: :func:`style_patches` of the style.
    mask: (H, W) region of the result this style covers, or None.
    normalization: ``gram`` (default) or ``none``.

  Returns:
    The scalar loss.
  """
  ours = patches(features)
  matched = target['patches'][nearest_patches(jax.lax.stop_gradient(ours), target)]
  weights = _patch_weights(mask, ours.shape[0])
  squared = jnp.sum((ours - matched) ** 2, axis=1) / ours.shape[1]
  distance = jnp.sum(weights * squared) / jnp.maximum(jnp.sum(weights), 1e-8)
  # Nearest-patch distances run 1.1-8x the Gram term on the common scale (measured at relu2_1 ...
  # relu5_1): a quarter of it brings the default style weight in line with the other terms.
  scale = terms.distribution_scale(normalization, second_moment=target['second_moment'])
  return distance * (scale / 4.0 if normalization != 'none' else scale)
