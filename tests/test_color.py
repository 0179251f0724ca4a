"""Tests for nst_jax.color against formulas written out here: the NTSC YIQ matrices, and the mean,
covariance and luminance statistics that each colour-preservation step promises."""

import numpy as np
import pytest
import scipy.linalg

from nst_jax import color

# Rec. 601 luma weights.
_LUMA = np.array([0.299, 0.587, 0.114])


def _ntsc_rgb_to_yiq() -> np.ndarray:
  """The NTSC matrix derived from its definition rather than copied.

  I and Q are the colour-difference signals V = 0.877283 (R - Y) and U = 0.492111 (B - Y) rotated
  by 33 degrees: I = V cos 33 - U sin 33, Q = V sin 33 + U cos 33.
  """
  red_minus_y, blue_minus_y = np.eye(3)[0] - _LUMA, np.eye(3)[2] - _LUMA
  v, u = 0.877283 * red_minus_y, 0.492111 * blue_minus_y
  angle = np.deg2rad(33.0)
  return np.stack([_LUMA, v * np.cos(angle) - u * np.sin(angle),
                   v * np.sin(angle) + u * np.cos(angle)])


_NTSC_RGB_TO_YIQ = _ntsc_rgb_to_yiq()
# The inverse as usually printed (three decimals): R = Y + 0.956 I + 0.621 Q, etc.
_NTSC_YIQ_TO_RGB = np.array([[1.0, 0.956, 0.621],
                             [1.0, -0.272, -0.647],
                             [1.0, -1.106, 1.703]])


def _image(rng, shape, low=0.0, high=255.0):
  return rng.uniform(low, high, shape).astype(np.float32)


def _correlated_image(rng, size, mean, mixing):
  """(size, size, 3) pixels mean + N(0, 1) @ mixing: a chosen mean and covariance."""
  noise = rng.standard_normal((size * size, 3))
  return (np.asarray(mean) + noise @ np.asarray(mixing)).reshape(size, size, 3)


def test_modes():
  assert color.MODES == ('none', 'histogram', 'luminance')


def test_rgb_to_yiq_matches_the_ntsc_matrix(rng):
  pixels = _image(rng, (5, 7, 3))
  expected = pixels.astype(np.float64) @ _NTSC_RGB_TO_YIQ.T
  got = color.rgb_to_yiq(pixels)
  assert got.shape == pixels.shape and got.dtype == np.float32
  # Published I/Q coefficients differ in the fourth decimal (2.5e-4 * 255 * 3 apart at most).
  np.testing.assert_allclose(got, expected, atol=0.2)
  # The luminance row is exact.
  np.testing.assert_allclose(got[..., 0], pixels @ _LUMA, rtol=1e-6, atol=1e-4)


def test_rgb_to_yiq_of_primaries_and_grays():
  primaries = np.eye(3, dtype=np.float32) * 255  # red, green, blue as pixels
  np.testing.assert_allclose(color.rgb_to_yiq(primaries) / 255, _NTSC_RGB_TO_YIQ.T, atol=2.5e-4)
  grays = np.array([[0, 0, 0], [128, 128, 128], [255, 255, 255]], np.float32)
  yiq = color.rgb_to_yiq(grays)
  np.testing.assert_allclose(yiq[:, 0], [0, 128, 255], atol=1e-3)
  np.testing.assert_allclose(yiq[:, 1:], 0, atol=1e-3)  # gray has no chroma


def test_yiq_to_rgb_matches_the_printed_inverse():
  unit = np.eye(3, dtype=np.float32)  # Y, I and Q alone
  np.testing.assert_allclose(color.yiq_to_rgb(unit), _NTSC_YIQ_TO_RGB.T, atol=2e-3)
  np.testing.assert_allclose(color.yiq_to_rgb(unit), np.linalg.inv(_NTSC_RGB_TO_YIQ).T, atol=1e-3)


@pytest.mark.parametrize('shape', [(3,), (4, 6, 3), (2, 3, 5, 3)])
def test_round_trip_and_shapes(rng, shape):
  pixels = _image(rng, shape)
  yiq = color.rgb_to_yiq(pixels)
  assert yiq.shape == shape and yiq.dtype == np.float32
  back = color.yiq_to_rgb(yiq)
  assert back.shape == shape and back.dtype == np.float32
  np.testing.assert_allclose(back, pixels, atol=1e-3)


def test_luminance_is_gray_rec601_y(rng):
  pixels = _image(rng, (6, 4, 3))
  gray = color.luminance(pixels)
  assert gray.shape == pixels.shape
  y = pixels.astype(np.float64) @ _LUMA
  for channel in range(3):
    np.testing.assert_allclose(gray[..., channel], y, rtol=1e-5, atol=1e-3)
  already_gray = np.repeat(pixels[..., :1], 3, axis=-1)
  np.testing.assert_allclose(color.luminance(already_gray), already_gray, atol=1e-3)


def test_match_histogram_gives_the_reference_mean_and_covariance(rng):
  # Mid-range pixels with modest spread, so clipping to 0-255 changes nothing.
  source = _correlated_image(rng, 40, (90, 140, 110), [[12, 3, 0], [0, 8, -2], [1, 0, 5]])
  reference = _correlated_image(rng, 24, (150, 100, 130), [[6, 0, 4], [3, 15, 0], [0, 2, 9]])
  out = color.match_histogram(source, reference=reference)
  assert out.shape == source.shape and out.dtype == np.float32
  assert out.min() > 0 and out.max() < 255
  flat_out, flat_ref = out.reshape(-1, 3).astype(np.float64), reference.reshape(-1, 3)
  np.testing.assert_allclose(flat_out.mean(0), flat_ref.mean(0), atol=1e-3)
  # Population covariances (over the pixels present), so images of other sizes compare.
  np.testing.assert_allclose(np.cov(flat_out, rowvar=False, bias=True),
                             np.cov(flat_ref, rowvar=False, bias=True), rtol=1e-4, atol=1e-3)


def test_match_histogram_is_the_paper_map(rng):
  # Gatys et al. 2016, eq. (1)-(2): x' = C_r^(1/2) C_s^(-1/2) (x - mu_s) + mu_r, with symmetric
  # matrix square roots (here scipy's sqrtm rather than an eigendecomposition).
  source = _correlated_image(rng, 16, (100, 120, 140), [[10, 2, 1], [0, 9, 3], [2, 0, 7]])
  reference = _correlated_image(rng, 16, (130, 110, 90), [[8, 1, 0], [1, 11, 2], [0, 3, 6]])
  flat_s, flat_r = source.reshape(-1, 3), reference.reshape(-1, 3)
  cov_s, cov_r = np.cov(flat_s, rowvar=False), np.cov(flat_r, rowvar=False)
  transform = np.real(scipy.linalg.sqrtm(cov_r)) @ np.linalg.inv(np.real(scipy.linalg.sqrtm(cov_s)))
  expected = (flat_s - flat_s.mean(0)) @ transform.T + flat_r.mean(0)
  np.testing.assert_allclose(color.match_histogram(source, reference=reference).reshape(-1, 3),
                             expected, atol=2e-3)


def test_match_histogram_clips_and_handles_flat_images(rng):
  source = _image(rng, (8, 8, 3))
  bright = np.clip(_correlated_image(rng, 8, (250, 250, 250), np.eye(3) * 40), 0, 255)
  out = color.match_histogram(source, reference=bright)
  assert out.min() >= 0 and out.max() == 255  # the map overshoots and is clipped
  # A flat style has no covariance: every pixel becomes the reference's mean colour.
  flat = np.full((5, 5, 3), 77.0)
  out = color.match_histogram(flat, reference=source)
  np.testing.assert_allclose(out, np.broadcast_to(source.reshape(-1, 3).mean(0), out.shape),
                             atol=1e-3)


def test_match_luminance_takes_the_content_luminance_statistics(rng):
  style = _correlated_image(rng, 20, (120, 100, 140), np.eye(3) * 20)
  content = _correlated_image(rng, 12, (110, 130, 120), [[9, 4, 0], [4, 9, 0], [0, 0, 9]])
  out = color.match_luminance(style, content=content)
  assert out.shape == style.shape and out.dtype == np.float32
  np.testing.assert_array_equal(out[..., 0], out[..., 1])
  np.testing.assert_array_equal(out[..., 0], out[..., 2])
  style_y, content_y, out_y = style @ _LUMA, content @ _LUMA, out[..., 0].astype(np.float64)
  assert abs(out_y.mean() - content_y.mean()) < 1e-3
  assert abs(out_y.std() - content_y.std()) < 1e-3
  # An affine map of the style's luminance: perfectly correlated with it.
  assert np.corrcoef(out_y.ravel(), style_y.ravel())[0, 1] > 1 - 1e-6


def test_match_luminance_of_a_flat_style_is_the_content_mean(rng):
  content = _image(rng, (6, 6, 3))
  out = color.match_luminance(np.full((4, 4, 3), 50.0), content=content)
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out, (content @ _LUMA).mean(), atol=1e-3)


def test_recombine_takes_result_luminance_and_content_chroma(rng):
  result = _image(rng, (7, 5, 3), 60, 200)
  content = _image(rng, (7, 5, 3), 60, 200)
  # A small chroma, so that the recombined pixels stay inside 0-255 and no clipping happens.
  content = 0.8 * content + 0.2 * content.mean(-1, keepdims=True)
  out = color.recombine(result, content=content)
  assert out.shape == result.shape
  assert 0 < out.min() and out.max() < 255
  out_yiq = color.rgb_to_yiq(out)
  np.testing.assert_allclose(out_yiq[..., 0], color.rgb_to_yiq(result)[..., 0], atol=1e-3)
  np.testing.assert_allclose(out_yiq[..., 1:], color.rgb_to_yiq(content)[..., 1:], atol=1e-3)


def test_recombine_clips_to_pixel_range():
  result = np.full((2, 2, 3), 250.0)
  content = np.zeros((2, 2, 3))
  content[..., 0] = 255  # strongly red chroma on a bright luminance leaves the gamut
  out = color.recombine(result, content=content)
  assert out.min() >= 0 and out.max() <= 255 and out.max() == 255


def test_histogram_matching_gives_the_style_the_content_colours(rng):
  style = rng.uniform(0, 255, (30, 30, 3)) * np.array([1.0, 0.3, 0.1])
  content = rng.uniform(0, 255, (20, 20, 3)) * np.array([0.2, 0.5, 0.9]) + 10
  matched = color.match_histogram(style, reference=content)
  np.testing.assert_allclose(matched.reshape(-1, 3).mean(0), content.reshape(-1, 3).mean(0),
                             atol=1.5)
  np.testing.assert_allclose(np.cov(matched.reshape(-1, 3), rowvar=False),
                             np.cov(content.reshape(-1, 3), rowvar=False), rtol=0.1, atol=20)


def test_histogram_matching_to_a_single_pixel_gives_its_colour(rng):
  # A 1-pixel reference (or source) has zero covariance: defined, not NaN.
  style = rng.uniform(0, 255, (8, 8, 3))
  matched = color.match_histogram(style, reference=np.full((1, 1, 3), [200.0, 100.0, 50.0]))
  assert np.isfinite(matched).all()
  np.testing.assert_allclose(matched, np.broadcast_to([200.0, 100.0, 50.0], matched.shape), atol=1)
  single = color.match_histogram(np.full((1, 1, 3), 30.0), reference=style)
  np.testing.assert_allclose(single[0, 0], style.reshape(-1, 3).mean(0), atol=1e-3)
