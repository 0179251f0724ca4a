r"""Neural style transfer from the command line.

  python main.py                                   # the embedded example, into runs/default
  python main.py --workdir=runs/mine --config.content_image=photo.jpg \
      --config.style_images=painting.jpg --config.size=512
  python main.py --config=configs/keras_vgg16.py   # a preset (see configs/)

Every setting is a field of the config file (configs/default.py lists and explains them all),
overridable as --config.FIELD=VALUE.
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from nst_jax import errors
from nst_jax import stylize

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/default.py', 'Config file; fields overridable as --config.FIELD=VALUE.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', 'runs/default', 'Folder for the result and logs.')


@errors.report_user_errors
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}; settings are --config.FIELD=VALUE')
  try:
    stylize.run(_CONFIG.value, _WORKDIR.value)
  except stylize.Stopped as stopped:
    sys.exit(128 + stopped.signal_number)


if __name__ == '__main__':
  app.run(main)
