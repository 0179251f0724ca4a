"""nst_jax.fast: the transformation network, its training, its model files and applying it.

Most tests use a narrow network (4 channels, 1 residual block) and shallow loss layers at 32 px,
so that compiling and running stay within seconds on a 2-core CPU; the architecture test builds
Johnson et al.'s full network.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from nst_jax import errors
from nst_jax import vgg
from nst_jax import weights
from nst_jax.fast import apply
from nst_jax.fast import data
from nst_jax.fast import model_files
from nst_jax.fast import network
from nst_jax.fast import settings
from nst_jax.fast import steps
from nst_jax.fast import train
from tests import helpers

_REPO = helpers.ROOT
TINY = network.Architecture(channels=4, residual_blocks=1)


def tiny_config(**overrides):
  """configs/fast_train.py shrunk: 32 px, a narrow network, shallow layers, no cache or bar."""
  from configs import fast_train
  config = fast_train.get_config()
  config.size = 32
  config.style_size = 48
  config.batch_size = 2
  config.channels = TINY.channels
  config.residual_blocks = TINY.residual_blocks
  config.steps = 4
  config.chunk_size = 2
  config.save_every = 0
  config.checkpoint_every = 2
  config.progress = 'none'
  config.compilation_cache = ''
  config.losses.style.layers = ('block1_relu2', 'block2_relu2')
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.fixture(scope='module')
def net():
  return vgg.prepare(weights.load(None))


# --------------------------------------------------------------------------------------------
# The network.


def test_johnsons_architecture_keeps_the_size_and_stays_in_pixel_range():
  module = network.Architecture().module()
  image = jax.random.uniform(jax.random.key(1), (2, 48, 64, 3), maxval=255.0)
  params = network.init_params(network.Architecture(), key=jax.random.key(0), size=32)
  out = module.apply({'params': params}, image)
  assert out.shape == image.shape
  assert float(out.min()) >= 0.0 and float(out.max()) <= 255.0
  kernels = {name: module['Conv_0']['kernel'].shape for name, module in params.items()
             if name.startswith('ConvNorm')}
  # 9x9, two stride-2 3x3, (5 residual blocks), two upsampling 3x3, 9x9 to RGB.
  assert kernels == {'ConvNorm_0': (9, 9, 3, 32), 'ConvNorm_1': (3, 3, 32, 64),
                     'ConvNorm_2': (3, 3, 64, 128), 'ConvNorm_3': (3, 3, 128, 64),
                     'ConvNorm_4': (3, 3, 64, 32), 'ConvNorm_5': (9, 9, 32, 3)}
  blocks = [name for name in params if name.startswith('ResidualBlock')]
  assert len(blocks) == 5
  for name in blocks:
    assert [params[name][f'ConvNorm_{i}']['Conv_0']['kernel'].shape for i in range(2)] == [
        (3, 3, 128, 128)] * 2
  # Instance norm after every convolution but the last.
  assert all('InstanceNorm_0' in params[f'ConvNorm_{i}'] for i in range(5))
  assert 'InstanceNorm_0' not in params['ConvNorm_5']


def test_the_downsampling_convolutions_halve_and_upsampling_is_a_resize():
  x = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(1, 2, 3, 2)
  up = network.upsample(x)
  np.testing.assert_array_equal(np.asarray(up), np.repeat(np.repeat(np.asarray(x), 2, 1), 2, 2))
  layer = network.ConvNorm(8, 3, stride=2)
  variables = layer.init(jax.random.key(0), jnp.zeros((1, 32, 24, 3)))
  assert layer.apply(variables, jnp.zeros((1, 32, 24, 3))).shape == (1, 16, 12, 8)


@pytest.mark.parametrize('height, width, size, stride', [(17, 20, 3, 2), (16, 16, 3, 2),
                                                          (20, 18, 9, 1)])
def test_the_convolutions_gradients_equal_jaxs_own(height, width, size, stride):
  x = jax.random.normal(jax.random.key(0), (2, height, width, 3))
  kernel = jax.random.normal(jax.random.key(1), (size, size, 3, 5))
  dimensions = ('NHWC', 'HWIO', 'NHWC')
  reference = lambda x, k: jnp.sum(jnp.sin(jax.lax.conv_general_dilated(
      x, k, (stride, stride), 'VALID', dimension_numbers=dimensions)))
  ours = lambda x, k: jnp.sum(jnp.sin(network.conv(x, k, stride)))
  np.testing.assert_allclose(ours(x, kernel), reference(x, kernel), rtol=1e-6)
  for a, b in zip(jax.grad(ours, (0, 1))(x, kernel), jax.grad(reference, (0, 1))(x, kernel)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_training_in_a_loop_compiles_to_canonical_convolutions_only():
  # XLA:CPU runs convolutions of other layouts ~8x slower; inside a loop it leaves JAX's own
  # gradient convolutions in such layouts (see network.conv). Every convolution of a compiled
  # scan of training steps must be NHWC x HWIO -> NHWC.
  params = network.init_params(TINY, key=jax.random.key(0))
  photos = jnp.ones((2, 16, 16, 3))
  grad = jax.grad(lambda p: jnp.mean(TINY.module().apply({'params': p}, photos) ** 2))
  scan = jax.jit(lambda p: jax.lax.scan(
      lambda p, _: (jax.tree.map(lambda a, b: a - 1e-3 * b, p, grad(p)), None), p, None,
      length=2)[0])
  text = scan.lower(params).compile().as_text()
  labels = re.findall(r' convolution\(.*?dim_labels=(\S+?)[,\s]', text)
  assert len(labels) >= 3 * 6, labels  # forward, input and kernel gradients of every layer
  assert set(labels) == {'b01f_01io->b01f'}, sorted(set(labels))


def test_instance_norm_normalises_each_image_and_channel_over_its_positions():
  layer = network.ConvNorm(6, 3, relu=False)
  rng = np.random.default_rng(0)
  # Two images of very different brightness and contrast.
  x = np.stack([rng.uniform(0, 1, (20, 16, 3)), rng.uniform(0, 200, (20, 16, 3)) + 50])
  variables = layer.init(jax.random.key(0), jnp.asarray(x, jnp.float32))
  out = np.asarray(layer.apply(variables, jnp.asarray(x, jnp.float32)), np.float64)
  # Instance norm: per image and channel, mean 0 and variance 1 over positions (scale 1, bias 0
  # at initialisation); the same convolution without it, by hand, has other statistics.
  np.testing.assert_allclose(out.mean(axis=(1, 2)), 0.0, atol=1e-4)
  np.testing.assert_allclose(out.var(axis=(1, 2)), 1.0, rtol=1e-3)
  kernel = np.asarray(variables['params']['Conv_0']['kernel'], np.float64)
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='reflect')
  conv = sum(padded[:, i:i + 20, j:j + 16] @ kernel[i, j] for i in range(3) for j in range(3))
  assert 'bias' not in variables['params']['Conv_0']  # instance norm would cancel it
  expected = (conv - conv.mean(axis=(1, 2), keepdims=True)) / np.sqrt(
      conv.var(axis=(1, 2), keepdims=True) + 1e-5)
  np.testing.assert_allclose(out, expected, atol=2e-3)


# --------------------------------------------------------------------------------------------
# Training.


def test_crops_are_a_function_of_seed_and_step():
  crops = data.Crops(data.EMBEDDED_TRAIN, size=32, batch_size=3, crop_scale=2.0, seed=5)
  again = data.Crops(data.EMBEDDED_TRAIN, size=32, batch_size=3, crop_scale=2.0, seed=5)
  first = crops.chunk(4, 2)
  assert first.shape == (2, 3, 32, 32, 3) and first.dtype == np.uint8
  np.testing.assert_array_equal(first, again.chunk(4, 2))
  np.testing.assert_array_equal(first[1], again.batch(5))
  assert not np.array_equal(crops.batch(4), crops.batch(6))
  # Every photo is visited once per epoch.
  assert sorted(crops._file(s) for s in range(3)) == sorted(data.EMBEDDED_TRAIN)


def test_training_steps_lower_the_loss(net):
  # Twenty times the preset's style weight: at 32 px and 12 steps the preset's (chosen for 128 px
  # and 200 steps) leaves the loss almost all content, which Adam halves more slowly.
  plan = settings.train_plan(tiny_config(style_weight=1e-3))
  setup = steps.setup_of(plan)
  _, styles = train._styles(plan, net, setup)
  style = jax.tree.map(lambda x: x[0], styles)
  models = steps.init_models(setup=setup, seed=0, count=1)
  params, opt_state = (jax.tree.map(lambda x: x[0], models[k]) for k in ('params', 'opt_state'))
  batch = data.Crops(plan.train_paths, size=32, batch_size=2, crop_scale=1.0, seed=0).batch(0)
  first = None
  for index in range(12):
    params, opt_state, loss, parts = steps.train_step(
        params, opt_state, batch, steps.step_key(0, index), net=net, style=style, setup=setup)
    first = float(loss) if first is None else first
    assert np.isclose(float(loss), sum(float(v) for v in parts.values()), rtol=1e-5)
  assert float(loss) < 0.5 * first, (first, float(loss))


def _params(path):
  return jax.tree.leaves(model_files.load(path).params)


def test_a_run_writes_models_logs_samples_and_resumes_to_the_same_parameters(tmp_path):
  whole = train.run(settings.train_plan(tiny_config(save_every=2)), str(tmp_path / 'whole'))
  assert [os.path.basename(p) for p in whole] == ['model.msgpack']
  written = sorted(os.listdir(tmp_path / 'whole'))
  for name in ('checkpoint.msgpack', 'losses.jsonl', 'loss_curve.png', 'samples_000002.png',
               'samples_000004.png'):
    assert name in written
  records = [json.loads(line) for line in open(tmp_path / 'whole' / 'losses.jsonl')]
  assert [r['step'] for r in records] == [1, 2, 3, 4]
  # Two steps, then a resume to four: the same parameters as four steps at once.
  part = str(tmp_path / 'part')
  train.run(settings.train_plan(tiny_config(steps=2)), part)
  halfway = _params(os.path.join(part, 'model.msgpack'))
  resumed = train.run(settings.train_plan(tiny_config(resume=True)), part)
  assert model_files.load(resumed[0]).step == 4
  for a, b, c in zip(_params(whole[0]), _params(resumed[0]), halfway):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert any(not np.allclose(a, c) for a, c in zip(_params(whole[0]), halfway))
  assert len(open(os.path.join(part, 'losses.jsonl')).read().splitlines()) == 4


def test_ctrl_c_stops_after_the_chunk_and_keeps_the_model(tmp_path, monkeypatch):
  real = steps.train_chunk

  def chunk_then_ctrl_c(*args, **kwargs):
    out = real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C while the chunk runs
    return out

  monkeypatch.setattr(steps, 'train_chunk', chunk_then_ctrl_c)
  with pytest.raises(train.Stopped) as stopped:
    train.run(settings.train_plan(tiny_config(steps=6, checkpoint_every=0)), str(tmp_path))
  assert stopped.value.signal_number == signal.SIGINT and stopped.value.step == 2
  assert model_files.load(str(tmp_path / 'model.msgpack')).step == 2
  monkeypatch.setattr(steps, 'train_chunk', real)
  [path] = train.run(settings.train_plan(tiny_config(steps=6, resume=True)), str(tmp_path))
  assert model_files.load(path).step == 6


def test_a_resume_with_another_loss_is_refused(tmp_path):
  train.run(settings.train_plan(tiny_config(steps=2)), str(tmp_path))
  with pytest.raises(errors.UserError, match='another config'):
    train.run(settings.train_plan(tiny_config(resume=True, style_weight=1.0)), str(tmp_path))


def test_n_styles_in_one_program_equal_n_separate_trainings(net):
  scream = os.path.join(os.path.dirname(data.HELD_OUT), 'the_scream.jpg')
  starry = os.path.join(os.path.dirname(data.HELD_OUT), 'starry_night.jpg')
  both = settings.train_plan(tiny_config(style_images=f'{starry},{scream}', batch_over='style'))
  setup = steps.setup_of(both)
  _, styles = train._styles(both, net, setup)
  batches = data.Crops(both.train_paths, size=32, batch_size=2, crop_scale=2.0,
                       seed=0).chunk(0, 3)
  key = jax.random.key(0)
  together, _, _ = steps.train_chunk(steps.init_models(setup=setup, seed=0, count=2), batches,
                                     3, 0, key, net=net, styles=styles, setup=setup)
  for index in range(2):
    alone, _, _ = steps.train_chunk(
        steps.init_models(setup=setup, seed=0, count=1), batches, 3, 0, key, net=net,
        styles=jax.tree.map(lambda x, index=index: x[index:index + 1], styles), setup=setup)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(together['params']),
                            jax.tree.leaves(alone['params'])):
      np.testing.assert_allclose(np.asarray(a)[index], np.asarray(b)[0], rtol=1e-3, atol=5e-5,
                                 err_msg=jax.tree_util.keystr(path))
  first, second = (jax.tree.leaves(together['params'])[0][i] for i in range(2))
  assert not np.allclose(first, second)  # two styles, two different networks


def test_batch_over_style_writes_one_model_per_style(tmp_path):
  scream = os.path.join(os.path.dirname(data.HELD_OUT), 'the_scream.jpg')
  paths = train.run(settings.train_plan(tiny_config(
      steps=2, style_images=f'{data.HELD_OUT},{scream}', batch_over='style')), str(tmp_path))
  assert [os.path.basename(p) for p in paths] == ['model_0.msgpack', 'model_1.msgpack']
  assert model_files.load(paths[1]).style == scream


# --------------------------------------------------------------------------------------------
# Applying.


@pytest.fixture(scope='module')
def model_path(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('model') / 'model.msgpack')
  params = network.init_params(TINY, key=jax.random.key(3))
  model_files.save(path, model_files.Model(architecture=TINY, params=params, style='x.jpg',
                                           size=32, style_size=48, step=0))
  return path


def test_load_returns_the_networks_function_for_any_size(model_path):
  stylize = apply.load(model_path)
  image = np.random.default_rng(0).uniform(0, 255, (37, 50, 3)).astype(np.float32)
  out = stylize(image)
  assert out.shape == image.shape and out.dtype == np.float32
  params = model_files.load(model_path).params
  padded = np.pad(image, ((0, 3), (0, 2), (0, 0)), mode='reflect')
  direct = TINY.module().apply({'params': params}, padded[None])[0, :37, :50]
  np.testing.assert_allclose(out, np.asarray(direct), atol=1e-3)


def _gif(path, sizes=(24, 32), durations=(40, 120, 70)):
  # Textured frames: instance norm maps any flat image to the same output.
  rng = np.random.default_rng(0)
  frames = [Image.fromarray(rng.integers(0, 256, (*sizes, 3), np.uint8)) for _ in durations]
  frames[0].save(path, save_all=True, append_images=frames[1:], duration=list(durations), loop=3)
  return str(path)


def test_an_animated_gif_comes_back_as_a_gif_with_the_same_frames_and_timing(tmp_path,
                                                                             model_path):
  source = _gif(tmp_path / 'anim.gif')
  plan = settings.ApplyPlan(model_path=model_path, content=source, size=0, batch_size=2,
                            compute_dtype='float32', compilation_cache='')
  [out] = apply.run(plan, str(tmp_path / 'out'))
  assert out.endswith('anim.gif')
  with Image.open(out) as gif:
    assert gif.n_frames == 3 and gif.size == (32, 24) and gif.info.get('loop') == 3
    durations = []
    for index in range(gif.n_frames):
      gif.seek(index)
      durations.append(gif.info['duration'])
  assert durations == [40, 120, 70]


def test_a_folder_is_stylised_image_by_image(tmp_path, model_path):
  folder = tmp_path / 'photos'
  folder.mkdir()
  helpers.write_image(folder / 'a.png', np.full((32, 40, 3), 90))
  helpers.write_image(folder / 'b.png', np.full((36, 28, 3), 200))
  plan = settings.ApplyPlan(model_path=model_path, content=str(folder), size=64, batch_size=4,
                            compute_dtype='float32', compilation_cache='')
  written = apply.run(plan, str(tmp_path / 'out'))
  assert sorted(os.path.basename(p) for p in written) == ['a.png', 'b.png']
  assert Image.open(tmp_path / 'out' / 'a.png').size == (64, 51)


# --------------------------------------------------------------------------------------------
# Bad input: one line.


def test_a_folder_without_images_is_refused(tmp_path):
  (tmp_path / 'notes.txt').write_text('no photos here')
  with pytest.raises(errors.UserError, match='no images in'):
    settings.train_plan(tiny_config(train_images=str(tmp_path)))


def test_a_model_file_of_another_network_is_refused(tmp_path, model_path):
  with pytest.raises(errors.UserError, match='not an nst_jax fast-stylisation model'):
    apply.load(weights.embedded_path())
  other = str(tmp_path / 'other.msgpack')
  model = model_files.load(model_path)
  # The file says 4 channels, its parameters are of an 8-channel network.
  wider = network.init_params(network.Architecture(channels=8, residual_blocks=1),
                              key=jax.random.key(0))
  model_files.save(other, model_files.Model(architecture=model.architecture, params=wider,
                                            style='', size=32, style_size=48, step=0))
  with pytest.raises(errors.UserError, match='do not fit|a parameter of shape'):
    apply.load(other)


def test_a_gif_with_one_frame_is_refused(tmp_path, model_path):
  source = _gif(tmp_path / 'still.gif', durations=(100,))
  plan = settings.ApplyPlan(model_path=model_path, content=source, size=0, batch_size=2,
                            compute_dtype='float32', compilation_cache='')
  with pytest.raises(errors.UserError, match='one frame'):
    apply.run(plan, str(tmp_path / 'out'))


@pytest.mark.parametrize('overrides, message', [
    ({'size': 34}, 'multiple of 4'),
    ({'style_images': 'a.jpg,b.jpg'}, 'batch_over=style'),
    ({'batch_over': 'content'}, "over 'style' only"),
    ({'style_weight': 0.0}, 'no style term'),
])
def test_bad_training_settings_get_one_line(overrides, message):
  with pytest.raises(errors.UserError, match=message):
    settings.train_plan(tiny_config(**overrides))


def test_the_command_line_reports_a_missing_model_in_one_line(tmp_path):
  done = subprocess.run(
      [sys.executable, 'main.py', '--config=configs/fast_apply.py',
       f'--config.model={tmp_path / "missing.msgpack"}', f'--workdir={tmp_path}'],
      cwd=_REPO, capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == errors.EXIT_USER_ERROR
  assert 'cannot read the model' in done.stderr and 'Traceback' not in done.stderr


# --------------------------------------------------------------------------------------------
# Data parallel: 4 forced host devices give the parameters of 1 device.

DEVICES = 4


def _five_steps(directory: str) -> dict:
  """Five training steps of a batch of 4 (on however many devices this process has)."""
  plan = settings.train_plan(tiny_config(batch_size=4))
  setup = steps.setup_of(plan)
  net_ = vgg.prepare(weights.load(None))
  _, styles = train._styles(plan, net_, setup)
  photos, replicated = steps.mesh_placement(plan.batch_size)
  batches = data.Crops(plan.train_paths, size=32, batch_size=4, crop_scale=2.0,
                       seed=0).chunk(0, 5)
  batches = jax.device_put(batches, photos)
  models = jax.device_put(steps.init_models(setup=setup, seed=0, count=1), replicated)
  models, losses, _ = steps.train_chunk(models, batches, 5, 0, jax.random.key(0), net=net_,
                                        styles=styles, setup=setup)
  leaves = {str(i): np.asarray(leaf).tolist() for i, leaf in
            enumerate(jax.tree.leaves(models['params']))}
  return {'params': leaves, 'losses': np.asarray(losses).tolist(),
          'batch_devices': len(batches.sharding.device_set),
          'batch_shard_rows': [s.data.shape[1] for s in batches.addressable_shards],
          'params_devices': len(jax.tree.leaves(models['params'])[0].sharding.device_set)}


def _child(directory: str) -> None:
  assert jax.device_count() == DEVICES, jax.devices()
  print(json.dumps(_five_steps(directory)))


def test_data_parallel_training_on_four_devices_equals_one_device(tmp_path):
  env = dict(os.environ)
  env['XLA_FLAGS'] = (f'{env.get("XLA_FLAGS", "")} '
                      f'--xla_force_host_platform_device_count={DEVICES}').strip()
  code = (f'import sys; sys.path.insert(0, {_REPO!r}); '
          'from tests import test_fast as t; t._child(sys.argv[1])')
  done = subprocess.run([sys.executable, '-c', code, str(tmp_path)], cwd=_REPO, env=env,
                        capture_output=True, text=True, timeout=900, check=False)
  assert done.returncode == 0, done.stderr[-4000:]
  four = json.loads(done.stdout.strip().splitlines()[-1])
  one = _five_steps(str(tmp_path))
  # The photos really were split: one per device, and the networks replicated on all four.
  assert four['batch_devices'] == DEVICES and four['batch_shard_rows'] == [1] * DEVICES
  assert four['params_devices'] == DEVICES and one['batch_devices'] == 1
  np.testing.assert_allclose(four['losses'], one['losses'], rtol=1e-4)
  # Adam moves every parameter by about the learning rate (1e-3) a step, whatever the gradient's
  # size: summation-order rounding in a tiny gradient can move a parameter by a few percent of a
  # step, so the tolerance is 5% of one step.
  for name, leaf in one['params'].items():
    np.testing.assert_allclose(four['params'][name], leaf, rtol=1e-3, atol=5e-5)


def test_the_fast_benchmark_prints_training_stylising_and_the_comparison(tmp_path):
  # Tiny: one 32 px training step, stylising at 256/512 px, the comparison at 64 px.
  path = str(tmp_path / 'model.msgpack')
  model_files.save(path, model_files.Model(
      architecture=TINY, params=network.init_params(TINY, key=jax.random.key(3)),
      style=os.path.join(os.path.dirname(data.HELD_OUT), 'starry_night.jpg'), size=32,
      style_size=48, step=7))
  done = subprocess.run(
      [sys.executable, '-m', 'nst_jax.benchmark', '--sections=fast', '--fast_sizes=32',
       '--chunk=1', '--repeats=1', f'--fast_model={path}', '--fast_px=64'],
      cwd=_REPO, capture_output=True, text=True, timeout=900, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  out = done.stdout
  assert re.search(r'32 px\s+\d+\.\d+ s/step', out), out
  assert re.search(r'512 px\s+\d+\.\d+ s\n', out), out
  assert 'trained 7 steps at 32 px' in out, out
  rows = {line[:34].strip(): line[34:].split() for line in out.splitlines()
          if line.startswith(('fast network', 'optimisation', 'the photo itself'))}
  assert set(rows) == {'fast network', 'optimisation (default config)', 'the photo itself'}, out
  assert re.search(r'speed-up: the fast network is \d+x faster than optimising', out), out
  # The optimisation moves towards the style; the photo itself is at content distance 0.
  assert float(rows['optimisation (default config)'][1]) < float(rows['the photo itself'][0])
  assert float(rows['the photo itself'][1]) == 0.0
