"""STROTSS terms: relaxed earth mover's distance (style) and self-similarity (content).

Kolkin, Salavon, Shakhnarovich, "Style Transfer by Relaxed Optimal Transport and
Self-Similarity", CVPR 2019. Both compare cosine distances between feature vectors on a random
subset of positions, drawn afresh every step from the term's ``key`` (``positions`` of them,
default 1024, all positions when the layer has fewer). The paper concatenates several layers into
hypercolumns; here each layer is a term of its own, weighted like any other (``layer_weights``).
The paper's style loss also has a moment term and a palette term: combine ``relaxed_emd`` with
``mean_std`` in another entry for the moments.

They register into :mod:`nst_jax.terms`; importing :mod:`nst_jax.losses` imports this module.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from nst_jax import errors
from nst_jax import feature_statistics
from nst_jax import terms


def cosine_distances(a: jax.Array, b: jax.Array) -> jax.Array:
  """``1 − cos(a_i, b_j)`` of the rows of ``a`` (n, C) and ``b`` (m, C): (n, m), in [0, 2].

  The small constant under the square root keeps the gradient finite at all-zero ReLU vectors.
  """
  a = a * jax.lax.rsqrt(jnp.sum(a ** 2, axis=1, keepdims=True) + 1e-8)
  b = b * jax.lax.rsqrt(jnp.sum(b ** 2, axis=1, keepdims=True) + 1e-8)
  return 1.0 - a @ b.T


def random_positions(key: jax.Array, *, count: int, positions: int,
                     p: jax.Array | None = None) -> jax.Array:
  """``min(count, positions)`` distinct indices of ``range(positions)`` (probabilities ``p``)."""
  return jax.random.choice(key, positions, (min(count, positions),), replace=False, p=p)


# --------------------------------------------------------------------------------------------
# Relaxed EMD (style).


def style_samples(features: jax.Array, *, mask: jax.Array | None = None,
                  **unused_options) -> dict[str, jax.Array]:
  """The style's activations (M, C), its positions' weights (M,) and mean second moment."""
  flat, weights = feature_statistics.positions_and_weights(features, mask)
  return {'features': flat, 'weights': weights,
          'second_moment': weights @ jnp.mean(flat ** 2, axis=1)}


#: Normalisations of the relaxed EMD: ``gram`` multiplies the cosine cost (unitless, in [0, 2])
#: by the square of the style's mean second moment, the Gram term's units (feature⁴), and 1/8,
#: measured: on the embedded astronaut × Starry Night and chelsea × Shipwreck at 64 and 256 px,
#: 0.2-3x the Gram term at each of relu1_1 ... relu5_1. ``none`` is the paper's value.
EMD_NORMALIZATIONS = ('gram', 'gatys', 'none')


def _emd_scale(normalization: str, *, second_moment: jax.Array) -> jax.Array:
  if normalization in ('gram', 'gatys'):  # gatys: the default config's style option
    return second_moment ** 2 / 8.0
  if normalization == 'none':
    return jnp.ones((), second_moment.dtype)
  raise errors.UserError(f'unknown normalization {normalization!r} for relaxed_emd; choose one '
                         f'of {", ".join(EMD_NORMALIZATIONS)}')


@terms.register('relaxed_emd', reference='style', statistic=style_samples)
def relaxed_emd(*, features: jax.Array, target: Mapping[str, jax.Array], key: jax.Array,
                mask: jax.Array | None = None, positions: int = 1024,
                normalization: str = 'gram', **unused) -> jax.Array:
  """Relaxed earth mover's distance between the result's and the style's features (STROTSS).

  With the cosine cost ``C_ij = 1 − cos(A_i, B_j)`` between ``positions`` random result
  activations ``A`` and as many random style activations ``B``,
  ``ℓ_r = max(mean_i min_j C_ij, mean_j min_i C_ij)``: each one-sided mean of nearest costs is the
  transport cost with one marginal constraint dropped, and the larger is a lower bound of the EMD.
  With a mask, result positions are drawn with probability proportional to it, the first mean
  weights each drawn position by its mask value and the second takes its minimum over drawn
  positions with a cost raised by ``2 (1 − mask)``, so outside the region they are never nearest.

  Args:
    features: the result's activations (H, W, C).
    target: :func:`style_samples` of the style.
    key: this step's key for the positions.
    mask: (H, W) region of the result this style covers, or None.
    positions: how many positions of each image to compare.
    normalization: ``gram`` (default: on the Gram term's scale) or ``none``.

  Returns:
    The scalar loss.
  """
  flat = features.reshape(-1, features.shape[-1])
  our_key, their_key = jax.random.split(key)
  inside = None if mask is None else mask.reshape(-1).astype(flat.dtype)
  p = None if inside is None else inside / jnp.maximum(jnp.sum(inside), 1e-8)
  ours = random_positions(our_key, count=positions, positions=flat.shape[0], p=p)
  theirs = random_positions(their_key, count=positions, positions=target['features'].shape[0],
                            p=target['weights'])
  cost = cosine_distances(flat[ours], target['features'][theirs])
  if inside is None:
    ours_to_theirs = jnp.mean(jnp.min(cost, axis=1))
    theirs_to_ours = jnp.mean(jnp.min(cost, axis=0))
  else:
    drawn = inside[ours]
    ours_to_theirs = (jnp.sum(drawn * jnp.min(cost, axis=1))
                      / jnp.maximum(jnp.sum(drawn), 1e-8))
    theirs_to_ours = jnp.mean(jnp.min(cost + 2.0 * (1.0 - drawn)[:, None], axis=0))
  distance = jnp.maximum(ours_to_theirs, theirs_to_ours)
  return distance * _emd_scale(normalization, second_moment=target['second_moment'])


# --------------------------------------------------------------------------------------------
# Self-similarity (content).

#: Normalisations of the self-similarity term: ``content`` puts it on the scale of the ``content``
#: term (½ Σ (F − P)²): times the number of positions compared (the STROTSS code's own factor,
#: which makes the value independent of it), half the content's summed squared activations
#: ½ Σ P² (the content term's units) and 5, measured: on a Gram-stylised astronaut × Starry Night
#: (64 and 256 px) the two content terms are then 0.9x of each other at relu4_2. ``none`` is the
#: paper's value.
SELF_SIMILARITY_NORMALIZATIONS = ('content', 'none')


def _self_similarity_scale(normalization: str, *, count: int, energy: jax.Array) -> jax.Array:
  if normalization == 'content':
    return count * 0.5 * energy * 5.0
  if normalization == 'none':
    return jnp.ones((), energy.dtype)
  raise errors.UserError(f'unknown normalization {normalization!r} for self_similarity; choose '
                         f'one of {", ".join(SELF_SIMILARITY_NORMALIZATIONS)}')


@terms.register('self_similarity', reference='content')
def self_similarity(*, features: jax.Array, target: jax.Array, key: jax.Array,
                    positions: int = 1024, normalization: str = 'content', **unused
                    ) -> jax.Array:
  """Self-similarity content loss (STROTSS): the result's pattern of cosine distances, the
  content's.

  At ``n = positions`` random positions (the same for both images), ``D^X_ij`` is the cosine
  distance between the result's activations at positions i and j, and ``D^C`` the content's;
  ``L = 1/n² Σ_ij |D^X_ij / Σ_i D^X_ij − D^C_ij / Σ_i D^C_ij|`` (columns normalised to sum one).
  It constrains structure, not activations, so colours and textures may change freely.

  Args:
    features: the result's activations (H, W, C).
    target: the content's activations at the same layer (same shape).
    key: this step's key for the positions.
    positions: how many positions to compare.
    normalization: ``content`` (default: on the content term's scale) or ``none``.

  Returns:
    The scalar loss.
  """
  flat = features.reshape(-1, features.shape[-1])
  content = target.reshape(-1, target.shape[-1])
  chosen = random_positions(key, count=positions, positions=flat.shape[0])

  def normalized_self_distances(x):
    distances = cosine_distances(x, x)
    return distances / (jnp.sum(distances, axis=0, keepdims=True) + 1e-8)

  distance = jnp.mean(jnp.abs(normalized_self_distances(flat[chosen])
                              - normalized_self_distances(content[chosen])))
  energy = jnp.sum(target ** 2)
  return distance * _self_similarity_scale(normalization, count=chosen.shape[0], energy=energy)
