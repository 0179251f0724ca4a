"""Tests for nst_jax.files: output folders, and atomic writes that never leave a partial file."""

import contextlib
import os
import stat

import pytest

from nst_jax import errors
from nst_jax import files


@contextlib.contextmanager
def _umask(mask):
  old = os.umask(mask)
  try:
    yield
  finally:
    os.umask(old)


def _mode(path) -> int:
  return stat.S_IMODE(os.stat(path).st_mode)


# ------------------------------------------------------------------------------------------------
# ensure_directory.


def test_ensure_directory_creates_parents_and_accepts_existing(tmp_path):
  target = tmp_path / 'a' / 'b' / 'c'
  files.ensure_directory(str(target))
  assert target.is_dir()
  files.ensure_directory(str(target))  # already there: no error
  assert target.is_dir()


def test_ensure_directory_of_empty_path_does_nothing(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  files.ensure_directory('')
  assert os.listdir(tmp_path) == []


def test_ensure_directory_refuses_a_file(tmp_path):
  path = tmp_path / 'taken'
  path.write_text('x')
  with pytest.raises(errors.UserError, match='exists and is not a directory') as raised:
    files.ensure_directory(str(path))
  assert str(path) in str(raised.value)
  assert path.read_text() == 'x'


def test_ensure_directory_under_a_file_is_a_user_error(tmp_path):
  (tmp_path / 'file').write_text('x')
  with pytest.raises(errors.UserError, match='cannot create output folder') as raised:
    files.ensure_directory(str(tmp_path / 'file' / 'sub'))
  assert 'writable --workdir' in str(raised.value) and '\n' not in str(raised.value)


def test_ensure_directory_not_writable_is_a_user_error(tmp_path, monkeypatch):
  # os.access is what the check asks; faking its answer works even when the tests run as root.
  monkeypatch.setattr(files.os, 'access', lambda path, mode: False)
  with pytest.raises(errors.UserError, match='is not writable'):
    files.ensure_directory(str(tmp_path))


# ------------------------------------------------------------------------------------------------
# atomic_write, write_bytes, write_text.


def test_write_bytes_and_text(tmp_path):
  files.write_bytes(str(tmp_path / 'b.bin'), b'\x00\xffdata')
  assert (tmp_path / 'b.bin').read_bytes() == b'\x00\xffdata'
  files.write_text(str(tmp_path / 't.txt'), 'Gatys – naïve ✓\n')
  assert (tmp_path / 't.txt').read_bytes() == 'Gatys – naïve ✓\n'.encode('utf-8')
  assert sorted(os.listdir(tmp_path)) == ['b.bin', 't.txt']


def test_write_creates_missing_folders_and_takes_relative_paths(tmp_path, monkeypatch):
  files.write_text(str(tmp_path / 'x' / 'y' / 'out.json'), '{}')
  assert (tmp_path / 'x' / 'y' / 'out.json').read_text() == '{}'
  monkeypatch.chdir(tmp_path)
  files.write_text('here.txt', 'ok')
  assert (tmp_path / 'here.txt').read_text() == 'ok'


def test_replacement_is_a_new_file_and_the_old_is_never_written_into(tmp_path):
  path = tmp_path / 'out.txt'
  path.write_bytes(b'old and longer than the new contents')
  os.link(path, tmp_path / 'old_link')  # still names the old inode after a rename over `path`
  files.write_bytes(str(path), b'new')
  assert path.read_bytes() == b'new'  # complete, with no tail of the old contents
  assert (tmp_path / 'old_link').read_bytes() == b'old and longer than the new contents'
  assert sorted(os.listdir(tmp_path)) == ['old_link', 'out.txt']


def test_during_the_write_readers_see_the_old_file(tmp_path):
  path = tmp_path / 'out.txt'
  path.write_text('old')
  with files.atomic_write(str(path)) as handle:
    handle.write(b'half of the new')
    handle.flush()
    assert path.read_text() == 'old'
    temporaries = [name for name in os.listdir(tmp_path) if name != 'out.txt']
    assert len(temporaries) == 1
    assert temporaries[0].startswith('.out.txt.') and temporaries[0].endswith('.tmp')
    assert (tmp_path / temporaries[0]).read_bytes() == b'half of the new'
    handle.write(b' file')
  assert path.read_text() == 'half of the new file'
  assert os.listdir(tmp_path) == ['out.txt']


@pytest.mark.parametrize('exception', [RuntimeError('encoder failed'), KeyboardInterrupt()])
def test_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path, exception):
  path = tmp_path / 'out.txt'
  path.write_text('keep me')
  with pytest.raises(type(exception)):
    with files.atomic_write(str(path)) as handle:
      handle.write(b'partial')
      raise exception
  assert path.read_text() == 'keep me'
  assert os.listdir(tmp_path) == ['out.txt']


def test_failure_without_an_old_file_leaves_nothing(tmp_path):
  with pytest.raises(ValueError):
    with files.atomic_write(str(tmp_path / 'new.txt')) as handle:
      handle.write(b'partial')
      raise ValueError('stop')
  assert os.listdir(tmp_path) == []


def test_temporary_file_that_cannot_be_made_is_a_user_error(tmp_path, monkeypatch):

  def refuse(**unused_kwargs):
    raise PermissionError(13, 'Permission denied')

  monkeypatch.setattr(files.tempfile, 'mkstemp', refuse)
  path = str(tmp_path / 'out.png')
  with pytest.raises(errors.UserError, match='cannot write') as raised:
    files.write_bytes(path, b'x')
  assert path in str(raised.value) and 'Permission denied' in str(raised.value)
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('mask, expected', [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664),
                                            (0o000, 0o666)])
def test_permissions_follow_the_umask_like_open(tmp_path, mask, expected):
  with _umask(mask):
    files.write_bytes(str(tmp_path / 'atomic'), b'x')
    with open(tmp_path / 'plain', 'wb') as handle:  # what the permissions should match
      handle.write(b'x')
    assert os.umask(mask) == mask  # the umask itself is left as it was
  assert _mode(tmp_path / 'atomic') == expected == _mode(tmp_path / 'plain')


def test_a_replaced_file_keeps_its_permissions(tmp_path):
  # As open(path, 'w') does: rewriting an existing file does not reset its mode to the umask's.
  path = tmp_path / 'shared.png'
  path.write_bytes(b'old')
  os.chmod(path, 0o640)
  with _umask(0o022):
    files.write_bytes(str(path), b'new')
  assert path.read_bytes() == b'new' and _mode(path) == 0o640



def _proc_shows_umask() -> bool:
  try:
    with open('/proc/self/status', 'rb') as status:
      return any(line.startswith(b'Umask:') for line in status)
  except OSError:
    return False


@pytest.mark.skipif(not _proc_shows_umask(), reason='no Umask line in /proc/self/status')
@pytest.mark.parametrize('mask, expected', [(0o022, 0o644), (0o027, 0o640)])
def test_umask_is_read_without_setting_it(tmp_path, monkeypatch, mask, expected):
  # Setting the umask even for an instant changes what files other threads create then.
  def no_umask(unused_mask):
    raise AssertionError('os.umask called: the umask was changed to read it')

  with _umask(mask), monkeypatch.context() as patch:
    patch.setattr(os, 'umask', no_umask)
    files.write_bytes(str(tmp_path / 'atomic'), b'x')
  assert _mode(tmp_path / 'atomic') == expected


def test_umask_without_proc_is_set_to_private_and_back(tmp_path, monkeypatch):
  monkeypatch.setattr(files, '_PROC_STATUS', str(tmp_path / 'no_proc_status'))
  real_umask = os.umask
  calls = []

  def recording_umask(mask):
    calls.append(mask)
    return real_umask(mask)

  with _umask(0o027):
    with monkeypatch.context() as patch:
      patch.setattr(os, 'umask', recording_umask)
      files.write_bytes(str(tmp_path / 'atomic'), b'x')
    assert os.umask(0o027) == 0o027  # left as it was
  # Only ever more private for the instant it is read, never 0 (world-writable files).
  assert calls == [0o077, 0o027]
  assert _mode(tmp_path / 'atomic') == 0o640
