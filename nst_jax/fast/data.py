"""Training images for the fast network: which files, and each step's batch of random crops.

Every step's batch is a function of (seed, step) alone, so a resumed run sees the same batches as an
uninterrupted one: the files are visited in a fresh random order each epoch (a permutation drawn
from the seed and the epoch), and each sample's scale and crop come from the seed and the sample's
number. A file is resized so its shorter side is ``size`` times a random factor in
[1, ``crop_scale``] (objects at several scales; Johnson et al. resized COCO to 256 x 256 instead),
then a random ``size`` x ``size`` crop is taken. Horizontal flips happen on the device, in the
train step, from its PRNG key. Batches are uint8 (a quarter of float32's transfer).
"""

from __future__ import annotations

import functools
import glob
import os
from collections.abc import Sequence

import numpy as np

from nst_jax import errors
from nst_jax import images

#: File name extensions read as training images (case-insensitive).
EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')
_EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'assets',
                         'examples')
#: The embedded photos trained on when no folder is given (paintings are styles, not content).
EMBEDDED_TRAIN = tuple(os.path.join(_EXAMPLES, name)
                       for name in ('astronaut.jpg', 'chelsea.jpg', 'rocket.jpg'))
#: An embedded photo never trained on, shown in the samples grid (Rachel Michetti, CC0).
HELD_OUT = os.path.join(_EXAMPLES, 'coffee.jpg')
#: Files decoded once and kept in memory when there are at most this many (the embedded demo);
#: a large folder (COCO: 83k) is read from disk per sample.
_CACHED_FILES = 64


def _has_image_extension(path: str) -> bool:
  return os.path.splitext(path)[1].lower() in EXTENSIONS


def find(spec: str) -> tuple[str, ...]:
  """The image files a ``train_images`` setting names: a folder, a glob, or comma-separated paths.

  Raises:
    errors.UserError: nothing matches, or the folder holds no image.
  """
  if not spec:
    return EMBEDDED_TRAIN
  paths: list[str] = []
  for part in (item.strip() for item in spec.split(',') if item.strip()):
    part = os.path.expanduser(part)
    if os.path.isdir(part):
      found = sorted(os.path.join(root, name) for root, _, names in os.walk(part)
                     for name in names if _has_image_extension(name))
      if not found:
        raise errors.UserError(f'no images in --config.train_images={part!r} (looked for '
                               f'{", ".join(EXTENSIONS)} in it and its subfolders); point it at '
                               'a folder of photos, e.g. COCO train2014')
      paths += found
    elif any(char in part for char in '*?['):
      found = sorted(path for path in glob.glob(part, recursive=True)
                     if _has_image_extension(path))
      if not found:
        raise errors.UserError(f'no image files match --config.train_images={part!r}; check the '
                               'pattern (quote it so the shell does not expand it)')
      paths += found
    elif os.path.isfile(part):
      paths.append(part)
    else:
      raise errors.UserError(f'--config.train_images: {part!r} is not a file, folder or glob')
  return tuple(paths)


@functools.lru_cache(maxsize=_CACHED_FILES)
def _decoded(path: str) -> np.ndarray:
  return images.load(path, what='training image')


class Crops:
  """Random crops of ``paths``: :meth:`batch` (one step's) and :meth:`chunk` (several steps')."""

  def __init__(self, paths: Sequence[str], *, size: int, batch_size: int, crop_scale: float,
               seed: int):
    self.paths = tuple(paths)
    self.size, self.batch_size, self.crop_scale, self.seed = size, batch_size, crop_scale, seed
    self._cache = len(self.paths) <= _CACHED_FILES

  def _file(self, sample: int) -> str:
    n = len(self.paths)
    epoch, position = divmod(sample, n)
    order = np.random.default_rng([self.seed, 1, epoch]).permutation(n)
    return self.paths[order[position]]

  def sample(self, sample: int) -> np.ndarray:
    """The ``sample``-th crop of the run: (size, size, 3) uint8."""
    rng = np.random.default_rng([self.seed, 2, sample])
    factor = rng.uniform(1.0, self.crop_scale)
    path = self._file(sample)
    pixels = _decoded(path) if self._cache else images.load(path, what='training image')
    height, width = pixels.shape[:2]
    scale = self.size * factor / min(height, width)
    pixels = images.resize(pixels, max(self.size, round(height * scale)),
                           max(self.size, round(width * scale)))
    top = rng.integers(0, pixels.shape[0] - self.size + 1)
    left = rng.integers(0, pixels.shape[1] - self.size + 1)
    return images.to_uint8(pixels[top:top + self.size, left:left + self.size])

  def batch(self, step: int) -> np.ndarray:
    """Step ``step``'s batch: (batch_size, size, size, 3) uint8."""
    first = step * self.batch_size
    return np.stack([self.sample(first + i) for i in range(self.batch_size)])

  def chunk(self, first_step: int, steps: int) -> np.ndarray:
    """Batches of ``steps`` steps from ``first_step``: (steps, batch_size, size, size, 3) uint8."""
    return np.stack([self.batch(first_step + i) for i in range(steps)])
