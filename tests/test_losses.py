"""Loss terms against the seeds' formulas written out by hand in NumPy."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nst_jax import errors
from nst_jax import losses
from nst_jax import feature_statistics


def numpy_gram(features):
  flat = features.reshape(-1, features.shape[-1]).astype(np.float64)  # M x N
  return flat.T @ flat


@pytest.fixture
def layer(rng):
  features = rng.standard_normal((6, 5, 4)).astype(np.float32)
  style = rng.standard_normal((6, 5, 4)).astype(np.float32)
  return features, style


def test_content_seed_form(layer):
  features, target = layer
  expected = 0.5 * np.sum((features.astype(np.float64) - target) ** 2)
  got = losses.content(features=jnp.asarray(features), target=jnp.asarray(target))
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  np.testing.assert_allclose(
      losses.content(features=features, target=target, reduction='sum'), 2 * expected, rtol=1e-5)
  np.testing.assert_allclose(losses.content_mse(features=features, target=target),
                             2 * expected / features.size, rtol=1e-5)


def test_gram_seed_form_is_gatys_formula(layer):
  features, style = layer
  n = features.shape[-1]
  m = features.shape[0] * features.shape[1]
  expected = np.sum((numpy_gram(features) - numpy_gram(style)) ** 2) / (4 * n ** 2 * m ** 2)
  target = feature_statistics.gram_statistic(jnp.asarray(style))
  got = losses.gram_loss(features=jnp.asarray(features), target=target,
                         image=jnp.zeros((12, 10, 3)), normalization='gatys')
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_gram_keras_tutorial_normaliser(layer):
  features, style = layer
  image_height, image_width = 12, 10  # the tutorial divides by the image's H*W, not the layer's
  expected = (np.sum((numpy_gram(features) - numpy_gram(style)) ** 2)
              / (4.0 * 3 ** 2 * (image_height * image_width) ** 2))
  got = losses.gram_loss(features=jnp.asarray(features),
                         target=feature_statistics.gram_statistic(jnp.asarray(style)),
                         image=jnp.zeros((image_height, image_width, 3)), normalization='keras')
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_gram_jcjohnson_and_pastiche_normalisations(layer):
  features, style = layer
  h, w, c = features.shape
  image = jnp.zeros((h, w, 3))
  jc = np.mean((numpy_gram(features) / (c * h * w) - numpy_gram(style) / (c * h * w)) ** 2)
  pa = np.mean((numpy_gram(features) / (h * w) - numpy_gram(style) / (h * w)) ** 2)
  target = feature_statistics.gram_statistic(jnp.asarray(style))
  np.testing.assert_allclose(losses.gram_loss(features=features, target=target, image=image,
                                              normalization='jcjohnson'), jc, rtol=1e-5)
  np.testing.assert_allclose(losses.gram_loss(features=features, target=target, image=image,
                                              normalization='pastiche'), pa, rtol=1e-5)
  with pytest.raises(errors.UserError, match='unknown Gram normalization'):
    losses.gram_loss(features=features, target=target, image=image, normalization='nope')


def test_total_variation_seed_form_by_hand(rng):
  x = rng.uniform(0, 255, (5, 7, 3)).astype(np.float64)
  expected = 0.0
  for i in range(x.shape[0] - 1):
    for j in range(x.shape[1] - 1):
      a = (x[i, j] - x[i + 1, j]) ** 2
      b = (x[i, j] - x[i, j + 1]) ** 2
      expected += np.sum((a + b) ** 1.25)
  got = losses.total_variation(image=jnp.asarray(x, jnp.float32), power=1.25)
  np.testing.assert_allclose(got, expected, rtol=1e-4)
  l2 = sum(np.sum((x[i, j] - x[i + 1, j]) ** 2 + (x[i, j] - x[i, j + 1]) ** 2)
           for i in range(4) for j in range(6))
  np.testing.assert_allclose(losses.total_variation_l2(image=jnp.asarray(x, jnp.float32)), l2,
                             rtol=1e-4)
  # pastiche: loss += 0.5 * tv_weight * (mean|dx| + mean|dy|).
  l1 = 0.5 * (np.mean(np.abs(np.diff(x, axis=0))) + np.mean(np.abs(np.diff(x, axis=1))))
  np.testing.assert_allclose(losses.total_variation_l1(image=jnp.asarray(x, jnp.float32)), l1,
                             rtol=1e-4)


def test_wasserstein_against_numpy_and_zero_at_target(layer):
  features, style = layer
  f = features.reshape(-1, 4).astype(np.float64)
  s = style.reshape(-1, 4).astype(np.float64)
  mf, ms = f.mean(0), s.mean(0)
  cf = (f - mf).T @ (f - mf) / len(f)
  cs = (s - ms).T @ (s - ms) / len(s)

  def sqrtm(a):
    values, vectors = np.linalg.eigh(a)
    return (vectors * np.sqrt(np.maximum(values, 0))) @ vectors.T

  root = sqrtm(cs)
  expected = (np.sum((mf - ms) ** 2) + np.trace(cf) + np.trace(cs)
              - 2 * np.trace(sqrtm(root @ cf @ root))) / 4
  target = feature_statistics.mean_covariance_statistic(jnp.asarray(style))
  np.testing.assert_allclose(
      losses.wasserstein(features=jnp.asarray(features), target=target, normalization='none'),
      expected, rtol=1e-3, atol=1e-4)
  # On the Gram term's scale: times the style's mean second moment (|μ_s|² + tr Σ_s) / C, / 8.
  second_moment = (np.sum(ms ** 2) + np.trace(cs)) / 4
  np.testing.assert_allclose(losses.wasserstein(features=jnp.asarray(features), target=target),
                             expected * second_moment / 8, rtol=1e-3, atol=1e-4)
  assert abs(float(losses.wasserstein(features=jnp.asarray(style), target=target))) < 1e-3


def test_mean_std_against_numpy(layer):
  features, style = layer
  f, s = features.reshape(-1, 4), style.reshape(-1, 4)
  expected = (np.mean((f.mean(0) - s.mean(0)) ** 2)
              + np.mean((np.sqrt(f.var(0) + 1e-5) - np.sqrt(s.var(0) + 1e-5)) ** 2))
  target = feature_statistics.mean_std_statistic(jnp.asarray(style))
  np.testing.assert_allclose(
      losses.mean_std(features=jnp.asarray(features), target=target, normalization='none'),
      expected, rtol=1e-4)
  second_moment = np.mean(s.mean(0) ** 2 + s.var(0) + 1e-5)
  np.testing.assert_allclose(losses.mean_std(features=jnp.asarray(features), target=target),
                             expected * second_moment / 8, rtol=1e-4)
  with pytest.raises(errors.UserError, match="unknown normalization 'x'"):
    losses.mean_std(features=jnp.asarray(features), target=target, normalization='x')


def test_masked_wasserstein_and_mean_std_ignore_positions_outside_the_mask(rng):
  features = rng.uniform(0, 3, (6, 8, 4)).astype(np.float32)
  mask = rng.uniform(0, 1, (6, 8)).astype(np.float32)
  mask[:, 5:] = 0.0
  changed = features.copy()
  changed[:, 5:] = 100.0
  for term, statistic in ((losses.wasserstein, feature_statistics.mean_covariance_statistic),
                          (losses.mean_std, feature_statistics.mean_std_statistic)):
    target = statistic(jnp.asarray(features[::-1]))
    a = term(features=jnp.asarray(features), target=target, mask=jnp.asarray(mask))
    b = term(features=jnp.asarray(changed), target=target, mask=jnp.asarray(mask))
    c = term(features=jnp.asarray(changed), target=target)
    np.testing.assert_allclose(a, b, rtol=1e-4)
    assert abs(float(c) - float(a)) > 0.1 * abs(float(a))  # unmasked, the change shows


def test_every_built_in_style_term_accepts_a_mask():
  for name, fn in losses.TERMS.items():
    if fn.reference == 'style':
      assert losses.accepts_mask(losses.make_entry(name='s', term=name, layers=('block1_relu1',)))


def test_total_weights_entries_styles_and_layers(rng):
  feats = {'a': rng.standard_normal((4, 4, 2)).astype(np.float32),
           'b': rng.standard_normal((2, 2, 2)).astype(np.float32)}
  entries = (
      losses.make_entry(name='content', term='content', layers=['a']),
      losses.make_entry(name='style', term='gram', layers=['a', 'b'], layer_weights=[2.0, 3.0]),
      losses.make_entry(name='tv', term='tv_l2'),
  )
  image = jnp.asarray(rng.uniform(0, 255, (8, 8, 3)), jnp.float32)
  content_ref = {'a': rng.standard_normal((4, 4, 2)).astype(np.float32)}
  style_refs = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in feats.items()}
                for _ in range(2)]
  content_targets = losses.targets(entries=entries, reference_features=content_ref,
                                   reference='content')
  style_targets = [losses.targets(entries=entries, reference_features=r, reference='style')
                   for r in style_refs]
  weights = {'content': 1.5, 'style': 10.0, 'tv': 0.1}
  blend = jnp.asarray([0.25, 0.75])
  got, parts = losses.total(image=image, features=feats, entries=entries, weights=weights,
                            content_targets=content_targets, style_targets=style_targets,
                            style_blend=blend)
  expected_style = 0.0
  for b, ref in zip([0.25, 0.75], style_refs):
    for layer, lw in (('a', 2.0), ('b', 3.0)):
      n, m = 2, feats[layer].shape[0] * feats[layer].shape[1]
      expected_style += b * lw * np.sum(
          (numpy_gram(feats[layer]) - numpy_gram(ref[layer])) ** 2) / (4 * n ** 2 * m ** 2)
  np.testing.assert_allclose(parts['style'], 10.0 * expected_style, rtol=1e-4)
  np.testing.assert_allclose(
      parts['content'], 1.5 * 0.5 * np.sum((feats['a'] - content_ref['a']) ** 2), rtol=1e-5)
  np.testing.assert_allclose(got, sum(parts.values()), rtol=1e-6)


def test_unknown_term_and_bad_layer_weights():
  with pytest.raises(errors.UserError, match="unknown loss term 'gramm'.*gram"):
    losses.lookup('gramm')
  with pytest.raises(errors.UserError, match='2 layer weights for 1 layers'):
    losses.make_entry(name='style', term='gram', layers=['a'], layer_weights=[1, 2])
  with pytest.raises(errors.UserError, match='needs at least one layer'):
    losses.make_entry(name='style', term='gram', layers=[])


def test_a_term_from_outside_the_package_by_name(tmp_path):
  """A researcher's own module and config, without editing nst_jax (README's recipe)."""
  (tmp_path / 'my_terms.py').write_text(textwrap.dedent('''
      import jax.numpy as jnp
      from nst_jax import losses

      @losses.term(reference='style', statistic=lambda f, **_: f.mean(axis=(0, 1)))
      def channel_mean(*, features, target, **unused):
        return jnp.sum((features.mean(axis=(0, 1)) - target) ** 2)
      '''))
  (tmp_path / 'my_config.py').write_text(textwrap.dedent('''
      from configs import default

      def get_config():
        config = default.get_config()
        config.losses.mean = {'term': 'my_terms:channel_mean', 'weight': 1e3,
                              'layers': ('block1_relu1',), 'layer_weights': (), 'options': {}}
        config.size = 32
        config.steps = 4
        config.chunk_size = 2
        config.progress = 'lines'
        config.compilation_cache = ''
        return config
      '''))
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=f'{tmp_path}{os.pathsep}{root}')
  result = subprocess.run(
      [sys.executable, os.path.join(root, 'main.py'), f'--config={tmp_path}/my_config.py',
       f'--workdir={tmp_path}/out'], env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  log = (tmp_path / 'out' / 'losses.jsonl').read_text().splitlines()
  assert '"mean"' in log[-1]  # the researcher's term was part of the total
  assert (tmp_path / 'out' / 'result.png').exists()


# ------------------------------------------------------------------------------------------
# Per-layer gradient normalisation (jcjohnson/neural-style's -normalize_gradients).


def _style_total(rng, *, normalize, weight, layer_weights):
  """The total of one Gram entry over two layers, as a function of the features."""
  feats = {'a': rng.standard_normal((4, 4, 3)).astype(np.float32),
           'b': rng.standard_normal((2, 3, 3)).astype(np.float32)}
  style = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in feats.items()}
  entries = (losses.make_entry(name='style', term='gram', layers=['a', 'b'],
                               layer_weights=layer_weights, normalize_gradients=normalize),)
  style_targets = [losses.targets(entries=entries, reference_features=style, reference='style')]
  fn = lambda features: losses.total(
      image=jnp.zeros((8, 8, 3)), features=features, entries=entries, weights={'style': weight},
      content_targets={}, style_targets=style_targets, style_blend=jnp.ones(1))[0]
  return fn, {k: jnp.asarray(v) for k, v in feats.items()}


def test_normalize_gradients_gives_each_layer_a_unit_l1_gradient():
  plain, feats = _style_total(np.random.default_rng(1), normalize=False, weight=1.0,
                              layer_weights=[1.0, 1.0])
  normalized, _ = _style_total(np.random.default_rng(1), normalize=True, weight=1.0,
                               layer_weights=[1.0, 1.0])
  np.testing.assert_allclose(normalized(feats), plain(feats), rtol=1e-6)  # forward unchanged
  got, raw = jax.grad(normalized)(feats), jax.grad(plain)(feats)
  for layer in ('a', 'b'):
    g, r = np.asarray(got[layer], np.float64), np.asarray(raw[layer], np.float64)
    np.testing.assert_allclose(np.abs(g).sum(), 1.0, rtol=1e-5)
    np.testing.assert_allclose(g, r / np.abs(r).sum(), rtol=1e-4, atol=1e-9)  # same direction
  # Weights scale the normalised gradient, as neural-style's strength does: L1 = weight x w_l.
  weighted, _ = _style_total(np.random.default_rng(1), normalize=True, weight=3.0,
                             layer_weights=[0.5, 2.0])
  got = jax.grad(weighted)(feats)
  np.testing.assert_allclose(np.abs(np.asarray(got['a'])).sum(), 1.5, rtol=1e-5)
  np.testing.assert_allclose(np.abs(np.asarray(got['b'])).sum(), 6.0, rtol=1e-5)


def test_normalize_gradients_from_the_config_and_refused_without_layers(tmp_path):
  from nst_jax import plan
  from tests import helpers
  config = helpers.tiny_config(tmp_path, **{'losses.style.normalize_gradients': True})
  entries = {entry.name: entry for entry in plan.from_config(config).entries}
  assert entries['style'].normalize_gradients and not entries['content'].normalize_gradients
  with pytest.raises(errors.UserError, match='reads no layer'):
    losses.make_entry(name='tv', term='tv', normalize_gradients=True)


# ------------------------------------------------------------------------------------------
# PRNG keys for terms that draw random numbers.


def test_terms_that_take_a_key_get_one_per_entry_and_layer(monkeypatch):
  @losses.term(reference='style')
  def noise(*, features, target, key, **unused):
    return jax.random.uniform(key)

  monkeypatch.setitem(losses.TERMS, 'noise', noise)
  entries = tuple(losses.make_entry(name=name, term='noise', layers=['x', 'y'])
                  for name in ('first', 'second'))
  assert losses.accepts_key(entries[0])
  assert not losses.accepts_key(losses.make_entry(name='s', term='gram', layers=['x']))
  features = {'x': jnp.zeros((2, 2, 1)), 'y': jnp.zeros((1, 1, 1))}
  style_targets = [losses.targets(entries=entries, reference_features=features,
                                  reference='style')]
  key = jax.random.PRNGKey(7)
  _, parts = losses.total(image=jnp.zeros((4, 4, 3)), features=features, entries=entries,
                          weights={'first': 1.0, 'second': 1.0}, content_targets={},
                          style_targets=style_targets, style_blend=jnp.ones(1), key=key)
  for index, name in enumerate(('first', 'second')):
    entry_key = jax.random.fold_in(key, index)
    expected = sum(0.5 * jax.random.uniform(jax.random.fold_in(entry_key, layer))
                   for layer in range(2))
    np.testing.assert_allclose(parts[name], expected, rtol=1e-6)
  assert float(parts['first']) != float(parts['second'])
  with pytest.raises(ValueError, match='draws random numbers'):
    losses.total(image=jnp.zeros((4, 4, 3)), features=features, entries=entries,
                 weights={'first': 1.0, 'second': 1.0}, content_targets={},
                 style_targets=style_targets, style_blend=jnp.ones(1))
