"""The fast-stylisation table (--sections=fast): training steps, stylising, against optimising.

* Seconds per training step (batch --fast_batch, Johnson's network and the configs/fast_train.py
  loss) at each of --fast_sizes, timed over a compiled chunk of --chunk steps after compiling.
* Seconds to stylise one image at 256 and 512 px with a model (--fast_model, or a freshly
  initialised network: the time does not depend on the weights), compiled beforehand.
* With --fast_model: the model's result and the default optimisation's (configs/default.py, its
  300 L-BFGS steps, timed with compilation) on the embedded coffee photo (never trained on) and
  the model's style image at each of --fast_px, with nst_jax.metrics' distances of both and the
  speed-up (the network's seconds compiled; its first call, compiling, is printed apart).
"""

from __future__ import annotations

import os
import time

from absl import flags

from nst_jax.benchmark import measure

FLAGS = flags.FLAGS


def _train_seconds(size: int) -> float:
  import jax
  import numpy as np
  from nst_jax import config_files
  from nst_jax import vgg
  from nst_jax import weights
  from nst_jax.fast import data
  from nst_jax.fast import settings
  from nst_jax.fast import steps
  from nst_jax.fast import train
  config = config_files.load_config_file('fast_train')
  config.size, config.batch_size = size, FLAGS.fast_batch
  plan = settings.train_plan(config)
  setup = steps.setup_of(plan)
  net = vgg.prepare(weights.load(None))
  _, styles = train._styles(plan, net, setup)  # pylint: disable=protected-access
  batches = data.Crops(plan.train_paths, size=size, batch_size=plan.batch_size,
                       crop_scale=plan.crop_scale, seed=0).chunk(0, FLAGS.chunk)
  models = steps.init_models(setup=setup, seed=0, count=1)
  key = jax.random.key(0)
  run = lambda: jax.block_until_ready(steps.train_chunk(
      models, batches, FLAGS.chunk, 0, key, net=net, styles=styles, setup=setup)[1])
  losses = np.asarray(run())  # compiles
  assert np.isfinite(losses).all(), losses
  return measure.median_seconds(run, FLAGS.repeats) / FLAGS.chunk


def _apply_seconds(stylize, size: int) -> float:
  import numpy as np
  image = np.random.default_rng(0).uniform(0, 255, (size, size, 3)).astype(np.float32)
  stylize(image)  # compiles
  return measure.median_seconds(lambda: stylize(image), FLAGS.repeats)


def _stylizer(directory: str):
  import jax
  from nst_jax.fast import apply
  from nst_jax.fast import model_files
  from nst_jax.fast import network
  if FLAGS.fast_model:
    return apply.load(FLAGS.fast_model)
  path = os.path.join(directory, 'fresh.msgpack')
  architecture = network.Architecture()
  model_files.save(path, model_files.Model(
      architecture=architecture, params=network.init_params(architecture, key=jax.random.key(0)),
      style='', size=0, style_size=0, step=0))
  return apply.load(path)


def _against_optimisation(stylize, directory: str, px: int) -> None:
  from nst_jax import api
  from nst_jax import images
  from nst_jax import metrics
  from nst_jax.fast import data
  model = stylize.model
  os.makedirs(directory, exist_ok=True)
  content = images.load(data.HELD_OUT)
  content = images.resize(content, *images.fit_size(*content.shape[:2], size=px))
  style = images.load(model.style)
  start = time.perf_counter()
  fast = stylize(content)
  first_seconds = time.perf_counter() - start
  fast_seconds = measure.median_seconds(lambda: stylize(content), FLAGS.repeats)
  start = time.perf_counter()
  optimised = api.stylize(content, style, size=px, progress='none', compilation_cache='',
                          workdir=os.path.join(directory, f'optimised_{px}'))
  optimise_seconds = time.perf_counter() - start
  images.save(fast, os.path.join(directory, f'fast_{px}.png'))
  images.save(optimised, os.path.join(directory, f'optimised_{px}.png'))
  print(f'\ncoffee (never trained on) x {os.path.basename(model.style)} at {px} px; '
        f'model trained {model.step} steps at {model.size} px:')
  print(f'{"result":<34} {"seconds":>9} {"style (Gram)":>13} {"content (relu4_2)":>18}')
  for label, result, seconds in (('fast network', fast, fast_seconds),
                                 ('optimisation (default config)', optimised, optimise_seconds)):
    found = metrics.distances(result, content=content, style=style)
    print(f'{label:<34} {seconds:>9.2f} {found["style"]:>13.4g} {found["content"]:>18.4g}')
  found = metrics.distances(content, content=content, style=style)
  print(f'{"the photo itself":<34} {"":>9} {found["style"]:>13.4g} {found["content"]:>18.4g}')
  print(f'speed-up: the fast network is {optimise_seconds / fast_seconds:.0f}x faster than '
        f'optimising (its first call, compiling: {first_seconds:.2f} s)')


def fast_table(directory: str) -> None:
  """Prints the fast-stylisation figures (see the module docstring)."""
  print(f'\nfast stylisation: training step, batch {FLAGS.fast_batch} (seconds)')
  for size in FLAGS.fast_sizes:
    print(f'  {int(size):>5} px  {_train_seconds(int(size)):8.3f} s/step')
  stylize = _stylizer(directory)
  print('stylising one image with a trained network (seconds, compiled beforehand)')
  for size in (256, 512):
    print(f'  {size:>5} px  {_apply_seconds(stylize, size):8.3f} s')
  if FLAGS.fast_model:
    for px in FLAGS.fast_px:
      _against_optimisation(stylize, FLAGS.fast_dir or directory, int(px))
