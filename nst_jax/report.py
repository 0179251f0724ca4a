"""What a run shows and leaves behind besides the image: progress, the loss log and its plot.

* :class:`Progress`: a one-line bar on a terminal (step, loss terms, steps/s, time left), plain
  log lines otherwise.
* :class:`LossLog`: per-step losses as JSON lines, rewritten atomically after every chunk.
* :func:`loss_curve`: a PNG plot of the loss (log scale) drawn with Pillow, no matplotlib.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import numpy as np
from PIL import Image, ImageDraw

from nst_jax import files
from nst_jax import images

PROGRESS_MODES = ('auto', 'bar', 'lines', 'none')


def _format_seconds(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, minutes = seconds // 3600, seconds // 60 % 60
  return f'{hours}:{minutes:02d}:{seconds % 60:02d}' if hours else f'{minutes}:{seconds % 60:02d}'


class Progress:
  """Reports optimisation progress once per chunk.

  Args:
    total: total steps of the run (all scales).
    mode: one of :data:`PROGRESS_MODES`; ``auto`` draws a bar when ``stream`` is a terminal.
    stream: where to write (stderr by default).
  """

  def __init__(self, *, total: int, mode: str = 'auto', stream: TextIO | None = None):
    self.total = total
    self.stream = stream or sys.stderr
    if mode == 'auto':
      mode = 'bar' if self.stream.isatty() else 'lines'
    self.mode = mode
    self.start = time.perf_counter()
    self.done_at_start = 0

  def restart_clock(self, done: int) -> None:
    """Measures speed from now, e.g. after compilation or when resuming at step ``done``."""
    self.start = time.perf_counter()
    self.done_at_start = done

  def update(self, *, done: int, losses: Mapping[str, float], label: str = '') -> None:
    """Shows ``done`` of ``total`` steps and the latest loss terms."""
    if self.mode == 'none':
      return
    elapsed = time.perf_counter() - self.start
    rate = (done - self.done_at_start) / elapsed if elapsed > 0 else 0.0
    left = (self.total - done) / rate if rate > 0 else float('nan')
    terms = ' '.join(f'{name}={value:.4g}' for name, value in losses.items())
    eta = _format_seconds(left) if math.isfinite(left) else '?'
    if self.mode == 'bar':
      width = 24
      filled = int(width * done / max(self.total, 1))
      bar = '#' * filled + '-' * (width - filled)
      self.stream.write(f'\r{label}[{bar}] {done}/{self.total} {terms} {rate:.2f} steps/s '
                        f'left {eta}   ')
      if done >= self.total:
        self.stream.write('\n')
    else:
      self.stream.write(f'{label}step {done}/{self.total} {terms} {rate:.2f} steps/s '
                        f'left {eta}\n')
    self.stream.flush()

  def message(self, text: str) -> None:
    """Prints a line of its own (ending a bar first)."""
    if self.mode == 'none':
      return
    if self.mode == 'bar':
      self.stream.write('\n')
    self.stream.write(text + '\n')
    self.stream.flush()


class LossLog:
  """Per-step loss records, saved as JSON lines (one object per step) atomically.

  With ``path=None`` the records are kept in memory only (the Python API without a workdir).
  """

  def __init__(self, path: str | None, records: Sequence[Mapping[str, Any]] = ()):
    self.path = path
    self.records: list[dict[str, Any]] = [dict(r) for r in records]

  def add(self, record: Mapping[str, Any]) -> None:
    self.records.append(dict(record))

  def save(self) -> None:
    if self.path is None:
      return
    files.write_text(self.path, ''.join(json.dumps(r) + '\n' for r in self.records))


def loss_curve(values: Sequence[float], path: str, *, title: str = 'total loss',
               size: tuple[int, int] = (640, 400)) -> None:
  """Draws ``values`` against step on a log scale and writes the PNG atomically."""
  width, height = size
  margin = 48
  canvas = Image.new('RGB', size, 'white')
  draw = ImageDraw.Draw(canvas)
  finite = np.array([v for v in values if v is not None and np.isfinite(v) and v > 0], np.float64)
  draw.text((margin, 8), title, fill='black')
  draw.rectangle([margin, margin, width - 12, height - margin], outline='black')
  if finite.size >= 2:
    logs = np.log10(finite)
    low, high = logs.min(), logs.max()
    if high - low < 1e-9:
      high = low + 1.0
    xs = margin + (width - 12 - margin) * np.arange(finite.size) / (finite.size - 1)
    ys = height - margin - (height - 2 * margin) * (logs - low) / (high - low)
    draw.line(list(zip(xs.tolist(), ys.tolist())), fill=(200, 30, 30), width=2)
    draw.text((4, margin - 6), f'{10 ** high:.3g}', fill='black')
    draw.text((4, height - margin - 6), f'{10 ** low:.3g}', fill='black')
    draw.text((margin, height - margin + 8), f'step 1 ... {finite.size}', fill='black')
  files.write_bytes(path, images.encode(np.asarray(canvas, np.float32), path))
