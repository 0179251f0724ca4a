"""The end-to-end comparison (--e2e): wall time and final-image distances of whole runs.

Every nst_jax setting runs the pipeline from the config to the final image; the single scale runs
on until the longest other setting's wall time, so each setting can be compared with it after
equal time. With --torch_python, pastiche runs too, through
:mod:`nst_jax.benchmark.torch_side`.
"""

from __future__ import annotations

import json
import os
import time

from absl import flags

from nst_jax.benchmark import measure
from nst_jax.benchmark import torch_side

FLAGS = flags.FLAGS


class _Enough(Exception):
  """Ends the single-scale run once it has run as long as the longest other setting."""


def _span(scales: int) -> str:
  """The side of a square run's coarsest and final scales at --e2e_px, as the plan makes them."""
  from nst_jax import plan as plan_lib
  px = FLAGS.e2e_px
  return f'{max(plan_lib.MIN_SIZE, round(px / 2 ** (scales - 1)))}-{px} px'


def _e2e_settings(with_torch: bool) -> list[tuple[str, dict]]:
  """(label, config overrides) of the nst_jax settings; the single scale first.

  The coarser scales run --e2e_steps // 8 steps each (25 at the default 200), and one 2-scale
  setting --e2e_steps // 20 (at least 1; 10: the one measured no worse on both distances at
  256 px, README "Measured"). Finer scales start from the upsampled coarser result plus the
  content's lost detail (scale_content_detail, the default) unless the setting says plain
  upsampling.
  """
  coarse, few = FLAGS.e2e_steps // 8, max(1, FLAGS.e2e_steps // 20)
  two = {'scales': 2, 'scale_factor': 2.0, 'coarse_steps': coarse}
  three = {'scales': 3, 'scale_factor': 2.0, 'coarse_steps': coarse}
  settings = [('single scale', {}),
              (f'2 scales ({_span(2)}), {coarse} coarse steps', two),
              (f'2 scales, {few} coarse steps', dict(two, coarse_steps=few)),
              ('2 scales, plain upsampling', dict(two, scale_content_detail=False)),
              (f'3 scales ({_span(3)}), {coarse} coarse steps', three)]
  if with_torch:
    settings.append(('2 scales, history 30', dict(two, memory_size=30)))
  return settings


def _steps_text(overrides: dict) -> str:
  """The steps at each scale of a setting, coarse to fine: e.g. 25+200."""
  coarse = [str(overrides.get('coarse_steps'))] * (overrides.get('scales', 1) - 1)
  return '+'.join(coarse + [str(FLAGS.e2e_steps)])


def _e2e_config(content: str, style: str, overrides: dict):
  config = measure.pastiche_config()
  config.content_image, config.style_images = content, style
  config.size, config.square = FLAGS.e2e_px, True
  config.steps = FLAGS.e2e_steps
  config.chunk_size = 10
  config.checkpoint_every = 0
  config.progress = 'none'
  config.compilation_cache = ''
  for key, value in overrides.items():
    config[key] = value
  return config


def _e2e_run(config, workdir: str, *, until_seconds: float | None = None) -> dict:
  """One nst_jax run, timed from after file reading (pastiche's setup is excluded too).

  Args:
    config: from :func:`_e2e_config`.
    workdir: for the loss log.
    until_seconds: keep going past ``config.steps`` until this wall time (the single scale).

  Returns:
    ``chunks``: (seconds, step, image) after every chunk of the final scale (compilation
    included); ``records``: the loss log; ``seconds``/``image``: at step --e2e_steps.
  """
  import jax
  from nst_jax import loop
  from nst_jax import outputs
  from nst_jax import pipeline
  from nst_jax import plan as plan_lib
  jax.clear_caches()  # every setting compiles its own programs, as a fresh process would
  steps = config.steps
  if until_seconds is not None:
    config.steps = 100 * steps  # stopped by _Enough long before
  prepared = pipeline.prepare(plan_lib.from_config(config))
  task = prepared.whole_task()
  os.makedirs(workdir, exist_ok=True)
  final, chunks = len(task.sizes) - 1, []
  start = time.perf_counter()

  def on_chunk(scale, step, optimized):
    seconds = time.perf_counter() - start
    if scale == final:
      chunks.append((seconds, step, outputs.finished(
          optimized, contents=prepared.batch.contents,
          preserve_color=prepared.plan.images.preserve_color)[0]))
      if until_seconds is not None and step >= steps and seconds >= until_seconds:
        raise _Enough

  try:
    loop.optimize(task, pipeline.saving(prepared.plan, workdir), on_chunk=on_chunk)
  except _Enough:
    pass
  with open(os.path.join(workdir, pipeline.LOSS_LOG)) as f:
    records = [json.loads(line) for line in f]
  seconds, _, image = next(chunk for chunk in chunks if chunk[1] >= steps)
  return {'chunks': chunks, 'records': records, 'seconds': seconds, 'image': image,
          'final_scale': final}


def _reached(run: dict, target: float, reference_seconds: float) -> str:
  """When ``run`` first reached pastiche's final loss (at the end of that step's chunk)."""
  import numpy as np
  losses = [(r['step'], r['loss'][0]) for r in run['records']
            if r['scale'] == run['final_scale'] and r['loss'][0] is not None]
  step = next((step for step, loss in losses if loss <= target), None)
  if step is None:
    return f'no (best {np.nanmin([loss for _, loss in losses]):.4g})'
  seconds = next(s for s, chunk_step, _ in run['chunks'] if chunk_step >= step)
  return f'step {step}, {seconds:.1f} s = {seconds / reference_seconds:.2f}x'


def _at_time(single: dict, seconds: float):
  """The single-scale run's last chunk finished within ``seconds``: (step, image), or None."""
  within = [(step, image) for s, step, image in single['chunks'] if s <= seconds]
  return within[-1] if within else None


def _e2e_pastiche(content: str, style: str, directory: str) -> dict:
  from nst_jax import images
  output = os.path.join(directory, 'pastiche.png')
  reference = torch_side.run_torch('e2e', '--content', content, '--style', style, '--steps',
                                   str(FLAGS.e2e_steps), '--output', output)
  return {'seconds': reference['times'][-1], 'setup': reference['setup_seconds'],
          'target': reference['losses'][-1], 'image': images.load(output),
          'torch': reference['torch'], 'threads': reference['threads']}


def e2e_table(directory: str) -> None:
  """End to end: wall time and final-image distances of every setting (see the package)."""
  from nst_jax import images
  from nst_jax import metrics
  content, style = measure.write_pair(directory, FLAGS.e2e_px)
  pixels = {'content': images.load(content), 'style': images.load(style)}

  def distances(image):
    return metrics.distances(images.to_uint8(image), **pixels)

  rows = []  # (label, steps, seconds, image, reached)
  pastiche = None
  if FLAGS.torch_python:
    pastiche = _e2e_pastiche(content, style, directory)
    rows.append((f'pastiche (PyTorch {pastiche["torch"]})', str(FLAGS.e2e_steps),
                 pastiche['seconds'], pastiche['image'], '-'))
  settings = _e2e_settings(with_torch=pastiche is not None)
  runs = {}
  for label, overrides in settings[1:]:
    runs[label] = _e2e_run(_e2e_config(content, style, overrides),
                           os.path.join(directory, f'run{len(runs)}'))
  longest = max([run['seconds'] for run in runs.values()]
                + [pastiche['seconds'] if pastiche else 0.0])
  single = _e2e_run(_e2e_config(content, style, {}), os.path.join(directory, 'single'),
                    until_seconds=longest)
  for label, overrides in settings:
    run = single if label == 'single scale' else runs[label]
    steps = _steps_text(overrides)
    reached = _reached(run, pastiche['target'], pastiche['seconds']) if pastiche else '-'
    rows.append((label, steps, run['seconds'], run['image'], reached))
  _print_e2e(rows, single, distances, pastiche)


def _print_e2e(rows, single: dict, distances, pastiche: dict | None) -> None:
  """The table: each row's distances beside the single-scale run's after equal wall time."""
  width = max(len(row[0]) for row in rows)
  title = (f'pastiche ({pastiche["threads"]} torch threads) reaches loss '
           f'{pastiche["target"]:.6g} in {FLAGS.e2e_steps} steps, its setup '
           f'({pastiche["setup"]:.1f} s) excluded' if pastiche else 'nst_jax only')
  print(f'\n== end to end at {FLAGS.e2e_px} px, pastiche loss, chunks of 10 steps; seconds '
        f'include compilation; {title} ==')
  print(f'{"setting":>{width}} {"steps":>12} {"seconds":>8} {"style":>10} {"content":>10} '
        + (f'{"reaches pastiche loss":>28} ' if pastiche else '')
        + f'| {"single scale at equal time: step":>33} {"style":>10} {"content":>10} '
        f'{"no worse on both":>17}')
  for label, steps, seconds, image, reached in rows:
    ours = distances(image)
    line = (f'{label:>{width}} {steps:>12} {seconds:>8.1f} {ours["style"]:>10.4g} '
            f'{ours["content"]:>10.4g} ' + (f'{reached:>28} ' if pastiche else '') + '| ')
    equal = None if label == 'single scale' else _at_time(single, seconds)
    if equal is None:
      line += f'{"-":>33}'
    else:
      theirs = distances(equal[1])
      better = ours['style'] <= theirs['style'] and ours['content'] <= theirs['content']
      line += (f'{equal[0]:>33} {theirs["style"]:>10.4g} {theirs["content"]:>10.4g} '
               f'{"yes" if better else "no":>17}')
    print(line, flush=True)
