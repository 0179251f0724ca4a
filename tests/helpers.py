"""Helpers shared by the tests: random VGG weights of the right shapes.

Imported as ``from tests import helpers`` (``tests/conftest.py`` puts the repository root on
``sys.path``).
"""

from __future__ import annotations

import numpy as np

from nst_jax import weights


def random_weights(
    *, network: str = 'vgg19', seed: int = 0,
    preprocessing: weights.Preprocessing = weights.Preprocessing()) -> weights.VggWeights:
  """He-initialised random weights of the right shapes.

  Args:
    network: ``"vgg19"`` or ``"vgg16"``.
    seed: NumPy seed.
    preprocessing: the preprocessing to attach.

  Returns:
    Random float32 weights.
  """
  rng = np.random.default_rng(seed)
  params = {}
  for layer, in_channels, out_channels in weights.CONV_SPECS[network]:
    scale = np.sqrt(2.0 / (9 * in_channels))
    kernel = rng.standard_normal((3, 3, in_channels, out_channels)) * scale
    bias = rng.standard_normal(out_channels) * 0.1
    params[layer] = {'kernel': kernel.astype(np.float32), 'bias': bias.astype(np.float32)}
  return weights.VggWeights(network=network, params=params, preprocessing=preprocessing)
