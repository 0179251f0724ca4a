"""What every loss-term module shares: the registry of terms by name, and the Gram scale.

The built-in terms live in several modules, one per family: :mod:`nst_jax.losses` (Gatys et al.'s
content and Gram terms, and the weighted total), :mod:`nst_jax.gaussian_losses` (Wasserstein,
mean/std), :mod:`nst_jax.total_variation` (tv, tv_l2, tv_l1), :mod:`nst_jax.texture_losses`
(sliced Wasserstein, histogram, MRF) and :mod:`nst_jax.strotss` (relaxed EMD, self-similarity).
Each imports this module and registers into :data:`TERMS`; none but :mod:`nst_jax.losses`
imports another term module, so there is no import cycle. :mod:`nst_jax.losses` imports the
others, so importing it (as everything that names a term does) registers every built-in term, and
it re-exports :func:`term`, :func:`register`, :func:`lookup` and :data:`TERMS`: a researcher
writes ``@losses.term(...)``.

:func:`distribution_scale` is here because every distribution-matching term, whichever module
defines it, puts its distance on the Gram term's scale the same way, so that one
``style_weight`` stylises with any of them.

A term may also declare itself **additive over positions** (``additive=Additive(...)``): its loss
is a function of sums over the layer's positions (a Gram matrix is ``Σ F Fᵀ`` over positions, a
mean ``Σ F`` over a count). Such a term can be evaluated tile by tile with the memory of one tile
(``--config.tile_size``, :mod:`nst_jax.tiling`): ``sums`` gives the sums over some positions,
which add up over any partition of the positions, and ``finish`` turns the sums over all positions
into the loss, equal to the term's own value. A term that needs all positions at once (sorting,
nearest neighbours, random subsets) leaves ``additive`` unset and tiling refuses it. A layer term's
``sums`` is called as ``sums(*, features, valid, target, mask=None, **options)``: ``features``
(h, w, C) are some of the layer's positions, ``valid`` (h, w) is 1 inside the image and 0 on
padding (weight every position's part by it), ``target`` the term's target (cropped to the same
positions when ``positional_target``, as for content), ``mask`` the style mask at those positions.
An image term's (``reference=None``) is ``sums(*, image, valid, **options)``, ``image`` (h+1, w+1,
3) holding the positions and one more row and column (total variation looks one pixel ahead).
``finish(*, sums, target, shape, image_shape, **options)`` gets the layer's full (H, W, C) shape
and the image's. A style term may also give ``statistic(*, sums, **options)``: its target (the
term's ``statistic`` of the style image) from the same sums over all of the style's positions, so
tiles compute the target without the style's whole features (otherwise they assemble the layer's
features from the tiles and apply the term's ``statistic``, as for a per-position content target).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from nst_jax import errors

REFERENCES = ('content', 'style', None)


@dataclasses.dataclass(frozen=True)
class Additive:
  """How a term is a function of sums over positions (see the module docstring for signatures).

  Attributes:
    sums: the per-position parts of some positions, summed (a pytree of arrays).
    finish: the loss from the sums over all positions.
    positional_target: the target holds one value per position (H, W, ...) and is cropped with
      the features (content); otherwise it is passed whole (a style statistic).
    statistic: the term's target of a reference image from ``sums`` over all its positions
      (unmasked), or None (the reference's features are assembled from tiles instead).
  """

  sums: Callable[..., Any]
  finish: Callable[..., jax.Array]
  positional_target: bool = False
  statistic: Callable[..., Any] | None = None


def term(*, reference: str | None, statistic: Callable[..., Any] | None = None,
         additive: Additive | None = None):
  """Marks a function as a loss term.

  Args:
    reference: which image's features become targets: ``"content"``, ``"style"`` or ``None``.
    statistic: maps a reference layer's features (H, W, C) (and the term's options) to the stored
      target; default: the features themselves.
    additive: the term as sums over positions, so tiled evaluation can split it; None for a term
      that needs all positions at once.

  Returns:
    A decorator that records these on the function and returns it unchanged.
  """
  if reference not in REFERENCES:
    raise ValueError(f'reference must be one of {REFERENCES}, got {reference!r}')

  def decorate(fn):
    fn.reference = reference
    fn.statistic = statistic or (lambda features, **unused: features)
    fn.additive = additive
    return fn

  return decorate


#: The built-in terms by name.
TERMS: dict[str, Callable[..., jax.Array]] = {}


def register(name: str, *, reference: str | None, statistic: Callable[..., Any] | None = None,
             additive: Additive | None = None):
  """Like :func:`term`, and also makes the term available as ``name`` in configs."""

  def decorate(fn):
    TERMS[name] = term(reference=reference, statistic=statistic, additive=additive)(fn)
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


#: Normalisations of the distribution-matching terms: ``gram`` puts the term on the scale of the
#: Gram term (``normalization="gatys"``) so the same ``style_weight`` gives a comparable
#: stylisation; ``none`` is the plain distance. ``gatys`` means ``gram``: it is the default
#: config's style option, so ``--config.losses.style.term=wasserstein`` (or any distribution
#: term) works alone.
DISTRIBUTION_NORMALIZATIONS = ('gram', 'gatys', 'none')


def distribution_scale(normalization: str, *, second_moment: jax.Array) -> jax.Array:
  """Factor that brings a distance of units feature² to the Gram term's units (feature⁴).

  The Gram term is a mean squared difference of second moments; multiplying a squared distance of
  features by the style's mean second moment ``(|μ_s|² + tr Σ_s) / C`` gives the same units. The
  remaining constant 1/8 is measured: on the embedded astronaut against The Starry Night at 64 and
  256 px, the scaled Wasserstein and mean/std terms are 0.2–2x the Gram term at each of
  relu1_1 ... relu5_1 (unscaled they are 400–600 000x smaller, and a style weight chosen for Gram
  leaves the image almost unchanged).

  Args:
    normalization: one of :data:`DISTRIBUTION_NORMALIZATIONS`.
    second_moment: the style's mean squared activation at the layer (a scalar).

  Returns:
    The scalar factor.
  """
  if normalization in ('gram', 'gatys'):
    return second_moment / 8.0
  if normalization == 'none':
    return jnp.ones((), second_moment.dtype)
  raise errors.UserError(f'unknown normalization {normalization!r} for a distribution term; '
                         f'choose one of {", ".join(DISTRIBUTION_NORMALIZATIONS)}')
