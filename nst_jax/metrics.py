"""Quality of a result, measured on the image, independent of the loss that was optimised.

Distances with the embedded VGG19 (features of RGB 0–255 images of any size), the ones used to
judge every change to the method. Per style layer (relu1_1 ... relu5_1) and summed:

* ``gram``: ``mean((G(x) − G(s))²)`` with ``G = F Fᵀ / (C H W)`` (jcjohnson/neural-style's
  normalisation, so layers of different sizes and images of different sizes compare);
* ``gaussian_w2``: the squared 2-Wasserstein distance between Gaussians fitted to the features
  (means and covariances over positions), ``‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁^½ Σ₂ Σ₁^½)^½)``;
* ``sliced_wasserstein``: the features projected on :data:`SLICED_DIRECTIONS` fixed random unit
  directions (seed :data:`SLICED_SEED`), each direction's values sorted and compared quantile by
  quantile, ``mean((sorted(x·d) − sorted(s·d))²)``; when the images have different numbers of
  positions the style's quantile function is read at the result's quantile levels by linear
  interpolation.

And ``content``: ``mean((F(x) − F(p))²)`` at relu4_2 (the content must have the result's size).

:func:`evaluate` measures a result and the content image itself (the "do nothing" reference) and
gives each distance as a ratio result / reference: below 1 the result is closer to the style than
the unstyled photo. The content distance of the reference is 0, so it has no ratio (None).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nst_jax import feature_statistics
from nst_jax import vgg
from nst_jax import weights as weights_lib

STYLE_LAYERS = ('block1_relu1', 'block2_relu1', 'block3_relu1', 'block4_relu1', 'block5_relu1')
CONTENT_LAYER = 'block4_relu2'
#: The style distances, in the order they are reported.
STYLE_METRICS = ('gram', 'gaussian_w2', 'sliced_wasserstein')
SLICED_DIRECTIONS = 64
SLICED_SEED = 0
#: Most quantiles kept per direction: larger layers are read at evenly spaced ranks, so a 2048 px
#: image holds 16 MB per layer instead of 1 GB (the default 256 px output is below the limit).
MAX_QUANTILES = 65536


@functools.cache
def embedded_network() -> dict:
  """The embedded VGG19, prepared once per process."""
  return vgg.prepare(weights_lib.load(None, network='vgg19'))


def normalized_gram(features: jax.Array) -> jax.Array:
  """``F Fᵀ / (C H W)`` of features (H, W, C): (C, C): the loss terms' Gram per position, over C."""
  return feature_statistics.gram_statistic(features) / features.shape[-1]


def unit_projections(channels: int, *, count: int = SLICED_DIRECTIONS,
                     seed: int = SLICED_SEED) -> np.ndarray:
  """``count`` random unit directions in feature space, (channels, count); fixed by ``seed``."""
  directions = np.random.default_rng(seed).standard_normal((channels, count))
  return (directions / np.linalg.norm(directions, axis=0, keepdims=True)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class LayerStatistics:
  """What the style distances compare of one layer's features (host arrays)."""

  gram: np.ndarray               # (C, C), F Fᵀ / (C H W)
  mean: np.ndarray               # (C,) over positions
  covariance: np.ndarray         # (C, C) float64, population covariance over positions
  covariance_sqrt: np.ndarray    # (C, C) float64, its symmetric square root
  sorted_projections: np.ndarray  # (Q, directions): each direction's values, ascending


# Features, Grams and covariances are computed on the device at full float32 matmul precision
# (no TF32 on GPUs, so every device gives the same figures); eigendecompositions on the host in
# float64, where the square roots of nearly singular covariances stay accurate.
_PRECISION = 'highest'


def _symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
  # About 0.1 s per 512 x 512 eigh here; on a CPU oversubscribed by other processes OpenBLAS's
  # threads can take seconds (limiting them would need a dependency outside requirements.txt).
  values, vectors = np.linalg.eigh(matrix)
  return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def _device_statistics(features: jax.Array, projections: jax.Array) -> dict[str, jax.Array]:
  """Gram, mean, covariance and sorted projections of features (H, W, C), on the device."""
  flat = features.reshape(-1, features.shape[-1])
  mean = flat.mean(axis=0)
  centred = flat - mean
  ranks = flat.shape[0]
  projected = jnp.sort(flat @ projections, axis=0)
  if ranks > MAX_QUANTILES:
    projected = projected[((np.arange(MAX_QUANTILES) + 0.5) * ranks / MAX_QUANTILES).astype(int)]
  return {'gram': normalized_gram(features), 'mean': mean,
          'covariance': centred.T @ centred / ranks, 'sorted_projections': projected}


def _host_statistics(device: Mapping[str, jax.Array]) -> LayerStatistics:
  covariance = np.asarray(device['covariance'], np.float64)
  covariance = (covariance + covariance.T) / 2  # exactly symmetric for eigh
  return LayerStatistics(gram=np.asarray(device['gram']), mean=np.asarray(device['mean']),
                         covariance=covariance, covariance_sqrt=_symmetric_sqrt(covariance),
                         sorted_projections=np.asarray(device['sorted_projections']))


def layer_statistics(features: np.ndarray) -> LayerStatistics:
  """The statistics of one layer's features (H, W, C), with this module's fixed projections."""
  features = jnp.asarray(features, jnp.float32)
  with jax.default_matmul_precision(_PRECISION):
    return _host_statistics(_device_statistics(
        features, jnp.asarray(unit_projections(features.shape[-1]))))


@dataclasses.dataclass(frozen=True)
class ImageStatistics:
  """An image's statistics at every style layer and its features at the content layer."""

  layers: dict[str, LayerStatistics]
  content_features: np.ndarray   # (H, W, C) at CONTENT_LAYER


@functools.partial(jax.jit, static_argnames=('layers',))
def _image_statistics(net: Mapping, image: jax.Array, projections: Mapping[str, jax.Array], *,
                      layers: tuple[str, ...]) -> tuple[dict, jax.Array]:
  features = vgg.features(net, image, layers=layers + (CONTENT_LAYER,))
  return ({layer: _device_statistics(features[layer], projections[layer]) for layer in layers},
          features[CONTENT_LAYER])


def image_statistics(image: np.ndarray, *, net: Mapping | None = None) -> ImageStatistics:
  """The statistics of an RGB 0–255 image (H, W, 3) that every distance here compares."""
  net = embedded_network() if net is None else net
  projections = {layer: jnp.asarray(unit_projections(vgg.channels(layer)))
                 for layer in STYLE_LAYERS}
  with jax.default_matmul_precision(_PRECISION):
    per_layer, content = _image_statistics(net, jnp.asarray(image, jnp.float32), projections,
                                           layers=STYLE_LAYERS)
  return ImageStatistics(layers={layer: _host_statistics(per_layer[layer])
                                 for layer in STYLE_LAYERS},
                         content_features=np.asarray(content))


def gram_distance(ours: LayerStatistics, theirs: LayerStatistics) -> float:
  """``mean((G₁ − G₂)²)``."""
  difference = ours.gram.astype(np.float64) - theirs.gram
  return float(np.mean(difference ** 2))


def gaussian_w2_distance(ours: LayerStatistics, theirs: LayerStatistics) -> float:
  """Squared 2-Wasserstein distance of the Gaussians ``N(μ, Σ)`` fitted to two feature sets."""
  # tr((Σ₂^½ Σ₁ Σ₂^½)^½) equals tr((Σ₁^½ Σ₂ Σ₁^½)^½); the style's (theirs) root is the one a
  # batch shares.
  middle = theirs.covariance_sqrt @ ours.covariance @ theirs.covariance_sqrt
  cross = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)))
  means = np.sum((ours.mean.astype(np.float64) - theirs.mean) ** 2)
  return float(max(means + np.trace(ours.covariance) + np.trace(theirs.covariance)
                   - 2 * cross, 0.0))


def sliced_wasserstein_distance(ours: LayerStatistics, theirs: LayerStatistics) -> float:
  """Mean squared difference of sorted projections, ``theirs`` read at ``ours``' quantiles."""
  mine, other = (np.asarray(s.sorted_projections, np.float64) for s in (ours, theirs))
  if mine.shape[0] != other.shape[0]:
    levels = (np.arange(mine.shape[0]) + 0.5) / mine.shape[0]
    other_levels = (np.arange(other.shape[0]) + 0.5) / other.shape[0]
    other = np.stack([np.interp(levels, other_levels, column) for column in other.T], axis=1)
  return float(np.mean((mine - other) ** 2))


def content_mse(ours: np.ndarray, theirs: np.ndarray) -> float:
  """``mean((F₁ − F₂)²)`` of same-shaped features."""
  if np.shape(ours) != np.shape(theirs):
    raise ValueError(f'content features of shapes {np.shape(ours)} and {np.shape(theirs)}: resize '
                     'the content to the result\'s size before measuring')
  return float(np.mean((np.asarray(ours, np.float64) - theirs) ** 2))


_STYLE_DISTANCES = {'gram': gram_distance, 'gaussian_w2': gaussian_w2_distance,
                    'sliced_wasserstein': sliced_wasserstein_distance}


def compare(result: ImageStatistics, *, content: ImageStatistics, style: ImageStatistics
            ) -> dict[str, Any]:
  """Every distance of one result: ``{metric: {layer: d, ..., 'sum': d}, 'content': d}``."""
  out: dict[str, Any] = {}
  for name in STYLE_METRICS:
    per_layer = {layer: _STYLE_DISTANCES[name](result.layers[layer], style.layers[layer])
                 for layer in STYLE_LAYERS}
    out[name] = dict(per_layer, sum=sum(per_layer.values()))
  out['content'] = content_mse(result.content_features, content.content_features)
  return out


def _ratios(result: Any, reference: Any) -> Any:
  if isinstance(result, dict):
    return {key: _ratios(value, reference[key]) for key, value in result.items()}
  return result / reference if reference > 0 else None


def assess(result: ImageStatistics, *, content: ImageStatistics, style: ImageStatistics
           ) -> dict[str, Any]:
  """A result's distances, the content image's (doing nothing) and their ratios.

  Returns:
    ``{'result': compare(result), 'reference': compare(content), 'ratio': result / reference}``
    (see :func:`compare`; a ratio whose reference is 0, the content distance, is None).
  """
  measured = compare(result, content=content, style=style)
  reference = compare(content, content=content, style=style)
  return {'result': measured, 'reference': reference, 'ratio': _ratios(measured, reference)}


def evaluate(result: np.ndarray, *, content: np.ndarray, style: np.ndarray,
             net: Mapping | None = None) -> dict[str, Any]:
  """:func:`assess` of RGB 0–255 images (the content resized to the result's size beforehand)."""
  measure = lambda image: image_statistics(image, net=net)
  return assess(measure(result), content=measure(content), style=measure(style))


def style_distances(result: np.ndarray, style: np.ndarray, *, net: Mapping | None = None
                    ) -> dict[str, float]:
  """Gram distance per style layer between ``result`` and ``style`` (RGB 0–255 arrays)."""
  ours, theirs = image_statistics(result, net=net), image_statistics(style, net=net)
  return {layer: gram_distance(ours.layers[layer], theirs.layers[layer])
          for layer in STYLE_LAYERS}


def style_distance(result: np.ndarray, style: np.ndarray, *, net: Mapping | None = None) -> float:
  """Summed Gram distance over relu1_1 ... relu5_1 (lower: closer to the style)."""
  return sum(style_distances(result, style, net=net).values())


def content_distance(result: np.ndarray, content: np.ndarray, *, net: Mapping | None = None
                     ) -> float:
  """Mean squared relu4_2 difference (lower: closer to the content); same-sized images."""
  ours, theirs = image_statistics(result, net=net), image_statistics(content, net=net)
  return content_mse(ours.content_features, theirs.content_features)


def distances(result: np.ndarray, *, content: np.ndarray, style: np.ndarray,
              net: Mapping | None = None) -> dict[str, float]:
  """``{'style': ..., 'content': ...}`` for one result (the content resized beforehand)."""
  return {'style': style_distance(result, style, net=net),
          'content': content_distance(result, content, net=net)}
