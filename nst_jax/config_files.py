"""Config files and example images: presets loaded by name or path, as main.py loads them.

The benchmark, the Python API and the tests load presets through :func:`load_config_file`
rather than importing ``configs`` (which is not a package of the installed library).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from importlib import resources

from nst_jax import errors

#: The embedded example pair used when no content or style image is given.
DEFAULT_CONTENT = 'astronaut.jpg'
DEFAULT_STYLE = 'starry_night.jpg'

#: The checkout's top folder, where configs/ lives.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config_file(path: str):
  """``get_config()`` of a config file (e.g. ``configs/pastiche.py``), loaded as main.py does.

  A bare name such as ``'pastiche'`` means ``configs/pastiche.py`` of this checkout.
  """
  if os.sep not in path and not path.endswith('.py'):
    path = os.path.join(ROOT, 'configs', f'{path}.py')
  if not os.path.isfile(path):
    raise errors.UserError(f'config file {path} not found; give a path to a config file such as '
                           'configs/default.py of a checkout of nst_jax')
  spec = importlib.util.spec_from_file_location(
      f'nst_jax_config_{os.path.splitext(os.path.basename(path))[0]}', path)
  module = importlib.util.module_from_spec(spec)
  added = ROOT not in sys.path
  if added:  # presets import configs.default, as they do under main.py
    sys.path.insert(0, ROOT)
  try:
    spec.loader.exec_module(module)
  finally:
    if added:
      sys.path.remove(ROOT)
  return module.get_config()


def example_path(name: str) -> str:
  """Path of an embedded example image (see nst_jax/assets/README.md for licences)."""
  return str(resources.files('nst_jax').joinpath('assets', 'examples', name))
