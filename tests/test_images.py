"""Tests for nst_jax.images: real files of every common kind in, RGB float32 0-255 out.

Every file is written here with Pillow in the layout real tools produce (palette PNGs with a tRNS
chunk, 16-bit PNGs, CMYK JPEGs, photos stored sideways with an EXIF orientation tag), and every
bad input must become one :class:`nst_jax.errors.UserError` that names the file.
"""

from __future__ import annotations

import os
import struct
import threading
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from nst_jax import errors
from nst_jax import images

_RED, _GREEN, _BLUE, _WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def _check_rgb(pixels: np.ndarray, height: int, width: int) -> None:
  """Asserts the contract of images.load: float32 (H, W, 3) within 0-255."""
  assert pixels.dtype == np.float32
  assert pixels.shape == (height, width, 3)
  assert pixels.min() >= 0.0 and pixels.max() <= 255.0


def _load(image: Image.Image, path, **save_options) -> np.ndarray:
  image.save(path, **save_options)
  return images.load(str(path))


def _quadrants(width: int, height: int) -> Image.Image:
  """An asymmetric pattern: red top-left, green top-right, blue bottom-left, white bottom-right."""
  pixels = np.zeros((height, width, 3), np.uint8)
  half_h, half_w = height // 2, width // 2
  pixels[:half_h, :half_w] = _RED
  pixels[:half_h, half_w:] = _GREEN
  pixels[half_h:, :half_w] = _BLUE
  pixels[half_h:, half_w:] = _WHITE
  return Image.fromarray(pixels)


def _noise(height: int = 64, width: int = 64, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# Modes.


def test_load_rgb_png_is_exact(tmp_path):
  pixels = _noise(5, 7)
  out = _load(Image.fromarray(pixels), tmp_path / 'rgb.png')
  _check_rgb(out, 5, 7)
  np.testing.assert_array_equal(out, pixels.astype(np.float32))


def test_load_grayscale_l(tmp_path):
  gray = np.array([[0, 64, 128], [200, 254, 255]], np.uint8)
  image = Image.fromarray(gray)
  assert image.mode == 'L'
  out = _load(image, tmp_path / 'gray.png')
  _check_rgb(out, 2, 3)
  np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, axis=-1).astype(np.float32))


def test_load_bilevel_1(tmp_path):
  bits = np.array([[True, False, True, False], [False, False, True, True]])
  image = Image.fromarray(bits)
  assert image.mode == '1'
  out = _load(image, tmp_path / 'bits.png')
  _check_rgb(out, 2, 4)
  np.testing.assert_array_equal(out, np.repeat(bits[..., None], 3, axis=-1) * 255.0)


def _palette_image(indices: np.ndarray) -> Image.Image:
  image = Image.fromarray(indices.astype(np.uint8), mode='L').convert('P')
  image.putdata(indices.ravel().tolist())
  palette = [0] * 768
  palette[0:3], palette[3:6], palette[6:9], palette[9:12] = (
      (10, 20, 30), _RED, (0, 128, 255), (40, 50, 60))
  image.putpalette(palette)
  return image


def test_load_palette_p(tmp_path):
  indices = np.array([[0, 1], [2, 1]])
  image = _palette_image(indices)
  assert image.mode == 'P'
  out = _load(image, tmp_path / 'palette.png')
  _check_rgb(out, 2, 2)
  expected = np.array([[(10, 20, 30), _RED], [(0, 128, 255), _RED]], np.float32)
  np.testing.assert_array_equal(out, expected)


def test_load_palette_with_transparency_is_composited_on_white(tmp_path):
  indices = np.array([[0, 1], [3, 2]])
  path = tmp_path / 'palette_alpha.png'
  _palette_image(indices).save(path, transparency=3)  # palette entry 3 is fully transparent
  with Image.open(path) as reread:
    assert reread.mode == 'P' and 'transparency' in reread.info
  out = images.load(str(path))
  _check_rgb(out, 2, 2)
  expected = np.array([[(10, 20, 30), _RED], [_WHITE, (0, 128, 255)]], np.float32)
  np.testing.assert_array_equal(out, expected)


def test_load_rgba_composites_on_white(tmp_path):
  rgba = np.array([[(255, 0, 0, 0), (10, 20, 30, 255)],
                   [(0, 0, 0, 0), (0, 0, 0, 128)]], np.uint8)
  out = _load(Image.fromarray(rgba, mode='RGBA'), tmp_path / 'rgba.png')
  _check_rgb(out, 2, 2)
  np.testing.assert_array_equal(out[0, 0], _WHITE)  # transparent red is not red
  np.testing.assert_array_equal(out[0, 1], (10, 20, 30))
  np.testing.assert_array_equal(out[1, 0], _WHITE)  # transparent black is not black
  np.testing.assert_allclose(out[1, 1], [255 * (1 - 128 / 255)] * 3, atol=1.0)  # half over white


def test_load_la_composites_on_white(tmp_path):
  image = Image.new('LA', (3, 1))
  image.putdata([(100, 255), (0, 0), (0, 128)])
  out = _load(image, tmp_path / 'la.png')
  _check_rgb(out, 1, 3)
  np.testing.assert_array_equal(out[0, 0], (100, 100, 100))
  np.testing.assert_array_equal(out[0, 1], _WHITE)
  np.testing.assert_allclose(out[0, 2], [255 * (1 - 128 / 255)] * 3, atol=1.0)


def test_load_16_bit_grayscale_png_scales_full_range(tmp_path):
  values = np.array([[65535, 32768], [200, 0]], np.uint16)
  path = tmp_path / 'gray16.png'
  Image.fromarray(values).save(path)
  with Image.open(path) as reread:
    assert reread.mode.startswith('I')  # Pillow keeps the 16 bits
  out = images.load(str(path))
  _check_rgb(out, 2, 2)
  np.testing.assert_allclose(out[..., 0], values / 65535.0 * 255.0, atol=1e-3)
  assert out[0, 0, 0] == pytest.approx(255.0)
  assert out[0, 1, 0] == pytest.approx(127.5, abs=0.01)
  assert out[1, 0, 0] < 1.0  # a dark 16-bit value is dark, not 200 of 255
  np.testing.assert_array_equal(out[..., 0], out[..., 1])
  np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_load_16_bit_png_of_only_small_values_is_dark(tmp_path):
  # A dark 16-bit exposure: the scale follows the file's bit depth, not the values it holds.
  out = _load(Image.fromarray(np.array([[100, 255]], np.uint16)), tmp_path / 'dark16.png')
  assert out.max() < 1.0


def test_load_32_bit_integer_tiff_stays_in_range(tmp_path):
  # Mode 'I' values beyond 16 bits (or below zero) must not leave the 0-255 range.
  out = _load(Image.fromarray(np.array([[100000, 65535, 5, -7]], np.int32)), tmp_path / 'i32.tif')
  _check_rgb(out, 1, 4)
  np.testing.assert_allclose(out[0, :, 0], [255.0, 255.0, 5 / 65535 * 255, 0.0], atol=1e-4)


def test_load_cmyk_jpeg(tmp_path):
  image = Image.new('CMYK', (16, 16), (0, 255, 255, 0))  # red in CMYK
  image.paste((0, 0, 0, 255), (8, 0, 16, 16))  # black right half
  path = tmp_path / 'cmyk.jpg'
  image.save(path, quality=95)
  with Image.open(path) as reread:
    assert reread.mode == 'CMYK'
  out = images.load(str(path))
  _check_rgb(out, 16, 16)
  np.testing.assert_allclose(out[8, 2], _RED, atol=12)
  np.testing.assert_allclose(out[8, 13], (0, 0, 0), atol=12)


@pytest.mark.parametrize('orientation, stored_transpose', [
    # Tag 6: the viewer rotates the stored pixels 90 degrees clockwise, so the camera stored the
    # upright scene rotated 90 degrees counter-clockwise.
    (6, Image.Transpose.ROTATE_90),
    # Tag 8: the viewer rotates 90 degrees counter-clockwise; stored rotated clockwise.
    (8, Image.Transpose.ROTATE_270),
])
def test_load_exif_rotated_jpeg_comes_out_upright(tmp_path, orientation, stored_transpose):
  width, height = 48, 32  # the upright scene is landscape
  upright = _quadrants(width, height)
  stored = upright.transpose(stored_transpose)
  assert stored.size == (height, width)  # stored sideways: portrait
  exif = Image.Exif()
  exif[0x0112] = orientation
  path = tmp_path / f'photo_{orientation}.jpg'
  stored.save(path, exif=exif, quality=95)
  with Image.open(path) as reread:
    assert reread.size == (height, width) and reread.getexif()[0x0112] == orientation
  out = images.load(str(path))
  _check_rgb(out, height, width)  # dimensions swapped back
  corners = {(4, 4): _RED, (4, width - 5): _GREEN, (height - 5, 4): _BLUE,
             (height - 5, width - 5): _WHITE}
  for (y, x), expected in corners.items():
    np.testing.assert_allclose(out[y, x], expected, atol=12, err_msg=f'pixel {(y, x)}')


def test_load_jpeg_without_exif_is_unchanged(tmp_path):
  out = _load(_quadrants(48, 32), tmp_path / 'plain.jpg', quality=95)
  _check_rgb(out, 32, 48)
  np.testing.assert_allclose(out[4, 4], _RED, atol=12)
  np.testing.assert_allclose(out[4, 43], _GREEN, atol=12)


# --------------------------------------------------------------------------------------------
# Saving.


def test_save_png_round_trip_is_exact(tmp_path):
  pixels = _noise(9, 11).astype(np.float32)
  path = str(tmp_path / 'out.png')
  images.save(pixels, path)
  np.testing.assert_array_equal(images.load(path), pixels)


def test_save_rounds_and_clips(tmp_path):
  pixels = np.array([[[-20.0, 0.4, 0.6], [254.6, 300.0, 127.5]]], np.float32)
  path = str(tmp_path / 'clip.png')
  images.save(pixels, path)
  np.testing.assert_array_equal(images.load(path), [[[0, 0, 1], [255, 255, 128]]])


@pytest.mark.parametrize('name', ['out.jpg', 'OUT.JPEG'])
def test_save_jpeg_round_trip_is_close(tmp_path, name):
  smooth = np.stack(np.meshgrid(np.linspace(0, 255, 40), np.linspace(40, 200, 30)), -1)
  pixels = np.concatenate([smooth, smooth[..., :1]], axis=-1).astype(np.float32)
  path = str(tmp_path / name)
  images.save(pixels, path)
  with Image.open(path) as reread:
    assert reread.format == 'JPEG'
  out = images.load(path)
  _check_rgb(out, 30, 40)
  assert np.abs(out - pixels).mean() < 2.0
  assert np.abs(out - pixels).max() < 16.0


def test_save_is_atomic_and_replaces_whole_file(tmp_path):
  path = tmp_path / 'result.png'
  old_bytes = b'old contents that are much longer than nothing ' * 1000
  path.write_bytes(old_bytes)
  os.link(path, tmp_path / 'old_link')  # still names the old file if save renames a new one over
  pixels = _noise(8, 8).astype(np.float32)
  images.save(pixels, str(path))
  assert sorted(os.listdir(tmp_path)) == ['old_link', 'result.png']  # no temporary files left
  assert (tmp_path / 'old_link').read_bytes() == old_bytes  # old file never written into
  assert path.read_bytes() == images.encode(pixels, 'x.png')  # new file complete, no old tail
  np.testing.assert_array_equal(images.load(str(path)), pixels)


def test_save_creates_missing_folders(tmp_path):
  path = tmp_path / 'a' / 'b' / 'out.png'
  images.save(np.zeros((2, 2, 3)), str(path))
  assert os.listdir(tmp_path / 'a' / 'b') == ['out.png']


def test_failed_save_leaves_old_file_and_no_temporary(tmp_path):
  path = tmp_path / 'result.xyz'
  path.write_bytes(b'keep me')
  with pytest.raises(errors.UserError, match='result.xyz'):
    images.save(np.zeros((2, 2, 3)), str(path))
  assert os.listdir(tmp_path) == ['result.xyz']
  assert path.read_bytes() == b'keep me'


@pytest.mark.parametrize('extension, signature', [
    ('.png', b'\x89PNG'), ('.jpg', b'\xff\xd8'), ('.jpeg', b'\xff\xd8'), ('.bmp', b'BM'),
    ('.webp', b'RIFF'), ('.tif', b'II'), ('.PNG', b'\x89PNG')])
def test_encode_formats(extension, signature):
  assert images.encode(np.zeros((3, 3, 3)), 'out' + extension).startswith(signature)


@pytest.mark.parametrize('name', ['result.xyz', 'result', 'result.gif.txt'])
def test_encode_unknown_extension(name):
  with pytest.raises(errors.UserError) as info:
    images.encode(np.zeros((2, 2, 3)), name)
  assert repr(name) in str(info.value)
  assert '.png' in str(info.value)


# --------------------------------------------------------------------------------------------
# Grid, resize, fit_size.


def test_grid_shapes_and_background():
  a = np.zeros((20, 40, 3), np.float32)
  b = np.zeros((40, 40, 3), np.float32)
  c = np.zeros((10, 10, 3), np.float32)
  canvas = images.grid([[a, b], [c]], height=32, gap=4)
  assert canvas.dtype == np.float32
  assert canvas.shape == (32 + 4 + 32, 64 + 4 + 32, 3)
  np.testing.assert_array_equal(canvas[:32, :64], 0)  # a, scaled to 32x64
  np.testing.assert_array_equal(canvas[:32, 64:68], 255)  # the gap
  np.testing.assert_array_equal(canvas[32:36], 255)  # the gap between rows
  np.testing.assert_array_equal(canvas[36:, 32:], 255)  # the shorter row's padding
  assert images.grid([[a]], height=10, gap=4).shape == (10, 20, 3)


def test_contact_sheet_labels_each_picture_below_it_and_wraps_rows():
  gray = np.full((20, 40, 3), 128.0, np.float32)
  sheet = images.contact_sheet([gray, gray, gray], labels=['1', 'a rather long label', '3'],
                               height=32, columns=2, gap=4)
  strip = sheet.shape[0] // 2 - 2 - 32  # two rows of picture + label strip, a gap between
  assert strip > 8
  row = 32 + strip
  np.testing.assert_array_equal(sheet[:32, :64], 128)  # the first picture, scaled to 32 px
  assert (sheet[32:row, :64] < 100).any()  # its label, dark on white below it
  assert (sheet[32:row, :64] > 250).any()
  # A label wider than its picture widens the cell (the picture is centred above it).
  assert sheet.shape[1] > 64 + 4 + 64
  assert (sheet[row + 4:row + 4 + 32, :64] == 128).all()  # the third picture, second row
  assert (sheet[row + 4 + 32:, :64] < 100).any()
  unlabelled = images.contact_sheet([gray], labels=[''], height=32)
  assert (unlabelled[32:] == 255).all()


def test_fit_size_and_resize():
  assert images.fit_size(300, 400, size=100) == (75, 100)
  assert images.fit_size(400, 300, size=100) == (100, 75)
  assert images.fit_size(300, 400, size=64, square=True) == (64, 64)
  assert images.fit_size(1, 1000, size=32) == (1, 32)
  flat = np.full((10, 20, 3), 77.0, np.float32)
  out = images.resize(flat, 5, 7)
  assert out.shape == (5, 7, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out, 77.0, atol=1e-3)


# --------------------------------------------------------------------------------------------
# Bad inputs: one UserError naming the file.


def _raises_naming(path, what: str = 'image') -> str:
  with pytest.raises(errors.UserError) as info:
    images.load(str(path), what=what)
  message = str(info.value)
  assert str(path) in message, message
  assert what in message
  assert '\n' not in message
  return message


def test_error_missing_path(tmp_path):
  assert 'does not exist' in _raises_naming(tmp_path / 'nope.png', 'content image')


def test_error_empty_path():
  with pytest.raises(errors.UserError, match='no style image given'):
    images.load('', what='style image')


def test_error_directory(tmp_path):
  assert 'directory' in _raises_naming(tmp_path, 'style image 2')


def test_error_empty_file(tmp_path):
  path = tmp_path / 'empty.jpg'
  path.write_bytes(b'')
  assert 'empty' in _raises_naming(path)


@pytest.mark.parametrize('name, options', [('cut.png', {}), ('cut.jpg', {'quality': 95})])
def test_error_truncated_file(tmp_path, name, options):
  whole = tmp_path / ('whole' + os.path.splitext(name)[1])
  Image.fromarray(_noise(64, 64)).save(whole, **options)
  data = whole.read_bytes()
  path = tmp_path / name
  path.write_bytes(data[:len(data) // 2])
  message = _raises_naming(path, 'content image')
  assert 'truncated' in message or 'corrupt' in message


def test_error_text_file_named_png(tmp_path):
  path = tmp_path / 'notes.png'
  path.write_text('this is not an image\n' * 10)
  assert 'not an image' in _raises_naming(path)


def test_error_random_bytes_named_jpg(tmp_path):
  path = tmp_path / 'noise.jpg'
  path.write_bytes(b'\xff\xd8\xff' + bytes(np.random.default_rng(0).integers(0, 256, 500,
                                                                              dtype=np.uint8)))
  _raises_naming(path)


def _header_only_png(path, width: int, height: int) -> None:
  """A PNG whose header claims width x height pixels but holds no pixel data (a few bytes)."""
  def chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack('>I', len(data)) + kind + data
            + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff))
  path.write_bytes(b'\x89PNG\r\n\x1a\n'
                   + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0))
                   + chunk(b'IEND', b''))


def test_error_no_pixel_data(tmp_path):
  path = tmp_path / 'no_pixels.png'
  _header_only_png(path, 8, 8)
  assert 'corrupt' in _raises_naming(path)


@pytest.mark.parametrize('width, height, too_large', [
    (10000, 10000, False),   # a 100 MP camera photo is within MAX_INPUT_PIXELS (Pillow's own
                             # guard of ~89 MP must not refuse it); here it fails for lack of data
    (25000, 20000, True),    # 500 MP: refused before decoding, with its size
    (100000, 100000, True),  # 10 GP: refused before decoding
])
def test_pixel_limit_is_max_input_pixels(tmp_path, width, height, too_large):
  pillow_limit = Image.MAX_IMAGE_PIXELS
  path = tmp_path / 'big.png'
  _header_only_png(path, width, height)
  message = _raises_naming(path)
  assert ('too large' in message) == too_large, message
  assert Image.MAX_IMAGE_PIXELS == pillow_limit  # Pillow's global is restored


def test_pixel_limit_follows_the_constant(tmp_path, monkeypatch):
  monkeypatch.setattr(images, 'MAX_INPUT_PIXELS', 20 * 10)
  Image.fromarray(_noise(10, 20)).save(tmp_path / 'ok.png')
  Image.fromarray(_noise(10, 21)).save(tmp_path / 'big.png')
  assert images.load(str(tmp_path / 'ok.png')).shape == (10, 20, 3)
  assert '21x10' in _raises_naming(tmp_path / 'big.png')


# --------------------------------------------------------------------------------------------
# Pillow's global state: raised for a load, left exactly as it was afterwards.


def _pillow_state():
  return Image.MAX_IMAGE_PIXELS, list(warnings.filters)


def _make_ok(path):
  Image.fromarray(_noise(8, 8)).save(path)


def _make_text(path):
  path.write_text('not an image\n')


def _make_truncated(path):
  Image.fromarray(_noise(64, 64)).save(path)
  path.write_bytes(path.read_bytes()[:200])


@pytest.mark.parametrize('make', [
    _make_ok, _make_text, _make_truncated,
    lambda path: _header_only_png(path, 25000, 20000),     # refused by our own size check
    lambda path: _header_only_png(path, 100000, 100000),   # refused by Pillow's bomb guard
], ids=['ok', 'not_an_image', 'truncated', 'too_large', 'pillow_bomb_error'])
def test_pillow_state_is_restored_after_every_outcome(tmp_path, make):
  before = _pillow_state()
  path = tmp_path / 'file.png'
  make(path)
  try:
    images.load(str(path))
  except errors.UserError:
    pass
  assert _pillow_state() == before


def test_pillow_state_is_restored_after_an_unexpected_exception(tmp_path, monkeypatch):
  before = _pillow_state()
  Image.fromarray(_noise(8, 8)).save(tmp_path / 'ok.png')

  def broken_open(path):
    assert Image.MAX_IMAGE_PIXELS == images.MAX_INPUT_PIXELS  # raised while Pillow reads
    raise RuntimeError('a bug in a Pillow plugin')

  monkeypatch.setattr(Image, 'open', broken_open)
  with pytest.raises(RuntimeError, match='a bug in a Pillow plugin'):
    images.load(str(tmp_path / 'ok.png'))
  assert _pillow_state() == before


def test_overlapping_loads_in_threads_leave_pillow_state_unchanged(tmp_path, monkeypatch):
  # A saves and raises the limit, B saves the raised one, A restores, B "restores" the raised one:
  # a plain save/restore per load would leave the global raised after this order.
  before = _pillow_state()
  Image.fromarray(_noise(8, 8)).save(tmp_path / 'ok.png')
  entered = {name: threading.Event() for name in 'AB'}
  release = {name: threading.Event() for name in 'AB'}
  real_open = Image.open

  def blocking_open(path):
    name = threading.current_thread().name
    assert Image.MAX_IMAGE_PIXELS == images.MAX_INPUT_PIXELS
    entered[name].set()
    assert release[name].wait(10)
    return real_open(path)

  monkeypatch.setattr(Image, 'open', blocking_open)
  results = {}

  def load(name):
    results[name] = images.load(str(tmp_path / 'ok.png')).shape

  threads = {name: threading.Thread(target=load, args=(name,), name=name) for name in 'AB'}
  try:
    threads['A'].start()
    assert entered['A'].wait(10)
    threads['B'].start()
    assert entered['B'].wait(10)
    release['A'].set()
    threads['A'].join(10)
    assert Image.MAX_IMAGE_PIXELS == images.MAX_INPUT_PIXELS  # B is still reading
  finally:
    for name in 'AB':
      release[name].set()
      if threads[name].ident is not None:  # started
        threads[name].join(10)
  assert results == {'A': (8, 8, 3), 'B': (8, 8, 3)}
  assert _pillow_state() == before
