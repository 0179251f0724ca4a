"""Writing files so that nothing is ever half-written: a temporary file, then a rename."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

from nst_jax import errors


def ensure_directory(path: str) -> None:
  """Creates ``path`` (and parents) if needed; raises UserError if that is impossible."""
  if not path:
    return
  if os.path.exists(path) and not os.path.isdir(path):
    raise errors.UserError(f'{path!r} exists and is not a directory; choose another output folder')
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as exc:
    raise errors.UserError(f'cannot create output folder {path!r} ({exc.strerror}); '
                           'choose a writable --workdir') from None
  if not os.access(path, os.W_OK):
    raise errors.UserError(f'output folder {path!r} is not writable; choose a writable --workdir')


#: Where Linux (4.7 and later) shows the process umask, so it can be read without changing it.
_PROC_STATUS = '/proc/self/status'


def _umask() -> int:
  """The process umask, read without changing it where the system shows it.

  Elsewhere the only way to read it is to set it and set it back; for that instant the mask is
  0o077 (files other threads create are private, never more open than the user asked for).
  """
  try:
    with open(_PROC_STATUS, 'rb') as status:
      for line in status:
        if line.startswith(b'Umask:'):
          return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  mask = os.umask(0o077)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def atomic_write(path: str) -> Iterator[BinaryIO]:
  """Opens a temporary file beside ``path`` for binary writing and renames it over ``path``.

  Readers see either the old file or the complete new one, never a partial write, even if the
  process is killed mid-write.

  Args:
    path: the final destination.

  Yields:
    A binary file handle to write to.
  """
  directory = os.path.dirname(os.path.abspath(path))
  ensure_directory(directory)
  try:
    descriptor, temporary = tempfile.mkstemp(
        dir=directory, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
  except OSError as exc:
    raise errors.UserError(f'cannot write {path!r} ({exc.strerror}); choose a writable '
                           'output path') from None
  try:
    with os.fdopen(descriptor, 'wb') as handle:
      yield handle
      handle.flush()
      os.fsync(handle.fileno())
    # mkstemp makes the file private (0600): a replaced file keeps its own permissions, a new
    # one gets those a plain open() would give it.
    try:
      mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
      mode = 0o666 & ~_umask()
    os.chmod(temporary, mode)
    os.replace(temporary, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(temporary)
    raise


def write_bytes(path: str, data: bytes) -> None:
  """Writes ``data`` to ``path`` atomically."""
  with atomic_write(path) as handle:
    handle.write(data)


def write_text(path: str, text: str) -> None:
  """Writes UTF-8 ``text`` to ``path`` atomically."""
  write_bytes(path, text.encode('utf-8'))
