"""Outputs: the optimised images as the user sees them, and every file a run writes.

The result(s), the grid (content | styles | result per problem), the loss curve, the metrics
(``metrics.json``; ``metrics_steps.jsonl`` for intermediate images), for a sweep over a weight the
trade-off curve and the contact sheet, and intermediate images; every write is atomic
(:mod:`nst_jax.files`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from nst_jax import color
from nst_jax import files
from nst_jax import images
from nst_jax import inputs
from nst_jax import metrics
from nst_jax import plan as plan_lib
from nst_jax import report

METRICS = 'metrics.json'
STEP_METRICS = 'metrics_steps.jsonl'
#: Longest side at which results are measured; larger ones are scaled down to it first.
METRICS_MAX_SIDE = 2048
TRADEOFF = 'tradeoff.png'
CONTACT_SHEET = 'contact_sheet.png'


def result_paths(workdir: str, output: str, n: int) -> list[str]:
  """The result file of each problem: ``result.png``, or ``result_0.png``, ... for N > 1."""
  if n == 1:
    return [os.path.join(workdir, output)]
  stem, extension = os.path.splitext(output)
  return [os.path.join(workdir, f'{stem}_{i}{extension}') for i in range(n)]


def finished(optimized: Sequence[np.ndarray], *, contents: Sequence[np.ndarray],
             preserve_color: str) -> list[np.ndarray]:
  """Optimised images as the user sees them (luminance mode puts the content's chroma back)."""
  out = []
  for image, content in zip(optimized, contents):
    if preserve_color == 'luminance':
      image = color.recombine(image, content=images.resize(content, *image.shape[:2]))
    out.append(np.clip(image, 0, 255))
  return out


class Measurer:
  """Measures finished images (:mod:`nst_jax.metrics`) against their problem's references.

  The content is resized to the result's size; the style is the problem's first style image as
  the run resizes (and colour-handles) it for a result of that size (:func:`inputs.scale_images`).
  The references' statistics are computed once per distinct image.

  Args:
    batch: the run's problems.
    images_plan: how the run sizes and colour-handles its images.
  """

  def __init__(self, *, batch: inputs.Batch, images_plan: plan_lib.ImagesPlan):
    self.batch = batch
    self.images_plan = images_plan
    self._statistics: dict[tuple, metrics.ImageStatistics] = {}

  def _reference(self, image: np.ndarray) -> metrics.ImageStatistics:
    # By value: a sweep's problems share one content and style, in arrays of their own.
    key = (image.shape, hashlib.sha256(np.ascontiguousarray(image).tobytes()).digest())
    if key not in self._statistics:
      self._statistics[key] = metrics.image_statistics(image)
    return self._statistics[key]

  def __call__(self, index: int, result: np.ndarray) -> dict[str, Any]:
    """Problem ``index``'s result measured: ``{'result', 'reference', 'ratio'}``.

    Every image is measured as an 8-bit file would hold it, so the figures can be reproduced
    from ``result.png`` and the content as the result gives ratios of exactly 1.
    """
    as_file = lambda image: images.to_uint8(image).astype(np.float32)
    height, width = result.shape[:2]
    content = images.resize(self.batch.contents[index], height, width)
    style = inputs.scale_images(self.batch, index, self.images_plan, height, width)[1][0]
    measured = measured_size(height, width)
    if measured != (height, width):
      result, content = (images.resize(image, *measured) for image in (result, content))
      style = images.resize(style, *measured_size(*style.shape[:2]))
    found = metrics.assess(metrics.image_statistics(as_file(result)),
                           content=self._reference(as_file(content)),
                           style=self._reference(as_file(style)))
    return found if measured == (height, width) else dict(found, measured_at=list(measured))


def measured_size(height: int, width: int) -> tuple[int, int]:
  """The size an image of ``height`` x ``width`` is measured at: itself, or scaled down to
  METRICS_MAX_SIDE on its longer side (the whole-image VGG pass of the metrics would otherwise
  need more memory than a tiled run's optimisation)."""
  if max(height, width) <= METRICS_MAX_SIDE:
    return height, width
  scale = METRICS_MAX_SIDE / max(height, width)
  return max(1, round(height * scale)), max(1, round(width * scale))


def metrics_note(height: int, width: int) -> str:
  """The line a run says when its results are measured smaller than they are ('' if not)."""
  measured = measured_size(height, width)
  if measured == (height, width):
    return ''
  return (f'metrics.json measures the {width}x{height} result scaled to {measured[1]}x'
          f'{measured[0]} (its "measured_at"): the metrics run VGG on the whole image, untiled')


def labels(batch_plan: plan_lib.BatchPlan, n: int) -> list[str]:
  """What tells each result of a batch apart (``style_weight=1000``; '' without a batch)."""
  if batch_plan.values:
    return [f'{batch_plan.over}={value:.4g}' for value in batch_plan.values]
  if batch_plan.over:
    return [f'{batch_plan.over} {index + 1}' for index in range(n)]
  return [''] * n


def _finite(value: Any) -> Any:
  """``value`` with every non-finite float (a diverged result's distance) as None."""
  if isinstance(value, dict):
    return {key: _finite(item) for key, item in value.items()}
  if isinstance(value, list):
    return [_finite(item) for item in value]
  return None if isinstance(value, float) and not np.isfinite(value) else value


def _json(value: Any) -> str:
  """Strict JSON (no NaN or Infinity, which many readers refuse)."""
  return json.dumps(_finite(value), allow_nan=False)


def write_metrics(path: str, measured: Sequence[Mapping[str, Any]], *,
                  batch_plan: plan_lib.BatchPlan, paths: Sequence[str]) -> None:
  """Writes ``metrics.json``: the definitions, then each result's metrics in batch order."""
  names = labels(batch_plan, len(measured))
  results = []
  for index, (measurement, result_path, label) in enumerate(zip(measured, paths, names)):
    entry = {'index': index, 'file': os.path.basename(result_path)}
    if label:
      entry['label'] = label
    if batch_plan.values:
      entry[batch_plan.over] = batch_plan.values[index]
    results.append(dict(entry, **measurement))
  document = {'style_layers': list(metrics.STYLE_LAYERS), 'content_layer': metrics.CONTENT_LAYER,
              'sliced_wasserstein': {'directions': metrics.SLICED_DIRECTIONS,
                                     'seed': metrics.SLICED_SEED},
              'batch_over': batch_plan.over, 'results': results}
  files.write_text(path, _json(document) + '\n')


def _sweep_files(workdir: str, *, batch_plan: plan_lib.BatchPlan, results: Sequence[np.ndarray],
                 measured: Sequence[Mapping[str, Any]]) -> list[str]:
  """The trade-off curve and the contact sheet of a batch over a weight ([] otherwise)."""
  if not batch_plan.over.endswith('_weight'):
    return []
  order = sorted(range(len(results)), key=lambda i: batch_plan.values[i])
  values = [f'{batch_plan.values[i]:.4g}' for i in order]
  tradeoff_path = os.path.join(workdir, TRADEOFF)
  report.tradeoff_curve([measured[i] for i in order], tradeoff_path, labels=values,
                        style_metrics=metrics.STYLE_METRICS,
                        title=f'{batch_plan.over}: content against style distance')
  sheet_path = os.path.join(workdir, CONTACT_SHEET)
  images.save(images.contact_sheet([results[i] for i in order],
                                   labels=[f'{batch_plan.over}={value}' for value in values],
                                   height=min(256, results[0].shape[0])), sheet_path)
  return [tradeoff_path, sheet_path]


def write(workdir: str, *, output: str, batch: inputs.Batch, images_plan: plan_lib.ImagesPlan,
          batch_plan: plan_lib.BatchPlan, results: Sequence[np.ndarray],
          records: Sequence[Mapping]) -> list[str]:
  """Writes every final file of a run; returns the paths written.

  The finished result(s), the grid, the loss curve, ``metrics.json`` and, for a batch over a
  weight, ``tradeoff.png`` and ``contact_sheet.png``.

  Args:
    workdir: the output folder.
    output: the result's file name.
    batch: the run's problems (the grid shows their contents and styles).
    images_plan: how the run sized its images (the metrics' references follow it).
    batch_plan: what the problems differ in (labels, the sweep).
    results: one finished image per problem (shapes may differ between problems).
    records: the loss log.
  """
  paths = result_paths(workdir, output, len(results))
  for image, path in zip(results, paths):
    images.save(image, path)
  rows = [[batch.contents[i], *batch.styles[i], results[i]] for i in range(len(results))]
  grid_path = os.path.join(workdir, 'grid.png')
  images.save(images.grid(rows, height=min(256, results[0].shape[0])), grid_path)
  curve_path = os.path.join(workdir, 'loss_curve.png')
  report.loss_curve(records, curve_path)
  measure = Measurer(batch=batch, images_plan=images_plan)
  measured = [measure(index, image) for index, image in enumerate(results)]
  metrics_path = os.path.join(workdir, METRICS)
  write_metrics(metrics_path, measured, batch_plan=batch_plan, paths=paths)
  sweep = _sweep_files(workdir, batch_plan=batch_plan, results=results, measured=measured)
  logs = sorted(name for name in os.listdir(workdir)
                if name.startswith('losses') and name.endswith('.jsonl'))
  return (paths + [grid_path, curve_path, metrics_path] + sweep
          + [os.path.join(workdir, name) for name in logs])


class StepMetrics:
  """``metrics_steps.jsonl``: the metrics of every intermediate image (``save_every``).

  One JSON line per result and save (``scale``, ``step`` within the scale, ``index``, then as in
  ``metrics.json``), sorted by scale, step and index, rewritten atomically after every save. A
  resumed run keeps the lines already written and replaces those of the steps it takes again.

  Args:
    path: the file.
    measure: measures one result.
    resume: whether the run resumes (otherwise an old file is replaced).
  """

  def __init__(self, path: str, *, measure: Measurer, resume: bool):
    self.path = path
    self.measure = measure
    self.lines: dict[tuple[int, int, int], str] = {}
    if resume and os.path.exists(path):
      with open(path, encoding='utf-8') as handle:
        for line in handle:
          if line.strip():
            record = json.loads(line)
            self.lines[record['scale'], record['step'], record['index']] = line.strip()

  def add(self, *, scale: int, step: int, indices: Sequence[int],
          finished_images: Sequence[np.ndarray]) -> None:
    """Measures the group's images after ``step`` steps of ``scale`` and rewrites the file."""
    for index, image in zip(indices, finished_images):
      record = dict(scale=scale, step=step, index=index, **self.measure(index, image))
      self.lines[scale, step, index] = _json(record)
    files.write_text(self.path, ''.join(self.lines[key] + '\n' for key in sorted(self.lines)))


def intermediate_writer(workdir: str, *, every: int, chunk_size: int, indices: Sequence[int],
                        n: int, finish: Callable[[np.ndarray], list[np.ndarray]],
                        step_metrics: StepMetrics | None = None
                        ) -> Callable[[int, int, np.ndarray], None] | None:
  """``on_chunk`` for :func:`nst_jax.loop.optimize` writing images every ``every`` steps.

  Args:
    workdir: the output folder.
    every: the ``save_every`` setting (0: never; then None is returned).
    chunk_size: steps per chunk (an image is written after the chunk that passes a multiple).
    indices: the group's problems' positions in the whole batch (for file names).
    n: the whole batch's size.
    finish: turns the group's optimised images into finished ones.
    step_metrics: where the intermediate images' metrics go (None: not measured).
  """
  if not every:
    return None

  def on_chunk(scale: int, step: int, optimized: np.ndarray) -> None:
    if step % every < chunk_size:
      finished_images = finish(optimized)
      for index, image in zip(indices, finished_images):
        suffix = f'_{index}' if n > 1 else ''
        images.save(image, os.path.join(workdir, f'step_s{scale}_{step:05d}{suffix}.png'))
      if step_metrics is not None:
        step_metrics.add(scale=scale, step=step, indices=indices, finished_images=finished_images)

  return on_chunk
