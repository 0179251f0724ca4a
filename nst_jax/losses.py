"""Loss terms, looked up by name, and the weighted total the optimiser minimises.

A loss term is a pure, keyword-only function of one layer::

    @losses.term(reference='style', statistic=feature_statistics.gram_statistic)
    def my_gram_loss(*, features, target, image, **options) -> jax.Array: ...

* ``features``: the generated image's activations at that layer, float32 (H, W, C).
* ``target``: ``statistic(reference_features)`` of the reference image at that layer, computed once
  before optimising (``reference`` is ``"content"``, ``"style"`` or ``None`` for terms such as total
  variation that only look at ``image``).
* ``image``: the generated image, RGB 0-255 (H, W, 3).
* ``mask``: only for style terms used with spatial masks, the region's mask at the layer's
  resolution (H, W); terms that support masks take it as a keyword.
* ``key``: only for terms that name it, a PRNG key for random draws (projections, subsets of
  positions): the problem's seed folded with the optimisation step, the entry and the layer, so it
  is fixed within a step (a line search sees one function), new at the next, and reproducible.
* ``options``: the term's ``options`` from the config.

The config names terms (``config.losses.<entry>.term``): a registered name (:data:`TERMS`) or
``"package.module:function"`` for a term defined outside nst_jax. This module defines Gatys et
al.'s content and Gram terms; it imports :mod:`nst_jax.gaussian_losses`,
:mod:`nst_jax.total_variation`, :mod:`nst_jax.texture_losses` and :mod:`nst_jax.strotss` so that
their terms are registered too (the registry itself is
:mod:`nst_jax.terms`). The total is
``sum_entries weight * sum_styles blend * sum_layers layer_weight * term(...)``; an entry with
``normalize_gradients`` divides each layer's gradient by its L1 norm in the backward pass.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from nst_jax import errors
from nst_jax import feature_statistics
from nst_jax import gaussian_losses
from nst_jax import strotss  # noqa: F401  (registers relaxed_emd, self_similarity)
from nst_jax import terms
from nst_jax import texture_losses  # noqa: F401  (registers sliced_wasserstein, histogram, mrf)
from nst_jax import total_variation as total_variation_lib

# The registry lives in nst_jax.terms (shared with the other term modules); these names are the
# documented API (``@losses.term``, ``losses.TERMS``).
REFERENCES = terms.REFERENCES
TERMS = terms.TERMS
term = terms.term
register = terms.register
lookup = terms.lookup
Additive = terms.Additive
# The Gaussian and total-variation terms live in their own modules; their names stay here.
wasserstein = gaussian_losses.wasserstein
mean_std = gaussian_losses.mean_std
total_variation = total_variation_lib.total_variation
total_variation_l2 = total_variation_lib.total_variation_l2
total_variation_l1 = total_variation_lib.total_variation_l1


# --------------------------------------------------------------------------------------------
# Content terms.


#: Content reductions: Gatys' ½Σ, the Keras tutorial's plain Σ, and the mean (MSE).
CONTENT_REDUCTIONS = {'half_sum': lambda x: 0.5 * jnp.sum(x), 'sum': jnp.sum, 'mean': jnp.mean}


def _content_sums(*, features: jax.Array, valid: jax.Array, target: jax.Array, **unused
                  ) -> dict[str, jax.Array]:
  return {'squares': jnp.sum(valid[..., None] * (features - target) ** 2)}


def _content_finish(*, sums: Mapping[str, jax.Array], shape: tuple[int, ...],
                    reduction: str = 'half_sum', **unused) -> jax.Array:
  scales = {'half_sum': 0.5, 'sum': 1.0, 'mean': 1.0 / math.prod(shape)}
  if reduction not in scales:
    raise errors.UserError(f'unknown content reduction {reduction!r}; choose one of '
                           f'{", ".join(CONTENT_REDUCTIONS)}')
  return scales[reduction] * sums['squares']


def _content_mse_finish(**kwargs) -> jax.Array:
  return _content_finish(**{**kwargs, 'reduction': 'mean'})


@register('content', reference='content', additive=terms.Additive(
    sums=_content_sums, finish=_content_finish, positional_target=True))
def content(*, features: jax.Array, target: jax.Array, reduction: str = 'half_sum',
            **unused) -> jax.Array:
  """Gatys et al.: ``1/2 Σ (F − P)²``; ``reduction`` ``sum`` (Keras tutorial) or ``mean`` (MSE)."""
  if reduction not in CONTENT_REDUCTIONS:
    raise errors.UserError(f'unknown content reduction {reduction!r}; choose one of '
                           f'{", ".join(CONTENT_REDUCTIONS)}')
  return CONTENT_REDUCTIONS[reduction]((features - target) ** 2)


@register('content_mse', reference='content', additive=terms.Additive(
    sums=_content_sums, finish=_content_mse_finish, positional_target=True))
def content_mse(*, features: jax.Array, target: jax.Array, **unused) -> jax.Array:
  """Mean squared error ``mean((F − P)²)`` (pastiche, jcjohnson/neural-style)."""
  return content(features=features, target=target, reduction='mean')


# --------------------------------------------------------------------------------------------
# Style terms.

#: Gram normalisations. Each maps Σ(Ĝ−Â)² (Ĝ, Â: Grams per position) to the loss, given the layer
#: size: ``gatys`` is Gatys' Σ(G−A)²/(4N²M²); ``keras`` the Keras tutorial's Σ(G−A)²/(4·3²·(HW)²),
#: HW the image's pixel count and 3 hard-coded; ``jcjohnson`` MSE of FFᵀ/(CHW) (neural-style);
#: ``pastiche`` MSE of FFᵀ/(HW) (pastiche).
GRAM_NORMALIZATIONS = ('gatys', 'keras', 'jcjohnson', 'pastiche')


def _gram_scale(normalization: str, *, channels: int, positions: int, image_pixels: int) -> float:
  if normalization == 'gatys':
    return 1.0 / (4.0 * channels ** 2)
  if normalization == 'keras':
    return positions ** 2 / (4.0 * 3 ** 2 * image_pixels ** 2)
  if normalization == 'jcjohnson':
    return 1.0 / channels ** 4
  if normalization == 'pastiche':
    return 1.0 / channels ** 2
  raise errors.UserError(f'unknown Gram normalization {normalization!r}; choose one of '
                         f'{", ".join(GRAM_NORMALIZATIONS)}')


def _gram_distance(statistic: jax.Array, target: jax.Array, *, shape: Sequence[int],
                   image_shape: Sequence[int], normalization: str) -> jax.Array:
  height, width, channels = shape
  scale = _gram_scale(normalization, channels=channels, positions=height * width,
                      image_pixels=image_shape[0] * image_shape[1])
  return scale * jnp.sum((statistic - target) ** 2)


def _gram_sums(*, features: jax.Array, valid: jax.Array, mask: jax.Array | None = None,
               **unused) -> dict[str, jax.Array]:
  return feature_statistics.gram_sums(
      features, weights=feature_statistics.position_weights(valid, mask))


def _gram_finish(*, sums: Mapping[str, jax.Array], target: jax.Array, shape: Sequence[int],
                 image_shape: Sequence[int], normalization: str = 'gatys', **unused) -> jax.Array:
  return _gram_distance(feature_statistics.gram_from_sums(sums), target, shape=shape,
                        image_shape=image_shape, normalization=normalization)


@register('gram', reference='style', statistic=feature_statistics.gram_statistic,
          additive=terms.Additive(
              sums=_gram_sums, finish=_gram_finish,
              statistic=lambda *, sums, **unused: feature_statistics.gram_from_sums(sums)))
def gram_loss(*, features: jax.Array, target: jax.Array, image: jax.Array,
              mask: jax.Array | None = None, normalization: str = 'gatys', **unused) -> jax.Array:
  """Gram-matrix style loss of one layer with a named normalisation (:data:`GRAM_NORMALIZATIONS`).

  With equal image and style sizes and ``normalization="gatys"`` this is exactly Gatys et al.'s
  ``E_l = Σ (G − A)² / (4 N² M²)``; comparing Grams per position keeps it right when the style
  image has another size.
  """
  return _gram_distance(feature_statistics.gram_statistic(features, mask=mask), target,
                        shape=features.shape, image_shape=image.shape,
                        normalization=normalization)


# --------------------------------------------------------------------------------------------
# The total.


@dataclasses.dataclass(frozen=True)
class Entry:
  """One weighted term of the total loss, as the config names it (hashable: static under jit).

  Attributes:
    name: the entry's name in ``config.losses`` (e.g. ``"style"``).
    term: the term's registered name or ``"module:function"``.
    layers: the layers it reads.
    layer_weights: a weight per layer (same order).
    options: extra keyword arguments for the term, as sorted (key, value) pairs.
    normalize_gradients: divide each layer's gradient by its L1 norm in the backward pass
      (jcjohnson/neural-style's ``-normalize_gradients``; see :func:`normalize_gradient`).
  """

  name: str
  term: str
  layers: tuple[str, ...]
  layer_weights: tuple[float, ...]
  options: tuple[tuple[str, Any], ...] = ()
  normalize_gradients: bool = False

  @property
  def fn(self) -> Callable[..., jax.Array]:
    return lookup(self.term)

  @property
  def reference(self) -> str | None:
    return self.fn.reference


def make_entry(*, name: str, term: str, layers: Sequence[str] = (),
               layer_weights: Sequence[float] = (), options: Mapping[str, Any] | None = None,
               normalize_gradients: bool = False) -> Entry:
  """Builds an :class:`Entry`, checking the term exists and the weights match the layers.

  Empty ``layer_weights`` means equal weights ``1/len(layers)`` (Gatys' w_l).
  """
  fn = lookup(term)
  layers = tuple(layers)
  if fn.reference is not None and not layers:
    raise errors.UserError(f'loss {name!r} (term {term!r}) needs at least one layer; set '
                           f'--config.losses.{name}.layers')
  if normalize_gradients and fn.reference is None:
    raise errors.UserError(f'loss {name!r} (term {term!r}) reads no layer, so it has no layer '
                           f'gradient to normalise; set --config.losses.{name}.normalize_gradients'
                           '=False')
  if layer_weights and len(layer_weights) != len(layers):
    raise errors.UserError(f'loss {name!r} has {len(layer_weights)} layer weights for '
                           f'{len(layers)} layers; give one per layer or none')
  weights = tuple(float(w) for w in layer_weights) or tuple(1.0 / max(len(layers), 1)
                                                              for _ in layers)
  return Entry(name=name, term=term, layers=layers, layer_weights=weights,
               options=tuple(sorted((options or {}).items())),
               normalize_gradients=bool(normalize_gradients))


def accepts_mask(entry: Entry) -> bool:
  """Whether the entry's term names a ``mask`` keyword (so spatial masks can be honoured)."""
  return 'mask' in inspect.signature(entry.fn).parameters


def accepts_key(entry: Entry) -> bool:
  """Whether the entry's term names a ``key`` keyword (it draws random numbers each step)."""
  return 'key' in inspect.signature(entry.fn).parameters


def feature_layers(entries: Sequence[Entry], reference: str | None = None) -> tuple[str, ...]:
  """The layers the entries need (of those with ``reference``, or all), without repeats."""
  layers = []
  for entry in entries:
    if reference is None or entry.reference == reference:
      layers += [layer for layer in entry.layers if layer not in layers]
  return tuple(layers)


def targets(*, entries: Sequence[Entry], reference_features: Mapping[str, jax.Array],
            reference: str, masks: Mapping[str, jax.Array] | None = None) -> dict:
  """Computes the stored targets of every entry that uses ``reference``.

  Args:
    entries: the loss entries.
    reference_features: the reference image's activations, ``{layer: (H, W, C)}``.
    reference: ``"content"`` or ``"style"``.
    masks: for a style with a spatial mask, the style image's own region mask per layer; None for
      the whole style image.

  Returns:
    ``{entry name: {layer: statistic}}``.
  """
  out = {}
  for entry in entries:
    if entry.reference != reference:
      continue
    options = dict(entry.options)
    out[entry.name] = {}
    for layer in entry.layers:
      kwargs = dict(options)
      if masks is not None:
        kwargs['mask'] = masks[layer]
      out[entry.name][layer] = entry.fn.statistic(reference_features[layer], **kwargs)
  return out


@jax.custom_vjp
def normalize_gradient(features: jax.Array, strength: jax.Array) -> jax.Array:
  """The identity on ``features``; in the backward pass the gradient is L1-normalised.

  jcjohnson/neural-style's ``-normalize_gradients``: each loss module divides the gradient it
  sends to its layer by the gradient's L1 norm (+1e-8), then multiplies by its strength. Here the
  arriving cotangent already carries ``strength`` (the entry's weight times the layer's), so it
  is divided by its own L1 norm and multiplied by ``|strength|``: the layer's gradient has L1
  norm ``|strength|``, its direction the term's, and weights keep their meaning.
  """
  del strength
  return features


def _normalize_gradient_fwd(features, strength):
  return features, strength


def _normalize_gradient_bwd(strength, cotangent):
  scale = jnp.abs(strength) / (jnp.sum(jnp.abs(cotangent)) + 1e-8)
  return cotangent * scale.astype(cotangent.dtype), jnp.zeros_like(strength)


normalize_gradient.defvjp(_normalize_gradient_fwd, _normalize_gradient_bwd)


def _layer_sum(entry: Entry, *, image: jax.Array, features: Mapping[str, jax.Array],
               per_reference: Sequence[tuple], weight: jax.Array, key: jax.Array | None
               ) -> jax.Array:
  """``sum_references blend * sum_layers layer_weight * term(...)`` of one entry."""
  value = 0.0
  for layer_index, (layer, layer_weight) in enumerate(zip(entry.layers, entry.layer_weights)):
    layer_features = features[layer]
    if entry.normalize_gradients:
      layer_features = normalize_gradient(layer_features, jnp.asarray(weight * layer_weight,
                                                                       jnp.float32))
    kwargs = dict(entry.options)
    if key is not None:  # each layer its own draws; every reference image the same ones
      kwargs['key'] = jax.random.fold_in(key, layer_index)
    for blend, entry_targets, masks in per_reference:
      if masks is not None:
        kwargs['mask'] = masks[layer]
      value = value + blend * layer_weight * entry.fn(
          features=layer_features, target=entry_targets[layer], image=image, **kwargs)
  return value


def total(*, image: jax.Array, features: Mapping[str, jax.Array], entries: Sequence[Entry],
          weights: Mapping[str, jax.Array], content_targets: Mapping,
          style_targets: Sequence[Mapping], style_blend: jax.Array,
          style_masks: Sequence[Mapping[str, jax.Array]] | None = None,
          key: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The weighted total loss and each entry's (weighted) part.

  Args:
    image: the generated image (H, W, 3).
    features: its activations at every layer the entries read.
    entries: the loss entries.
    weights: ``{entry name: scalar weight}`` (arrays, so weights can vary across a vmapped batch).
    content_targets: :func:`targets` of the content image.
    style_targets: :func:`targets` of each style image.
    style_blend: blend weight per style image (S,), summing to one.
    style_masks: per style, its region of the generated image per layer ``{layer: (H, W)}``;
      None for no spatial control.
    key: the step's PRNG key, needed when a term takes ``key`` (:func:`accepts_key`); folded
      with the entry's index and the layer's, so terms and layers draw differently.

  Returns:
    ``(total, {entry name: weighted part})``.
  """
  parts = {}
  for entry_index, entry in enumerate(entries):
    entry_key = None
    if accepts_key(entry):
      if key is None:
        raise ValueError(f'loss {entry.name!r} (term {entry.term!r}) draws random numbers; '
                         'give losses.total a key')
      entry_key = jax.random.fold_in(key, entry_index)
    if entry.reference is None:
      keyword = {} if entry_key is None else {'key': entry_key}
      value = entry.fn(image=image, **dict(entry.options), **keyword)
    else:
      if entry.reference == 'content':
        per_reference = [(1.0, content_targets[entry.name], None)]
      else:
        per_reference = [
            (style_blend[index], style_targets[index][entry.name],
             None if style_masks is None else style_masks[index])
            for index in range(len(style_targets))]
      value = _layer_sum(entry, image=image, features=features, per_reference=per_reference,
                         weight=weights[entry.name], key=entry_key)
    parts[entry.name] = weights[entry.name] * value
  return sum(parts.values()), parts
