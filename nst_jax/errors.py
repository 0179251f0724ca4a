"""The one exception type that reaches the user as a single line.

Anything the user can fix (a bad path, an unreadable image, an unknown layer name, a weights file of
the wrong network) raises :class:`UserError` with a message that names the problem and the fix. The
command-line entry points catch it, print ``error: <message>`` to stderr and exit with status 2; no
traceback is shown.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any


class UserError(Exception):
  """A problem with the user's input, described in one line that says what to do."""


#: Exit status for a UserError.
EXIT_USER_ERROR = 2


def report_user_errors(main: Callable[..., Any]) -> Callable[..., Any]:
  """Wraps an absl ``main(argv)`` so that a :class:`UserError` becomes one line and exit status 2."""

  @functools.wraps(main)
  def wrapped(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except UserError as exc:
      print(f'error: {exc}', file=sys.stderr)
      sys.exit(EXIT_USER_ERROR)
    except MemoryError:
      print('error: out of memory; use a smaller --config.size, fewer styles, or '
            '--config.remat=True', file=sys.stderr)
      sys.exit(EXIT_USER_ERROR)

  return wrapped
