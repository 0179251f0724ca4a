"""Image files to arrays and back: any common file in, RGB float32 0-255 out; atomic writes.

Reading handles what real files hold: EXIF orientation (photos come out upright), grayscale,
palette, transparency (composited on white), 16-bit and CMYK images. Every failure is a one-line
:class:`nst_jax.errors.UserError` naming the file and the fix.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from nst_jax import errors
from nst_jax import files

#: Largest input file, in pixels, that is decoded at all (a decompression-bomb guard).
MAX_INPUT_PIXELS = 20000 * 20000
SAVE_FORMATS = {'.png': 'PNG', '.jpg': 'JPEG', '.jpeg': 'JPEG', '.webp': 'WEBP', '.bmp': 'BMP',
                '.tif': 'TIFF', '.tiff': 'TIFF'}

# Pillow's own bomb guard (about 89 megapixels, an error at twice that) would refuse 100 MP camera
# photos long before MAX_INPUT_PIXELS. Image.open takes no limit of its own (Pillow 13 reads only
# the module global Image.MAX_IMAGE_PIXELS, also while loading some formats), so a load raises the
# global to ours and ignores Pillow's DecompressionBombWarning (our own check refuses those files
# with a clearer message), then puts both back. The first of overlapping loads (threads) saves
# them and the last restores them, so nothing is left changed however loads overlap.
_pillow_state_lock = threading.Lock()
_pillow_state_users = 0
_pillow_saved_limit: int | None = None
_pillow_saved_warnings: warnings.catch_warnings | None = None


@contextlib.contextmanager
def _pillow_pixel_limit(limit: int) -> Iterator[None]:
  """Inside the block: Pillow's pixel limit is ``limit``, its bomb warning silent; then restored."""
  global _pillow_state_users, _pillow_saved_limit, _pillow_saved_warnings
  with _pillow_state_lock:
    if _pillow_state_users == 0:
      _pillow_saved_limit = Image.MAX_IMAGE_PIXELS
      _pillow_saved_warnings = warnings.catch_warnings()
      _pillow_saved_warnings.__enter__()
      warnings.simplefilter('ignore', Image.DecompressionBombWarning)
    _pillow_state_users += 1
    Image.MAX_IMAGE_PIXELS = limit
  try:
    yield
  finally:
    with _pillow_state_lock:
      _pillow_state_users -= 1
      if _pillow_state_users == 0:
        Image.MAX_IMAGE_PIXELS = _pillow_saved_limit
        _pillow_saved_warnings.__exit__(None, None, None)
        _pillow_saved_limit = _pillow_saved_warnings = None


def _to_rgb(image: Image.Image) -> np.ndarray:
  mode = image.mode
  if mode in ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I'):
    # 16-bit (or 32-bit integer) grayscale: scale the full range to 0-255 rather than clip.
    values = np.asarray(image, dtype=np.float64)
    peak = 65535.0 if mode.startswith('I;16') or values.max() > 255 else 255.0
    # 32-bit files may hold values beyond 16 bits (or negative ones): keep the 0-255 contract.
    gray = np.clip(values / peak * 255.0, 0.0, 255.0).astype(np.float32)
    return np.repeat(gray[..., None], 3, axis=-1)
  if mode == 'F':
    gray = np.clip(np.asarray(image, dtype=np.float32), 0, 255)
    return np.repeat(gray[..., None], 3, axis=-1)
  if mode in ('RGBA', 'LA', 'PA', 'La', 'RGBa') or (mode == 'P' and 'transparency' in image.info):
    # Transparent pixels have no colour of their own: show them over white, as viewers do.
    rgba = image.convert('RGBA')
    background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
    image = Image.alpha_composite(background, rgba)
  return np.asarray(image.convert('RGB'), dtype=np.float32)


def load(path: str, *, what: str = 'image') -> np.ndarray:
  """Reads an image file as RGB float32 (H, W, 3) in 0-255, upright.

  Args:
    path: the file.
    what: how to name the file in error messages (``"content image"``, ``"style image 2"``).

  Returns:
    The pixels.

  Raises:
    errors.UserError: missing, a directory, empty, truncated, not an image, or absurdly large.
  """
  if not path:
    raise errors.UserError(f'no {what} given; pass a path to an image file')
  if not os.path.exists(path):
    raise errors.UserError(f'{what} {path!r} does not exist; check the path')
  if os.path.isdir(path):
    raise errors.UserError(f'{what} {path!r} is a directory; give an image file')
  if os.path.getsize(path) == 0:
    raise errors.UserError(f'{what} {path!r} is an empty file; give a PNG or JPEG image')
  try:
    with _pillow_pixel_limit(MAX_INPUT_PIXELS), Image.open(path) as image:
      width, height = image.size
      if width * height > MAX_INPUT_PIXELS:
        raise errors.UserError(f'{what} {path!r} is {width}x{height} pixels, too large to read; '
                               'downscale it first')
      image.load()
      image = ImageOps.exif_transpose(image)
      return _to_rgb(image)
  except UnidentifiedImageError:
    raise errors.UserError(f'{what} {path!r} is not an image file Pillow can read; give a PNG or '
                           'JPEG image') from None
  except (Image.DecompressionBombError, Image.DecompressionBombWarning):
    raise errors.UserError(f'{what} {path!r} is too large to read safely; downscale it first'
                           ) from None
  except PermissionError:
    raise errors.UserError(f'{what} {path!r} is not readable (permission denied)') from None
  except (OSError, SyntaxError, ValueError) as exc:
    raise errors.UserError(f'{what} {path!r} cannot be decoded ({exc}); the file is truncated or '
                           'corrupt: re-export or re-download it') from None


def fit_size(height: int, width: int, *, size: int, square: bool = False) -> tuple[int, int]:
  """The (height, width) with the longer side ``size`` keeping the aspect ratio (or square)."""
  if square:
    return size, size
  scale = size / max(height, width)
  return max(1, round(height * scale)), max(1, round(width * scale))


def resize(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
  """Resizes RGB float pixels with Lanczos (antialiased) filtering; float in, float out."""
  if pixels.shape[:2] == (height, width):
    return pixels.astype(np.float32)
  channels = [Image.fromarray(np.ascontiguousarray(pixels[..., c], np.float32), mode='F')
              .resize((width, height), Image.Resampling.LANCZOS) for c in range(pixels.shape[-1])]
  return np.stack([np.asarray(c, np.float32) for c in channels], axis=-1)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
  """Rounds and clips float 0-255 pixels to uint8."""
  return np.clip(np.round(np.asarray(pixels, np.float32)), 0, 255).astype(np.uint8)


def encode(pixels: np.ndarray, path: str) -> bytes:
  """Encodes pixels in the format ``path``'s extension names (PNG, JPEG, ...)."""
  extension = os.path.splitext(path)[1].lower()
  if extension not in SAVE_FORMATS:
    raise errors.UserError(f'cannot tell the image format of {path!r}; end it with one of '
                           f'{", ".join(sorted(SAVE_FORMATS))}')
  buffer = io.BytesIO()
  options = {'quality': 95} if SAVE_FORMATS[extension] in ('JPEG', 'WEBP') else {}
  Image.fromarray(to_uint8(pixels)).save(buffer, format=SAVE_FORMATS[extension], **options)
  return buffer.getvalue()


def save(pixels: np.ndarray, path: str) -> None:
  """Writes RGB 0-255 pixels to ``path`` atomically, in the format its extension names."""
  files.write_bytes(path, encode(pixels, path))


def grid(rows: list[list[np.ndarray]], *, height: int = 256, gap: int = 4) -> np.ndarray:
  """Lays images side by side (each row left to right), all scaled to ``height``, on white."""
  scaled_rows = []
  for row in rows:
    scaled = [resize(image, height, max(1, round(image.shape[1] * height / image.shape[0])))
              for image in row]
    scaled_rows.append(scaled)
  width = max(sum(image.shape[1] for image in row) + gap * (len(row) - 1) for row in scaled_rows)
  canvas = np.full((len(rows) * height + gap * (len(rows) - 1), width, 3), 255.0, np.float32)
  for row_index, row in enumerate(scaled_rows):
    x, y = 0, row_index * (height + gap)
    for image in row:
      canvas[y:y + height, x:x + image.shape[1]] = image
      x += image.shape[1] + gap
  return canvas


def contact_sheet(pictures: list[np.ndarray], *, labels: list[str], height: int = 256,
                  columns: int = 6, gap: int = 4) -> np.ndarray:
  """Images side by side (``columns`` per row), each scaled to ``height`` with its label below.

  Args:
    pictures: RGB 0-255 arrays of any sizes.
    labels: one line of text per picture (e.g. the value of a swept weight).
    height: every picture's height in the sheet.
    columns: pictures per row.
    gap: white pixels between pictures.

  Returns:
    The sheet as an RGB float32 array in 0-255.
  """
  font = ImageFont.load_default(size=max(10, height // 14))  # bitmap font without FreeType
  strip = round(getattr(font, 'size', 11) * 1.6)
  cells = []
  for picture, label in zip(pictures, labels):
    scaled = resize(picture, height, max(1, round(picture.shape[1] * height / picture.shape[0])))
    left, top, right, bottom = ImageDraw.Draw(Image.new('RGB', (1, 1))).textbbox(
        (0, 0), label, font=font)
    width = max(scaled.shape[1], right - left + 8)  # a long label widens its cell
    cell = Image.new('RGB', (width, height + strip), 'white')
    cell.paste(Image.fromarray(to_uint8(scaled)), ((width - scaled.shape[1]) // 2, 0))
    ImageDraw.Draw(cell).text(((width - (right - left)) // 2 - left,
                               height + (strip - (bottom - top)) // 2 - top), label,
                              fill='black', font=font)
    cells.append(np.asarray(cell, np.float32))
  rows = [cells[start:start + columns] for start in range(0, len(cells), columns)]
  return grid(rows, height=height + strip, gap=gap)
