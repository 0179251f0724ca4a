"""Sliced Wasserstein, histogram and MRF terms against NumPy transcriptions of their papers'
formulas, and each lowering its own distance when the real pipeline optimises with it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from nst_jax import config_files
from nst_jax import images
from nst_jax import metrics
from nst_jax import texture_losses
from nst_jax import vgg
from tests import helpers


def numpy_quantile_match(values, weights, style_values, style_weights):
  """1-D weighted optimal transport by quantiles, column by column, in float64.

  Returns (sorted values, their weights, the style's quantiles at their levels).
  """
  sorted_values, sorted_weights, matched = [], [], []
  for column in range(values.shape[1]):
    order = np.argsort(values[:, column], kind='stable')
    w = weights[order]
    levels = np.cumsum(w) - w / 2
    style_order = np.argsort(style_values[:, column], kind='stable')
    sw = style_weights[style_order]
    style_levels = np.cumsum(sw) - sw / 2
    sorted_values.append(values[order, column])
    sorted_weights.append(w)
    matched.append(np.interp(levels, style_levels, style_values[style_order, column]))
  return np.stack(sorted_values, 1), np.stack(sorted_weights, 1), np.stack(matched, 1)


def numpy_sliced_wasserstein(features, style, directions, mask=None):
  f = features.reshape(-1, features.shape[-1]).astype(np.float64)
  s = style.reshape(-1, style.shape[-1]).astype(np.float64)
  w = np.full(len(f), 1 / len(f)) if mask is None else mask.ravel() / mask.sum()
  ours, weights, matched = numpy_quantile_match(f @ directions, w, s @ directions,
                                                np.full(len(s), 1 / len(s)))
  return np.sum(weights * (ours - matched) ** 2) / directions.shape[1]


@pytest.fixture
def layers(rng):
  # Different position counts: the style's quantiles are interpolated.
  return (rng.uniform(0, 3, (6, 5, 4)).astype(np.float32),
          rng.uniform(0, 4, (4, 4, 4)).astype(np.float32))


def test_sliced_wasserstein_against_numpy(layers):
  features, style = layers
  key = jax.random.PRNGKey(3)
  directions = np.asarray(texture_losses.random_directions(key, channels=4, count=4), np.float64)
  np.testing.assert_allclose(np.linalg.norm(directions, axis=0), 1.0, rtol=1e-6)
  target = texture_losses.style_samples(jnp.asarray(style))
  got = texture_losses.sliced_wasserstein(features=jnp.asarray(features), target=target, key=key,
                                          normalization='none')
  expected = numpy_sliced_wasserstein(features, style, directions)
  np.testing.assert_allclose(got, expected, rtol=1e-4)
  # On the Gram scale: times the style's mean squared activation / 8.
  scaled = texture_losses.sliced_wasserstein(features=jnp.asarray(features), target=target,
                                             key=key)
  np.testing.assert_allclose(scaled, expected * np.mean(style.astype(np.float64) ** 2) / 8,
                             rtol=1e-4)
  # Equal position counts: exactly the sorted projections paired one to one.
  same = texture_losses.sliced_wasserstein(
      features=jnp.asarray(features), key=key, normalization='none',
      target=texture_losses.style_samples(jnp.asarray(features[::-1] * 1.5)))
  f = features.reshape(-1, 4) @ directions
  np.testing.assert_allclose(same, np.mean((np.sort(f, 0) - np.sort(1.5 * f, 0)) ** 2),
                             rtol=1e-4)
  # Six directions instead of one per channel.
  six = np.asarray(texture_losses.random_directions(key, channels=4, count=6), np.float64)
  np.testing.assert_allclose(
      texture_losses.sliced_wasserstein(features=jnp.asarray(features), target=target, key=key,
                                        projections=6, normalization='none'),
      numpy_sliced_wasserstein(features, style, six), rtol=1e-4)


def test_sliced_wasserstein_draws_its_directions_from_the_key(layers):
  features, style = layers
  target = texture_losses.style_samples(jnp.asarray(style))
  value = lambda seed: float(texture_losses.sliced_wasserstein(
      features=jnp.asarray(features), target=target, key=jax.random.PRNGKey(seed)))
  assert value(0) == value(0)
  assert value(0) != value(1)


def test_masked_sliced_wasserstein_weights_positions_by_the_mask(layers, rng):
  features, style = layers
  mask = rng.uniform(0, 1, (6, 5)).astype(np.float32)
  mask[:, 3:] = 0.0
  key = jax.random.PRNGKey(0)
  directions = np.asarray(texture_losses.random_directions(key, channels=4, count=4), np.float64)
  target = texture_losses.style_samples(jnp.asarray(style))
  got = texture_losses.sliced_wasserstein(features=jnp.asarray(features), target=target, key=key,
                                          mask=jnp.asarray(mask), normalization='none')
  np.testing.assert_allclose(got, numpy_sliced_wasserstein(features, style, directions, mask),
                             rtol=1e-4)
  changed = features.copy()
  changed[:, 3:] = 50.0  # outside the mask: no effect
  again = texture_losses.sliced_wasserstein(features=jnp.asarray(changed), target=target, key=key,
                                            mask=jnp.asarray(mask), normalization='none')
  np.testing.assert_allclose(again, got, rtol=1e-5)


def test_histogram_against_numpy(layers):
  features, style = layers
  f = features.reshape(-1, 4).astype(np.float64)
  s = style.reshape(-1, 4).astype(np.float64)
  remapped = np.empty_like(f)
  for channel in range(4):  # each activation replaced by the style's value at its rank
    ranks = np.argsort(np.argsort(f[:, channel]))
    levels = (ranks + 0.5) / len(f)
    style_levels = (np.arange(len(s)) + 0.5) / len(s)
    remapped[:, channel] = np.interp(levels, style_levels, np.sort(s[:, channel]))
  expected = np.mean((f - remapped) ** 2)
  target = texture_losses.sorted_channels(jnp.asarray(style))
  got = texture_losses.histogram(features=jnp.asarray(features), target=target,
                                 normalization='none')
  np.testing.assert_allclose(got, expected, rtol=1e-4)
  np.testing.assert_allclose(texture_losses.histogram(features=jnp.asarray(features),
                                                      target=target),
                             expected * np.mean(s ** 2) / 8, rtol=1e-4)
  # The remapped activations are held constant: the gradient is 2 (F − R) / (M C).
  grad = jax.grad(lambda x: texture_losses.histogram(features=x, target=target,
                                                     normalization='none'))(jnp.asarray(features))
  np.testing.assert_allclose(np.asarray(grad).reshape(-1, 4), 2 * (f - remapped) / f.size,
                             rtol=1e-4, atol=1e-7)
  # The style's own histograms: nothing to match.
  assert float(texture_losses.histogram(features=jnp.asarray(style), target=target)) < 1e-8


def test_masked_histogram_ignores_positions_outside_the_mask(layers, rng):
  features, style = layers
  mask = rng.uniform(0.2, 1, (6, 5)).astype(np.float32)
  mask[4:] = 0.0
  target = texture_losses.sorted_channels(jnp.asarray(style))
  f = features.reshape(-1, 4).astype(np.float64)
  w = mask.ravel().astype(np.float64) / mask.sum()
  ours, weights, matched = numpy_quantile_match(f, w, style.reshape(-1, 4).astype(np.float64),
                                                np.full(16, 1 / 16))
  expected = np.sum(weights * (ours - matched) ** 2) / 4
  got = texture_losses.histogram(features=jnp.asarray(features), target=target,
                                 mask=jnp.asarray(mask), normalization='none')
  np.testing.assert_allclose(got, expected, rtol=1e-4)
  changed = features.copy()
  changed[4:] = -20.0
  np.testing.assert_allclose(
      texture_losses.histogram(features=jnp.asarray(changed), target=target,
                               mask=jnp.asarray(mask), normalization='none'), got, rtol=1e-5)


def numpy_patches(features):
  h, w, _ = features.shape
  return np.stack([features[i:i + 3, j:j + 3].ravel()
                   for i in range(h - 2) for j in range(w - 2)]).astype(np.float64)


def numpy_mrf(features, style, weights=None):
  """Mean over patches of the squared distance to the most correlated style patch, per value."""
  ours, theirs = numpy_patches(features), numpy_patches(style)
  correlation = (ours @ theirs.T) / np.outer(np.linalg.norm(ours, axis=1),
                                             np.linalg.norm(theirs, axis=1))
  nearest = theirs[np.argmax(correlation, axis=1)]
  squared = np.sum((ours - nearest) ** 2, axis=1) / ours.shape[1]
  weights = np.ones(len(ours)) if weights is None else weights
  return np.sum(weights * squared) / np.sum(weights)


def test_mrf_against_numpy(rng, monkeypatch):
  features = rng.uniform(0, 3, (6, 7, 3)).astype(np.float32)
  style = rng.uniform(0, 3, (5, 6, 3)).astype(np.float32)
  target = texture_losses.style_patches(jnp.asarray(style))
  got = texture_losses.mrf(features=jnp.asarray(features), target=target, normalization='none')
  np.testing.assert_allclose(got, numpy_mrf(features, style), rtol=1e-4)
  # Gram scale: the style's mean squared activation / 8, and a quarter of that.
  np.testing.assert_allclose(
      texture_losses.mrf(features=jnp.asarray(features), target=target),
      numpy_mrf(features, style) * np.mean(style.astype(np.float64) ** 2) / 32, rtol=1e-4)
  # Matching in blocks of a few result patches finds the same neighbours.
  monkeypatch.setattr(texture_losses, '_MATCH_BLOCK_ELEMENTS', 3 * 12)
  blocked = texture_losses.mrf(features=jnp.asarray(features), target=target,
                               normalization='none')
  np.testing.assert_allclose(blocked, got, rtol=1e-6)
  # The style itself: every patch finds itself.
  assert float(texture_losses.mrf(features=jnp.asarray(style), target=target)) < 1e-6


def test_mrf_gradient_pulls_each_patch_to_its_fixed_neighbour(rng):
  features = rng.uniform(0, 3, (5, 5, 2)).astype(np.float32)
  style = rng.uniform(0, 3, (5, 6, 2)).astype(np.float32)
  target = texture_losses.style_patches(jnp.asarray(style))
  grad = jax.grad(lambda x: texture_losses.mrf(features=x, target=target,
                                               normalization='none'))(jnp.asarray(features))
  ours, theirs = numpy_patches(features), numpy_patches(style)
  correlation = ours @ theirs.T / np.linalg.norm(theirs, axis=1)
  difference = 2 * (ours - theirs[np.argmax(correlation, axis=1)]) / ours.size
  expected = np.zeros((5, 5, 2))
  for index, (i, j) in enumerate((i, j) for i in range(3) for j in range(3)):
    expected[i:i + 3, j:j + 3] += difference[index].reshape(3, 3, 2)
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-7)


def test_masked_mrf_weights_patches_by_the_mask_at_their_centre(rng):
  features = rng.uniform(0, 3, (6, 8, 3)).astype(np.float32)
  style = rng.uniform(0, 3, (5, 6, 3)).astype(np.float32)
  mask = rng.uniform(0.3, 1, (6, 8)).astype(np.float32)
  mask[:, 4:] = 0.0  # patches centred at columns 1-3 see columns 0-4 only
  target = texture_losses.style_patches(jnp.asarray(style))
  got = texture_losses.mrf(features=jnp.asarray(features), target=target,
                           mask=jnp.asarray(mask), normalization='none')
  np.testing.assert_allclose(got, numpy_mrf(features, style, mask[1:-1, 1:-1].ravel()),
                             rtol=1e-4)
  changed = features.copy()
  changed[:, 5:] = 40.0
  np.testing.assert_allclose(texture_losses.mrf(features=jnp.asarray(changed), target=target,
                                                mask=jnp.asarray(mask), normalization='none'),
                             got, rtol=1e-5)


def test_mrf_refuses_layers_smaller_than_a_patch():
  from nst_jax import errors
  with pytest.raises(errors.UserError, match='at least 3x3 positions, got 2x4'):
    texture_losses.patches(jnp.zeros((2, 4, 8)))


# ------------------------------------------------------------------------------------------
# Each term lowers its own distance under optimisation (the real pipeline, 64 px).

STYLE_LAYERS = ('block1_relu1', 'block2_relu1', 'block3_relu1', 'block4_relu1', 'block5_relu1')


def _optimised_and_reference_features(tmp_path, term, layers, steps=20):
  """Features of the content (the start image), of the result of ``steps`` steps of the default
  config with ``term`` as its style term at 64 px, and of the style."""
  config = default.get_config() if term != 'mrf' else config_files.load_config_file('mrf')
  config.size, config.steps, config.chunk_size = 64, steps, steps
  config.progress, config.compilation_cache, config.checkpoint_every = 'none', '', 0
  config.losses.style.term = term
  config.losses.style.options = {}
  result = images.load(helpers.run(config, str(tmp_path / term))[0])
  content = images.resize(helpers.example('content'), *result.shape[:2])
  style = helpers.example('style')
  style = images.resize(style, *images.fit_size(*style.shape[:2], size=64))
  net = metrics.embedded_network()
  features = lambda image: {layer: np.asarray(value, np.float64) for layer, value in vgg.features(
      net, jnp.asarray(image, jnp.float32), layers=layers).items()}
  return features(content), features(result), features(style)


def test_sliced_wasserstein_lowers_the_sliced_wasserstein_distance(tmp_path):
  content, result, style = _optimised_and_reference_features(tmp_path, 'sliced_wasserstein',
                                                             STYLE_LAYERS)
  rng = np.random.default_rng(0)  # fixed directions, not the ones optimised with

  def distance(features):
    total = 0.0
    for layer in STYLE_LAYERS:
      channels = style[layer].shape[-1]
      directions = rng.standard_normal((channels, channels))
      directions /= np.linalg.norm(directions, axis=0)
      total += numpy_sliced_wasserstein(features[layer], style[layer], directions)
    return total

  before, after = distance(content), distance(result)
  assert after < 0.5 * before, (before, after)


def test_histogram_lowers_the_per_channel_histogram_distance(tmp_path):
  content, result, style = _optimised_and_reference_features(tmp_path, 'histogram', STYLE_LAYERS)

  def distance(features):
    total = 0.0
    for layer in STYLE_LAYERS:
      f = features[layer].reshape(-1, features[layer].shape[-1])
      s = style[layer].reshape(-1, f.shape[1])
      ours, weights, matched = numpy_quantile_match(f, np.full(len(f), 1 / len(f)), s,
                                                    np.full(len(s), 1 / len(s)))
      total += np.sum(weights * (ours - matched) ** 2) / f.shape[1]
    return total

  before, after = distance(content), distance(result)
  assert after < 0.5 * before, (before, after)


def test_mrf_lowers_the_nearest_patch_distance(tmp_path):
  layers = ('block3_relu1', 'block4_relu1')
  content, result, style = _optimised_and_reference_features(tmp_path, 'mrf', layers)
  distance = lambda features: sum(numpy_mrf(features[layer], style[layer]) for layer in layers)
  before, after = distance(content), distance(result)
  assert after < 0.5 * before, (before, after)
