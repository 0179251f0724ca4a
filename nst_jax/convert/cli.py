"""The command line of ``python -m nst_jax.convert``: flags, one conversion, a one-line summary.

Thin: the work is :func:`nst_jax.convert.pipeline.convert`. ``--help`` prints the docstring of
``nst_jax/convert/__main__.py`` (absl shows the main module's), which describes the formats.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import app
from absl import flags

from nst_jax import errors
from nst_jax.convert import common
from nst_jax.convert import download
from nst_jax.convert import pipeline


def _define_flags(module_name: str) -> None:
  """Defines the flags, registered as ``module_name``'s so that ``--help`` lists them."""
  # Defined only when run as a program, so importing this package (tests, other entry points)
  # cannot collide with another module's flags of the same names.
  flags.DEFINE_string('input', None, 'Source weights file; "keras_vgg19"/"keras_vgg16" download '
                      'the Keras file.', module_name=module_name)
  flags.DEFINE_string('output', None, 'Destination .npz in the project\'s format.',
                      module_name=module_name)
  flags.DEFINE_string('network', None, 'vgg19 or vgg16; unset detects it from the file.',
                      module_name=module_name)
  flags.DEFINE_string('format', 'auto', f'auto or one of: {", ".join(common.FORMATS)}.',
                      module_name=module_name)
  flags.DEFINE_boolean('quantize', None, 'True: quantise kernels to 256-entry tables (about 4x '
                       'smaller); False: store float32 kernels; unset: keep the source\'s form.',
                       module_name=module_name)
  flags.DEFINE_string('fetch', None, 'vgg19 or vgg16: download the Keras weights instead of '
                      '--input.', module_name=module_name)


@errors.report_user_errors
def main(argv: Sequence[str]) -> None:
  """Runs the command line; see ``python -m nst_jax.convert --help``."""
  if len(argv) > 1:
    raise errors.UserError(f'unexpected arguments {list(argv[1:])}; every option is a flag such '
                           'as --input=FILE')
  options = flags.FLAGS
  input_path = options.input
  if options.fetch:
    if input_path:
      raise errors.UserError('give --input or --fetch, not both')
    if options.fetch not in download.KERAS_DOWNLOADS:
      raise errors.UserError(f'--fetch={options.fetch} is not a network; use vgg19 or vgg16')
    input_path = f'keras_{options.fetch}'
  if not input_path:
    raise errors.UserError('no input given; pass --input=FILE, or --fetch=vgg19 to download the '
                           'Keras VGG19 weights')
  converted = pipeline.convert(input_path, options.output, source_format=options.format,
                               network=options.network, quantize=options.quantize)
  print(pipeline.summary(converted, options.output))


def run() -> None:
  """Entry point for ``python -m nst_jax.convert`` and console scripts."""
  # absl's --help lists the flags of the main module, which it names by sys.argv[0].
  _define_flags(module_name=sys.argv[0])
  app.run(main)
