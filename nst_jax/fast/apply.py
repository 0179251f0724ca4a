"""Stylising with a trained fast network: arrays, image files, folders and animated GIFs.

:func:`load` is the Python API (a model file -> a function image -> image). :func:`run` is
``python main.py --config=configs/fast_apply.py``: one image, every image of a folder, or every
frame of an animated GIF, written into the workdir (a GIF back as a GIF with the same frame
durations and loop count). Images of one shape go through the network in batches of
``batch_size`` (the last batch padded, so one compiled program serves them all).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageSequence

from nst_jax import errors
from nst_jax import files
from nst_jax import images
from nst_jax import runtime
from nst_jax.fast import data
from nst_jax.fast import model_files
from nst_jax.fast import network
from nst_jax.fast import settings


@functools.partial(jax.jit, static_argnames=('architecture', 'dtype'))
def _forward(params: Any, batch: jax.Array, *, architecture: network.Architecture,
             dtype: str) -> jax.Array:
  return architecture.module(jnp.dtype(dtype)).apply({'params': params}, batch)


def stylize_batch(params: Any, batch: np.ndarray | jax.Array, *,
                  architecture: network.Architecture, dtype: str = 'float32') -> jax.Array:
  """The network's output for (N, H, W, 3) images in 0-255, any H and W.

  Sides that are not multiples of :data:`nst_jax.fast.network.MULTIPLE` are padded by reflection
  and the output cropped back.
  """
  batch = jnp.asarray(batch, jnp.float32)
  height, width = batch.shape[1:3]
  pad_h, pad_w = -height % network.MULTIPLE, -width % network.MULTIPLE
  if pad_h or pad_w:
    batch = jnp.pad(batch, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode='reflect'
                    if min(height, width) > max(pad_h, pad_w) else 'edge')
  return _forward(params, batch, architecture=architecture, dtype=dtype)[:, :height, :width]


def load(path: str, *, dtype: str = 'float32') -> Callable[[np.ndarray], np.ndarray]:
  """A trained model as a function: (H, W, 3) RGB in 0-255 -> stylised (H, W, 3) float32 in 0-255.

  Also takes a batch (N, H, W, 3). Compiled once per input shape.

  Raises:
    errors.UserError: the file is missing or not a model written by fast training.
  """
  model = model_files.load(path)
  params = jax.device_put(model.params)

  def stylize(image: np.ndarray) -> np.ndarray:
    pixels = np.asarray(image, np.float32)
    single = pixels.ndim == 3
    out = stylize_batch(params, pixels[None] if single else pixels,
                        architecture=model.architecture, dtype=dtype)
    out = np.asarray(out)
    return out[0] if single else out

  stylize.model = model
  return stylize


def _batches(frames: Sequence[np.ndarray], stylize: Callable, batch_size: int) -> list[np.ndarray]:
  """Stylises same-shaped frames ``batch_size`` at a time (the last batch padded)."""
  out = []
  for start in range(0, len(frames), batch_size):
    chunk = np.stack(frames[start:start + batch_size])
    pad = batch_size - len(chunk)
    if pad and len(frames) > batch_size:  # keep one compiled shape
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
    out += list(stylize(chunk)[:batch_size - pad])
  return out


def _sized(pixels: np.ndarray, size: int) -> np.ndarray:
  if not size:
    return pixels
  return images.resize(pixels, *images.fit_size(*pixels.shape[:2], size=size))


def read_gif(path: str) -> tuple[list[np.ndarray], list[int], int]:
  """An animated GIF's frames (RGB float32), each frame's duration in ms, and its loop count.

  Raises:
    errors.UserError: not readable, or only one frame (stylise it as an image).
  """
  try:
    with Image.open(path) as gif:
      frames, durations = [], []
      for frame in ImageSequence.Iterator(gif):
        durations.append(int(frame.info.get('duration', gif.info.get('duration', 100))))
        frames.append(np.asarray(frame.convert('RGB'), np.float32))
      loop = int(gif.info.get('loop', 0))
  except OSError as exc:
    raise errors.UserError(f'cannot read the GIF {path!r}: {exc}') from None
  if len(frames) < 2:
    raise errors.UserError(f'{path!r} is a GIF with one frame, not an animation; convert it to '
                           'PNG (or give a GIF of several frames) to stylise it')
  return frames, durations, loop


def write_gif(path: str, frames: Sequence[np.ndarray], *, durations: Sequence[int],
              loop: int) -> None:
  """Writes frames as an animated GIF (atomically) with these durations (ms) and loop count.

  Pillow merges consecutive identical frames into one (adding their durations), so a stylised
  animation keeps its timing even then; distinct frames are kept one for one.
  """
  pictures = [Image.fromarray(images.to_uint8(frame)) for frame in frames]
  with files.atomic_write(path) as handle:
    pictures[0].save(handle, format='GIF', save_all=True, append_images=pictures[1:],
                     duration=list(durations), loop=loop, disposal=2)


def _is_gif(path: str) -> bool:
  return os.path.splitext(path)[1].lower() == '.gif'


def _inputs(content: str) -> list[str]:
  if os.path.isdir(content):
    return list(data.find(content))  # one line if the folder holds no image
  if not os.path.isfile(content):
    raise errors.UserError(f'--config.content_image={content!r} is not a file or folder')
  return [content]


def run(plan: settings.ApplyPlan, workdir: str) -> list[str]:
  """Stylises ``plan.content`` (image, folder or GIF) into ``workdir``; returns the files written."""
  runtime.use_compilation_cache(plan.compilation_cache)
  stylize = load(plan.model_path, dtype=plan.compute_dtype)
  sources = _inputs(plan.content)
  files.ensure_directory(workdir)
  written = []
  start = time.perf_counter()
  single = len(sources) == 1 and not os.path.isdir(plan.content)
  by_shape: dict[tuple[int, ...], list[tuple[str, np.ndarray]]] = {}
  for path in sources:
    if _is_gif(path) and (single or _gif_frames(path) > 1):
      frames, durations, loop = read_gif(path)
      frames = [_sized(frame, plan.size) for frame in frames]
      out = _batches(frames, stylize, plan.batch_size)
      target = os.path.join(workdir, os.path.splitext(os.path.basename(path))[0] + '.gif')
      write_gif(target, out, durations=durations, loop=loop)
      written.append(target)
      print(f'{path}: {len(frames)} frames -> {target}')
      continue
    pixels = _sized(images.load(path, what='content image'), plan.size)
    by_shape.setdefault(pixels.shape, []).append((path, pixels))
  for group in by_shape.values():
    out = _batches([pixels for _, pixels in group], stylize, plan.batch_size)
    for (path, _), result in zip(group, out):
      name = 'result.png' if single else os.path.splitext(os.path.basename(path))[0] + '.png'
      target = os.path.join(workdir, name)
      images.save(result, target)
      written.append(target)
  print(f'stylised {len(sources)} input(s) with {plan.model_path} in '
        f'{time.perf_counter() - start:.1f} s (compilation included) -> {workdir}')
  return written


def _gif_frames(path: str) -> int:
  try:
    with Image.open(path) as gif:
      return int(getattr(gif, 'n_frames', 1))
  except OSError:
    return 1
