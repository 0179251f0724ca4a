"""Colour preservation (Gatys, Bethge, Hertzmann & Shechtman 2016, "Preserving Color in Neural
Artistic Style Transfer").

Two ways, both on RGB float 0-255 arrays:

* ``histogram``: before optimising, give the style image the content's colour distribution (its
  mean and covariance in RGB, a linear map via matrix square roots, the paper's method 1).
* ``luminance``: transfer style in luminance only: optimise a grayscale image against luminance
  targets (the style's luminance matched to the content's mean and spread), then put the content's
  chroma back (YIQ space, the paper's method 2).
"""

from __future__ import annotations

import numpy as np

MODES = ('none', 'histogram', 'luminance')

# NTSC YIQ, as in the paper.
_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114],
                        [0.595716, -0.274453, -0.321263],
                        [0.211456, -0.522591, 0.311135]], np.float64)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


def rgb_to_yiq(pixels: np.ndarray) -> np.ndarray:
  """RGB (..., 3) to YIQ (..., 3); Y in the same 0-255 units."""
  return (np.asarray(pixels, np.float64) @ _RGB_TO_YIQ.T).astype(np.float32)


def yiq_to_rgb(pixels: np.ndarray) -> np.ndarray:
  """YIQ (..., 3) back to RGB (..., 3)."""
  return (np.asarray(pixels, np.float64) @ _YIQ_TO_RGB.T).astype(np.float32)


def _sqrtm(matrix: np.ndarray, *, inverse: bool = False) -> np.ndarray:
  values, vectors = np.linalg.eigh(matrix)
  values = np.maximum(values, 1e-5)
  return (vectors * (values ** (-0.5 if inverse else 0.5))) @ vectors.T


def match_histogram(source: np.ndarray, *, reference: np.ndarray) -> np.ndarray:
  """Recolours ``source`` so its RGB mean and covariance equal ``reference``'s.

  Args:
    source: the image to recolour (the style image), (H, W, 3).
    reference: the image whose colours to take (the content image), (H', W', 3).

  Returns:
    The recoloured source, clipped to 0-255.
  """
  flat_source = np.asarray(source, np.float64).reshape(-1, 3)
  flat_reference = np.asarray(reference, np.float64).reshape(-1, 3)
  mean_source, mean_reference = flat_source.mean(0), flat_reference.mean(0)
  # Population covariances: defined for a single pixel too (zero, then floored in _sqrtm).
  cov_source = np.cov(flat_source, rowvar=False, bias=True)
  cov_reference = np.cov(flat_reference, rowvar=False, bias=True)
  transform = _sqrtm(cov_reference) @ _sqrtm(cov_source, inverse=True)
  out = (flat_source - mean_source) @ transform.T + mean_reference
  return np.clip(out, 0, 255).reshape(np.shape(source)).astype(np.float32)


def luminance(pixels: np.ndarray) -> np.ndarray:
  """The luminance Y as a gray RGB image (H, W, 3): what the network sees in luminance mode."""
  y = rgb_to_yiq(pixels)[..., :1]
  return np.repeat(y, 3, axis=-1)


def match_luminance(style: np.ndarray, *, content: np.ndarray) -> np.ndarray:
  """The style's luminance, shifted and scaled to the content luminance's mean and deviation."""
  style_y, content_y = rgb_to_yiq(style)[..., 0], rgb_to_yiq(content)[..., 0]
  matched = (style_y - style_y.mean()) * (content_y.std() / max(style_y.std(), 1e-6))
  matched = np.clip(matched + content_y.mean(), 0, 255)
  return np.repeat(matched[..., None], 3, axis=-1).astype(np.float32)


def recombine(result: np.ndarray, *, content: np.ndarray) -> np.ndarray:
  """The result's luminance with the content's chroma (I, Q): the luminance mode's output."""
  result_y = rgb_to_yiq(result)[..., :1]
  content_iq = rgb_to_yiq(content)[..., 1:]
  return np.clip(yiq_to_rgb(np.concatenate([result_y, content_iq], axis=-1)), 0, 255)
