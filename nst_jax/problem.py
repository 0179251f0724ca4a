"""The problem at one scale: the objective, and every problem's targets, weights and masks.

:class:`Program` is the static (hashable) description the compiled functions depend on;
:func:`objective` is the loss of one image; :func:`scale_targets` computes the reference
features of every problem of a batch at one scale, stacked on axis 0 so the batch is one pytree;
:func:`balance_weights` keeps a coarse scale's balance of terms as at the final scale.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nst_jax import images
from nst_jax import inputs
from nst_jax import losses
from nst_jax import parameterization
from nst_jax import plan as plan_lib
from nst_jax import tiling
from nst_jax import vgg


@dataclasses.dataclass(frozen=True)
class Program:
  """Everything the compiled step depends on statically (hashable; a change recompiles)."""

  entries: tuple[losses.Entry, ...]
  network: plan_lib.NetworkPlan
  optimizer: plan_lib.OptimizerPlan

  @property
  def layers(self) -> tuple[str, ...]:
    return losses.feature_layers(self.entries)

  @property
  def image_dtype(self) -> jnp.dtype:
    """The dtype of the optimised image: float32, or float64 for a float64 network."""
    return jnp.promote_types(self.network.compute_dtype, jnp.float32)

  @property
  def stochastic(self) -> bool:
    """Whether a term draws random numbers (takes a ``key``): the loss then depends on the step."""
    return any(losses.accepts_key(entry) for entry in self.entries)

  def encode(self, image: jax.Array) -> jax.Array:
    """An (H, W, 3) image as what the optimiser moves (itself, or its Laplacian pyramid)."""
    if self.optimizer.parameterization == 'pixels':
      return image
    return parameterization.encode(image, levels=self.optimizer.pyramid_levels)

  def decode(self, variables: jax.Array, size: tuple[int, int]) -> jax.Array:
    """The (H, W, 3) image of what the optimiser moves, for a result of ``size`` (H, W)."""
    if self.optimizer.parameterization == 'pixels':
      return variables
    return parameterization.decode(variables, height=size[0], width=size[1],
                                   levels=self.optimizer.pyramid_levels)

  def features(self, net: Mapping, image: jax.Array, layers: Sequence[str],
               boundary: Callable[[jax.Array, int], jax.Array] | None = None) -> dict:
    """:func:`nst_jax.vgg.features` with the program's network (``boundary``: for a tile)."""
    return vgg.features(net, image, layers=layers, network=self.network.name,
                        pooling=self.network.pooling, remat=self.network.remat,
                        compute_dtype=jnp.dtype(self.network.compute_dtype), boundary=boundary)


def objective(image: jax.Array, *, net: Mapping, targets: Mapping, program: Program,
              step: jax.Array | int = 0) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss of one generated image and its weighted parts, for one problem of a batch.

  ``step`` selects the random draws of terms that take a ``key``: the problem's key (from its
  seed, ``targets['key']``) folded with the step. Logs and balances measure at step 0, so one
  image always gets one value. With ``program.network.tile_size`` the loss and its gradient are
  computed over tiles (:mod:`nst_jax.tiling`), exactly, with the memory of one tile.
  """
  if program.network.tile_size:
    return tiling.objective(image, net=net, targets=targets, program=program)
  features = program.features(net, image, program.layers)
  return losses.total(
      image=image, features=features, entries=program.entries, weights=targets['weights'],
      content_targets=targets['content_targets'], style_targets=targets['style_targets'],
      style_blend=targets['style_blend'], style_masks=targets.get('style_masks'),
      key=jax.random.fold_in(targets['key'], step) if program.stochastic else None)


@functools.partial(jax.jit, static_argnames=('program', 'layers'))
def reference_features(net: Mapping, image: jax.Array, *, program: Program,
                       layers: tuple[str, ...]) -> dict:
  """Activations of a content or style image (computed once per scale)."""
  return program.features(net, image, layers)


@functools.partial(jax.jit, static_argnames=('program',))
def loss_parts(images_: jax.Array, net: Mapping, targets: Mapping, *, program: Program
               ) -> dict[str, jax.Array]:
  """Each entry's weighted loss for a batch of images (for logs, the progress line, balance)."""
  return jax.vmap(lambda image, problem_targets: objective(
      image, net=net, targets=problem_targets, program=program)[1])(images_, targets)


def layer_shapes(height: int, width: int, layers: Sequence[str]) -> dict[str, tuple[int, int]]:
  """Spatial (height, width) of each layer for a height x width input (pools floor)."""
  shapes = {}
  for layer in layers:
    h, w = height, width
    for _ in range(int(math.log2(vgg.downsampling(layer)))):
      h, w = h // 2, w // 2
    shapes[layer] = (h, w)
  return shapes


def _reference_targets(image: np.ndarray, *, net: Mapping, program: Program, reference: str,
                       layers: tuple[str, ...]) -> dict:
  """The targets of every entry that reads ``reference`` from that image; with tiles, tile by
  tile, so a huge content or style never holds its whole activations."""
  if program.network.tile_size and layers:
    return tiling.reference_targets(net, jnp.asarray(image), program=program, reference=reference)
  features = (reference_features(net, jnp.asarray(image), program=program, layers=layers)
              if layers else {})
  return losses.targets(entries=program.entries, reference_features=features,
                        reference=reference)


def _problem_targets(batch: inputs.Batch, index: int, images_plan: plan_lib.ImagesPlan, *,
                     net: Mapping, program: Program, height: int, width: int) -> dict[str, Any]:
  content, styles = inputs.scale_images(batch, index, images_plan, height, width)
  content_layers = losses.feature_layers(program.entries, 'content')
  style_layers = losses.feature_layers(program.entries, 'style')
  targets: dict[str, Any] = {
      'weights': {name: np.float32(value) for name, value in batch.entry_weights[index].items()},
      'style_blend': batch.style_blend[index], 'content_targets': {}, 'style_targets': [],
      # Raw uint32 key data, so the batch stacks and shards like any array and vmap carries each
      # problem's own key.
      'key': np.asarray(jax.random.key_data(jax.random.key(batch.seeds[index]))),
  }
  if content_layers:
    targets['content_targets'] = _reference_targets(content, net=net, program=program,
                                                    reference='content', layers=content_layers)
  for style in styles:
    targets['style_targets'].append(_reference_targets(style, net=net, program=program,
                                                       reference='style', layers=style_layers))
  if batch.masks is not None:
    shapes = layer_shapes(height, width, style_layers)
    targets['style_masks'] = [
        {layer: images.resize(mask[..., None], *shape)[..., 0].clip(0, 1)
         for layer, shape in shapes.items()}
        for mask in batch.masks[index]]
  return targets


def scale_targets(batch: inputs.Batch, images_plan: plan_lib.ImagesPlan, *, net: Mapping,
                  program: Program, height: int, width: int) -> dict:
  """Targets, weights and masks of every problem at one scale, stacked on axis 0 (host arrays)."""
  per_problem = [_problem_targets(batch, index, images_plan, net=net, program=program,
                                  height=height, width=width) for index in range(len(batch))]
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *per_problem)


def term_sizes(batch: inputs.Batch, images_plan: plan_lib.ImagesPlan, targets: Mapping, *,
               net: Mapping, program: Program, height: int, width: int) -> dict[str, np.ndarray]:
  """Each entry's size at one scale, per problem: its weighted value on the content image or
  on the first style image (resized to the scale), whichever is larger.

  Content terms are zero on the content and style terms small on the style, so this measures the
  range a term spans between the two ends of the trade-off.
  """
  probes = []
  for index in range(len(batch)):
    content, styles = inputs.scale_images(batch, index, images_plan, height, width)
    probes.append((content, images.resize(styles[0], height, width)))
  sizes = None
  for which in range(2):
    probe = jnp.asarray(np.stack([pair[which] for pair in probes]), jnp.float32)
    parts = jax.device_get(loss_parts(probe, net, targets, program=program))
    parts = {name: np.abs(np.asarray(value)) for name, value in parts.items()}
    sizes = parts if sizes is None else {name: np.maximum(sizes[name], parts[name])
                                         for name in parts}
  return sizes


def balance_weights(targets: dict, *, sizes: Mapping[str, np.ndarray],
                    final_sizes: Mapping[str, np.ndarray]) -> dict:
  """Scales each entry's weight so its size at this scale equals its size at the final scale."""
  weights = {}
  for name, weight in targets['weights'].items():
    ratio = np.where(sizes[name] > 0, final_sizes[name] / np.maximum(sizes[name], 1e-30), 1.0)
    weights[name] = (np.asarray(weight) * ratio).astype(np.float32)
  return dict(targets, weights=weights)
