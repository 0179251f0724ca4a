"""Checkpoints: written atomically, refused when made with another config."""

import jax.numpy as jnp
import numpy as np
import pytest

from nst_jax import checkpoints
from nst_jax import errors
from tests import helpers


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
  helpers.run(helpers.tiny_config(tmp_path, steps=3), str(tmp_path / 'run'))
  # The refusal names what differs, nested fields dotted.
  with pytest.raises(errors.UserError, match=r"another config \(size=40 there, 48 now\)"):
    helpers.run(helpers.tiny_config(tmp_path, resume=True, size=48), str(tmp_path / 'run'))
  with pytest.raises(errors.UserError, match=r"losses.style.term='gram' there, 'mean_std' now"):
    helpers.run(helpers.tiny_config(tmp_path, resume=True, **{'losses.style.term': 'mean_std'}),
                str(tmp_path / 'run'))


def test_a_checkpoint_round_trips_with_or_without_the_history(tmp_path):
  state = {'image': np.arange(12, dtype=np.float32).reshape(1, 2, 2, 3),
           'step': np.array([5], np.int32),
           'opt_state': {'history': np.ones((1, 4, 2, 2, 3), np.float32)}}
  template = lambda scale: {k: jnp.zeros_like(v) for k, v in state.items() if k != 'opt_state'} | {
      'opt_state': {'history': jnp.zeros((1, 4, 2, 2, 3))}}
  path = str(tmp_path / 'c.msgpack')
  for with_history in (True, False):
    checkpoints.save(path, state=state, scale=1, fingerprint='f', records=[{'step': 5}],
                     with_history=with_history)
    loaded, scale, records = checkpoints.load(path, template_for=template, fingerprint='f')
    assert scale == 1 and records == [{'step': 5}]
    np.testing.assert_array_equal(loaded['image'], state['image'])
    assert ('opt_state' in loaded) == with_history
  assert checkpoints.history_bytes(state) == 4 * 12 * 4
  assert checkpoints.keep_history('auto', state) and not checkpoints.keep_history('false', state)
  with pytest.raises(errors.UserError, match='another config'):
    checkpoints.load(path, template_for=template, fingerprint='g')
  (tmp_path / 'bad.msgpack').write_bytes(b'not msgpack')
  with pytest.raises(errors.UserError, match='cannot be read'):
    checkpoints.load(str(tmp_path / 'bad.msgpack'), template_for=template, fingerprint='f')
