"""Tests for nst_jax.errors: a UserError reaches the user as one line and exit status 2."""

import os
import subprocess
import sys
import textwrap

import pytest

from nst_jax import errors

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_user_error_is_an_exception_and_the_status_is_two():
  assert issubclass(errors.UserError, Exception)
  assert errors.EXIT_USER_ERROR == 2


def test_wrapper_passes_arguments_and_result_through():
  calls = []

  def main(argv, *, flag=None):
    """Docstring of main."""
    calls.append((argv, flag))
    return 'done'

  wrapped = errors.report_user_errors(main)
  assert wrapped(['prog', 'x'], flag=3) == 'done'
  assert calls == [(['prog', 'x'], 3)]
  assert wrapped.__name__ == 'main' and wrapped.__doc__ == 'Docstring of main.'
  assert wrapped.__wrapped__ is main


def test_user_error_becomes_one_line_and_status_two(capsys):

  def main(unused_argv):
    raise errors.UserError('image "a.png" does not exist; give an existing file')

  with pytest.raises(SystemExit) as exited:
    errors.report_user_errors(main)(['prog'])
  assert exited.value.code == errors.EXIT_USER_ERROR
  out, err = capsys.readouterr()
  assert out == ''
  assert err == 'error: image "a.png" does not exist; give an existing file\n'


def test_memory_error_becomes_one_line_with_advice(capsys):

  def main(unused_argv):
    raise MemoryError()

  with pytest.raises(SystemExit) as exited:
    errors.report_user_errors(main)(['prog'])
  assert exited.value.code == errors.EXIT_USER_ERROR
  out, err = capsys.readouterr()
  assert out == '' and err.count('\n') == 1 and err.startswith('error: out of memory')
  assert '--config.size' in err and '--config.remat=True' in err


@pytest.mark.parametrize('exception', [ValueError('a bug'), KeyboardInterrupt()])
def test_other_exceptions_are_not_swallowed(exception, capsys):

  def main(unused_argv):
    raise exception

  with pytest.raises(type(exception)):
    errors.report_user_errors(main)(['prog'])
  assert capsys.readouterr().err == ''


def test_subclasses_are_reported_too(capsys):

  class LayerError(errors.UserError):
    pass

  def main(unused_argv):
    raise LayerError('unknown layer')

  with pytest.raises(SystemExit) as exited:
    errors.report_user_errors(main)([])
  assert exited.value.code == 2 and capsys.readouterr().err == 'error: unknown layer\n'


@pytest.mark.parametrize('use_absl', [False, True])
def test_a_real_process_prints_no_traceback(use_absl):
  script = textwrap.dedent(f"""
      import sys
      from nst_jax import errors

      def main(argv):
        print('started', flush=True)
        raise errors.UserError('weights file "w.npz" does not exist')

      wrapped = errors.report_user_errors(main)
      if {use_absl}:
        from absl import app
        app.run(wrapped, argv=['prog'])
      else:
        wrapped(sys.argv)
  """)
  env = dict(os.environ, PYTHONPATH=_REPO)
  result = subprocess.run([sys.executable, '-c', script], cwd=_REPO, env=env, capture_output=True,
                          text=True, timeout=60, check=False)
  assert result.returncode == errors.EXIT_USER_ERROR, result.stderr
  assert result.stdout == 'started\n'
  assert result.stderr == 'error: weights file "w.npz" does not exist\n'
