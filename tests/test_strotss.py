"""STROTSS's relaxed EMD and self-similarity terms against NumPy transcriptions of Kolkin et al.'s
formulas, and each lowering its own distance when the real pipeline optimises with it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from nst_jax import errors
from nst_jax import images
from nst_jax import metrics
from nst_jax import strotss
from nst_jax import vgg
from tests import helpers


def numpy_cosine_distances(a, b):
  a = a / np.linalg.norm(a, axis=1, keepdims=True)
  b = b / np.linalg.norm(b, axis=1, keepdims=True)
  return 1 - a @ b.T


def numpy_relaxed_emd(features, style):
  cost = numpy_cosine_distances(features.reshape(-1, features.shape[-1]).astype(np.float64),
                                style.reshape(-1, style.shape[-1]).astype(np.float64))
  return max(cost.min(axis=1).mean(), cost.min(axis=0).mean())


def numpy_self_similarity(features, content):
  """1/n² Σ_ij |D^X_ij / Σ_i D^X_ij − D^C_ij / Σ_i D^C_ij| over all positions."""
  def normalized(x):
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
    distances = numpy_cosine_distances(flat, flat)
    return distances / distances.sum(axis=0, keepdims=True)
  return np.mean(np.abs(normalized(features) - normalized(content)))


@pytest.fixture
def layers(rng):
  return (rng.uniform(0, 3, (6, 5, 4)).astype(np.float32),
          rng.uniform(0, 3, (4, 4, 4)).astype(np.float32))


def test_relaxed_emd_against_numpy(layers):
  features, style = layers
  target = strotss.style_samples(jnp.asarray(style))
  key = jax.random.PRNGKey(0)
  # At least as many positions as both images have: every position, in some order.
  got = strotss.relaxed_emd(features=jnp.asarray(features), target=target, key=key,
                            normalization='none')
  np.testing.assert_allclose(got, numpy_relaxed_emd(features, style), rtol=1e-5)
  scaled = strotss.relaxed_emd(features=jnp.asarray(features), target=target, key=key)
  second_moment = np.mean(style.astype(np.float64) ** 2)
  np.testing.assert_allclose(scaled, numpy_relaxed_emd(features, style) * second_moment ** 2 / 8,
                             rtol=1e-5)
  # Fewer positions: the random subsets drawn with the key (result, then style).
  our_key, their_key = jax.random.split(key)
  ours = np.asarray(strotss.random_positions(our_key, count=7, positions=30))
  theirs = np.asarray(strotss.random_positions(their_key, count=7, positions=16,
                                               p=target['weights']))
  assert len(set(ours)) == 7 and len(set(theirs)) == 7
  subset = strotss.relaxed_emd(features=jnp.asarray(features), target=target, key=key,
                               positions=7, normalization='none')
  np.testing.assert_allclose(subset, numpy_relaxed_emd(features.reshape(-1, 4)[ours],
                                                       style.reshape(-1, 4)[theirs]), rtol=1e-5)
  other = strotss.relaxed_emd(features=jnp.asarray(features), target=target,
                              key=jax.random.PRNGKey(1), positions=7, normalization='none')
  assert float(other) != float(subset)
  with pytest.raises(errors.UserError, match="unknown normalization 'x' for relaxed_emd"):
    strotss.relaxed_emd(features=jnp.asarray(features), target=target, key=key,
                        normalization='x')


def test_masked_relaxed_emd_draws_and_matches_only_inside_the_mask(layers, rng):
  features, style = layers
  mask = rng.uniform(0.5, 1, (6, 5)).astype(np.float32)
  mask[:, 3:] = 0.0
  target = strotss.style_samples(jnp.asarray(style))
  key = jax.random.PRNGKey(0)
  inside = features[:, :3].reshape(-1, 4)
  cost = numpy_cosine_distances(inside.astype(np.float64), style.reshape(-1, 4))
  weights = mask[:, :3].ravel()
  # Style to result: the nearest drawn position, its cost raised by 2 (1 − mask).
  raised = cost + 2 * (1 - weights)[:, None]
  expected = max(np.sum(weights * cost.min(axis=1)) / weights.sum(), raised.min(axis=0).mean())
  got = strotss.relaxed_emd(features=jnp.asarray(features), target=target, key=key,
                            mask=jnp.asarray(mask), normalization='none')
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  changed = features.copy()
  changed[:, 3:] = rng.uniform(0, 3, (6, 2, 4))
  np.testing.assert_allclose(
      strotss.relaxed_emd(features=jnp.asarray(changed), target=target, key=key,
                          mask=jnp.asarray(mask), normalization='none'), got, rtol=1e-6)


def test_self_similarity_against_numpy(layers):
  features, _ = layers
  content = features * np.linspace(0.5, 2.0, 4) + 0.3  # another pattern of similarities
  key = jax.random.PRNGKey(0)
  got = strotss.self_similarity(features=jnp.asarray(features), target=jnp.asarray(content),
                                key=key, normalization='none')
  expected = numpy_self_similarity(features, content)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # On the content term's scale: times n, ½ Σ P² and 5.
  np.testing.assert_allclose(
      strotss.self_similarity(features=jnp.asarray(features), target=jnp.asarray(content),
                              key=key),
      expected * 30 * 0.5 * np.sum(content.astype(np.float64) ** 2) * 5, rtol=1e-5)
  # A subset: the same positions of both images.
  chosen = np.asarray(strotss.random_positions(key, count=9, positions=30))
  np.testing.assert_allclose(
      strotss.self_similarity(features=jnp.asarray(features), target=jnp.asarray(content),
                              key=key, positions=9, normalization='none'),
      numpy_self_similarity(features.reshape(-1, 4)[chosen], content.reshape(-1, 4)[chosen]),
      rtol=1e-5)
  # Scaling every activation keeps the self-similarities: no loss, unlike the content term.
  assert float(strotss.self_similarity(features=jnp.asarray(3 * features),
                                       target=jnp.asarray(features), key=key)) < 1e-3


def test_cosine_distances_have_finite_gradients_at_zero_vectors():
  a = jnp.zeros((3, 4)).at[0].set(1.0)
  grad = jax.grad(lambda x: jnp.sum(strotss.cosine_distances(x, x)))(a)
  assert np.isfinite(np.asarray(grad)).all()


# ------------------------------------------------------------------------------------------
# Each term lowers its own distance under optimisation (the real pipeline, 64 px).


def _features(image, layers):
  net = metrics.embedded_network()
  return {layer: np.asarray(value, np.float64) for layer, value in vgg.features(
      net, jnp.asarray(image, jnp.float32), layers=layers).items()}


def _run(tmp_path, config):
  config.size, config.chunk_size = 64, config.steps
  config.progress, config.compilation_cache, config.checkpoint_every = 'none', '', 0
  return images.load(helpers.run(config, str(tmp_path / 'run'))[0])


def test_relaxed_emd_lowers_the_relaxed_emd(tmp_path):
  config = default.get_config()
  config.steps = 20
  config.losses.style.term = 'relaxed_emd'
  config.losses.style.options = {}
  result = _run(tmp_path, config)
  layers = ('block1_relu1', 'block2_relu1', 'block3_relu1', 'block4_relu1', 'block5_relu1')
  content = images.resize(helpers.example('content'), *result.shape[:2])
  style = helpers.example('style')
  style = _features(images.resize(style, *images.fit_size(*style.shape[:2], size=64)), layers)
  # Every position (the term saw random subsets of 1024): relu1_1 is 64x64 here.
  distance = lambda features: sum(numpy_relaxed_emd(features[layer], style[layer])
                                  for layer in layers)
  before, after = distance(_features(content, layers)), distance(_features(result, layers))
  assert after < 0.7 * before, (before, after)


def test_self_similarity_lowers_the_self_similarity_distance_from_noise(tmp_path):
  config = default.get_config()
  config.steps, config.init, config.style_weight = 20, 'uniform', 0.0
  config.losses.content.term = 'self_similarity'
  config.losses.content.options = {}
  config.losses.content.layers = ('block3_relu1', 'block4_relu2')
  result = _run(tmp_path, config)
  layers = config.losses.content.layers
  content = _features(images.resize(helpers.example('content'), *result.shape[:2]), layers)
  start = np.asarray(np.random.default_rng(0).uniform(-128, 128, result.shape)
                     + np.asarray(metrics.embedded_network()['mean_rgb']), np.float32)
  distance = lambda features: sum(numpy_self_similarity(features[layer], content[layer])
                                  for layer in layers)
  before, after = distance(_features(start, layers)), distance(_features(result, layers))
  assert after < 0.5 * before, (before, after)
