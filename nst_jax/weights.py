"""VGG weight files: the project's format, validation, and the embedded default.

The project keeps pretrained weights in one format, a NumPy ``.npz`` archive with flat keys:

* ``meta/network``: ``"vgg19"`` or ``"vgg16"``.
* ``meta/channel_order``: ``"BGR"`` (Caffe/Keras) or ``"RGB"`` (torchvision, MatConvNet): the order
  of the first layer's input channels.
* ``meta/mean`` and ``meta/std``: float64 (3,), in the network's channel order and in 0-255 pixel
  units. The network sees ``(pixel - mean) / std``.
* ``<layer>/bias``: float32 (out,).
* ``<layer>/kernel``: float32 (3, 3, in, out) (HWIO, cross-correlation), or a quantised kernel:
  ``<layer>/kernel_codes`` uint8 (3, 3, in, out) indexing ``<layer>/kernel_table`` float32 (K,).

Loading dequantises, checks every layer of the named network for presence, shape, dtype and finite
values, and returns plain nested dicts ``{layer: {"kernel": ..., "bias": ...}}`` plus a
:class:`Preprocessing` record. Converters from other formats live in :mod:`nst_jax.convert`.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from collections.abc import Mapping
from importlib import resources

import numpy as np

from nst_jax import errors
from nst_jax import files

# (channels, convolutions) of each block; a 2x2 pool ends each block.
_VGG19_BLOCKS = ((64, 2), (128, 2), (256, 4), (512, 4), (512, 4))
_VGG16_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))

#: The embedded VGG19 (Keras ImageNet weights, kernels k-means quantised to 256 values).
EMBEDDED_VGG19 = 'vgg19_keras_imagenet_q8.npz'
#: The Caffe/Keras preprocessing: BGR channel order, ImageNet mean pixel, no scaling.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def _conv_specs(blocks: tuple[tuple[int, int], ...]) -> tuple[tuple[str, int, int], ...]:
  specs = []
  in_channels = 3
  for block_index, (channels, convs) in enumerate(blocks, start=1):
    for conv_index in range(1, convs + 1):
      specs.append((f'block{block_index}_conv{conv_index}', in_channels, channels))
      in_channels = channels
  return tuple(specs)


#: For each supported network, its convolutions as (layer name, input channels, output channels).
CONV_SPECS: dict[str, tuple[tuple[str, int, int], ...]] = {
    'vgg19': _conv_specs(_VGG19_BLOCKS),
    'vgg16': _conv_specs(_VGG16_BLOCKS),
}


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """How an RGB 0-255 image becomes the network's input: reorder, subtract ``mean``, divide ``std``.

  Attributes:
    channel_order: ``"BGR"`` or ``"RGB"``, the first convolution's input channel order.
    mean: per-channel mean in the network's channel order, 0-255 units.
    std: per-channel scale in the network's channel order, 0-255 units.
  """

  channel_order: str = 'BGR'
  mean: tuple[float, float, float] = CAFFE_MEAN_BGR
  std: tuple[float, float, float] = (1.0, 1.0, 1.0)


@dataclasses.dataclass(frozen=True)
class VggWeights:
  """Weights of one VGG network, ready for :func:`nst_jax.vgg.features`.

  Attributes:
    network: ``"vgg19"`` or ``"vgg16"``.
    params: ``{layer: {"kernel": float32 HWIO, "bias": float32}}`` for every convolution.
    preprocessing: how pixels are normalised for this network.
  """

  network: str
  params: dict[str, dict[str, np.ndarray]]
  preprocessing: Preprocessing


def embedded_path() -> str:
  """Returns the path of the embedded VGG19 weights file inside the installed package."""
  return str(resources.files('nst_jax').joinpath('assets', EMBEDDED_VGG19))


def save(path: str, *, network: str, layers: Mapping[str, Mapping[str, np.ndarray]],
         preprocessing: Preprocessing) -> None:
  """Writes weights in the project's format, atomically.

  Args:
    path: destination ``.npz`` file.
    network: ``"vgg19"`` or ``"vgg16"``.
    layers: ``{layer: arrays}``; arrays are ``kernel`` and ``bias``, or ``kernel_codes``,
      ``kernel_table`` and ``bias`` for a quantised kernel. Kernels are HWIO.
    preprocessing: the input normalisation these weights expect.
  """
  arrays: dict[str, np.ndarray] = {
      'meta/network': np.array(network),
      'meta/channel_order': np.array(preprocessing.channel_order),
      'meta/mean': np.asarray(preprocessing.mean, np.float64),
      'meta/std': np.asarray(preprocessing.std, np.float64),
  }
  for layer, layer_arrays in layers.items():
    for name, value in layer_arrays.items():
      arrays[f'{layer}/{name}'] = np.asarray(value)
  with files.atomic_write(path) as handle:
    np.savez(handle, **arrays)


def _read_npz(path: str) -> dict[str, np.ndarray]:
  if not os.path.exists(path):
    raise errors.UserError(f'weights file {path!r} does not exist; give an existing file '
                           'or convert one with `python -m nst_jax.convert`')
  if os.path.isdir(path):
    raise errors.UserError(f'weights path {path!r} is a directory; give a .npz weights file')
  try:
    with np.load(path, allow_pickle=False) as archive:
      return {key: archive[key] for key in archive.files}
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
    raise errors.UserError(
        f'{path!r} is not an nst_jax weights file ({exc.__class__.__name__}: {exc}); convert it '
        'first with `python -m nst_jax.convert --input=FILE --output=OUT.npz`') from None


def _layer_kernel(path: str, arrays: Mapping[str, np.ndarray], layer: str) -> np.ndarray:
  if f'{layer}/kernel' in arrays:
    return arrays[f'{layer}/kernel']
  codes_key, table_key = f'{layer}/kernel_codes', f'{layer}/kernel_table'
  if codes_key not in arrays or table_key not in arrays:
    raise errors.UserError(f'weights file {path!r} lacks layer {layer!r} (no kernel); '
                           'is it a weights file of the network the config names?')
  codes, table = arrays[codes_key], arrays[table_key]
  if codes.dtype != np.uint8 or table.dtype != np.float32 or table.ndim != 1:
    raise errors.UserError(
        f'weights file {path!r}: layer {layer!r} has quantised kernel codes {codes.dtype} and '
        f'table {table.dtype}{table.shape}; expected uint8 codes and a float32 (K,) table')
  if codes.size and int(codes.max()) >= table.shape[0]:
    raise errors.UserError(f'weights file {path!r}: layer {layer!r} has codes beyond its '
                           f'{table.shape[0]}-entry table; the file is corrupt')
  return table[codes]


def _layer_params(path: str, arrays: Mapping[str, np.ndarray], network: str
                  ) -> dict[str, dict[str, np.ndarray]]:
  """Every convolution's dequantised kernel and bias, checked for shape, dtype and finiteness."""
  params = {}
  for layer, in_channels, out_channels in CONV_SPECS[network]:
    kernel = _layer_kernel(path, arrays, layer)
    bias = arrays.get(f'{layer}/bias')
    expected = {'kernel': (3, 3, in_channels, out_channels), 'bias': (out_channels,)}
    for name, value in (('kernel', kernel), ('bias', bias)):
      if value is None:
        raise errors.UserError(f'weights file {path!r} lacks {layer}/{name}')
      if value.shape != expected[name]:
        raise errors.UserError(
            f'weights file {path!r}: {layer}/{name} has shape {value.shape}, expected '
            f'{expected[name]} for {network.upper()}; is it a file of another network?')
      if value.dtype != np.float32:
        raise errors.UserError(f'weights file {path!r}: {layer}/{name} is {value.dtype}, '
                               'expected float32')
      if not np.all(np.isfinite(value)):
        raise errors.UserError(f'weights file {path!r}: {layer}/{name} has non-finite values; '
                               'the file is corrupt')
    params[layer] = {'kernel': kernel, 'bias': bias}
  return params


def _preprocessing(path: str, arrays: Mapping[str, np.ndarray]) -> Preprocessing:
  """The file's meta/channel_order, meta/mean and meta/std (Caffe's when absent), checked."""
  preprocessing = Preprocessing(
      channel_order=str(arrays.get('meta/channel_order', 'BGR')),
      mean=tuple(float(v) for v in np.ravel(arrays.get('meta/mean', CAFFE_MEAN_BGR))),
      std=tuple(float(v) for v in np.ravel(arrays.get('meta/std', (1.0, 1.0, 1.0)))))
  for name, values in (('mean', preprocessing.mean), ('std', preprocessing.std)):
    if len(values) != 3 or not np.all(np.isfinite(values)) or (name == 'std' and min(values) <= 0):
      raise errors.UserError(f'weights file {path!r}: meta/{name} is {values}; expected three '
                             'finite numbers (std positive)')
  if preprocessing.channel_order not in ('BGR', 'RGB'):
    raise errors.UserError(f'weights file {path!r}: meta/channel_order is '
                           f'{preprocessing.channel_order!r}, expected "BGR" or "RGB"')
  return preprocessing


def load(path: str | None = None, *, network: str = 'vgg19') -> VggWeights:
  """Loads and validates a weights file in the project's format.

  Args:
    path: an ``.npz`` in the project's format; ``None`` or ``""`` means the embedded VGG19.
    network: the network the caller expects, ``"vgg19"`` or ``"vgg16"``.

  Returns:
    The dequantised, validated weights.

  Raises:
    errors.UserError: the file is missing, not a weights file, of another network, or a layer is
      missing or has the wrong shape, dtype or non-finite values. The message names the layer.
  """
  if network not in CONV_SPECS:
    raise errors.UserError(f'unknown network {network!r}; choose one of {sorted(CONV_SPECS)}')
  if not path:
    if network != 'vgg19':
      raise errors.UserError(
          f'no {network.upper()} weights are embedded (only VGG19 is); convert the Keras file '
          f'with `python -m nst_jax.convert --input={network}_weights_tf_dim_ordering_tf_kernels_'
          f'notop.h5 --output={network}.npz` and pass --config.weights={network}.npz')
    path = embedded_path()
  arrays = _read_npz(path)
  if 'meta/network' not in arrays:
    raise errors.UserError(f'{path!r} has no meta/network entry, so it is not an nst_jax weights '
                           'file; convert it with `python -m nst_jax.convert`')
  file_network = str(arrays['meta/network'])
  if file_network != network:
    raise errors.UserError(f'weights file {path!r} holds {file_network.upper()} weights but the '
                           f'config asks for {network.upper()}; set --config.network={file_network} '
                           'or give a file of the right network')
  params = _layer_params(path, arrays, network)
  return VggWeights(network=network, params=params,
                    preprocessing=_preprocessing(path, arrays))

