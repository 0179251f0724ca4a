"""Total variation: image terms that penalise differences between neighbouring pixels.

They read no layer, only the generated image (``reference=None``). Each is a sum (or mean) over
pixels of a function of a pixel's lower and right neighbours, so each is additive over positions
and tiles exactly with a one-pixel halo (:mod:`nst_jax.tiling`): the ``sums`` functions count a
position when its neighbours lie in the image, as the untiled term's slices do. Registered into
:mod:`nst_jax.terms`; importing :mod:`nst_jax.losses` imports this module.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from nst_jax import terms



def _differences(image: jax.Array) -> tuple[jax.Array, jax.Array]:
  return image[1:, :-1] - image[:-1, :-1], image[:-1, 1:] - image[:-1, :-1]


def _neighbour_sums(pointwise: Callable[..., jax.Array]):
  """The ``sums`` of a term ``Σ pointwise(down, right)`` over the positions whose lower and right
  neighbours are in the image (as :func:`_differences` takes them)."""

  def sums(*, image: jax.Array, valid: jax.Array, **options) -> dict[str, jax.Array]:
    down, right = _differences(image)
    weights = (valid[1:, :-1] * valid[:-1, 1:])[..., None]
    return {'sum': jnp.sum(weights * pointwise(down, right, **options))}

  return sums


def _sum_finish(*, sums: Mapping[str, jax.Array], **unused) -> jax.Array:
  return sums['sum']


def _tv_power(down, right, *, power: float = 1.25, **unused):
  return (down ** 2 + right ** 2 + 1e-12) ** power


@terms.register('tv', reference=None, additive=terms.Additive(
    sums=_neighbour_sums(_tv_power), finish=_sum_finish))
def total_variation(*, image: jax.Array, power: float = 1.25, **unused) -> jax.Array:
  """The seed's form: ``Σ ((x[i,j]−x[i+1,j])² + (x[i,j]−x[i,j+1])²)^power`` (power 1.25)."""
  down, right = _differences(image)
  return jnp.sum((down ** 2 + right ** 2 + 1e-12) ** power)


@terms.register('tv_l2', reference=None, additive=terms.Additive(
    sums=_neighbour_sums(lambda down, right, **unused: down ** 2 + right ** 2),
    finish=_sum_finish))
def total_variation_l2(*, image: jax.Array, **unused) -> jax.Array:
  """Squared differences of neighbours, summed: ``Σ (dx² + dy²)``."""
  down, right = _differences(image)
  return jnp.sum(down ** 2 + right ** 2)


def _tv_l1_sums(*, image: jax.Array, valid: jax.Array, **unused) -> dict[str, jax.Array]:
  down, right = _differences(image)
  return {'down': jnp.sum(valid[1:, :-1, None] * jnp.abs(down)),
          'right': jnp.sum(valid[:-1, 1:, None] * jnp.abs(right))}


def _tv_l1_finish(*, sums: Mapping[str, jax.Array], image_shape: Sequence[int], **unused
                  ) -> jax.Array:
  height, width, channels = image_shape
  return 0.5 * (sums['down'] / ((height - 1) * width * channels)
                + sums['right'] / (height * (width - 1) * channels))


@terms.register('tv_l1', reference=None,
                additive=terms.Additive(sums=_tv_l1_sums, finish=_tv_l1_finish))
def total_variation_l1(*, image: jax.Array, **unused) -> jax.Array:
  """pastiche's TV: ``½ (mean |x[i+1,j]−x[i,j]| + mean |x[i,j+1]−x[i,j]|)``.

  With the ½ a ``tv_weight`` means what pastiche's ``--tv-weight`` means.
  """
  return 0.5 * (jnp.mean(jnp.abs(image[1:] - image[:-1]))
                + jnp.mean(jnp.abs(image[:, 1:] - image[:, :-1])))
