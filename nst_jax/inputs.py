"""Inputs: the images a plan names, read and arranged as a batch of N problems.

Reads the content, style, mask and start images (paths, or arrays given to the Python API),
builds the batch (the N problems of one vmapped program differ in one thing: a style, a content
or a numeric field), splits it by content shape, and gives each problem's colour-handled images
and start image at any scale.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from nst_jax import color
from nst_jax import errors
from nst_jax import images
from nst_jax import plan as plan_lib

#: An image source: a file path, or an (H, W, 3) array of 0-255 RGB values.
Source = str | np.ndarray


@dataclasses.dataclass
class Batch:
  """N stylisation problems read from files (host arrays), one entry per problem."""

  contents: list[np.ndarray]                # full-size RGB
  styles: list[list[np.ndarray]]            # the problem's style images
  style_blend: list[np.ndarray]             # (S,) blend weights of those styles
  masks: list[list[np.ndarray]] | None      # per style, content-sized (H, W) in [0, 1]
  entry_weights: list[dict[str, float]]     # each loss entry's weight
  seeds: list[int]
  noise_scales: list[float]
  init_image: np.ndarray | None             # a given start image (init=file)

  def __len__(self) -> int:
    return len(self.contents)

  def select(self, indices: Sequence[int]) -> Batch:
    """The problems at ``indices``, in that order."""
    pick = lambda values: None if values is None else [values[i] for i in indices]
    return dataclasses.replace(
        self, contents=pick(self.contents), styles=pick(self.styles),
        style_blend=pick(self.style_blend), masks=pick(self.masks),
        entry_weights=pick(self.entry_weights), seeds=pick(self.seeds),
        noise_scales=pick(self.noise_scales))


def read_image(source: Source, *, what: str) -> np.ndarray:
  """A file's pixels, or a checked copy of an array, as float32 (H, W, 3) in 0-255."""
  if isinstance(source, str):
    return images.load(source, what=what)
  array = np.asarray(source)
  if array.ndim != 3 or array.shape[-1] != 3 or min(array.shape[:2]) < 1:
    raise errors.UserError(f'the {what} array has shape {array.shape}; give (height, width, 3) '
                           'RGB values in 0-255')
  if not np.isfinite(array).all():
    raise errors.UserError(f'the {what} array has non-finite values; give RGB values in 0-255')
  return array.astype(np.float32)


def _read_masks(sources: Sequence[Source], content_shape: tuple[int, ...]) -> list[np.ndarray]:
  masks = []
  for i, source in enumerate(sources):
    mask = read_image(source, what=f'style mask {i + 1}').mean(axis=-1) / 255.0
    if abs(mask.shape[0] / mask.shape[1] - content_shape[0] / content_shape[1]) > 0.02:
      name = f' {source!r}' if isinstance(source, str) else ''
      raise errors.UserError(
          f'style mask {i + 1}{name} is {mask.shape[1]}x{mask.shape[0]} but the content image is '
          f'{content_shape[1]}x{content_shape[0]}; masks must have the content\'s aspect ratio')
    masks.append(mask)
  return masks


def read_batch(images_plan: plan_lib.ImagesPlan, batch_plan: plan_lib.BatchPlan, *,
               entry_weights: dict[str, float], contents: Sequence[Source] = (),
               styles: Sequence[Source] = ()) -> Batch:
  """Reads every image the plan names and builds the batch of problems.

  Args:
    images_plan: which images, sizes and start image.
    batch_plan: what the problems differ in.
    entry_weights: each loss entry's weight, before batching.
    contents: content sources replacing ``images_plan.content_paths`` (the Python API's arrays).
    styles: style sources replacing ``images_plan.style_paths``.

  Raises:
    errors.UserError: an unreadable image, or masks that do not fit the content.
  """
  contents = [read_image(source, what='content image')
              for source in (contents or images_plan.content_paths)]
  style_images = [read_image(source, what=f'style image {i + 1}')
                  for i, source in enumerate(styles or images_plan.style_paths)]
  masks = None
  if images_plan.mask_paths:
    if len({content.shape[:2] for content in contents}) > 1:
      raise errors.UserError('--config.style_masks with content images of different shapes: '
                             'masks follow one content\'s shape; batch contents of one shape, or '
                             'no masks')
    masks = _read_masks(images_plan.mask_paths, contents[0].shape)
  init_image = (read_image(images_plan.init_path, what='init image')
                if images_plan.init == 'file' else None)
  blend = np.asarray(images_plan.style_blend, np.float32)
  over = batch_plan.over
  n = {'content': len(contents), 'style': len(style_images)}.get(over, len(batch_plan.values) or 1)
  batch = Batch(contents=[], styles=[], style_blend=[], masks=[] if masks else None,
                entry_weights=[], seeds=[], noise_scales=[], init_image=init_image)
  for index in range(n):
    batch.contents.append(contents[index] if over == 'content' else contents[0])
    if over == 'style':
      batch.styles.append([style_images[index]])
      batch.style_blend.append(np.ones(1, np.float32))
    else:
      batch.styles.append(style_images)
      batch.style_blend.append(blend)
    if masks:
      batch.masks.append([masks[index]] if over == 'style' else masks)
    weights = dict(entry_weights)
    seed, noise_scale = images_plan.seed, images_plan.init_noise_scale
    if batch_plan.values:
      value = batch_plan.values[index]
      if over == 'seed':
        seed = int(value)
      elif over == 'init_noise_scale':
        noise_scale = value
      else:
        weights[over[:-len('_weight')]] = value
    batch.entry_weights.append(weights)
    batch.seeds.append(seed)
    batch.noise_scales.append(noise_scale)
  return batch


def shape_groups(batch: Batch, images_plan: plan_lib.ImagesPlan
                 ) -> list[tuple[list[int], tuple[int, int]]]:
  """The batch's indices grouped by output size: one vmapped program per group.

  A batch over contents of different aspect ratios is optimised group by group, so every result
  keeps its own content's shape (never squashed to the first one's).

  Returns:
    (indices, (height, width)) per group, in order of first appearance.
  """
  groups: dict[tuple[int, int], list[int]] = {}
  for index, content in enumerate(batch.contents):
    groups.setdefault(images_plan.output_size(content.shape[:2]), []).append(index)
  return [(indices, size) for size, indices in groups.items()]


def scale_images(batch: Batch, index: int, images_plan: plan_lib.ImagesPlan, height: int,
                 width: int) -> tuple[np.ndarray, list[np.ndarray]]:
  """Problem ``index``'s content and style images for a height x width output, colour-handled."""
  content = images.resize(batch.contents[index], height, width)
  styles = []
  longer = max(height, width)
  for style in batch.styles[index]:
    if images_plan.square:
      style_height = style_width = round(longer * images_plan.style_scale)
    else:
      style_height, style_width = images.fit_size(
          *style.shape[:2], size=max(plan_lib.MIN_SIZE, round(longer * images_plan.style_scale)))
    style = images.resize(style, max(style_height, plan_lib.MIN_SIZE),
                          max(style_width, plan_lib.MIN_SIZE))
    if images_plan.preserve_color == 'histogram':
      style = color.match_histogram(style, reference=content)
    elif images_plan.preserve_color == 'luminance':
      style = color.match_luminance(style, content=content)
    styles.append(style)
  if images_plan.preserve_color == 'luminance':
    content = color.luminance(content)
  return content, styles


def start_images(batch: Batch, images_plan: plan_lib.ImagesPlan, *, mean_rgb: np.ndarray,
                 height: int, width: int) -> np.ndarray:
  """The start image of every problem at the first scale, (N, H, W, 3)."""
  out = []
  for index in range(len(batch)):
    content, styles = scale_images(batch, index, images_plan, height, width)
    rng = np.random.default_rng(batch.seeds[index])
    if images_plan.init == 'content':
      image = content
    elif images_plan.init == 'style':
      image = images.resize(styles[0], height, width)
    elif images_plan.init == 'uniform':
      image = mean_rgb + rng.uniform(-128.0, 128.0, (height, width, 3))
    elif images_plan.init == 'gaussian':
      image = mean_rgb + batch.noise_scales[index] * rng.standard_normal((height, width, 3))
    else:
      image = images.resize(batch.init_image, height, width)
      if images_plan.preserve_color == 'luminance':
        image = color.luminance(image)
    out.append(np.asarray(image, np.float32))
  return np.stack(out)
