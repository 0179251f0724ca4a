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
* ``options``: the term's ``options`` from the config.

The config names terms (``config.losses.<entry>.term``): a name registered here (:data:`TERMS`) or
``"package.module:function"`` for a term defined outside nst_jax. The total is
``sum_entries weight * sum_styles blend * sum_layers layer_weight * term(...)``.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from nst_jax import errors
from nst_jax import feature_statistics

REFERENCES = ('content', 'style', None)


def term(*, reference: str | None, statistic: Callable[..., Any] | None = None):
  """Marks a function as a loss term.

  Args:
    reference: which image's features become targets: ``"content"``, ``"style"`` or ``None``.
    statistic: maps a reference layer's features (H, W, C) (and the term's options) to the stored
      target; default: the features themselves.

  Returns:
    A decorator that records these on the function and returns it unchanged.
  """
  if reference not in REFERENCES:
    raise ValueError(f'reference must be one of {REFERENCES}, got {reference!r}')

  def decorate(fn):
    fn.reference = reference
    fn.statistic = statistic or (lambda features, **unused: features)
    return fn

  return decorate


#: The built-in terms by name.
TERMS: dict[str, Callable[..., jax.Array]] = {}


def register(name: str, *, reference: str | None, statistic: Callable[..., Any] | None = None):
  """Like :func:`term`, and also makes the term available as ``name`` in configs."""

  def decorate(fn):
    TERMS[name] = term(reference=reference, statistic=statistic)(fn)
    return fn

  return decorate


def lookup(name: str) -> Callable[..., jax.Array]:
  """Returns the term called ``name``: a built-in, or ``"module:function"`` imported on demand."""
  if name in TERMS:
    return TERMS[name]
  if ':' in name:
    module_name, _, function_name = name.partition(':')
    try:
      module = importlib.import_module(module_name)
    except ImportError as exc:
      raise errors.UserError(f'cannot import module {module_name!r} for loss term {name!r} '
                             f'({exc}); is it on PYTHONPATH?') from None
    fn = getattr(module, function_name, None)
    if fn is None:
      raise errors.UserError(f'module {module_name!r} has no function {function_name!r}')
    if not hasattr(fn, 'reference'):
      raise errors.UserError(f'{name} is not marked as a loss term; decorate it with '
                             '@nst_jax.losses.term(reference=...)')
    return fn
  raise errors.UserError(f'unknown loss term {name!r}; built-in terms are '
                         f'{", ".join(sorted(TERMS))}, or give "module:function"')


# --------------------------------------------------------------------------------------------
# Content terms.


#: Content reductions: Gatys' ½Σ, the Keras tutorial's plain Σ, and the mean (MSE).
CONTENT_REDUCTIONS = {'half_sum': lambda x: 0.5 * jnp.sum(x), 'sum': jnp.sum, 'mean': jnp.mean}


@register('content', reference='content')
def content(*, features: jax.Array, target: jax.Array, reduction: str = 'half_sum',
            **unused) -> jax.Array:
  """Gatys et al.: ``1/2 Σ (F − P)²``; ``reduction`` ``sum`` (Keras tutorial) or ``mean`` (MSE)."""
  if reduction not in CONTENT_REDUCTIONS:
    raise errors.UserError(f'unknown content reduction {reduction!r}; choose one of '
                           f'{", ".join(CONTENT_REDUCTIONS)}')
  return CONTENT_REDUCTIONS[reduction]((features - target) ** 2)


@register('content_mse', reference='content')
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


@register('gram', reference='style', statistic=feature_statistics.gram_statistic)
def gram_loss(*, features: jax.Array, target: jax.Array, image: jax.Array,
              mask: jax.Array | None = None, normalization: str = 'gatys', **unused) -> jax.Array:
  """Gram-matrix style loss of one layer with a named normalisation (:data:`GRAM_NORMALIZATIONS`).

  With equal image and style sizes and ``normalization="gatys"`` this is exactly Gatys et al.'s
  ``E_l = Σ (G − A)² / (4 N² M²)``; comparing Grams per position keeps it right when the style
  image has another size.
  """
  height, width, channels = features.shape
  scale = _gram_scale(normalization, channels=channels, positions=height * width,
                      image_pixels=image.shape[0] * image.shape[1])
  return scale * jnp.sum((feature_statistics.gram_statistic(features, mask=mask) - target) ** 2)


#: Normalisations of the distribution-matching terms: ``gram`` puts the term on the scale of the
#: Gram term (``normalization="gatys"``) so the same ``style_weight`` gives a comparable stylisation;
#: ``none`` is the plain distance.
DISTRIBUTION_NORMALIZATIONS = ('gram', 'none')


def _distribution_scale(normalization: str, *, second_moment: jax.Array) -> jax.Array:
  """Factor that brings a distance of units feature² to the Gram term's units (feature⁴).

  The Gram term is a mean squared difference of second moments; multiplying a squared distance of
  features by the style's mean second moment ``(|μ_s|² + tr Σ_s) / C`` gives the same units. The
  remaining constant 1/8 is measured: on the embedded astronaut against The Starry Night at 64 and
  256 px, the scaled Wasserstein and mean/std terms are 0.2–2x the Gram term at each of
  relu1_1 ... relu5_1 (unscaled they are 400–600 000x smaller, and a style weight chosen for Gram
  leaves the image almost unchanged).
  """
  if normalization == 'gram':
    return second_moment / 8.0
  if normalization == 'none':
    return jnp.ones((), second_moment.dtype)
  raise errors.UserError(f'unknown normalization {normalization!r} for a distribution term; '
                         f'choose one of {", ".join(DISTRIBUTION_NORMALIZATIONS)}')


@register('wasserstein', reference='style', statistic=feature_statistics.mean_covariance_statistic)
def wasserstein(*, features: jax.Array, target: Mapping[str, jax.Array],
                mask: jax.Array | None = None, normalization: str = 'gram', **unused
                ) -> jax.Array:
  """Squared 2-Wasserstein distance between Gaussians fitted to the features (crowsonkb).

  ``|μ − μ_s|² + tr Σ + tr Σ_s − 2 tr (Σ_s^½ Σ Σ_s^½)^½``, divided by the channel count, times
  :func:`_distribution_scale`. With a mask, μ and Σ are the masked region's.
  """
  stats = feature_statistics.mean_covariance_statistic(features, mask=mask)
  cross = target['sqrt_covariance'] @ stats['covariance'] @ target['sqrt_covariance']
  # Clamped above zero: ReLU features have near-singular covariances, and the gradient of a square
  # root at zero is infinite (NaN after the chain rule).
  cross_trace = jnp.sum(jnp.sqrt(jnp.maximum(jnp.linalg.eigvalsh(cross), 1e-5)))
  distance = (jnp.sum((stats['mean'] - target['mean']) ** 2) + jnp.trace(stats['covariance'])
              + jnp.trace(target['covariance']) - 2.0 * cross_trace)
  channels = features.shape[-1]
  second_moment = (jnp.sum(target['mean'] ** 2) + jnp.trace(target['covariance'])) / channels
  return distance / channels * _distribution_scale(normalization, second_moment=second_moment)


@register('mean_std', reference='style', statistic=feature_statistics.mean_std_statistic)
def mean_std(*, features: jax.Array, target: Mapping[str, jax.Array],
             mask: jax.Array | None = None, normalization: str = 'gram', **unused) -> jax.Array:
  """Channel mean and standard deviation matching (the AdaIN statistic): mean squared errors.

  Times :func:`_distribution_scale`; with a mask, the masked region's mean and deviation.
  """
  stats = feature_statistics.mean_std_statistic(features, mask=mask)
  distance = (jnp.mean((stats['mean'] - target['mean']) ** 2)
              + jnp.mean((stats['std'] - target['std']) ** 2))
  second_moment = jnp.mean(target['mean'] ** 2 + target['std'] ** 2)
  return distance * _distribution_scale(normalization, second_moment=second_moment)


# --------------------------------------------------------------------------------------------
# Total variation (no reference, no layers: a function of the image).


def _differences(image: jax.Array) -> tuple[jax.Array, jax.Array]:
  return image[1:, :-1] - image[:-1, :-1], image[:-1, 1:] - image[:-1, :-1]


@register('tv', reference=None)
def total_variation(*, image: jax.Array, power: float = 1.25, **unused) -> jax.Array:
  """The seed's form: ``Σ ((x[i,j]−x[i+1,j])² + (x[i,j]−x[i,j+1])²)^power`` (power 1.25)."""
  down, right = _differences(image)
  return jnp.sum((down ** 2 + right ** 2 + 1e-12) ** power)


@register('tv_l2', reference=None)
def total_variation_l2(*, image: jax.Array, **unused) -> jax.Array:
  """Squared differences of neighbours, summed: ``Σ (dx² + dy²)``."""
  down, right = _differences(image)
  return jnp.sum(down ** 2 + right ** 2)


@register('tv_l1', reference=None)
def total_variation_l1(*, image: jax.Array, **unused) -> jax.Array:
  """pastiche's TV: ``½ (mean |x[i+1,j]−x[i,j]| + mean |x[i,j+1]−x[i,j]|)``.

  With the ½ a ``tv_weight`` means what pastiche's ``--tv-weight`` means.
  """
  return 0.5 * (jnp.mean(jnp.abs(image[1:] - image[:-1]))
                + jnp.mean(jnp.abs(image[:, 1:] - image[:, :-1])))


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
  """

  name: str
  term: str
  layers: tuple[str, ...]
  layer_weights: tuple[float, ...]
  options: tuple[tuple[str, Any], ...] = ()

  @property
  def fn(self) -> Callable[..., jax.Array]:
    return lookup(self.term)

  @property
  def reference(self) -> str | None:
    return self.fn.reference


def make_entry(*, name: str, term: str, layers: Sequence[str] = (),
               layer_weights: Sequence[float] = (), options: Mapping[str, Any] | None = None
               ) -> Entry:
  """Builds an :class:`Entry`, checking the term exists and the weights match the layers.

  Empty ``layer_weights`` means equal weights ``1/len(layers)`` (Gatys' w_l).
  """
  fn = lookup(term)
  layers = tuple(layers)
  if fn.reference is not None and not layers:
    raise errors.UserError(f'loss {name!r} (term {term!r}) needs at least one layer; set '
                           f'--config.losses.{name}.layers')
  if layer_weights and len(layer_weights) != len(layers):
    raise errors.UserError(f'loss {name!r} has {len(layer_weights)} layer weights for '
                           f'{len(layers)} layers; give one per layer or none')
  weights = tuple(float(w) for w in layer_weights) or tuple(1.0 / max(len(layers), 1)
                                                              for _ in layers)
  return Entry(name=name, term=term, layers=layers, layer_weights=weights,
               options=tuple(sorted((options or {}).items())))


def accepts_mask(entry: Entry) -> bool:
  """Whether the entry's term names a ``mask`` keyword (so spatial masks can be honoured)."""
  return 'mask' in inspect.signature(entry.fn).parameters


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


def total(*, image: jax.Array, features: Mapping[str, jax.Array], entries: Sequence[Entry],
          weights: Mapping[str, jax.Array], content_targets: Mapping,
          style_targets: Sequence[Mapping], style_blend: jax.Array,
          style_masks: Sequence[Mapping[str, jax.Array]] | None = None
          ) -> tuple[jax.Array, dict[str, jax.Array]]:
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

  Returns:
    ``(total, {entry name: weighted part})``.
  """
  parts = {}
  for entry in entries:
    options = dict(entry.options)
    if entry.reference is None:
      value = entry.fn(image=image, **options)
    else:
      if entry.reference == 'content':
        per_reference = [(1.0, content_targets[entry.name], None)]
      else:
        per_reference = [
            (style_blend[index], style_targets[index][entry.name],
             None if style_masks is None else style_masks[index])
            for index in range(len(style_targets))]
      value = 0.0
      for blend, entry_targets, masks in per_reference:
        for layer, layer_weight in zip(entry.layers, entry.layer_weights):
          kwargs = dict(options)
          if masks is not None:
            kwargs['mask'] = masks[layer]
          value = value + blend * layer_weight * entry.fn(
              features=features[layer], target=entry_targets[layer], image=image, **kwargs)
    parts[entry.name] = weights[entry.name] * value
  return sum(parts.values()), parts
