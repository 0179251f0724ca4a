"""Exact tiled evaluation: the loss and its image gradient with the memory of one tile.

Every tiling term is *additive over positions* (:class:`nst_jax.terms.Additive`): its loss is a
function of sums over a layer's positions (Gram sums ``Σ F Fᵀ``, moments ``Σ F``, counts, squared
content errors, neighbour differences). Such a loss and its gradient split over square tiles of
the image exactly, in two passes, each a ``lax.scan`` over the tiles inside the compiled program:

1. Forward: each tile is cut out of the image with a halo around it, wide enough that the tile's
   own positions at the deepest layer read see no edge of the window (the receptive field's
   growth, rounded up to the pooling grid so that the window's poolings pair the same positions
   as the whole image's). The network runs on the window, zeroing every position outside the
   image at every layer (the ``boundary`` of :func:`nst_jax.vgg.features`), so a window at the
   image's edge sees the zero padding the whole image sees. Each term's sums over the tile's own
   positions are added up over tiles; the loss is its ``finish`` of the totals.
2. Backward (:func:`jax.custom_vjp`): with the totals fixed, the cotangent of the sums is one
   :func:`jax.vjp` of the finishing step; each tile's window then gets its gradient as the VJP of
   its sums with that cotangent, added into the image's gradient (halo included: a tile's
   features depend on the pixels around it).

Only one window's activations are alive at a time, so memory follows the tile, not the image;
the price is computing each halo again (a 64 px tile reading relu5_1 runs on a 224 px window).
Images whose sides are not multiples of the tile are padded, and the padding is weighted out of
every sum (``valid``). Terms that need all positions at once, draw random numbers, or normalise
a whole layer's gradient are refused by :func:`check`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from nst_jax import errors
from nst_jax import losses
from nst_jax import vgg

if TYPE_CHECKING:
  from nst_jax import problem


def pooling_grid(layers: Sequence[str]) -> int:
  """The stride of the deepest of ``layers`` (1 for none): tiles and halos are multiples of it."""
  return max((vgg.downsampling(layer) for layer in layers), default=1)


def halo_size(layers: Sequence[str], *, network: str, image_terms: bool) -> int:
  """Pixels around a tile that its features at ``layers`` depend on, rounded up to the grid.

  Each 3x3 convolution at stride ``s`` widens the receptive field by ``s`` pixels on each side
  (70 px up to VGG19's relu5_1); a term that reads the image itself needs one pixel.
  """
  order = vgg.layer_names(network)
  last = max((order.index(layer) for layer in layers), default=-1)
  growth = sum(vgg.downsampling(name) for name in order[:last + 1] if '_conv' in name)
  grid = pooling_grid(layers)
  return -(-max(growth, 1 if image_terms else 0) // grid) * grid


def window_size(tile_size: int, entries: Sequence[losses.Entry], *, network: str) -> int:
  """Side of the window one tile of ``tile_size`` px is evaluated on: the tile and its halo."""
  return tile_size + 2 * halo_size(losses.feature_layers(entries), network=network,
                                   image_terms=True)


def check(entries: Sequence[losses.Entry], *, tile_size: int, network: str) -> None:
  """Raises the one-line UserError of a setting that cannot be tiled (``tile_size`` 0: none)."""
  if tile_size < 0:
    raise errors.UserError(f'--config.tile_size={tile_size} must be 0 (off) or a tile side in px')
  if tile_size == 0:
    return
  tileable = sorted(name for name, fn in losses.TERMS.items() if fn.additive is not None)
  for entry in entries:
    if getattr(entry.fn, 'additive', None) is None:
      raise errors.UserError(
          f'loss {entry.name!r} (term {entry.term!r}) is not additive over positions (it needs '
          f'all positions at once, or declares no additive=...), so --config.tile_size cannot '
          f'split it; set --config.tile_size=0 or use a term that tiles ({", ".join(tileable)})')
    if entry.normalize_gradients or losses.accepts_key(entry):
      raise errors.UserError(
          f'loss {entry.name!r} (term {entry.term!r}) ' + (
              'normalises each layer gradient over the whole layer' if entry.normalize_gradients
              else 'draws random numbers over all positions') +
          ', which tiles cannot split; set --config.tile_size=0')
  layers = losses.feature_layers(entries)
  vgg.check_layers(layers, network=network)
  grid = pooling_grid(layers)
  if tile_size % grid:
    deepest = max(layers, key=vgg.downsampling)
    raise errors.UserError(
        f'--config.tile_size={tile_size} must be a multiple of {grid}, the pooling grid of '
        f'{deepest} (the deepest layer the losses read), so tiles align with the poolings')


@dataclasses.dataclass(frozen=True)
class Geometry:
  """How a ``height`` x ``width`` image is cut: square tiles of ``tile`` px, halos of ``halo``."""

  height: int
  width: int
  tile: int
  halo: int

  @property
  def rows(self) -> int:
    return -(-self.height // self.tile)

  @property
  def cols(self) -> int:
    return -(-self.width // self.tile)

  @property
  def window(self) -> int:
    return self.tile + 2 * self.halo

  def origin(self, index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Image coordinates of tile ``index``'s first pixel (row-major tiles)."""
    return (index // self.cols) * self.tile, (index % self.cols) * self.tile

  def pad(self, image: jax.Array) -> jax.Array:
    """The image with the halo around it and the last tiles' overhang, zeros: window ``index``
    starts at ``origin(index)`` of this array."""
    return jnp.pad(image, ((self.halo, self.rows * self.tile - self.height + self.halo),
                           (self.halo, self.cols * self.tile - self.width + self.halo), (0, 0)))

  def window_at(self, padded: jax.Array, index: jax.Array
                ) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """Window ``index`` (tile and halo) of :meth:`pad`'s output, and where it starts there."""
    row, col = self.origin(index)
    start = (row, col, jnp.zeros_like(row))  # index dtypes must agree (int64 under x64)
    return jax.lax.dynamic_slice(padded, start, (self.window, self.window, 3)), start

  def crop(self, padded: jax.Array) -> jax.Array:
    return padded[self.halo:self.halo + self.height, self.halo:self.halo + self.width]


def geometry_of(program: problem.Program, height: int, width: int) -> Geometry:
  image_terms = any(entry.reference is None for entry in program.entries)
  return Geometry(height=height, width=width, tile=program.network.tile_size,
                  halo=halo_size(program.layers, network=program.network.name,
                                 image_terms=image_terms))


def _inside(start: jax.Array, count: int, limit: int) -> jax.Array:
  positions = start + jnp.arange(count)
  return (positions >= 0) & (positions < limit)


def _valid(origin: tuple[jax.Array, jax.Array], count: int, limits: tuple[int, int]) -> jax.Array:
  """1.0 at the (count, count) positions from ``origin`` that lie inside ``limits``, else 0."""
  rows, cols = (_inside(start, count, limit) for start, limit in zip(origin, limits))
  return (rows[:, None] & cols[None, :]).astype(jnp.float32)


def _zero_outside(x: jax.Array, stride: int, *, origin: tuple[jax.Array, jax.Array],
                  geometry: Geometry) -> jax.Array:
  """The ``boundary`` of a window at ``origin`` (image px): zeros outside the image at ``stride``.

  Poolings floor, so a layer at stride ``s`` has ``height // s`` rows, as the whole image's.
  """
  start = (origin[0] // stride, origin[1] // stride)
  inside = _valid(start, x.shape[1], (geometry.height // stride, geometry.width // stride))
  return x * inside[None, :, :, None].astype(x.dtype)


# --------------------------------------------------------------------------------------------
# What the tiles read: the references of each entry, per-position arrays padded to whole tiles.


def _references(entry: losses.Entry, data: Mapping) -> list[tuple[Any, Any, Any]]:
  """``(blend, {layer: target}, {layer: mask} or None)`` per reference image of ``entry``."""
  if entry.reference == 'content':
    return [(1.0, data['content_targets'][entry.name], None)]
  masks = data.get('style_masks')
  return [(data['style_blend'][index], style[entry.name], None if masks is None else masks[index])
          for index, style in enumerate(data['style_targets'])]


def _pad_positions(tree: Any, stride: int, geometry: Geometry) -> Any:
  """Per-position arrays (H_l, W_l, ...) of a layer at ``stride``, zero-padded to whole tiles."""
  rows, cols = geometry.rows * geometry.tile // stride, geometry.cols * geometry.tile // stride
  return jax.tree.map(lambda x: jnp.pad(x, [(0, rows - x.shape[0]), (0, cols - x.shape[1])]
                                        + [(0, 0)] * (x.ndim - 2)), tree)


def _padded_targets(entry: losses.Entry, per_layer: Mapping, geometry: Geometry) -> Mapping:
  if not entry.fn.additive.positional_target:
    return per_layer
  return {layer: _pad_positions(target, vgg.downsampling(layer), geometry)
          for layer, target in per_layer.items()}


def tile_data(targets: Mapping, *, program: problem.Program, geometry: Geometry) -> dict:
  """The targets the tiles read (no PRNG key: tiling terms draw none), per-position ones padded."""
  data = {name: targets[name] for name in ('weights', 'style_blend')}
  data['content_targets'] = {
      entry.name: _padded_targets(entry, targets['content_targets'][entry.name], geometry)
      for entry in program.entries if entry.reference == 'content'}
  data['style_targets'] = [
      {entry.name: _padded_targets(entry, style[entry.name], geometry)
       for entry in program.entries if entry.reference == 'style'}
      for style in targets['style_targets']]
  if targets.get('style_masks') is not None:
    data['style_masks'] = [{layer: _pad_positions(mask, vgg.downsampling(layer), geometry)
                            for layer, mask in masks.items()} for masks in targets['style_masks']]
  return data


# --------------------------------------------------------------------------------------------
# One tile's sums, and the loss from the sums of all tiles.


def _crop(array: jax.Array, start: tuple[jax.Array, jax.Array], count: int) -> jax.Array:
  """``array[start : start + count]`` on its first two axes (a tile of a per-position array)."""
  zero = jnp.zeros_like(start[0])  # index dtypes must agree (int64 under x64)
  return jax.lax.dynamic_slice(array, (*start, *(zero,) * (array.ndim - 2)),
                               (count, count, *array.shape[2:]))


def tile_features(window: jax.Array, index: jax.Array, *, net: Mapping, program: problem.Program,
                  geometry: Geometry, layers: Sequence[str] | None = None
                  ) -> dict[str, jax.Array]:
  """Tile ``index``'s features at ``layers`` (default: the program's), from its window.

  They are the whole image's features at the tile's positions (zero where the tile overhangs the
  image): the halo keeps the window's own edges out of them.
  """
  layers = tuple(program.layers if layers is None else layers)
  if not layers:
    return {}
  origin = geometry.origin(index)
  window_origin = (origin[0] - geometry.halo, origin[1] - geometry.halo)
  features = program.features(net, window, layers, boundary=functools.partial(
      _zero_outside, origin=window_origin, geometry=geometry))
  tile = {}
  for layer, values in features.items():
    stride = vgg.downsampling(layer)
    inner, count = geometry.halo // stride, geometry.tile // stride
    tile[layer] = values[inner:inner + count, inner:inner + count]
  return tile


def _layer_tile(layer: str, origin: tuple[jax.Array, jax.Array], geometry: Geometry
                ) -> tuple[tuple[jax.Array, jax.Array], int, jax.Array]:
  """The tile at image ``origin`` on ``layer``'s grid: its first position, side, and ``valid``."""
  stride = vgg.downsampling(layer)
  count, start = geometry.tile // stride, (origin[0] // stride, origin[1] // stride)
  return start, count, _valid(start, count, (geometry.height // stride, geometry.width // stride))


def _layer_sums(entry: losses.Entry, features: Mapping[str, jax.Array], data: Mapping, *,
                origin: tuple[jax.Array, jax.Array], geometry: Geometry) -> list[dict]:
  """A layer term's sums over one tile's positions: ``[{layer: sums} per reference image]``."""
  additive = entry.fn.additive
  per_reference = []
  for _, entry_targets, masks in _references(entry, data):
    per_layer = {}
    for layer in entry.layers:
      start, count, valid = _layer_tile(layer, origin, geometry)
      kwargs = dict(entry.options)
      if masks is not None:
        kwargs['mask'] = _crop(masks[layer], start, count)
      target = entry_targets[layer]
      if additive.positional_target:
        target = jax.tree.map(lambda x: _crop(x, start, count), target)
      per_layer[layer] = additive.sums(features=features[layer], valid=valid, target=target,
                                       **kwargs)
    per_reference.append(per_layer)
  return per_reference


def _tile_sums(window: jax.Array, index: jax.Array, *, net: Mapping, data: Mapping,
               program: problem.Program, geometry: Geometry) -> dict:
  """Every entry's sums over tile ``index``'s positions, from its window (tile and halo)."""
  origin = geometry.origin(index)
  features = tile_features(window, index, net=net, program=program, geometry=geometry)
  sums = {}
  for entry in program.entries:
    if entry.reference is None:  # the tile's pixels and one more row and column
      inner, count = geometry.halo, geometry.tile + 1
      sums[entry.name] = entry.fn.additive.sums(
          image=window[inner:inner + count, inner:inner + count],
          valid=_valid(origin, count, (geometry.height, geometry.width)), **dict(entry.options))
    else:
      sums[entry.name] = _layer_sums(entry, features, data, origin=origin, geometry=geometry)
  return sums


def _finish(sums: Mapping, data: Mapping, *, program: problem.Program, geometry: Geometry
            ) -> dict[str, jax.Array]:
  """Each entry's weighted loss from its sums over the whole image (as :func:`losses.total`)."""
  image_shape = (geometry.height, geometry.width, 3)
  parts = {}
  for entry in program.entries:
    finish, options = entry.fn.additive.finish, dict(entry.options)
    if entry.reference is None:
      value = finish(sums=sums[entry.name], target=None, shape=image_shape,
                     image_shape=image_shape, **options)
    else:
      value = 0.0
      for (blend, entry_targets, _), per_layer in zip(_references(entry, data), sums[entry.name]):
        for layer, layer_weight in zip(entry.layers, entry.layer_weights):
          stride = vgg.downsampling(layer)
          shape = (geometry.height // stride, geometry.width // stride,
                   vgg.channels(layer, network=program.network.name))
          value = value + blend * layer_weight * finish(
              sums=per_layer[layer], target=entry_targets[layer], shape=shape,
              image_shape=image_shape, **options)
    parts[entry.name] = data['weights'][entry.name] * value
  return parts


# --------------------------------------------------------------------------------------------
# The targets of a reference image, tile by tile.


def _tile_reference(index: jax.Array, padded: jax.Array, *, net: Mapping, entries: Sequence,
                    program: problem.Program, geometry: Geometry, assembled: Sequence[str]
                    ) -> tuple[dict, dict]:
  """One tile's sums of the entries with a statistic from sums, and its features at
  ``assembled`` layers."""
  layers = sorted({layer for entry in entries for layer in entry.layers})
  features = tile_features(geometry.window_at(padded, index)[0], index, net=net, program=program,
                           geometry=geometry, layers=layers)
  origin = geometry.origin(index)
  sums = {}
  for entry in entries:
    if entry.fn.additive.statistic is None:
      continue
    sums[entry.name] = {}
    for layer in entry.layers:
      sums[entry.name][layer] = entry.fn.additive.sums(
          features=features[layer], valid=_layer_tile(layer, origin, geometry)[2], target=None,
          **dict(entry.options))
  return sums, {layer: features[layer] for layer in assembled}


@functools.partial(jax.jit, static_argnames=('program', 'reference'))
def reference_targets(net: Mapping, image: jax.Array, *, program: problem.Program,
                      reference: str) -> dict:
  """:func:`nst_jax.losses.targets` of a content or style image, computed over tiles.

  Statistics that are functions of sums (Gram, moments) add up the tiles' sums as the loss does;
  per-position targets (content) and terms without ``Additive.statistic`` get their layer's
  features assembled from the tiles' own positions. Only one window's activations are alive at a
  time, so a 4096 px image needs one window plus the stored targets, not its whole activations.
  """
  entries = [entry for entry in program.entries if entry.reference == reference]
  geometry = geometry_of(program, image.shape[0], image.shape[1])
  assembled = sorted({layer for entry in entries if entry.fn.additive.statistic is None
                      for layer in entry.layers})
  padded = geometry.pad(image)
  one = functools.partial(_tile_reference, padded=padded, net=net, entries=entries,
                          program=program, geometry=geometry, assembled=assembled)
  indices = jnp.arange(geometry.rows * geometry.cols)
  sums_shape, tile_shape = jax.eval_shape(one, indices[0])
  buffers = {layer: jnp.zeros((geometry.rows * shape.shape[0], geometry.cols * shape.shape[1],
                               shape.shape[2]), shape.dtype)
             for layer, shape in tile_shape.items()}

  def add(carry, index):
    total, whole = carry
    sums, tile = one(index)
    row, col = geometry.origin(index)
    for layer, values in tile.items():
      stride = vgg.downsampling(layer)
      whole = {**whole, layer: jax.lax.dynamic_update_slice(
          whole[layer], values, (row // stride, col // stride, jnp.zeros_like(row)))}
    return (jax.tree.map(jnp.add, total, sums), whole), None

  zeros = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), sums_shape)
  total, whole = jax.lax.scan(add, (zeros, buffers), indices)[0]
  out = {}
  for entry in entries:
    options = dict(entry.options)
    out[entry.name] = {}
    for layer in entry.layers:
      if entry.fn.additive.statistic is not None:
        out[entry.name][layer] = entry.fn.additive.statistic(sums=total[entry.name][layer],
                                                             **options)
      else:
        stride = vgg.downsampling(layer)
        features = whole[layer][:geometry.height // stride, :geometry.width // stride]
        out[entry.name][layer] = entry.fn.statistic(features, **options)
  return out


# --------------------------------------------------------------------------------------------
# The two passes.


def _accumulate(image: jax.Array, net: Mapping, data: Mapping, *, program: problem.Program,
                geometry: Geometry) -> dict:
  """Pass 1: the sums of every tile, added up (one window's activations alive at a time)."""
  padded = geometry.pad(image)
  tile_sums = functools.partial(_tile_sums, net=net, data=data, program=program,
                                geometry=geometry)
  one = lambda index: tile_sums(geometry.window_at(padded, index)[0], index)
  indices = jnp.arange(geometry.rows * geometry.cols)
  zeros = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype),
                       jax.eval_shape(one, indices[0]))
  add = lambda total, index: (jax.tree.map(jnp.add, total, one(index)), None)
  return jax.lax.scan(add, zeros, indices)[0]


def _gradient(image: jax.Array, net: Mapping, data: Mapping, sums_cotangent: Mapping, *,
              program: problem.Program, geometry: Geometry) -> jax.Array:
  """Pass 2: the image gradient, each window's VJP with the sums' cotangent added in place."""
  padded = geometry.pad(image)
  tile_sums = functools.partial(_tile_sums, net=net, data=data, program=program,
                                geometry=geometry)

  def add(gradient, index):
    window, start = geometry.window_at(padded, index)
    _, vjp = jax.vjp(lambda x: tile_sums(x, index), window)
    size = (geometry.window, geometry.window, 3)
    here = jax.lax.dynamic_slice(gradient, start, size) + vjp(sums_cotangent)[0]
    return jax.lax.dynamic_update_slice(gradient, here, start), None

  gradient = jax.lax.scan(add, jnp.zeros_like(padded), jnp.arange(geometry.rows * geometry.cols))
  return geometry.crop(gradient[0])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _tiled_parts(program, geometry, image, net, data):
  sums = _accumulate(image, net, data, program=program, geometry=geometry)
  return _finish(sums, data, program=program, geometry=geometry)


def _tiled_parts_fwd(program, geometry, image, net, data):
  sums = _accumulate(image, net, data, program=program, geometry=geometry)
  return _finish(sums, data, program=program, geometry=geometry), (image, net, data, sums)


def _tiled_parts_bwd(program, geometry, residuals, cotangent):
  image, net, data, sums = residuals
  _, finish_vjp = jax.vjp(lambda s: _finish(s, data, program=program, geometry=geometry), sums)
  gradient = _gradient(image, net, data, finish_vjp(cotangent)[0], program=program,
                       geometry=geometry)
  # The network and the targets are constants of the optimisation.
  zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
  return gradient, zeros(net), zeros(data)


_tiled_parts.defvjp(_tiled_parts_fwd, _tiled_parts_bwd)


def objective(image: jax.Array, *, net: Mapping, targets: Mapping, program: problem.Program
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """:func:`nst_jax.problem.objective` evaluated over tiles of ``program.network.tile_size``.

  Same value and gradient (to float32 rounding), with the memory of one tile's window.
  """
  geometry = geometry_of(program, image.shape[0], image.shape[1])
  parts = _tiled_parts(program, geometry, image, net,
                       tile_data(targets, program=program, geometry=geometry))
  return sum(parts.values()), parts
