"""Devices: padding and placing a batch, fetching it back, memory estimates and limits."""

import jax
import numpy as np

from nst_jax import devices
from nst_jax import vgg


def test_padding_repeats_the_last_problem():
  tree = {'image': np.arange(3 * 2).reshape(3, 2), 'weights': {'style': np.array([1., 2., 3.])}}
  padded = devices.pad_batch(tree, 5)
  np.testing.assert_array_equal(padded['image'], [[0, 1], [2, 3], [4, 5], [4, 5], [4, 5]])
  np.testing.assert_array_equal(padded['weights']['style'], [1, 2, 3, 3, 3])
  np.testing.assert_array_equal(devices.pad_batch(tree, 3)['image'], tree['image'])
  assert devices.padded_batch_size(3) % jax.device_count() == 0
  assert devices.padded_batch_size(3) >= 3


def test_a_placed_batch_comes_back_unchanged():
  tree = {'image': np.random.default_rng(0).normal(size=(2, 4, 4, 3)).astype(np.float32)}
  back = devices.to_host(devices.shard_batch(tree, 2))
  np.testing.assert_array_equal(back['image'], tree['image'])


def test_activation_bytes_count_every_conv_output_up_to_the_deepest_layer():
  # By hand: block1 (two convs, 64 channels) at 32x32, block2 (128 channels) at 16x16, both
  # convs of block2 because relu2_2 is asked for.
  expected = (2 * 32 * 32 * 64 + 2 * 16 * 16 * 128) * 4
  assert devices.activation_bytes(32, 32, layers=['block2_relu2', 'block1_relu1'],
                                  network='vgg19') == expected
  assert devices.activation_bytes(32, 32, layers=[], network='vgg19') == 0
  assert vgg.channels('block2_conv1', network='vgg19') == 128
  planned = devices.planned_bytes(32, 32, layers=['block2_relu2'], network='vgg19',
                                  compute_dtype='bfloat16', history_images=10, batch=3)
  assert planned == 3 * (expected // 2 + 10 * 32 * 32 * 3 * 4)
  # Tiles: activations of one 16 px window only; bfloat16 history: 2 bytes a value; rows split
  # over 4 devices: a quarter each.
  window = (2 * 16 * 16 * 64 + 2 * 8 * 8 * 128) * 4
  tiled = devices.planned_bytes(32, 32, layers=['block2_relu2'], network='vgg19',
                                compute_dtype='float32', history_images=10, batch=1,
                                history_dtype='bfloat16', tile_window=16, space_devices=4)
  assert tiled == (window + 10 * 32 * 32 * 3 * 2) // 4
  # float64: activations and history at 8 bytes a value.
  wide = devices.planned_bytes(32, 32, layers=['block2_relu2'], network='vgg19',
                               compute_dtype='float64', history_images=10, batch=1)
  assert wide == 2 * expected + 10 * 32 * 32 * 3 * 8


def test_device_memory_reads_an_accelerators_limit(monkeypatch):
  class FakeGpu:
    platform, device_kind = 'gpu', 'Fake GPU'

    def memory_stats(self):
      return {'bytes_limit': 123 * 2**20}

  host, where = devices.device_memory()
  assert where == 'this machine' and host > 2**28
  monkeypatch.setattr(jax, 'devices', lambda *a: [FakeGpu()])
  assert devices.device_memory() == (123 * 2**20, 'this Fake GPU')


def test_space_sharding_splits_only_arrays_ending_in_the_images_axes():
  # One device here: the rule's spec still names the axis (tests/test_space_sharding.py checks
  # that 4 devices each hold a quarter of the rows).
  spec = lambda shape: tuple(devices.space_sharding(shape, image_size=(8, 6)).spec)
  assert spec((2, 8, 6, 3)) == (None, 'space', None, None)  # images
  assert spec((2, 10, 8, 6, 3)) == (None, None, 'space', None, None)  # an L-BFGS history
  assert spec((2, 8, 6, 64)) == ()  # a feature map: whole
  assert spec((2, 10)) == () and spec(()) == ()
  assert devices.padded_batch_size(3, shard='space') == 3  # the batch axis is not split
  tree = {'image': np.random.default_rng(0).normal(size=(2, 8, 6, 3)).astype(np.float32),
          'gram': np.eye(4, dtype=np.float32)}
  placed = devices.placement('space', n_padded=2, image_size=(8, 6))(tree)
  assert tuple(placed['image'].sharding.spec) == (None, 'space', None, None)
  back = devices.to_host(placed)
  np.testing.assert_array_equal(back['image'], tree['image'])
  np.testing.assert_array_equal(back['gram'], tree['gram'])
