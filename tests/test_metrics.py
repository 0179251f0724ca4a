"""Metrics: each distance against its formula written out in NumPy/SciPy on tiny features."""

import numpy as np
import pytest
import scipy.linalg

from nst_jax import images
from nst_jax import metrics
from tests import helpers


def _features(shape, seed):
  """Correlated channels with non-zero means, as ReLU features are."""
  rng = np.random.default_rng(seed)
  height, width, channels = shape
  mixing = rng.standard_normal((channels, channels))
  flat = rng.standard_normal((height * width, channels)) @ mixing + rng.uniform(0, 3, channels)
  return flat.reshape(shape).astype(np.float32)


def _flat(features):
  return np.asarray(features, np.float64).reshape(-1, features.shape[-1])


def test_gram_distance_is_the_mean_squared_difference_of_normalised_grams():
  ours, theirs = _features((3, 4, 5), 0), _features((2, 5, 5), 1)
  gram = lambda f: _flat(f).T @ _flat(f) / f.size  # F Fᵀ / (C H W)
  expected = np.mean((gram(ours) - gram(theirs)) ** 2)
  got = metrics.gram_distance(metrics.layer_statistics(ours), metrics.layer_statistics(theirs))
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_gaussian_w2_matches_the_closed_form_with_scipy_sqrtm():
  ours, theirs = _features((4, 5, 6), 2), _features((3, 3, 6), 3)
  mean_a, mean_b = _flat(ours).mean(0), _flat(theirs).mean(0)
  cov_a, cov_b = np.cov(_flat(ours).T, bias=True), np.cov(_flat(theirs).T, bias=True)
  root_a = scipy.linalg.sqrtm(cov_a)
  cross = scipy.linalg.sqrtm(root_a @ cov_b @ root_a)
  expected = (np.sum((mean_a - mean_b) ** 2)
              + np.trace(cov_a + cov_b - 2 * np.real(cross)))
  statistics = metrics.layer_statistics(ours), metrics.layer_statistics(theirs)
  np.testing.assert_allclose(metrics.gaussian_w2_distance(*statistics), expected, rtol=1e-4)
  np.testing.assert_allclose(metrics.gaussian_w2_distance(*statistics[::-1]), expected, rtol=1e-4)
  same = metrics.gaussian_w2_distance(statistics[0], statistics[0])
  assert 0 <= same < 1e-6 * expected


def _quantiles_at(sorted_values, count):
  """The quantile function of ``sorted_values`` (at levels (j + 1/2) / n) read at ``count``
  evenly spaced levels, by linear interpolation between neighbouring ranks."""
  n = len(sorted_values)
  out = []
  for i in range(count):
    position = (i + 0.5) / count * n - 0.5  # fractional rank
    if position <= 0:
      out.append(sorted_values[0])
    elif position >= n - 1:
      out.append(sorted_values[-1])
    else:
      low = int(np.floor(position))
      fraction = position - low
      out.append((1 - fraction) * sorted_values[low] + fraction * sorted_values[low + 1])
  return np.array(out)


@pytest.mark.parametrize('their_shape', [(3, 4, 5), (2, 5, 5), (7, 3, 5)])
def test_sliced_wasserstein_compares_sorted_projections_quantile_by_quantile(their_shape):
  ours, theirs = _features((3, 4, 5), 4), _features(their_shape, 5)
  directions = metrics.unit_projections(5)
  total = []
  for direction in directions.T:
    mine = np.sort(_flat(ours) @ direction)
    other = _quantiles_at(np.sort(_flat(theirs) @ direction), len(mine))
    total.append(np.mean((mine - other) ** 2))
  got = metrics.sliced_wasserstein_distance(metrics.layer_statistics(ours),
                                            metrics.layer_statistics(theirs))
  np.testing.assert_allclose(got, np.mean(total), rtol=1e-5)


def test_projections_are_fixed_unit_directions():
  directions = metrics.unit_projections(7)
  assert directions.shape == (7, metrics.SLICED_DIRECTIONS)
  np.testing.assert_allclose(np.linalg.norm(directions, axis=0), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(directions, metrics.unit_projections(7))
  assert not np.allclose(directions, metrics.unit_projections(7, seed=1))


def test_large_layers_keep_evenly_spaced_ranks(monkeypatch):
  monkeypatch.setattr(metrics, 'MAX_QUANTILES', 4)
  features = _features((2, 5, 3), 6)
  kept = metrics.layer_statistics(features).sorted_projections
  everything = np.sort(_flat(features) @ metrics.unit_projections(3), axis=0)
  np.testing.assert_allclose(kept, everything[[1, 3, 6, 8]], atol=1e-5)  # ranks (j + 1/2) 10/4


def test_content_distance_is_the_mean_squared_feature_difference():
  ours, theirs = _features((3, 4, 5), 7), _features((3, 4, 5), 8)
  expected = np.mean((_flat(ours) - _flat(theirs)) ** 2)
  np.testing.assert_allclose(metrics.content_mse(ours, theirs), expected, rtol=1e-12)
  with pytest.raises(ValueError, match='resize the content'):
    metrics.content_mse(ours, theirs[:2])


@pytest.fixture(scope='module')
def pictures():
  content = images.resize(helpers.example('content'), 40, 48)
  style = images.resize(helpers.example('style'), 36, 44)
  return content, style


def test_doing_nothing_has_ratios_of_exactly_one(pictures):
  content, style = pictures
  measured = metrics.evaluate(content, content=content, style=style)
  assert measured['result'] == measured['reference']
  for name in metrics.STYLE_METRICS:
    assert set(measured['ratio'][name]) == set(metrics.STYLE_LAYERS) | {'sum'}
    assert all(value == 1.0 for value in measured['ratio'][name].values()), name
    assert measured['reference'][name]['sum'] > 0
  # The content image is at distance 0 from itself: that ratio has no reference to divide by.
  assert measured['reference']['content'] == 0.0 and measured['ratio']['content'] is None


def test_the_style_itself_is_closer_to_the_style_than_the_content(pictures):
  content, style = pictures
  restyled = images.resize(style, *content.shape[:2])
  measured = metrics.evaluate(restyled, content=content, style=style)
  for name in metrics.STYLE_METRICS:
    assert measured['ratio'][name]['sum'] < 0.5, (name, measured['ratio'][name])
    expected = sum(measured['result'][name][layer] for layer in metrics.STYLE_LAYERS)
    np.testing.assert_allclose(measured['result'][name]['sum'], expected)
  assert measured['result']['content'] > 0
  # The older entry points give the same numbers.
  np.testing.assert_allclose(metrics.style_distance(restyled, style),
                             measured['result']['gram']['sum'], rtol=1e-6)
  assert metrics.distances(restyled, content=content, style=style) == pytest.approx(
      {'style': measured['result']['gram']['sum'], 'content': measured['result']['content']})
