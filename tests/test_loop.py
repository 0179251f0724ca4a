"""The optimisation loop: coarse-to-fine scales, L-BFGS restarts, stopping between chunks."""

import numpy as np
import pytest

from nst_jax import images
from nst_jax import loop
from nst_jax import pipeline
from tests import helpers


@pytest.mark.parametrize('content_detail', [True, False])
def test_multiscale_fine_scale_starts_from_the_upsampled_coarse_result(tmp_path, content_detail):
  # No steps at the final scale: the result is exactly where the fine scale starts.
  config = helpers.tiny_config(size=48, scales=2, scale_factor=1.5, steps=0, coarse_steps=6,
                               save_every=6, scale_content_detail=content_detail)
  paths = helpers.run(config, tmp_path / 'ms')
  result = images.load(paths[0])
  assert result.shape == (48, 48, 3)
  coarse = images.load(str(tmp_path / 'ms' / 'step_s0_00006.png'))
  assert coarse.shape == (32, 32, 3)
  expected = images.resize(coarse, 48, 48)
  content = images.resize(helpers.example('content'), 48, 48)
  if content_detail:  # plus the content's detail the 32 px scale could not hold
    expected += content - images.resize(images.resize(content, 32, 32), 48, 48)
  # Equal up to the rounding and clipping of the saved coarse image, which the resize spreads.
  assert np.abs(result - np.clip(expected, 0, 255)).mean() < 0.5
  assert np.abs(result - content).mean() > 3  # the coarse scale did change the picture
  assert sorted({r['scale'] for r in helpers.final_losses(str(tmp_path / 'ms'))}) == [0]


def test_coarse_scales_are_balanced_and_the_final_scale_keeps_its_own_targets():
  # The final scale's targets are computed once, before the first scale (for the balance), and
  # used again at the final scale: unbalanced, equal to that scale's own; the coarse scale's
  # weights are rescaled.
  from nst_jax import problem
  prepared = helpers.prepare(helpers.tiny_config(size=48, scales=2, scale_factor=1.5))
  task = prepared.whole_task()
  final = loop._final_targets(task)
  own = problem.scale_targets(task.batch, task.images_plan, net=task.net, program=task.program,
                              height=48, width=48)
  at_final, at_coarse = loop._targets_at(task, 1, final), loop._targets_at(task, 0, final)
  for name, weight in own['weights'].items():
    np.testing.assert_array_equal(at_final['weights'][name], weight)
  np.testing.assert_allclose(at_final['style_targets'][0]['style'][helpers.SHALLOW_STYLE[0]],
                             own['style_targets'][0]['style'][helpers.SHALLOW_STYLE[0]])
  assert any(not np.allclose(at_coarse['weights'][name], own['weights'][name])
             for name in own['weights'])


def test_a_chunks_parts_add_up_to_the_next_steps_loss(tmp_path):
  # README's reading of losses.jsonl: a step's loss is at the image it started from, the parts
  # of a chunk's last step at the image after it.
  helpers.run(helpers.tiny_config(steps=6, chunk_size=3, progress='lines'), tmp_path)
  records = helpers.final_losses(str(tmp_path))
  assert [r['step'] for r in records] == [1, 2, 3, 4, 5, 6] and 'parts' in records[2]
  np.testing.assert_allclose(sum(v[0] for v in records[2]['parts'].values()),
                             records[3]['loss'][0], rtol=1e-5)
  assert not np.isclose(records[2]['loss'][0], records[3]['loss'][0], rtol=1e-3)


def test_content_detail_is_what_the_coarse_scale_lost():
  rng = np.random.default_rng(0)
  contents = rng.uniform(0, 255, (2, 16, 12, 3))
  smooth = np.stack([images.resize(c, 8, 6) for c in contents])
  # A coarse result equal to the downsampled content comes back as the content itself.
  np.testing.assert_allclose(loop.next_scale_start(smooth, contents=contents, height=16, width=12),
                             contents, atol=1e-3)
  plain = loop.next_scale_start(smooth, contents=None, height=16, width=12)
  assert np.abs(plain - contents).mean() > 10


def test_lbfgs_restart_starts_a_fresh_history_every_chunk(tmp_path):
  kept = helpers.tiny_config(tmp_path, steps=6, chunk_size=3, checkpoint_history='True')
  restarted = helpers.tiny_config(tmp_path, steps=6, chunk_size=3, checkpoint_history='True',
                          lbfgs_restart=True)
  helpers.run(kept, str(tmp_path / 'kept'))
  helpers.run(restarted, str(tmp_path / 'restarted'))
  a, b = helpers.final_losses(str(tmp_path / 'kept')), helpers.final_losses(str(tmp_path / 'restarted'))
  assert [r['loss'] for r in a[:4]] == [r['loss'] for r in b[:4]]  # same until the restart bites
  assert a[4]['loss'] != b[4]['loss']
  # A fresh history takes a capped gradient step again: min(1, 1/|g|_1) times the gradient.
  from flax import serialization
  with open(tmp_path / 'restarted' / 'checkpoint.msgpack', 'rb') as handle:
    state = serialization.msgpack_restore(handle.read())['state']
  assert int(np.asarray(state['opt_state']['count']).max()) == 3  # 3 steps since restart


def test_a_stop_request_ends_the_loop_after_the_chunk_keeping_the_images(tmp_path):
  prepared = helpers.prepare(helpers.tiny_config(steps=9, chunk_size=3))
  seen = []
  with pytest.raises(loop.Stopped) as stopped:
    loop.optimize(prepared.whole_task(), pipeline.saving(prepared.plan, str(tmp_path)),
                  on_chunk=lambda scale, step, optimized: seen.append(step),
                  stop_signal=lambda: 2 if seen else 0)
  assert seen == [3] and stopped.value.signal_number == 2
  assert stopped.value.images.shape == (1, 40, 40, 3)
  assert [r['step'] for r in stopped.value.records] == [1, 2, 3]
  assert (tmp_path / 'checkpoint.msgpack').exists()  # the stop is checkpointed


def test_without_a_workdir_nothing_is_written(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  prepared = helpers.prepare(helpers.tiny_config(steps=3))
  outcome = loop.optimize(prepared.whole_task(), pipeline.saving(prepared.plan, None))
  assert outcome.images.shape == (1, 40, 40, 3) and len(outcome.records) == 3
  assert list(tmp_path.iterdir()) == []


def test_random_terms_are_reproducible_from_the_seed_and_compile_once(tmp_path):
  # Content initialisation: the seed reaches the result only through the terms' PRNG keys.
  run = lambda name, seed: images.load(helpers.run(helpers.tiny_config(
      seed=seed, steps=4, chunk_size=2, **{'losses.style.term': 'sliced_wasserstein',
                                           'losses.style.options': {}}), tmp_path / name)[0])
  first = run('first', 0)
  compiled = loop.optimize_chunk._cache_size()
  again, other = run('again', 0), run('other', 1)
  np.testing.assert_array_equal(first, again)
  assert np.abs(first - other).max() > 0
  # Two chunks per run, a new seed, new draws every step: nothing recompiled.
  assert loop.optimize_chunk._cache_size() == compiled


def test_laplacian_parameterization_optimises_the_pyramid_and_moves_coarse_first(tmp_path):
  # Zero steps: the result is the start image, through an exact encode/decode round trip.
  start = helpers.prepare(helpers.tiny_config(size=64)).start_images(64, 64)[0]
  zero = helpers.prepare(helpers.tiny_config(size=64, steps=0, parameterization='laplacian'))
  outcome = loop.optimize(zero.whole_task(), pipeline.saving(zero.plan, None))
  np.testing.assert_allclose(outcome.images[0], start, atol=1e-2)
  # A few Adam steps: the change to the image holds more of its energy at low frequencies when
  # the optimiser moves the pyramid's levels than when it moves the pixels.
  changes = {}
  for name in ('pixels', 'laplacian'):
    prepared = helpers.prepare(helpers.tiny_config(size=64, steps=3, optimizer='adam',
                                                   learning_rate=2.0, parameterization=name))
    outcome = loop.optimize(prepared.whole_task(), pipeline.saving(prepared.plan, None))
    assert outcome.records[-1]['loss'][0] < outcome.records[0]['loss'][0]
    changes[name] = outcome.images[0] - start
  low = lambda x: np.abs(images.resize(images.resize(x, 8, 8), 64, 64)).mean() / np.abs(x).mean()
  assert low(changes['laplacian']) > 1.5 * low(changes['pixels']), {
      name: low(change) for name, change in changes.items()}
