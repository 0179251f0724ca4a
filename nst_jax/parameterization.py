"""What the optimiser moves: the pixels, or a Laplacian pyramid of the image.

``parameterization='laplacian'`` optimises the levels of a Laplacian pyramid (Burt & Adelson 1983)
instead of the pixels, as STROTSS (Kolkin et al., CVPR 2019) and NNST (Kolkin et al. 2022) do: a
step of the same size moves the coarse levels as much as the fine ones, so large structures form
first and high-frequency noise appears late. The image is a linear function of the levels:

  analyse:     G₀ = image, Gₖ₊₁ = down(Gₖ), Lₖ = Gₖ − up(Gₖ₊₁), levels = [L₀, ..., Lₙ₋₁, Gₙ]
  synthesise:  Gₙ given, Gₖ = Lₖ + up(Gₖ₊₁), image = G₀

so synthesise(analyse(x)) = x exactly (up to float rounding) whatever ``down`` and ``up`` are
(here antialiased linear resizing by 2). The optimiser sees the levels as one flat vector per
image, so every optimiser and the batch/vmap machinery work unchanged.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

PARAMETERIZATIONS = ('pixels', 'laplacian')
#: The coarsest level keeps at least this many pixels on its shorter side.
MIN_LEVEL_SIDE = 8


def level_shapes(height: int, width: int, *, levels: int) -> list[tuple[int, int]]:
  """(height, width) of every level, finest first: ``levels`` halvings at most, stopping before
  a side falls under :data:`MIN_LEVEL_SIDE`."""
  shapes = [(height, width)]
  while len(shapes) <= levels and min(shapes[-1]) >= 2 * MIN_LEVEL_SIDE:
    h, w = shapes[-1]
    shapes.append((math.ceil(h / 2), math.ceil(w / 2)))
  return shapes


def _resize(image: jax.Array, shape: tuple[int, int]) -> jax.Array:
  return jax.image.resize(image, (*shape, image.shape[-1]), method='linear', antialias=True)


def analyse(image: jax.Array, *, levels: int) -> list[jax.Array]:
  """The Laplacian pyramid of an (H, W, C) image: band-pass levels finest first, then the
  low-pass residual."""
  shapes = level_shapes(*image.shape[:2], levels=levels)
  gaussian = [image]
  for shape in shapes[1:]:
    gaussian.append(_resize(gaussian[-1], shape))
  bands = [fine - _resize(coarse, fine.shape[:2]) for fine, coarse in zip(gaussian, gaussian[1:])]
  return bands + [gaussian[-1]]


def synthesise(pyramid: list[jax.Array]) -> jax.Array:
  """The image of a pyramid from :func:`analyse` (its exact inverse)."""
  image = pyramid[-1]
  for band in reversed(pyramid[:-1]):
    image = band + _resize(image, band.shape[:2])
  return image


def parameter_count(height: int, width: int, *, levels: int, channels: int = 3) -> int:
  """Length of the flat vector holding a height x width image's pyramid."""
  return sum(h * w for h, w in level_shapes(height, width, levels=levels)) * channels


def encode(image: jax.Array, *, levels: int) -> jax.Array:
  """An (H, W, C) image as the flat vector of its pyramid's levels."""
  return jnp.concatenate([level.ravel() for level in analyse(image, levels=levels)])


def decode(vector: jax.Array, *, height: int, width: int, levels: int,
           channels: int = 3) -> jax.Array:
  """The (H, W, C) image of a flat pyramid vector from :func:`encode`."""
  pyramid, start = [], 0
  for h, w in level_shapes(height, width, levels=levels):
    pyramid.append(vector[start:start + h * w * channels].reshape(h, w, channels))
    start += h * w * channels
  return synthesise(pyramid)
