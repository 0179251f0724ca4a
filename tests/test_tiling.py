"""Exact tiled evaluation (nst_jax/tiling.py): tiles give the untiled loss and gradient.

The equality tests run the embedded VGG19 at 256 px with 64 px tiles (16 tiles; relu5_1 needs an
80 px halo, so each tile runs on a 224 px window), each term alone, and compare every weighted
part and its image gradient with the untiled objective's. Wasserstein's float32 gradient is
compared in float64 as well: its square roots of near-zero eigenvalues make the term's own float32
gradient differ from its float64 one by 1e-2 to 1e-1 per layer, tiles or not.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from nst_jax import config_files
from nst_jax import errors
from nst_jax import images
from nst_jax import losses
from nst_jax import plan
from nst_jax import problem
from nst_jax import tiling
from nst_jax import vgg
from nst_jax.benchmark import measure
from tests import helpers

SIZE, TILE = 256, 64
DEEP = ('block1_relu1', 'block2_relu1', 'block3_relu1', 'block4_relu1', 'block5_relu1')
TOLERANCE = 1e-4


def _relative_error(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _untiled(program: problem.Program) -> problem.Program:
  return dataclasses.replace(program, network=dataclasses.replace(program.network, tile_size=0))


def _problem(config, *, float64: bool = False):
  """The prepared config's tiled program, net, one problem's targets and a start image."""
  prepared = helpers.prepare(config)
  height, width = prepared.plan.images.output_size(prepared.batch.contents[0].shape[:2])
  targets = jax.tree.map(lambda v: v[0], prepared.scale_targets(height, width))
  image, net, program = prepared.start_images(height, width)[0], prepared.net, prepared.program
  if float64:  # called inside jax.enable_x64
    widen = lambda tree: jax.tree.map(
        lambda v: jnp.asarray(v, jnp.float64) if np.issubdtype(np.asarray(v).dtype, np.floating)
        else v, tree)
    net, targets, image = widen(net), widen(targets), widen(image)
    program = dataclasses.replace(program, network=dataclasses.replace(
        program.network, compute_dtype='float64'))
  return program, net, targets, jnp.asarray(image)


def _parts_and_gradients(program, net, targets, image) -> dict[str, tuple[jax.Array, jax.Array]]:
  """Each weighted part and its own image gradient (one backward per part, one forward)."""
  names = [entry.name for entry in program.entries]

  def parts(x):
    values = problem.objective(x, net=net, targets=targets, program=program)[1]
    return jnp.stack([values[name] for name in names])

  values, jacobian = jax.jit(lambda x: (parts(x), jax.jacrev(parts)(x)))(image)
  return {name: (values[index], jacobian[index]) for index, name in enumerate(names)}


def _errors(program, net, targets, image) -> dict[str, tuple[float, float]]:
  """``{part: (loss error, gradient error)}`` of the tiled program against the untiled one."""
  tiled = _parts_and_gradients(program, net, targets, image)
  untiled = _parts_and_gradients(_untiled(program), net, targets, image)
  for name, (value, gradient) in untiled.items():
    assert float(value) > 0 and float(jnp.abs(gradient).max()) > 0, name  # a real comparison
  return {name: (_relative_error(tiled[name][0], untiled[name][0]),
                 _relative_error(tiled[name][1], untiled[name][1])) for name in tiled}


def _config(**overrides):
  """The default terms at SIZE px with TILE px tiles, away from the content (Gaussian start)."""
  return helpers.tiny_config(size=SIZE, tile_size=TILE, init='gaussian', **overrides)


CASES = {
    'gram': {'losses.style.layers': DEEP, 'content_weight': 0.0},
    'mean_std': {'losses.style.term': 'mean_std', 'losses.style.options': {},
                 'losses.style.layers': DEEP, 'content_weight': 0.0},
    'content': {'losses.content.layers': ('block4_relu2',), 'style_weight': 0.0},
    'tv': {'tv_weight': 1.0, 'content_weight': 0.0, 'style_weight': 0.0},
}


@pytest.mark.parametrize('case', list(CASES))
def test_tiles_give_the_untiled_loss_and_gradient(case):
  found = _errors(*_problem(_config(**CASES[case])))
  assert len(found) == 1
  for name, (loss_error, gradient_error) in found.items():
    assert loss_error < TOLERANCE and gradient_error < TOLERANCE, (name, found)


def _masks(tmp_path, *, height: int, width: int, styles: int) -> str:
  """``styles`` masks of a content of height x width: vertical bands, left to right."""
  paths = []
  for index in range(styles):
    band = np.zeros((height, width, 3))
    band[:, index * width // styles:(index + 1) * width // styles] = 255
    paths.append(helpers.write_image(tmp_path / f'mask{index}.png', band))
  return ','.join(paths)


def test_masked_terms_and_an_image_not_a_multiple_of_the_tile(tmp_path):
  # 256 x 200: the last row of tiles overhangs the image by 56 px, and relu4_1's 25 rows end
  # inside a tile; two styles, each confined to half of the picture.
  content = helpers.write_image(tmp_path / 'content.png', helpers.example('content')[:300])
  styles = ','.join(config_files.example_path(name) for name in (config_files.DEFAULT_STYLE,
                                                                   config_files.DEFAULT_CONTENT))
  config = _config(content_image=content, style_images=styles, tv_weight=1.0,
                   style_masks=_masks(tmp_path, height=300, width=384, styles=2),
                   **{'losses.style.layers': ('block1_relu1', 'block3_relu1', 'block4_relu1'),
                      'losses.content.layers': ('block4_relu2',), 'losses.tv.term': 'tv_l1'})
  config.losses.mean_std = ml_collections.ConfigDict(dict(config.losses.style.to_dict(),
                                                          term='mean_std', options={}))
  program, net, targets, image = _problem(config)
  assert image.shape == (200, 256, 3) and 'style_masks' in targets
  found = _errors(program, net, targets, image)
  assert sorted(found) == ['content', 'mean_std', 'style', 'tv']
  for name, (loss_error, gradient_error) in found.items():
    assert loss_error < TOLERANCE and gradient_error < TOLERANCE, (name, found)


@pytest.mark.parametrize('masked', [False, True])
def test_wasserstein_tiles_exactly(tmp_path, masked):
  # In float32 the term's own gradient is noisy (see the module docstring): there, tiles keep
  # the loss to 1e-4 and the gradient within that noise. In float64 (relu1_1-relu3_1, where its
  # 256 channels have more positions than channels) both agree to 1e-9.
  overrides = {'losses.style.term': 'wasserstein', 'losses.style.options': {},
               'losses.style.layers': DEEP, 'content_weight': 0.0}
  if masked:
    overrides['style_masks'] = _masks(tmp_path, height=384, width=384, styles=1)
  config = helpers.tiny_config(size=128, tile_size=TILE, init='gaussian', **overrides)
  loss_error, gradient_error = _errors(*_problem(config))['style']
  assert loss_error < TOLERANCE and gradient_error < 1e-2, (loss_error, gradient_error)
  config.losses.style.layers = DEEP[:3]
  with jax.enable_x64(True):
    loss_error, gradient_error = _errors(*_problem(config, float64=True))['style']
  assert loss_error < 1e-9 and gradient_error < 1e-9, (loss_error, gradient_error)


# --------------------------------------------------------------------------------------------
# Each additive term's sums, finished, are the term; settings that cannot tile are refused.


def _blocks(array: np.ndarray, garbage_rows: int, rng) -> tuple[np.ndarray, np.ndarray]:
  """``array`` with rows of garbage below, and the validity of each row (1 above, 0 below)."""
  extra = rng.normal(0, 50, (garbage_rows, *array.shape[1:])).astype(np.float32)
  valid = np.r_[np.ones(array.shape[0]), np.zeros(garbage_rows)].astype(np.float32)
  return np.concatenate([array, extra]), valid


def _summed(parts: list) -> dict:
  return jax.tree.map(lambda *leaves: sum(leaves), *parts)


# Masks are a style-term option: content terms are checked unmasked only.
@pytest.mark.parametrize('name, masked', [
    ('content', False), ('content_mse', False), *[(name, masked) for name in
                                                  ('gram', 'wasserstein', 'mean_std')
                                                  for masked in (False, True)]])
def test_layer_term_sums_over_row_blocks_finish_to_the_term(rng, name, masked):
  fn = losses.TERMS[name]
  features = np.abs(rng.normal(1, 1, (12, 10, 6))).astype(np.float32)
  style = np.abs(rng.normal(1, 2, (9, 8, 6))).astype(np.float32)
  target = (fn.statistic(jnp.asarray(style)) if fn.reference == 'style'
            else rng.normal(1, 1, features.shape).astype(np.float32))
  mask = rng.uniform(0, 1, features.shape[:2]).astype(np.float32) if masked else None
  # Three tiles of rows 0-4, 5-11 and 12-15 (garbage, weighted out), as the tiler cuts them.
  padded, valid = _blocks(features, 4, rng)
  positional = fn.additive.positional_target
  padded_target = _blocks(np.asarray(target), 4, rng)[0] if positional else target
  padded_mask = None if mask is None else _blocks(mask, 4, rng)[0]
  parts = []
  for rows in (slice(0, 5), slice(5, 12), slice(12, 16)):
    parts.append(fn.additive.sums(
        features=jnp.asarray(padded[rows]), valid=jnp.asarray(valid[rows][:, None] * np.ones(10)),
        target=padded_target[rows] if fn.additive.positional_target else target,
        **({} if mask is None else {'mask': padded_mask[rows]})))
  image = np.zeros((48, 40, 3), np.float32)
  got = fn.additive.finish(sums=_summed(parts), target=target, shape=features.shape,
                           image_shape=image.shape)
  want = fn(features=jnp.asarray(features), target=target, image=image,
            **({} if mask is None else {'mask': jnp.asarray(mask)}))
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize('name', ['tv', 'tv_l2', 'tv_l1'])
def test_image_term_sums_over_row_blocks_finish_to_the_term(rng, name):
  fn = losses.TERMS[name]
  image = rng.uniform(0, 255, (11, 9, 3)).astype(np.float32)
  # One garbage column on the right and rows below: each block reads one row and column more.
  padded, valid_rows = _blocks(np.concatenate([image, rng.uniform(0, 255, (11, 1, 3))], 1), 4,
                               rng)
  valid = valid_rows[:, None] * np.r_[np.ones(9), 0.0][None, :]
  parts = [fn.additive.sums(image=jnp.asarray(padded[rows.start:rows.stop + 1]),
                            valid=jnp.asarray(valid[rows.start:rows.stop + 1]))
           for rows in (slice(0, 6), slice(6, 14))]
  got = fn.additive.finish(sums=_summed(parts), target=None, shape=image.shape,
                           image_shape=image.shape)
  np.testing.assert_allclose(got, fn(image=jnp.asarray(image)), rtol=1e-5)


@pytest.mark.parametrize('overrides, message', [
    ({'losses.style.term': 'mrf'}, "loss 'style' (term 'mrf') is not additive over positions"),
    ({'losses.style.term': 'sliced_wasserstein'}, "term 'sliced_wasserstein') is not additive"),
    ({'losses.content.term': 'self_similarity'}, "term 'self_similarity') is not additive"),
    ({'losses.style.normalize_gradients': True}, 'normalises each layer gradient'),
    ({'losses.style.layers': DEEP, 'tile_size': 40},
     'tile_size=40 must be a multiple of 16, the pooling grid of block5_relu1'),
    ({'tile_size': -8}, 'tile_size=-8 must be 0'),
])
def test_settings_that_cannot_tile_are_refused_in_one_line(overrides, message):
  config = helpers.tiny_config(**{'tile_size': 32, 'losses.style.options': {},
                                  'losses.content.options': {}, **overrides})
  with pytest.raises(errors.UserError) as raised:
    plan.from_config(config)
  assert message in str(raised.value) and '\n' not in str(raised.value), str(raised.value)
  config.tile_size = 0  # the same losses run untiled
  plan.from_config(config)


def _channel_mean_sums(*, features, valid, **unused):
  return {'first': jnp.sum(valid[..., None] * features, axis=(0, 1)), 'count': jnp.sum(valid)}


def _channel_mean_finish(*, sums, target, **unused):
  return jnp.sum((sums['first'] / sums['count'] - target) ** 2)


@losses.term(reference='style', statistic=lambda features, **unused: features.mean(axis=(0, 1)),
             additive=losses.Additive(sums=_channel_mean_sums, finish=_channel_mean_finish))
def channel_mean(*, features, target, **unused):
  """A researcher's own additive term: squared error of the channel means."""
  return jnp.sum((features.mean(axis=(0, 1)) - target) ** 2)


def test_a_term_of_ones_own_tiles_when_it_declares_its_sums():
  config = helpers.tiny_config(size=80, tile_size=32, init='gaussian', content_weight=0.0,
                               **{'losses.style.term': 'tests.test_tiling:channel_mean',
                                  'losses.style.options': {}})
  found = _errors(*_problem(config))
  assert found['style'][0] < TOLERANCE and found['style'][1] < TOLERANCE, found


def test_each_window_gives_the_whole_images_features_at_its_tile():
  # The halo's own check, sharper than the loss: 256 x 200 px (tiles overhang the image), every
  # layer to relu5_1, each of the 16 tiles against the whole image's features.
  config = helpers.tiny_config(size=SIZE, init='gaussian', tile_size=TILE,
                               **{'losses.style.layers': DEEP})
  prepared = helpers.prepare(config)
  program, net = prepared.program, prepared.net
  image = jnp.asarray(prepared.start_images(SIZE, SIZE)[0][:200])
  geometry = tiling.geometry_of(program, 200, SIZE)
  whole = jax.device_get(jax.jit(lambda x: program.features(net, x, program.layers))(image))
  padded = geometry.pad(image)
  features = jax.jit(lambda index: tiling.tile_features(
      geometry.window_at(padded, index)[0], index, net=net, program=program, geometry=geometry))
  for index in range(geometry.rows * geometry.cols):
    tile = features(index)
    row, col = geometry.origin(index)
    for layer, values in whole.items():
      stride = vgg.downsampling(layer)
      expected = values[row // stride:(row + TILE) // stride, col // stride:(col + TILE) // stride]
      got = np.asarray(tile[layer])
      inside = got[:expected.shape[0], :expected.shape[1]]
      assert np.abs(inside - expected).max(initial=0) <= 1e-5 * np.abs(values).max(), layer
      assert not got[expected.shape[0]:].any() and not got[:, expected.shape[1]:].any(), layer


@pytest.mark.parametrize('reference', ['content', 'style'])
def test_targets_computed_over_tiles_equal_the_whole_images(reference):
  # 120 x 136 px with 32 px tiles (the last tiles overhang), every kind of target: Gram and
  # moments from summed tiles (Additive.statistic), content features and a term without a
  # statistic from sums (channel_mean) assembled from the tiles' positions.
  config = helpers.tiny_config(size=136, tile_size=32, **{
      'losses.style.layers': DEEP, 'losses.content.layers': ('block4_relu2', 'block2_relu1')})
  for name, term, layers in (('mean_std', 'mean_std', DEEP),
                             ('wasserstein', 'wasserstein', ('block1_relu1', 'block3_relu1')),
                             ('channel_mean', 'tests.test_tiling:channel_mean', ('block2_relu1',))):
    config.losses[name] = ml_collections.ConfigDict(dict(config.losses.style.to_dict(), term=term,
                                                         options={}, layers=layers))
  prepared = helpers.prepare(config)
  program, net = prepared.program, prepared.net
  image = jnp.asarray(images.resize(helpers.example(reference), 120, 136), jnp.float32)
  tiled = jax.device_get(tiling.reference_targets(net, image, program=program,
                                                  reference=reference))
  layers = losses.feature_layers(program.entries, reference)
  whole = jax.device_get(losses.targets(entries=program.entries, reference=reference,
                                        reference_features=problem.reference_features(
                                            net, image, program=_untiled(program), layers=layers)))
  names = {'content': ['content'], 'style': ['channel_mean', 'mean_std', 'style', 'wasserstein']}
  assert sorted(tiled) == sorted(whole) == names[reference]
  flat_tiled = jax.tree_util.tree_leaves_with_path(tiled)
  flat_whole = jax.tree.leaves(whole)
  assert len(flat_tiled) == len(flat_whole) >= 2
  for (path, got), want in zip(flat_tiled, flat_whole):
    assert got.shape == want.shape and np.abs(want).max() > 0, path
    assert _relative_error(got, want) < TOLERANCE, (path, _relative_error(got, want))


def test_a_tiled_run_computes_its_targets_over_tiles(monkeypatch):
  calls = []
  real = tiling.reference_targets
  monkeypatch.setattr(tiling, 'reference_targets',
                      lambda *args, **kwargs: calls.append(kwargs['reference']) or real(*args, **kwargs))
  prepared = helpers.prepare(helpers.tiny_config(size=64, tile_size=32))
  prepared.scale_targets(64, 64)
  assert calls == ['content', 'style']
  calls.clear()
  helpers.prepare(helpers.tiny_config(size=64)).scale_targets(64, 64)
  assert calls == []


def test_halo_and_grid_follow_the_deepest_layer():
  assert tiling.pooling_grid(DEEP) == 16 and tiling.pooling_grid(()) == 1
  # 2 + 2x2 + 4x4 + 4x8 + 16 = 70 px of receptive field, rounded up to the grid of 16.
  assert tiling.halo_size(DEEP, network='vgg19', image_terms=False) == 80
  assert tiling.halo_size(('block3_relu1',), network='vgg19', image_terms=True) == 12
  assert tiling.halo_size((), network='vgg19', image_terms=True) == 1


# --------------------------------------------------------------------------------------------
# Through the pipeline, and what tiles save.


def test_twenty_lbfgs_steps_with_tiles_give_the_untiled_image(tmp_path):
  # 72 px in 32 px tiles: 3 x 3 tiles overhanging the image by 24 px; content, Gram and TV.
  # L-BFGS amplifies float32 rounding: the same run on one 96 px tile (no split at all) ends
  # 19 levels away at some pixel after 20 lbfgs_fixed steps at the default weights. So this runs
  # the line-search L-BFGS at a content-leaning weight, where the trajectory is stable, and
  # bounds the mean difference by 1/4 of a level (measured 0.07) and the largest by 4 (1.1).
  from nst_jax import pipeline
  results, losses_ = {}, {}
  for tile_size in (0, 32):
    config = helpers.tiny_config(size=72, steps=20, chunk_size=10, tv_weight=1.0,
                                 style_weight=1e2, tile_size=tile_size, optimizer='lbfgs')
    workdir = tmp_path / str(tile_size)
    results[tile_size] = pipeline.run(plan.from_config(config), str(workdir)).images[0]
    losses_[tile_size] = np.array([line['loss'][0] for line in helpers.final_losses(workdir)])
  assert results[0].shape == (72, 72, 3) and losses_[0][-1] < 0.2 * losses_[0][0]
  np.testing.assert_allclose(losses_[32], losses_[0], rtol=1e-3)
  difference = np.abs(results[32] - results[0])
  assert difference.mean() < 0.25 and difference.max() < 4, (difference.mean(), difference.max())


def test_twenty_default_lbfgs_steps_in_float64_with_tiles_give_the_untiled_image(tmp_path):
  # The bound, < 1 of 255 everywhere, at the default optimiser (lbfgs_fixed) and
  # weights: in float64 (compute_dtype=float64: image, network and history) the rounding L-BFGS
  # amplifies is ~1e-16 instead of ~1e-7, so what is left is the tiling's own error. Measured
  # largest difference: 1.4e-9 levels here (23 s); 1.3e-11 with the default layers relu1_1..5_1
  # and relu4_2 (80 px halos, 3.5 min: left to the equality tests above at 256 px).
  from nst_jax import pipeline
  results, losses_ = {}, {}
  with jax.enable_x64(True):
    for tile_size in (0, 32):
      config = helpers.tiny_config(size=72, steps=20, chunk_size=10, tile_size=tile_size,
                                   compute_dtype='float64')
      workdir = tmp_path / str(tile_size)
      outcome = pipeline.run(plan.from_config(config), str(workdir))
      results[tile_size] = outcome.images[0]
      losses_[tile_size] = np.array([line['loss'][0] for line in helpers.final_losses(workdir)])
  assert results[0].dtype == np.float64, results[0].dtype  # the run was float64 throughout
  assert losses_[0][-1] < 0.5 * losses_[0][0]  # it moved
  np.testing.assert_allclose(losses_[32], losses_[0], rtol=1e-9)
  difference = np.abs(results[32] - results[0])
  assert difference.max() < 1e-6, (difference.mean(), difference.max())  # the issue: < 1


def test_a_tile_that_covers_the_whole_image_is_said(tmp_path, capsys):
  helpers.run(helpers.tiny_config(size=40, steps=1, chunk_size=1, tile_size=48,
                                  progress='lines'), tmp_path / 'one')
  assert '--config.tile_size=48 covers the whole image' in capsys.readouterr().err
  helpers.run(helpers.tiny_config(size=40, steps=1, chunk_size=1, tile_size=32,
                                  progress='lines'), tmp_path / 'four')
  assert 'covers the whole image' not in capsys.readouterr().err


def test_tiles_plan_less_temporary_memory():
  # 512 px, relu5_1: XLA plans 574 MiB of temporaries untiled, 115 MiB with 64 px tiles.
  program, net, targets, image = _problem(helpers.tiny_config(
      size=512, tile_size=TILE, init='gaussian', **CASES['gram']))

  def temporary_bytes(program):
    loss = lambda x, net, targets: problem.objective(x, net=net, targets=targets,
                                                     program=program)[0]
    compiled = jax.jit(jax.value_and_grad(loss)).lower(image, net, targets).compile()
    return measure.planned_bytes(compiled)[1]

  tiled, untiled = temporary_bytes(program), temporary_bytes(_untiled(program))
  assert 0 < tiled < 0.3 * untiled, (tiled, untiled)


def test_the_large_benchmark_runs_a_row_and_skips_one_that_does_not_fit():
  # The `large` section's rows, tiny: one real subprocess (its own peak resident memory), and a
  # budget nothing fits in, which plans the chunk but does not run it.
  from nst_jax.benchmark import large
  row = large.measure_in_subprocess(64, tile_size=32, memory_size=5, memory_gib=24.0)
  assert row['finite'] and row['step_s'] > 0 and row['planned_bytes'] > 0, row
  assert row['peak_rss_bytes'] >= row['setup_rss_bytes'] > 0, row
  skipped = large.measure_here(64, tile_size=32, memory_size=5, memory_gib=1e-6)
  assert skipped['step_s'] is None and skipped['planned_bytes'] > 1e-6 * 2**30, skipped
