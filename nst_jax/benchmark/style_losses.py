"""Which style loss? (--style_losses): every style term on the embedded pairs, judged by metrics.

Each setting runs the default config (Gatys' content term, the default weights and optimiser) with
one style term swapped in, on astronaut x The Starry Night and chelsea x The Scream, square
--style_px, --style_steps steps in chunks of 10. Every setting's final image is measured with
:func:`nst_jax.metrics.evaluate` (Gram, Gaussian 2-Wasserstein and sliced Wasserstein distances
to the style summed over relu1_1..relu5_1, relu4_2 distance to the content) at equal steps, and at
equal wall time (the image of each setting's last chunk finished within the fastest setting's
total time). Results are written beside the table (--style_dir) for the README gallery.
"""

from __future__ import annotations

import os

from absl import flags

FLAGS = flags.FLAGS

#: (label, style term, the style entry's options and layers when they differ from the default,
#: top-level config overrides).
SETTINGS = (
    ('gram', 'gram', None, {}),
    ('wasserstein', 'wasserstein', {}, {}),
    ('sliced_wasserstein', 'sliced_wasserstein', {}, {}),
    ('histogram', 'histogram', {}, {}),
    ('mrf (relu3_1, relu4_1)', 'mrf', {'layers': ('block3_relu1', 'block4_relu1')}, {}),
    ('gram, laplacian pyramid', 'gram', None, {'parameterization': 'laplacian'}),
)
PAIRS = (('astronaut.jpg', 'starry_night.jpg'), ('chelsea.jpg', 'the_scream.jpg'))


def _config(content: str, style: str, term: str, entry: dict | None, overrides: dict):
  from nst_jax import config_files
  config = config_files.load_config_file('default')
  config.content_image, config.style_images = content, style
  config.size, config.square = FLAGS.style_px, True
  config.steps, config.chunk_size = FLAGS.style_steps, 10
  config.checkpoint_every, config.progress, config.compilation_cache = 0, 'none', ''
  config.losses.style.term = term
  if entry is not None:
    config.losses.style.options = {}
    if 'layers' in entry:
      config.losses.style.layers = entry['layers']
      config.losses.style.layer_weights = ()
  for key, value in overrides.items():
    config[key] = value
  return config


def _available(term: str, overrides: dict) -> str:
  """Why a setting cannot run in this checkout ('' when it can)."""
  from nst_jax import config_files
  from nst_jax import losses
  if term not in losses.TERMS:
    return f'no {term!r} term'
  missing = [key for key in overrides if key not in config_files.load_config_file('default')]
  return f'no {", ".join(missing)} field' if missing else ''


def _row(label: str, steps: int, seconds: float, measured: dict) -> str:
  style = ' | '.join(f'{measured[name]["sum"]:.4g}'
                     for name in ('gram', 'gaussian_w2', 'sliced_wasserstein'))
  return f'| {label} | {steps} | {seconds:.0f} s | {style} | {measured["content"]:.4g} |'


def _pair_table(content_name: str, style_name: str, directory: str) -> None:
  from nst_jax import config_files
  from nst_jax import images
  from nst_jax import metrics
  from nst_jax.benchmark import e2e
  px = FLAGS.style_px
  paths = []
  for name in (content_name, style_name):
    path = os.path.join(directory, f'{os.path.splitext(name)[0]}_{px}.png')
    images.save(images.resize(images.load(config_files.example_path(name)), px, px), path)
    paths.append(path)
  pixels = {'content': images.load(paths[0]), 'style': images.load(paths[1])}
  runs = {}
  for label, term, entry, overrides in SETTINGS:
    if FLAGS.style_settings and not any(part in label for part in FLAGS.style_settings):
      continue
    why = _available(term, overrides)
    if why:
      print(f'{label}: skipped ({why})', flush=True)
      continue
    slug = f'{os.path.splitext(content_name)[0]}_{label.split()[0].strip(",")}' + (
        '_laplacian' if overrides else '')
    runs[label] = e2e._e2e_run(_config(*paths, term, entry, overrides),
                               os.path.join(directory, slug))
    images.save(images.to_uint8(runs[label]['image']), os.path.join(directory, slug + '.jpg'))
  equal_time = min(run['seconds'] for run in runs.values())
  print(f'\n== {content_name} x {style_name}, {px} px, default config with each style term; '
        f'equal time = {equal_time:.0f} s (the fastest setting\'s {FLAGS.style_steps} steps) ==')
  print('| style term | steps | seconds | Gram | Gaussian W2 | sliced W | content |')
  print('|---|---|---|---|---|---|---|')
  for label, run in runs.items():
    measure = lambda image: metrics.evaluate(images.to_uint8(image), **pixels)['result']
    print(_row(label, FLAGS.style_steps, run['seconds'], measure(run['image'])), flush=True)
    at = [(s, step, image) for s, step, image in run['chunks'] if s <= equal_time]
    if at and at[-1][1] < FLAGS.style_steps:
      print(_row(f'{label}, equal time', at[-1][1], at[-1][0], measure(at[-1][2])), flush=True)
  reference = metrics.evaluate(pixels['content'], **pixels)['result']
  print(_row('the content itself (do nothing)', 0, 0.0, reference), flush=True)


def style_losses_table(directory: str) -> None:
  """The "Which style loss?" tables, one per embedded pair (see the module docstring)."""
  os.makedirs(directory, exist_ok=True)
  for content_name, style_name in PAIRS:
    _pair_table(content_name, style_name, directory)
