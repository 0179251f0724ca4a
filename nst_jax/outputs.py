"""Outputs: the optimised images as the user sees them, and every file a run writes.

The result(s), the grid (content | styles | result per problem), the loss curve and intermediate
images; every write is atomic (:mod:`nst_jax.files`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from nst_jax import color
from nst_jax import images
from nst_jax import inputs
from nst_jax import report


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


def write(workdir: str, *, output: str, batch: inputs.Batch, results: Sequence[np.ndarray],
          records: Sequence[Mapping]) -> list[str]:
  """Writes the finished result(s), the grid and the loss curve; returns the paths written.

  ``results`` holds one finished image per problem (shapes may differ between problems).
  """
  paths = result_paths(workdir, output, len(results))
  for image, path in zip(results, paths):
    images.save(image, path)
  rows = [[batch.contents[i], *batch.styles[i], results[i]] for i in range(len(results))]
  grid_path = os.path.join(workdir, 'grid.png')
  images.save(images.grid(rows, height=min(256, results[0].shape[0])), grid_path)
  curve_path = os.path.join(workdir, 'loss_curve.png')
  report.loss_curve(records, curve_path)
  logs = sorted(name for name in os.listdir(workdir)
                if name.startswith('losses') and name.endswith('.jsonl'))
  return paths + [grid_path, curve_path] + [os.path.join(workdir, name) for name in logs]


def intermediate_writer(workdir: str, *, every: int, chunk_size: int, indices: Sequence[int],
                        n: int, finish: Callable[[np.ndarray], list[np.ndarray]]
                        ) -> Callable[[int, int, np.ndarray], None] | None:
  """``on_chunk`` for :func:`nst_jax.loop.optimize` writing images every ``every`` steps.

  Args:
    workdir: the output folder.
    every: the ``save_every`` setting (0: never; then None is returned).
    chunk_size: steps per chunk (an image is written after the chunk that passes a multiple).
    indices: the group's problems' positions in the whole batch (for file names).
    n: the whole batch's size.
    finish: turns the group's optimised images into finished ones.
  """
  if not every:
    return None

  def on_chunk(scale: int, step: int, optimized: np.ndarray) -> None:
    if step % every < chunk_size:
      for index, image in zip(indices, finish(optimized)):
        suffix = f'_{index}' if n > 1 else ''
        images.save(image, os.path.join(workdir, f'step_s{scale}_{step:05d}{suffix}.png'))

  return on_chunk
