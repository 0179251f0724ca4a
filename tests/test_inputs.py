"""Inputs: reading images (paths or arrays), the batch, start images, colour-handled scales."""

import numpy as np
import pytest

from nst_jax import errors
from nst_jax import images
from nst_jax import inputs
from nst_jax import plan
from tests import helpers


def test_initialisation_from_style_or_a_file(tmp_path):
  rng = np.random.default_rng(4)
  style = helpers.write_image(tmp_path / 'style.png', rng.integers(0, 255, (40, 40, 3)))
  start = helpers.write_image(tmp_path / 'start.png', rng.integers(0, 255, (40, 40, 3)))
  for init, expected in (('style', style), (start, start)):
    prepared = helpers.prepare(helpers.tiny_config(style_images=style, init=init))
    np.testing.assert_allclose(prepared.start_images(40, 40)[0], images.load(expected),
                               atol=1e-3)
  noise = [helpers.prepare(c).start_images(40, 40)[0] for c in (
      helpers.tiny_config(init='gaussian', seed=1), helpers.tiny_config(init='gaussian', seed=1),
      helpers.tiny_config(init='uniform', seed=2))]
  np.testing.assert_array_equal(noise[0], noise[1])  # seeded
  assert abs(noise[2].mean() - 114.8) < 5 and noise[2].std() > 60  # mean pixel + U(-128, 128)


def test_style_blend_and_scale_change_the_targets(tmp_path):
  rng = np.random.default_rng(1)
  a = helpers.write_image(tmp_path / 'a.png', rng.integers(0, 255, (40, 40, 3)))
  b = helpers.write_image(tmp_path / 'b.png', np.full((40, 40, 3), 90))
  prepared = helpers.prepare(helpers.tiny_config(style_images=f'{a},{b}',
                                                 style_blend_weights='3,1'))
  np.testing.assert_allclose(prepared.batch.style_blend[0], [0.75, 0.25])
  small = helpers.prepare(helpers.tiny_config(style_images=a, style_scale=0.5))
  _, styles = inputs.scale_images(small.batch, 0, small.plan.images, 40, 40)
  assert styles[0].shape[:2] == (32, 32)  # half of 40, at least the 32 px minimum


def test_arrays_are_read_like_files(tmp_path):
  rng = np.random.default_rng(2)
  pixels = rng.integers(0, 255, (30, 20, 3)).astype(np.uint8)
  path = helpers.write_image(tmp_path / 'a.png', pixels)
  np.testing.assert_array_equal(inputs.read_image(pixels, what='content image'),
                                inputs.read_image(path, what='content image'))
  for bad, message in ((pixels[..., :2], r'shape \(30, 20, 2\)'),
                       (np.full((4, 4, 3), np.nan), 'non-finite')):
    with pytest.raises(errors.UserError, match=message):
      inputs.read_image(bad, what='content image')


def test_a_batch_over_a_field_varies_only_that_field():
  config = helpers.tiny_config(batch_over='seed', batch_values='1,7')
  images_plan = plan.from_config(config).images
  batch = inputs.read_batch(images_plan, plan.from_config(config).batch,
                            entry_weights={'content': 1.0, 'style': 1e3})
  assert len(batch) == 2 and batch.seeds == [1, 7]
  assert batch.entry_weights[0] == batch.entry_weights[1]
  weights = plan.from_config(helpers.tiny_config(batch_over='style_weight', batch_values='5,6'))
  batch = inputs.read_batch(weights.images, weights.batch, entry_weights=weights.entry_weights)
  assert [w['style'] for w in batch.entry_weights] == [5.0, 6.0]
  assert batch.select([1]).entry_weights == [batch.entry_weights[1]]


def test_shape_groups_keep_first_appearance_order(tmp_path):
  shapes = ((40, 64), (64, 40), (40, 64))
  paths = [helpers.write_image(tmp_path / f'c{i}.png', np.zeros((*shape, 3)))
           for i, shape in enumerate(shapes)]
  the_plan = plan.from_config(helpers.tiny_config(content_image=','.join(paths),
                                                  batch_over='content', size=64))
  batch = inputs.read_batch(the_plan.images, the_plan.batch, entry_weights=the_plan.entry_weights)
  assert inputs.shape_groups(batch, the_plan.images) == [([0, 2], (40, 64)), ([1], (64, 40))]
