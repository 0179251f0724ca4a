"""Helpers shared by the tests: random VGG weights of the right shapes, tiny end-to-end runs.

Imported as ``from tests import helpers`` (``tests/conftest.py`` puts the repository root on
``sys.path``).
"""

from __future__ import annotations

import json
import os

import numpy as np
from PIL import Image

from nst_jax import config_files
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


# ------------------------------------------------------------------------------------------
# Tiny end-to-end runs.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHALLOW_STYLE = ('block1_relu1', 'block2_relu1', 'block3_relu1')


def tiny_config(tmp_path=None, **overrides):
  """The default config shrunk: 32-48 px, shallow layers, a few steps, no cache, no bar.

  ``overrides`` are fields, dotted for nested ones (``'losses.style.term'`` as a dict key).
  """
  from configs import default
  config = default.get_config()
  config.size = 40
  config.steps = 6
  config.chunk_size = 3
  config.checkpoint_every = 3
  config.progress = 'none'
  config.compilation_cache = ''
  config.losses.content.layers = ('block2_relu2',)
  config.losses.style.layers = SHALLOW_STYLE
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split('.')
    for parent in parents:
      target = target[parent]
    target[leaf] = value
  return config


def run(config, workdir):
  """``main.py``'s path without the command line: the paths written."""
  from nst_jax import pipeline
  from nst_jax import plan
  return pipeline.run(plan.from_config(config), str(workdir)).paths


def prepare(config):
  """The config's inputs read and checked (:func:`nst_jax.pipeline.prepare`)."""
  from nst_jax import pipeline
  from nst_jax import plan
  return pipeline.prepare(plan.from_config(config))


def write_image(path, pixels):
  Image.fromarray(np.asarray(pixels, np.uint8)).save(path)
  return str(path)


def final_losses(workdir):
  lines = open(os.path.join(workdir, 'losses.jsonl')).read().splitlines()
  return [json.loads(line) for line in lines]


def example(name):
  """An embedded example image's pixels ('content' or 'style')."""
  from nst_jax import images
  return images.load(config_files.example_path(
      config_files.DEFAULT_CONTENT if name == 'content' else config_files.DEFAULT_STYLE))
