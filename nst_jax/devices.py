"""Devices: placing a batch across them, fetching it back, and how much memory there is.

Two ways to share a run (``config.shard``):

* ``batch``: a batch of N problems is one pytree with leading axis N; on several devices (or
  hosts) that axis is split across all of them, after padding N to a multiple of the device count.
* ``space``: every array ending in an image's (H, W, 3) axes (the image, its optimiser history) is
  split along H across all devices, the rest replicated; XLA's SPMD partitioner adds the rows each
  convolution needs from its neighbours. One large image then needs 1/devices of the memory each.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nst_jax import vgg


#: The mesh axes of the two ways to share a run (config.shard).
BATCH_AXIS, SPACE_AXIS = 'batch', 'space'


def shard_batch(tree: Any, n: int) -> Any:
  """Places a batched pytree so its leading axis is split across all devices (if N divides)."""
  devices = jax.devices()
  if len(devices) == 1 or n % len(devices):
    return jax.device_put(tree)
  mesh = Mesh(np.asarray(devices), ('batch',))

  def place(x):
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    return jax.device_put(x, NamedSharding(mesh, PartitionSpec('batch', *[None] * (x.ndim - 1))))

  return jax.tree.map(place, tree)


def space_sharding(shape: Sequence[int], *, image_size: tuple[int, int]) -> NamedSharding:
  """Rows split across all devices for an array ending in the image's (H, W, 3) axes, else whole.

  Only where H divides evenly: ``jax.device_put`` refuses uneven shards, and XLA returns an
  unevenly constrained output replicated anyway (measured, jax 0.10.2).
  """
  mesh = Mesh(np.asarray(jax.devices()), (SPACE_AXIS,))
  height, width = image_size
  if (len(shape) < 3 or tuple(shape[-3:]) != (height, width, 3)
      or height % jax.device_count()):
    return NamedSharding(mesh, PartitionSpec())
  return NamedSharding(mesh, PartitionSpec(*[None] * (len(shape) - 3), SPACE_AXIS, None, None))


def shard_space(tree: Any, *, image_size: tuple[int, int]) -> Any:
  """Places a pytree as :func:`space_sharding` says: image-shaped leaves by rows, the rest whole."""
  return jax.tree.map(lambda x: jax.device_put(
      x, space_sharding(np.shape(x), image_size=image_size)), tree)


def constrain_space(tree: Any, *, image_size: tuple[int, int]) -> Any:
  """:func:`shard_space` inside a compiled function: its outputs keep the rows split.

  Arrays made inside (a fresh optimiser history of zeros) would otherwise come out whole.
  """
  return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
      x, space_sharding(x.shape, image_size=image_size)), tree)


def placement(shard: str, *, n_padded: int, image_size: tuple[int, int]) -> Callable[[Any], Any]:
  """The function that places a state or targets of one scale on the devices, as ``shard`` says.

  ``space``: image-shaped arrays split by rows, everything else (targets included) whole on every
  device; ``batch``: the leading axis split (:func:`shard_batch`).
  """
  if shard == SPACE_AXIS:
    return functools.partial(shard_space, image_size=tuple(image_size))
  return lambda tree: shard_batch(tree, n_padded)


def splits_rows(height: int) -> bool:
  """Whether ``shard=space`` splits an image this high (its rows divide evenly over devices)."""
  return height % jax.device_count() == 0


def to_host(tree: Any) -> Any:
  """Fetches a (possibly sharded) pytree to NumPy; across hosts, gathers every host's shards."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def padded_batch_size(n: int, *, shard: str = BATCH_AXIS) -> int:
  """N rounded up to a multiple of the device count (padding repeats the last element).

  With ``shard=space`` the batch axis is not split: N as it is.
  """
  if shard == SPACE_AXIS:
    return n
  count = jax.device_count()
  return -(-n // count) * count


def pad_batch(tree: Any, n_padded: int) -> Any:
  """Repeats the last batch element so the leading axis is ``n_padded`` long."""
  def pad(x):
    x = np.asarray(x)
    extra = n_padded - x.shape[0]
    return x if extra == 0 else np.concatenate([x, np.repeat(x[-1:], extra, axis=0)])
  return jax.tree.map(pad, tree)


def device_memory() -> tuple[int, str]:
  """Bytes the optimisation may use, and where: the accelerator's own memory, or host RAM."""
  device = jax.devices()[0]
  if device.platform != 'cpu':
    stats = device.memory_stats() or {}
    if stats.get('bytes_limit'):
      return int(stats['bytes_limit']), f'this {device.device_kind}'
  try:
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'), 'this machine'
  except (ValueError, OSError, AttributeError):
    return 1 << 40, 'this machine'


def activation_bytes(height: int, width: int, *, layers: Sequence[str], network: str,
                     dtype_bytes: int = 4) -> int:
  """Memory one forward+backward keeps alive, roughly: one copy of every conv output.

  The image gradient stores no conv inputs (the weights are constants), only ReLU and pooling
  masks, so this matched XLA's planned temporaries within 10% at 512 and 1024 px.
  """
  if not layers:
    return 0  # only image terms (total variation): no network pass at all
  order = vgg.layer_names(network)
  last = max(order.index(layer) for layer in layers)
  total = 0
  h, w = height, width
  for name in order[:last + 1]:
    if name.endswith('_pool'):
      h, w = h // 2, w // 2
    elif '_conv' in name:
      total += h * w * vgg.channels(name, network=network) * dtype_bytes
  return total


def planned_bytes(height: int, width: int, *, layers: Sequence[str], network: str,
                  compute_dtype: str, history_images: int, batch: int,
                  history_dtype: str = 'float32', tile_window: int = 0,
                  space_devices: int = 1) -> int:
  """The memory per device a batch of height x width problems needs: activations plus history.

  Args:
    tile_window: side of the window one tile is evaluated on (tile plus halo; 0: no tiles): the
      activations are those of one window, not of the whole image.
    space_devices: how many devices the image's rows are split over (``shard='space'``).
  """
  if tile_window:
    height_a, width_a = min(height, tile_window), min(width, tile_window)
  else:
    height_a, width_a = height, width
  float_bytes = 8 if compute_dtype == 'float64' else 4  # the image's (and history's) dtype
  activations = activation_bytes(height_a, width_a, layers=layers, network=network,
                                 dtype_bytes=2 if compute_dtype == 'bfloat16' else float_bytes)
  history_bytes = 2 if history_dtype == 'bfloat16' else float_bytes
  history = history_images * height * width * 3 * history_bytes
  return (activations + history) * batch // space_devices