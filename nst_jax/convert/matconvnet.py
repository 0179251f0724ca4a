"""Reads MatConvNet SimpleNN VGG files (``imagenet-vgg-verydeep-19.mat`` or ``-16.mat``).

Kernels are ``[h w in out]``, i.e. HWIO; the weights expect RGB input minus the mean pixel stored
in the file. SciPy is imported only when a file is read; MATLAB v7.3 (HDF5) files are refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from nst_jax import errors
from nst_jax import weights
from nst_jax.convert import common

#: MatConvNet's VGG mean pixel (RGB), used when the file stores no average image.
MATCONVNET_MEAN_RGB = (123.68, 116.779, 103.939)


def _mat_mean(data: Mapping[str, Any]) -> tuple[float, float, float]:
  """The RGB mean pixel of a MatConvNet file: ``meta.normalization`` (or top-level, older)."""
  meta = data.get('meta')
  normalization = (getattr(meta, 'normalization', None) if meta is not None
                   else data.get('normalization'))
  average = getattr(normalization, 'averageImage', None)
  if average is not None:
    average = np.asarray(average, np.float64)
    if average.size == 3:
      return tuple(float(v) for v in average.reshape(3))
    if average.ndim >= 2 and average.shape[-1] == 3 and average.size:
      # Older files hold a whole mean image; its per-channel mean is the mean pixel.
      return tuple(float(v) for v in average.reshape(-1, 3).mean(axis=0))
  # import-caffe.py writes a placeholder [0 0] when it knows no average.
  return MATCONVNET_MEAN_RGB


def _load_mat(path: str) -> dict[str, Any]:
  """Loads a ``.mat`` file as ``{"layers": ..., "meta": ...}`` (or its top-level variables)."""
  import scipy.io  # pylint: disable=g-import-not-at-top  # keeps the other formats' start-up quick
  common.check_input_path(path)
  try:
    data = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
  except NotImplementedError:
    raise errors.UserError(f'{path!r} is a MATLAB v7.3 file, which SciPy cannot read; re-save it '
                           'from MATLAB with -v7') from None
  except Exception as exc:  # pylint: disable=broad-except
    # scipy.io raises ValueError, TypeError, OSError, ... for malformed files.
    raise errors.UserError(f'cannot read {path!r} as a MATLAB .mat file ({common.reason(exc)}); '
                           'is it the complete MatConvNet file?') from None
  if 'layers' not in data and hasattr(data.get('net'), 'layers'):
    data = {'layers': data['net'].layers, 'meta': getattr(data['net'], 'meta', None)}
  if 'layers' not in data:
    raise errors.UserError(f'{path!r} has no "layers" variable, so it is not a MatConvNet network '
                           'file; use imagenet-vgg-verydeep-19.mat (SimpleNN)')
  return data


def _conv_layers(path: str, mat_layers: Any) -> dict[str, dict[str, np.ndarray]]:
  """``{blockB_convC: {"kernel", "bias"}}`` from the ``convB_C`` entries of ``layers``."""
  layers: dict[str, dict[str, np.ndarray]] = {}
  for entry in np.atleast_1d(mat_layers).ravel():
    name = getattr(entry, 'name', None)
    match = re.fullmatch(r'conv(\d+)_(\d+)', name) if isinstance(name, str) else None
    if match is None:
      continue  # relu, pool, fc6... carry no weights we need
    layer = f'block{match.group(1)}_conv{match.group(2)}'
    if hasattr(entry, 'weights'):
      pair = np.atleast_1d(np.asarray(entry.weights, dtype=object)).ravel()
      if pair.size != 2:
        raise errors.UserError(f'{path!r}: layer {name} has {pair.size} weight arrays, expected '
                               '{kernel, bias}; is it a MatConvNet SimpleNN VGG file?')
      kernel, bias = pair
    elif hasattr(entry, 'filters') and hasattr(entry, 'biases'):
      kernel, bias = entry.filters, entry.biases
    else:
      raise errors.UserError(f'{path!r}: layer {name} has no weights; DagNN files are not '
                             'supported, use the SimpleNN imagenet-vgg-verydeep-19.mat')
    # Biases are stored as 1xN or Nx1 matrices.
    layers[layer] = {'kernel': np.asarray(kernel), 'bias': np.asarray(bias).reshape(-1)}
  if not layers:
    raise errors.UserError(f'{path!r} has no VGG convolutions (conv1_1, ...); is it a MatConvNet '
                           'VGG file?')
  return layers


def read_matconvnet(path: str, *, network: str | None = None) -> common.Converted:
  """Reads a MatConvNet SimpleNN VGG file (``imagenet-vgg-verydeep-19.mat`` or ``-16.mat``).

  ``layers`` is a cell array of structs; a convolution ``convB_C`` has ``weights = {kernel, bias}``
  (or, in older files, ``filters`` and ``biases``) with the kernel ``[h w in out]``, the project's
  HWIO for images stored height by width, as MATLAB stores them.

  Args:
    path: the ``.mat`` file (MATLAB v5/v7, not v7.3).
    network: ``"vgg19"`` or ``"vgg16"``; ``None`` detects it (VGG19 has ``conv3_4``).

  Returns:
    Float32 HWIO weights, RGB order, mean pixel from ``meta.normalization.averageImage`` (or
    ``(123.68, 116.779, 103.939)``), std 1.

  Raises:
    errors.UserError: unreadable file, no VGG layers, wrong network or shapes, non-finite values.
  """
  data = _load_mat(path)
  layers = _conv_layers(path, data['layers'])
  detected, evidence = common.network_from_layer_names(set(layers))
  evidence = re.sub(r'block(\d+)_conv(\d+)', r'conv\1_\2', evidence)
  network = common.resolve_network(path, detected, network, evidence)
  preprocessing = weights.Preprocessing(channel_order='RGB', mean=_mat_mean(data),
                                        std=(1.0, 1.0, 1.0))
  return common.finish(path, 'matconvnet', network, layers, preprocessing)
