"""The fast network's compiled training steps, with nst_jax's own loss terms (Johnson et al. 2016).

The loss of a network output is :func:`nst_jax.losses.total` of the same ``config.losses`` entries
as the optimisation path: content terms compare the output's VGG features with those of the input
photo, style terms with the style image's statistics. :func:`train_step` is the pure step of one
network, a function of (parameters, optimiser state, batch, key) and the fixed loss network and
style targets; :func:`train_chunk` runs several steps in one compiled loop for N networks at once
(one per style image, vmapped over their parameters and optimiser states; the input photos' VGG
features are computed once per step for all N), with the batch split across devices
(``NamedSharding``; XLA adds the gradient all-reduce) when there are several.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nst_jax import errors
from nst_jax import losses
from nst_jax import problem
from nst_jax.fast import network
from nst_jax.fast import settings

#: The mesh axis the photos of a batch are split over.
DATA_AXIS = 'data'


@dataclasses.dataclass(frozen=True)
class Setup:
  """What the compiled steps depend on statically (hashable; a change recompiles)."""

  program: problem.Program           # the loss entries and the VGG settings
  architecture: network.Architecture
  learning_rate: float

  @property
  def optimizer(self) -> optax.GradientTransformation:
    return optax.adam(self.learning_rate)


def setup_of(plan: settings.TrainPlan) -> Setup:
  return Setup(program=problem.Program(entries=plan.entries, network=plan.network,
                                       optimizer=None),
               architecture=plan.architecture, learning_rate=plan.learning_rate)


def style_targets(net: Mapping, style: np.ndarray, *, setup: Setup,
                  weights: Mapping[str, float]) -> dict:
  """One style's targets and entry weights, as the loss of :func:`train_step` takes them."""
  layers = losses.feature_layers(setup.program.entries, 'style')
  features = problem.reference_features(net, jnp.asarray(style), program=setup.program,
                                        layers=layers)
  return {'targets': losses.targets(entries=setup.program.entries, reference_features=features,
                                    reference='style'),
          'weights': {name: jnp.float32(value) for name, value in weights.items()}}


def _content_features(net: Mapping, contents: jax.Array, *, setup: Setup) -> dict:
  layers = losses.feature_layers(setup.program.entries, 'content')
  return jax.vmap(lambda image: setup.program.features(net, image, layers))(contents)


def _loss(params: Any, contents: jax.Array, content_features: Mapping, key: jax.Array, *,
          net: Mapping, style: Mapping, setup: Setup) -> tuple[jax.Array, dict]:
  """Mean over the batch of each output's weighted total loss, and its parts."""
  outputs = setup.architecture.module().apply({'params': params}, contents)
  program = setup.program

  def one(output, features_of_content, image_key):
    content_targets = losses.targets(entries=program.entries,
                                     reference_features=features_of_content, reference='content')
    return losses.total(
        image=output, features=program.features(net, output, program.layers),
        entries=program.entries, weights=style['weights'], content_targets=content_targets,
        style_targets=[style['targets']], style_blend=jnp.ones((1,), jnp.float32),
        key=image_key if program.stochastic else None)

  keys = jax.random.split(key, contents.shape[0])
  totals, parts = jax.vmap(one)(outputs, content_features, keys)
  return totals.mean(), {name: value.mean() for name, value in parts.items()}


def _flipped(batch: jax.Array, key: jax.Array) -> jax.Array:
  """uint8 photos as float32, each mirrored left-right with probability 1/2."""
  photos = batch.astype(jnp.float32)
  flip = jax.random.bernoulli(key, 0.5, (photos.shape[0],))
  return jnp.where(flip[:, None, None, None], photos[:, :, ::-1], photos)


def _update(params, opt_state, contents, content_features, key, *, net, style, setup):
  (loss, parts), grads = jax.value_and_grad(_loss, has_aux=True)(
      params, contents, content_features, key, net=net, style=style, setup=setup)
  updates, opt_state = setup.optimizer.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, loss, parts


@functools.partial(jax.jit, static_argnames=('setup',))
def train_step(params: Any, opt_state: Any, batch: jax.Array, key: jax.Array, *, net: Mapping,
               style: Mapping, setup: Setup) -> tuple[Any, Any, jax.Array, dict]:
  """One Adam step of one network on a batch of photos (N, H, W, 3) uint8 or 0-255.

  Returns:
    ``(params, opt_state, loss, parts)``: the loss and its weighted parts before the update.
  """
  flip_key, loss_key = jax.random.split(key)
  contents = _flipped(batch, flip_key)
  features = _content_features(net, contents, setup=setup)
  return _update(params, opt_state, contents, features, loss_key, net=net, style=style,
                 setup=setup)


def init_models(*, setup: Setup, seed: int, count: int) -> dict:
  """``count`` networks' parameters and Adam states, stacked on axis 0 (all from ``seed``, so
  network i equals the network a one-style run with the same seed starts from)."""
  params = network.init_params(setup.architecture, key=jax.random.key(seed))
  one = {'params': params, 'opt_state': setup.optimizer.init(params)}
  return jax.tree.map(lambda x: jnp.stack([x] * count), one)


def step_key(seed: int, step: int | jax.Array) -> jax.Array:
  """Step ``step``'s PRNG key: the same for every network, and after a resume."""
  return jax.random.fold_in(jax.random.key(seed), step)


@functools.partial(jax.jit, static_argnames=('setup',))
def train_chunk(models: dict, batches: jax.Array, active: jax.Array, first_step: jax.Array,
                seed_key: jax.Array, *, net: Mapping, styles: Mapping, setup: Setup
                ) -> tuple[dict, jax.Array, dict]:
  """The first ``active`` steps of ``batches`` (steps, B, H, W, 3) for every network of ``models``.

  One program for every chunk: ``active`` is traced (a shorter last chunk pads ``batches``).

  Returns:
    ``(models, losses (steps, N), parts {name: (steps, N)})``, NaN for the steps not taken.
  """
  length, count = batches.shape[0], jax.tree.leaves(styles)[0].shape[0]
  names = [entry.name for entry in setup.program.entries]

  def body(index, carry):
    models, losses_, parts = carry
    key = jax.random.fold_in(seed_key, first_step + index)
    flip_key, loss_key = jax.random.split(key)
    contents = _flipped(jax.lax.dynamic_index_in_dim(batches, index, keepdims=False), flip_key)
    features = _content_features(net, contents, setup=setup)  # once for all N networks
    update = functools.partial(_update, net=net, setup=setup)
    params, opt_state, loss, step_parts = jax.vmap(
        lambda p, o, s: update(p, o, contents, features, loss_key, style=s))(
            models['params'], models['opt_state'], styles)
    losses_ = losses_.at[index].set(loss)
    parts = {name: parts[name].at[index].set(step_parts[name]) for name in names}
    return {'params': params, 'opt_state': opt_state}, losses_, parts

  nan = jnp.full((length, count), jnp.nan, jnp.float32)
  return jax.lax.fori_loop(0, jnp.minimum(active, length), body,
                           (models, nan, {name: nan for name in names}))


def mesh_placement(batch_size: int) -> tuple[NamedSharding | None, NamedSharding | None]:
  """Shardings of a chunk's photos (split on the batch axis) and of the models (replicated).

  Raises:
    errors.UserError: the batch does not split evenly over the devices.
  """
  devices = jax.devices()
  if len(devices) == 1:
    return None, None
  if batch_size % len(devices):
    raise errors.UserError(f'--config.batch_size={batch_size} does not split evenly over the '
                           f'{len(devices)} devices; use a multiple of {len(devices)}')
  mesh = Mesh(np.asarray(devices), (DATA_AXIS,))
  return (NamedSharding(mesh, PartitionSpec(None, DATA_AXIS)),
          NamedSharding(mesh, PartitionSpec()))


