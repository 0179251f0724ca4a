"""What a run shows and leaves behind besides the image: progress, the loss log and its plot.

* :class:`Progress`: a tqdm bar on a terminal (step, loss terms, steps/s, time left), plain
  log lines otherwise.
* :class:`LossLog`: per-step losses as JSON lines, rewritten atomically after every chunk.
* :func:`loss_curve`: a PNG plot (matplotlib, Agg) of the total and each weighted term on a log
  scale, scale boundaries marked; :func:`tradeoff_curve`: content against style distance of a
  sweep over a weight.
"""

from __future__ import annotations

import io
import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

import numpy as np
import tqdm

from nst_jax import files

PROGRESS_MODES = ('auto', 'bar', 'lines', 'none')


def _format_seconds(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, minutes = seconds // 3600, seconds // 60 % 60
  return f'{hours}:{minutes:02d}:{seconds % 60:02d}' if hours else f'{minutes}:{seconds % 60:02d}'


class Nowhere(io.TextIOBase):
  """A text stream that drops everything written to it (not a terminal)."""

  def writable(self) -> bool:
    return True

  def write(self, text: str) -> int:
    return len(text)


class Progress:
  """Reports optimisation progress once per chunk.

  Args:
    total: total steps of the run (all scales).
    mode: one of :data:`PROGRESS_MODES`; ``auto`` draws a bar when ``stream`` is a terminal.
    stream: where to write (stderr by default); :class:`Nowhere` for a process that must
      compute what it would show (the loss terms: a collective in a distributed run) but not
      show it.
  """

  def __init__(self, *, total: int, mode: str = 'auto', stream: TextIO | None = None):
    self.total = total
    self.stream = stream or sys.stderr
    if mode == 'auto':
      mode = 'bar' if self.stream.isatty() else 'lines'
    self.mode = mode
    self.start = time.perf_counter()
    self.done_at_start = 0
    self._bar: tqdm.tqdm | None = None  # opened at the first update, so messages come first

  def restart_clock(self, done: int) -> None:
    """Measures speed from now, e.g. after compilation or when resuming at step ``done``."""
    self.start = time.perf_counter()
    self.done_at_start = done

  def update(self, *, done: int, losses: Mapping[str, float], label: str = '') -> None:
    """Shows ``done`` of ``total`` steps and the latest loss terms."""
    if self.mode == 'none':
      return
    # The speed is ours, not tqdm's: measured from restart_clock, so it leaves out compilation.
    elapsed = time.perf_counter() - self.start
    rate = (done - self.done_at_start) / elapsed if elapsed > 0 else 0.0
    left = (self.total - done) / rate if rate > 0 else float('nan')
    terms = ' '.join(f'{name}={value:.4g}' for name, value in losses.items())
    eta = _format_seconds(left) if math.isfinite(left) else '?'
    if self.mode == 'bar':
      self._draw_bar(done=done, text=f'{terms} {rate:.2f} steps/s left {eta}', label=label)
    else:
      self.stream.write(f'{label}step {done}/{self.total} {terms} {rate:.2f} steps/s '
                        f'left {eta}\n')
      self.stream.flush()

  def _draw_bar(self, *, done: int, text: str, label: str) -> None:
    if self._bar is None:  # drawn at once, in its first state
      self._bar = tqdm.tqdm(total=self.total, initial=done, desc=label, postfix=text,
                            file=self.stream, dynamic_ncols=True, leave=True,
                            bar_format='{desc}{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}'
                            '{postfix}')
    else:
      self._bar.n = done
      self._bar.set_description_str(label, refresh=False)
      self._bar.set_postfix_str(text, refresh=False)
      self._bar.refresh()
    if done >= self.total:
      self._close_bar()

  def _close_bar(self) -> None:
    if self._bar is not None:
      self._bar.close()  # leaves the finished bar on its own line
      self._bar = None

  def message(self, text: str) -> None:
    """Prints a line of its own (above the bar while one is drawn)."""
    if self.mode == 'none':
      return
    if self._bar is not None:
      tqdm.tqdm.write(text, file=self.stream)
    else:
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


def _figure(size: tuple[int, int], dpi: int = 100):
  """A matplotlib Figure of ``size`` pixels drawn by Agg, without pyplot.

  Imported here, not at the top: matplotlib's import builds a font cache on disk, and importing
  nst_jax changes no process state (matplotlib.use or pyplot would also change a global backend).
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  figure = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
  FigureCanvasAgg(figure)
  return figure


def save_figure(figure, path: str) -> None:
  """Writes a Figure as a PNG of exactly its pixel size, atomically."""
  buffer = io.BytesIO()
  figure.canvas.print_png(buffer)
  files.write_bytes(path, buffer.getvalue())


def _positive(values) -> np.ndarray:
  """Floats with None, non-finite and non-positive values as NaN (gaps on a log axis)."""
  out = np.array([np.nan if v is None else v for v in values], np.float64)
  return np.where(np.isfinite(out) & (out > 0), out, np.nan)


def _mean_positive(values) -> float:
  positive = _positive(values)
  return float(np.nanmean(positive)) if np.isfinite(positive).any() else float('nan')


def _mark_scales(axes, records: Sequence[Mapping[str, Any]]) -> None:
  """A dashed line where a new scale starts (or the next content shape's program)."""
  for index in range(1, len(records)):
    before, after = records[index - 1], records[index]
    if after.get('scale') != before.get('scale') or after.get('step', 0) <= before.get('step', 0):
      axes.axvline(index + 0.5, color='gray', linestyle='--', linewidth=0.8)
      axes.annotate(f'scale {after.get("scale", 0) + 1}', (index + 1, 1),
                    xycoords=('data', 'axes fraction'), xytext=(2, -12),
                    textcoords='offset points', color='gray', fontsize=8)


def loss_figure(records: Sequence[Mapping[str, Any]], *, size: tuple[int, int] = (640, 400)):
  """The loss against step on a log scale: the total, each weighted term, scale boundaries.

  Args:
    records: the loss log (:class:`LossLog` records: ``scale``, ``step``, ``loss`` per problem,
      and ``parts`` per weighted term at the end of each chunk), in order; a batch is shown by
      its mean over problems.
    size: width and height in pixels.

  Returns:
    A matplotlib Figure (drawn by Agg; see :func:`save_figure`) with one line per term and the
    total, labelled for the legend.
  """
  from matplotlib import ticker  # see _figure
  figure = _figure(size)
  axes = figure.add_subplot()
  steps = np.arange(1, len(records) + 1)
  totals = [_mean_positive(r['loss']) for r in records]
  axes.plot(steps, totals, color='black', linewidth=1.5, label='total')
  # Terms are computed at chunk ends only (one more forward pass each): points joined by lines.
  ends = [(step, r['parts']) for step, r in zip(steps, records) if r.get('parts')]
  for name in dict.fromkeys(name for _, parts in ends for name in parts):
    marked = [(step, _mean_positive(parts[name])) for step, parts in ends if name in parts]
    axes.plot(*zip(*marked), marker='.', linewidth=1, label=name)
  _mark_scales(axes, records)
  axes.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  if np.isfinite(totals).any():
    axes.set_yscale('log')
  n = max([len(r['loss']) for r in records] or [1])
  axes.set_title('loss' + (f' (mean over {n} results)' if n > 1 else ''))
  axes.set_xlabel('step (all scales)')
  axes.set_ylabel('weighted loss')
  axes.grid(True, which='both', alpha=0.3)
  if records:
    axes.legend(loc='upper right', fontsize=8)
  figure.tight_layout()
  return figure


def loss_curve(records: Sequence[Mapping[str, Any]], path: str, *,
               size: tuple[int, int] = (640, 400)) -> None:
  """Draws :func:`loss_figure` and writes the PNG atomically."""
  save_figure(loss_figure(records, size=size), path)


def _log_if_wide(axes, which: str, values: Sequence[float]) -> None:
  """Log scale for an axis whose values are all positive and span a factor of 10 or more."""
  from matplotlib import ticker  # see _figure
  values = np.asarray(values, np.float64)
  if values.size and (values > 0).all() and values.max() >= 10 * values.min():
    axis = axes.xaxis if which == 'x' else axes.yaxis
    (axes.set_xscale if which == 'x' else axes.set_yscale)('log')
    # Labels at 1, 2 and 5 times each power of 10 only: matplotlib's labelled minor ticks of a
    # short log axis run into each other.
    axis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ticker.LogFormatterSciNotation(labelOnlyBase=False))
    axis.set_minor_formatter(ticker.NullFormatter())


def tradeoff_figure(measured: Sequence[Mapping[str, Any]], *, labels: Sequence[str],
                    style_metrics: Sequence[str], title: str,
                    size: tuple[int, int] = (1200, 420)):
  """Content distance against style distance of a sweep, one labelled point per result.

  The effectiveness/coherence plot of Yeh et al. (arXiv 1910.09447): down is closer to the
  content, left closer to the style; a dashed line marks the content image's own style distance
  (doing nothing). One panel per style distance.

  Args:
    measured: per result, ``{'result': {metric: {'sum': d, ...}, 'content': d}, 'reference':
      ...}`` (:func:`nst_jax.metrics.assess`), in the order the points are joined.
    labels: each result's label (e.g. the swept weight's value).
    style_metrics: the style distances to plot, one panel each.
    title: the figure's title.
    size: width and height in pixels.

  Returns:
    A matplotlib Figure (see :func:`save_figure`).
  """
  figure = _figure(size)
  panels = figure.subplots(1, len(style_metrics), sharey=True, squeeze=False)[0]
  content = [m['result']['content'] for m in measured]
  for axes, name in zip(panels, style_metrics):
    style = [m['result'][name]['sum'] for m in measured]
    reference = measured[0]['reference'][name]['sum']
    axes.plot(style, content, color='tab:blue', marker='o', linewidth=1)
    for x, y, label in zip(style, content, labels):
      axes.annotate(label, (x, y), xytext=(4, 4), textcoords='offset points', fontsize=8)
    axes.axvline(reference, color='gray', linestyle='--', linewidth=0.8,
                 label='content image (no style)')
    _log_if_wide(axes, 'x', style + [reference])
    axes.set_title(name, fontsize=10)
    axes.set_xlabel('style distance (sum over layers)')
    axes.grid(True, which='both', alpha=0.3)
  _log_if_wide(panels[0], 'y', content)
  panels[0].set_ylabel('content distance (relu4_2 MSE)')
  panels[0].legend(loc='best', fontsize=8)
  figure.suptitle(title)
  figure.tight_layout()
  return figure


def tradeoff_curve(measured: Sequence[Mapping[str, Any]], path: str, *, labels: Sequence[str],
                   style_metrics: Sequence[str], title: str) -> None:
  """Draws :func:`tradeoff_figure` and writes the PNG atomically."""
  save_figure(tradeoff_figure(measured, labels=labels, style_metrics=style_metrics, title=title),
              path)
