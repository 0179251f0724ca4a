"""Reads Keras VGG16/VGG19 weights files (HDF5, ``*_tf_dim_ordering_tf_kernels*.h5``).

Kernels are HWIO already; the weights expect Caffe preprocessing (BGR, ImageNet mean pixel, no
scaling). h5py is imported only when a file is read.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nst_jax import errors
from nst_jax import weights
from nst_jax.convert import common

_LAYER_NAMES = frozenset(name for specs in weights.CONV_SPECS.values() for name, _, _ in specs)


def _keras_layers(path: str, handle: Any,
                  network: str | None) -> tuple[str, dict[str, dict[str, np.ndarray]]]:
  """Finds each conv layer's kernel and bias datasets in an open Keras file and reads them."""
  import h5py  # pylint: disable=g-import-not-at-top  # keeps the other formats' start-up quick
  found: dict[str, dict[str, list[str]]] = {}

  def visit(name: str, obj: Any) -> None:
    parts = name.split('/')
    # A full saved model also holds the optimizer's slots, named after the layers.
    if not isinstance(obj, h5py.Dataset) or parts[0] == 'optimizer_weights':
      return
    layer = next((part for part in parts if part in _LAYER_NAMES), None)
    if layer is not None:
      role = {4: 'kernel', 1: 'bias'}.get(len(obj.shape), 'other')
      found.setdefault(layer, {}).setdefault(role, []).append(name)

  handle.visititems(visit)
  if not found:
    raise errors.UserError(f'{path!r} holds no Keras VGG layers (block1_conv1, ...); is it a '
                           'Keras VGG16/VGG19 weights file?')
  detected, evidence = common.network_from_layer_names(set(found))
  network = common.resolve_network(path, detected, network, evidence)
  layers = {}
  for layer, in_channels, out_channels in weights.CONV_SPECS[network]:
    datasets = found.get(layer)
    if datasets is None:
      continue  # finish reports the missing layer
    arrays = {}
    for role, description in (('kernel', '4-D kernel'), ('bias', '1-D bias')):
      names = datasets.get(role, [])
      if len(names) != 1:
        listing = ', '.join(f'{name} {handle[name].shape}'
                            for name in names + datasets.get('other', []))
        raise errors.UserError(
            f'{path!r}: layer {layer} has {len(names)} {description} datasets '
            f'({listing or "none"}), expected one; is it a Keras VGG weights file?')
      expected = (3, 3, in_channels, out_channels) if role == 'kernel' else (out_channels,)
      common.check_shape(path, f'layer {layer} {role} ({names[0]})', handle[names[0]].shape,
                         expected, network)
      arrays[role] = handle[names[0]][()]
    layers[layer] = arrays
  return network, layers


def read_keras_h5(path: str, *, network: str | None = None) -> common.Converted:
  """Reads a Keras VGG16/VGG19 weights file (``*_tf_dim_ordering_tf_kernels*.h5``).

  Each layer's kernel (the 4-D dataset) and bias (the 1-D dataset) are found anywhere below its
  group, so both the old naming (``block1_conv1/block1_conv1_W_1:0``) and the newer ones
  (``block1_conv1/block1_conv1/kernel:0``, ``model_weights/...``) are read.

  Args:
    path: the ``.h5`` file.
    network: ``"vgg19"`` or ``"vgg16"``; ``None`` detects it (VGG19 has ``block3_conv4``).

  Returns:
    Float32 HWIO weights with Caffe preprocessing (BGR, ImageNet mean pixel, no scaling).

  Raises:
    errors.UserError: unreadable file, missing or ambiguous layers, wrong network or shapes,
      non-finite values.
  """
  import h5py  # pylint: disable=g-import-not-at-top  # keeps the other formats' start-up quick
  common.check_input_path(path)
  try:
    with h5py.File(path, 'r') as handle:
      network, layers = _keras_layers(path, handle, network)
  except OSError as exc:  # not HDF5, or damaged: opening or any later read can fail
    raise errors.UserError(f'cannot read {path!r} as a Keras HDF5 weights file '
                           f'({common.reason(exc)}); is it the complete .h5 file?') from None
  return common.finish(path, 'keras_h5', network, layers, weights.Preprocessing())
