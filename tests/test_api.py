"""The Python API: nst_jax.stylize on arrays and paths, the CLI's checks, nothing on disk."""

import numpy as np
import pytest

import nst_jax
from nst_jax import errors
from nst_jax import images
from tests import helpers

TINY = dict(size=40, steps=4, chunk_size=2, progress='none')


def _layers(**overrides):
  """The tiny test layers, as a config to start from (the API takes top-level fields)."""
  return helpers.tiny_config(**{**TINY, **overrides})


def test_arrays_in_uint8_out_nothing_written(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv('HOME', str(tmp_path))  # a compilation cache would land in ~/.cache
  rng = np.random.default_rng(0)
  content = rng.integers(0, 255, (48, 64, 3)).astype(np.uint8)
  style = rng.integers(0, 255, (40, 40, 3)).astype(np.uint8)
  result = nst_jax.stylize(content, style, config=_layers(), size=48, style_weight=1e4)
  assert result.dtype == np.uint8 and result.shape == (36, 48, 3)  # content's aspect, size 48
  assert np.abs(result.astype(float) - images.resize(content, 36, 48)).mean() > 2  # it changed
  assert list(tmp_path.iterdir()) == []


def test_paths_give_the_same_result_as_the_command_line_path(tmp_path):
  rng = np.random.default_rng(1)
  content = helpers.write_image(tmp_path / 'c.png', rng.integers(0, 255, (40, 40, 3)))
  style = helpers.write_image(tmp_path / 's.png', rng.integers(0, 255, (40, 40, 3)))
  result = nst_jax.stylize(content, style, config=_layers(), workdir=str(tmp_path / 'api'))
  cli = helpers.run(_layers(content_image=content, style_images=style), tmp_path / 'cli')
  np.testing.assert_array_equal(result, images.load(cli[0]))
  np.testing.assert_array_equal(result, images.load(str(tmp_path / 'api' / 'result.png')))
  from_arrays = nst_jax.stylize(images.load(content), images.load(style), config=_layers())
  np.testing.assert_array_equal(result, from_arrays)


def test_a_batch_returns_a_list_and_a_style_list_blends(tmp_path):
  rng = np.random.default_rng(2)
  content = (128 + rng.normal(0, 5, (40, 40, 3))).astype(np.uint8)  # gray
  styles = [(rng.uniform(0, 1, (40, 40, 3)) * tint).astype(np.uint8)
            for tint in ([250, 20, 20], [20, 20, 250])]  # red and blue textures
  # optax L-BFGS: its line search copes with the large style loss in 10 steps.
  config = _layers(steps=10, optimizer='lbfgs')
  batch = nst_jax.stylize(content, styles, config=config, batch_over='style', style_weight=1e6)
  assert isinstance(batch, list) and len(batch) == 2
  blended = nst_jax.stylize(content, styles, config=config, style_weight=1e6)
  assert isinstance(blended, np.ndarray)
  redness = lambda x: (x[..., 0].astype(float) - x[..., 2]).mean()
  assert redness(batch[0]) > redness(blended) + 5 > redness(batch[1]) + 10, [
      redness(x) for x in (batch[0], blended, batch[1])]


def test_bad_settings_raise_the_clis_one_line_errors():
  content = np.zeros((40, 40, 3), np.uint8)
  for overrides, message in (({'size': 8}, 'too small'),
                             ({'no_such_field': 1}, "unknown config field 'no_such_field'"),
                             ({'steps': 'many'}, 'steps=')):
    with pytest.raises(errors.UserError, match=message) as raised:
      nst_jax.stylize(content, content, config=_layers(), **overrides)
    assert '\n' not in str(raised.value)
  with pytest.raises(errors.UserError, match='does not exist'):
    nst_jax.stylize('/no/such/photo.jpg', content, config=_layers())


def test_a_preset_by_name(tmp_path):
  content = np.full((40, 40, 3), 120, np.uint8)
  result = nst_jax.stylize(content, content + 30, config='pastiche', size=32, steps=2,
                           chunk_size=2, progress='none')
  assert result.shape == (32, 32, 3)
