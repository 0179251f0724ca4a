"""config.shard=space: one image's rows split across 4 devices give the 1-device results.

The device count is fixed when JAX starts, so the measurements run once in a subprocess with
``--xla_force_host_platform_device_count=4`` added to XLA_FLAGS (this module's ``_child``); it
prints them as one JSON line and the tests below judge them. The image is 64 high and 48 wide:
16 rows a device, fewer than VGG's deepest layers have in all, so the halo exchanges and uneven
pooled shards that XLA adds are exercised. The 1-device runs use the same process's first device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES, HEIGHT, WIDTH = 4, 64, 48
MEMORY_PX = 256
TILE = 16  # 4 x 3 tiles of the 64 x 48 image


def _spec(array) -> list:
  """The array's partition spec, one entry an axis, as JSON ([] where it sits on one device)."""
  spec = getattr(array.sharding, 'spec', None)
  if spec is None:
    return []
  return [None if axis is None else str(axis) for axis in spec] + [None] * (array.ndim - len(spec))


def _layout(tree) -> dict:
  """Each leaf's partition spec and the shapes of its shards on the devices."""
  import jax
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {jax.tree_util.keystr(path): {'spec': _spec(leaf), 'shape': list(leaf.shape),
                                       'shards': [list(s.data.shape)
                                                  for s in leaf.addressable_shards]}
          for path, leaf in leaves}


def _prepare(directory: str, **overrides):
  from nst_jax import images
  from tests import helpers
  path = os.path.join(directory, 'content.png')
  if not os.path.exists(path):
    helpers.write_image(path, images.resize(helpers.example('content'), HEIGHT, WIDTH))
  return helpers.prepare(helpers.tiny_config(content_image=path, size=HEIGHT, init='gaussian',
                                             memory_size=10, **overrides))


def _loss_and_gradient(directory: str, **overrides) -> dict:
  """The style + content objective and its gradient, whole on one device and split by rows."""
  import jax
  from nst_jax import devices
  from nst_jax import problem
  prepared = _prepare(directory, **overrides)
  targets, image = prepared.scale_targets(HEIGHT, WIDTH), prepared.start_images(HEIGHT, WIDTH)
  value_and_grad = jax.jit(jax.vmap(jax.value_and_grad(lambda x, t: problem.objective(
      x, net=prepared.net, targets=t, program=prepared.program)[0])))
  first = jax.devices()[0]
  loss_1, grad_1 = jax.device_get(value_and_grad(jax.device_put(image, first),
                                                 jax.device_put(targets, first)))
  loss_n, grad_n = value_and_grad(devices.shard_space(image, image_size=(HEIGHT, WIDTH)),
                                  devices.shard_space(targets, image_size=(HEIGHT, WIDTH)))
  return {'loss_relative': float(abs(loss_n[0] - loss_1[0]) / abs(loss_1[0])),
          'grad_relative': float(np.linalg.norm(np.asarray(grad_n) - grad_1)
                                 / np.linalg.norm(grad_1)),
          'grad_spec': _spec(grad_n), 'loss': float(loss_1[0])}


def _state_layout(directory: str) -> dict:
  """Where initial_state and optimize_chunk put the state's arrays with shard='space'."""
  import jax.numpy as jnp
  from nst_jax import devices
  from nst_jax import loop
  prepared = _prepare(directory, chunk_size=2)
  place = lambda tree: devices.shard_space(tree, image_size=(HEIGHT, WIDTH))
  targets = place(prepared.scale_targets(HEIGHT, WIDTH))
  state = loop.initial_state(place(prepared.start_images(HEIGHT, WIDTH)), prepared.net, targets,
                             program=prepared.program, shard='space')
  initial = _layout(state)
  state, _ = loop.optimize_chunk(state, jnp.int32(2), prepared.net, targets,
                                 program=prepared.program, shard='space')
  return {'initial': initial, 'after_chunk': _layout(state)}


def _ten_steps(directory: str) -> dict:
  """10 lbfgs_fixed steps through loop.optimize, shard=batch and space.

  shard=batch pads the one problem to 4, each whole on a device of its own: the 1-device run.

  Content and total variation only: with the style term, L-BFGS's first curvature pair comes
  from a step of min(1, 1/|g|_1) ~ 1e-3 px, and the 1-device run itself moves tens of pixels
  apart in 10 steps when its start changes by 1e-6 px (measured), so summing a Gram's rows in
  another order cannot give the same image. Loss and gradient with style: ``_loss_and_gradient``.
  """
  from nst_jax import loop
  from nst_jax import pipeline
  seen = []
  original = loop.optimize_chunk

  def spy(state, *args, **kwargs):
    seen.append(_spec(state['image']))
    return original(state, *args, **kwargs)

  runs = {}
  loop.optimize_chunk = spy
  try:
    for shard in ('batch', 'space'):
      prepared = _prepare(directory, shard=shard, style_weight=0.0, tv_weight=1e-3, steps=10,
                          chunk_size=5)
      outcome = loop.optimize(prepared.whole_task(), pipeline.saving(prepared.plan, None))
      runs[shard] = (outcome.images, [r['loss'][0] for r in outcome.records])
  finally:
    loop.optimize_chunk = original
  (images_1, losses_1), (images_n, losses_n) = runs['batch'], runs['space']
  return {'image_difference': float(np.abs(images_n - images_1).max()),
          'image_moved': float(np.abs(images_1 - _prepare(directory).start_images(
              HEIGHT, WIDTH)).max()),
          'loss_relative': float(np.max(np.abs(np.subtract(losses_n, losses_1))
                                        / np.abs(losses_1))),
          'steps': len(losses_n), 'specs_seen': seen, 'shape': list(images_n.shape)}


def _planned_memory(directory: str) -> dict:
  """XLA's plan per device of the chunk at MEMORY_PX, one device and split by rows."""
  from nst_jax.benchmark import space
  prepared = _prepare(directory)
  size = (MEMORY_PX, MEMORY_PX)
  targets = prepared.scale_targets(*size)
  return {shard: space.planned_chunk_bytes(prepared, targets, size, shard=shard, chunk=1)[0]
          for shard in ('single', 'space')}


def _child(directory: str) -> None:
  import jax
  assert jax.device_count() == DEVICES, jax.devices()
  print(json.dumps({'loss_and_gradient': _loss_and_gradient(directory),
                    'tiled': _loss_and_gradient(directory, tile_size=TILE, tv_weight=1e-3),
                    'layout': _state_layout(directory), 'ten_steps': _ten_steps(directory),
                    'planned': _planned_memory(directory)}))


@pytest.fixture(scope='module')
def measured(tmp_path_factory) -> dict:
  env = dict(os.environ)
  env['XLA_FLAGS'] = (f'{env.get("XLA_FLAGS", "")} '
                      f'--xla_force_host_platform_device_count={DEVICES}').strip()
  code = (f'import sys; sys.path.insert(0, {_REPO!r}); '
          'from tests import test_space_sharding as t; t._child(sys.argv[1])')
  result = subprocess.run([sys.executable, '-c', code, str(tmp_path_factory.mktemp('space'))],
                          cwd=_REPO, env=env, capture_output=True, text=True, timeout=900,
                          check=False)
  assert result.returncode == 0, result.stderr[-4000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_loss_and_gradient_equal_the_one_device_run(measured):
  figures = measured['loss_and_gradient']
  assert figures['loss'] > 0
  assert figures['loss_relative'] < 1e-4 and figures['grad_relative'] < 1e-4, figures
  assert figures['grad_spec'][:2] == [None, 'space'], figures  # the gradient too, by rows


def test_tiles_over_rows_split_across_devices_equal_the_one_device_run(measured):
  # Each device holds a quarter of the rows; the tiles' windows cut across those quarters. The
  # tiled passes gather the image (every device evaluates every tile: the run says so), and
  # optimize_chunk splits the new state by rows again (the layout test).
  figures = measured['tiled']
  assert figures['loss'] > 0
  assert figures['loss_relative'] < 1e-4 and figures['grad_relative'] < 1e-4, figures


@pytest.mark.parametrize('when', ['initial', 'after_chunk'])
def test_the_image_and_its_history_are_split_by_rows(measured, when):
  layout = measured['layout'][when]
  rows = HEIGHT // DEVICES
  split = {path: leaf for path, leaf in layout.items() if leaf['shape'][-3:] == [HEIGHT, WIDTH, 3]}
  # The image, the last finite image and lbfgs_fixed's s, y, previous_params, previous_grad.
  assert {"['image']", "['last_finite']", "['opt_state'].s", "['opt_state'].y",
          "['opt_state'].previous_params", "['opt_state'].previous_grad"} <= set(split), layout
  for path, leaf in split.items():
    axis = len(leaf['shape']) - 3
    assert leaf['spec'][axis] == 'space' and leaf['spec'].count('space') == 1, (path, leaf)
    assert len(leaf['shards']) == DEVICES, (path, leaf)
    assert all(shard[axis] == rows and shard[axis + 1:] == [WIDTH, 3]
               for shard in leaf['shards']), (path, leaf)
  for path, leaf in layout.items():  # counters, rho, gamma...: whole on every device
    if path not in split:
      assert 'space' not in leaf['spec'] and all(shard == leaf['shape']
                                                 for shard in leaf['shards']), (path, leaf)


def test_ten_steps_equal_the_one_device_run(measured):
  figures = measured['ten_steps']
  assert figures['steps'] == 10 and figures['shape'] == [1, HEIGHT, WIDTH, 3]
  assert figures['image_moved'] > 50, figures  # the steps did change the picture
  assert figures['image_difference'] < 1, figures  # of 255
  assert figures['loss_relative'] < 1e-4, figures
  # loop.optimize ran the chunks on whole images for batch, on the row-split state for space.
  assert figures['specs_seen'] == ([['batch', None, None, None]] * 2
                                   + [[None, 'space', None, None]] * 2), figures


def test_each_device_plans_less_memory_than_one_device_alone(measured):
  planned = measured['planned']
  assert 0 < planned['space'] < planned['single'], planned


def test_space_refuses_the_laplacian_pyramid():
  from nst_jax import errors
  from nst_jax import plan
  from tests import helpers
  with pytest.raises(errors.UserError, match='shard=space .* no rows'):
    plan.from_config(helpers.tiny_config(shard='space', parameterization='laplacian'))
