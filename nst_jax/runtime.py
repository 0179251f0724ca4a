"""Process-wide run-time settings shared by every command: Ctrl-C handling, the XLA cache.

:func:`stop_requests` turns the first SIGINT/SIGTERM into a request to stop after the current
compiled chunk (the caller then writes its last good result); :func:`signals_ignored` protects the
final writes from a second Ctrl-C; :func:`use_compilation_cache` points JAX's persistent
compilation cache at a folder.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

import jax


def use_compilation_cache(directory: str) -> None:
  """Persistent XLA compilation cache in ``directory`` ('' = none); an unwritable one is skipped."""
  if not directory:
    return
  cache = os.path.expanduser(directory)
  try:
    os.makedirs(cache, exist_ok=True)
  except OSError:
    return  # an unwritable cache only costs compile time
  jax.config.update('jax_compilation_cache_dir', cache)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


@contextlib.contextmanager
def stop_requests() -> Iterator[list[int]]:
  """Turns the first SIGINT/SIGTERM into a request to stop after the current chunk."""
  requested: list[int] = []
  previous = {}

  def handler(signal_number, frame):
    requested.append(signal_number)
    # A second Ctrl-C interrupts at once (the last good image is still written by `run`).
    signal.signal(signal_number, previous[signal_number])

  try:
    for number in (signal.SIGINT, signal.SIGTERM):
      previous[number] = signal.signal(number, handler)
  except ValueError:  # not the main thread: no signal handling
    pass
  try:
    yield requested
  finally:
    for number, old in previous.items():
      signal.signal(number, old)


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
  """Ignores SIGINT/SIGTERM while the final images are written (main thread only)."""
  previous = {}
  try:
    for number in (signal.SIGINT, signal.SIGTERM):
      previous[number] = signal.signal(number, signal.SIG_IGN)
  except ValueError:  # not the main thread
    pass
  try:
    yield
  finally:
    for number, old in previous.items():
      signal.signal(number, old)
