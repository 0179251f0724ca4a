r"""Neural style transfer from the command line.

  python main.py                                   # the embedded example, into runs/default
  python main.py --workdir=runs/mine --config.content_image=photo.jpg \
      --config.style_images=painting.jpg --config.size=512
  python main.py --config=configs/tf_tutorial.py   # a preset (see configs/)

Every setting is a field of the config file (configs/default.py lists and explains them all),
overridable as --config.FIELD=VALUE.
"""

import logging
import os
import re
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from nst_jax import errors
from nst_jax import stylize

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs',
                               'default.py')
# ml_collections applies --config.FIELD overrides while these flags are parsed: a mistyped field
# or an unloadable config file surfaces as KeyError/AttributeError/OSError, reported in one line.
_CONFIG_ERRORS = (KeyError, AttributeError, OSError, flags.Error)


def _config_error(exc: BaseException) -> None:
  text = str(exc.args[0] if exc.args else exc)
  missing = re.search(r'\[Errno \d+\] ([^\n]*)', text)
  if isinstance(exc, OSError) and missing:
    text = f'cannot load the --config file: {missing.group(1)}'
  else:
    # ml_collections' KeyError messages are reprs with escaped newlines: make them one line.
    text = text.replace('\\n', '; ').replace("\\'", "'")
    if len(text) > 1 and text[0] == text[-1] and text[0] in '\'"':
      text = text[1:-1]
  print(f'error: bad command line: {" ".join(text.split())} (see python main.py --help and '
        'configs/default.py for the fields)', file=sys.stderr)
  sys.exit(errors.EXIT_USER_ERROR)


try:
  _CONFIG = config_flags.DEFINE_config_file(
      'config', _DEFAULT_CONFIG, 'Config file; fields overridable as --config.FIELD=VALUE.',
      lock_config=True)
except _CONFIG_ERRORS as exc:
  _config_error(exc)
_WORKDIR = flags.DEFINE_string('workdir', 'runs/default', 'Folder for the result and logs.')


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except _CONFIG_ERRORS as exc:
    _config_error(exc)


@errors.report_user_errors
def main(argv):
  # JAX logs at INFO that it found no TPU; users only need to know which device runs (we say).
  logging.getLogger('jax._src.xla_bridge').setLevel(logging.WARNING)
  if len(argv) > 1:
    raise errors.UserError(f'unexpected arguments {argv[1:]}; settings are --config.FIELD=VALUE')
  try:
    config = _CONFIG.value
    config.keys()  # a --config file that failed to load raises here
  except OSError as exc:
    _config_error(exc)
  try:
    stylize.run(config, _WORKDIR.value)
  except stylize.Stopped as stopped:
    sys.exit(128 + stopped.signal_number)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
