"""Quality of a result, measured on the final image, independent of the loss that was optimised.

Two distances with the embedded VGG19, the ones used to judge every change to the method:

* style distance: ``Σ_l mean((G_l(x) − G_l(s))²)`` over relu1_1 ... relu5_1, with
  ``G = F Fᵀ / (C H W)`` (jcjohnson/neural-style's normalisation, so layers of different sizes and
  images of different sizes compare);
* content distance: ``mean((F(x) − F(p))²)`` at relu4_2.

A multi-scale run, another style term or another optimiser is better only if it is no worse on
both. The functions take RGB 0–255 arrays of any size (the style may differ in size from the
result; the content must have the result's size).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from nst_jax import vgg
from nst_jax import weights as weights_lib

STYLE_LAYERS = ('block1_relu1', 'block2_relu1', 'block3_relu1', 'block4_relu1', 'block5_relu1')
CONTENT_LAYER = 'block4_relu2'


@functools.cache
def embedded_network() -> dict:
  """The embedded VGG19, prepared once per process."""
  return vgg.prepare(weights_lib.load(None, network='vgg19'))


def normalized_gram(features: jax.Array) -> jax.Array:
  """``F Fᵀ / (C H W)`` of features (H, W, C): (C, C)."""
  height, width, channels = features.shape
  flat = features.reshape(-1, channels)
  return flat.T @ flat / (channels * height * width)


@functools.partial(jax.jit, static_argnames=('layers',))
def _features(net: Mapping, image: jax.Array, *, layers: tuple[str, ...]) -> dict:
  return vgg.features(net, image, layers=layers)


def style_distances(result: np.ndarray, style: np.ndarray, *, net: Mapping | None = None
                    ) -> dict[str, float]:
  """Gram distance per style layer between ``result`` and ``style`` (RGB 0–255 arrays)."""
  net = embedded_network() if net is None else net
  ours = _features(net, jnp.asarray(result, jnp.float32), layers=STYLE_LAYERS)
  theirs = _features(net, jnp.asarray(style, jnp.float32), layers=STYLE_LAYERS)
  return {layer: float(jnp.mean((normalized_gram(ours[layer]) - normalized_gram(theirs[layer]))
                                ** 2)) for layer in STYLE_LAYERS}


def style_distance(result: np.ndarray, style: np.ndarray, *, net: Mapping | None = None) -> float:
  """Summed Gram distance over relu1_1 ... relu5_1 (lower: closer to the style)."""
  return sum(style_distances(result, style, net=net).values())


def content_distance(result: np.ndarray, content: np.ndarray, *, net: Mapping | None = None
                     ) -> float:
  """Mean squared relu4_2 difference (lower: closer to the content); same-sized images."""
  net = embedded_network() if net is None else net
  layers = (CONTENT_LAYER,)
  ours = _features(net, jnp.asarray(result, jnp.float32), layers=layers)[CONTENT_LAYER]
  theirs = _features(net, jnp.asarray(content, jnp.float32), layers=layers)[CONTENT_LAYER]
  return float(jnp.mean((ours - theirs) ** 2))


def distances(result: np.ndarray, *, content: np.ndarray, style: np.ndarray,
              net: Mapping | None = None) -> dict[str, float]:
  """``{'style': ..., 'content': ...}`` for one result (the content resized beforehand)."""
  return {'style': style_distance(result, style, net=net),
          'content': content_distance(result, content, net=net)}
