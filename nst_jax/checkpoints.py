"""Checkpoints: the resumable state of a run (image, optimiser state, step), written atomically.

A checkpoint is a flax msgpack of the batched optimisation state, the scale it belongs to, the
config's fingerprint and the loss records so far. The optimiser history (L-BFGS: 2 x memory_size
images per problem) can be left out (``checkpoint_history``); a resume then restarts it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import serialization

from nst_jax import devices
from nst_jax import errors
from nst_jax import files

#: ``checkpoint_history=auto`` keeps the optimiser history in checkpoints only below this size.
HISTORY_BYTES_LIMIT = 256 * 2**20


def history_bytes(state: Mapping) -> int:
  """Bytes of the optimiser's state (L-BFGS: 2 x memory_size images per batch element)."""
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state['opt_state']))


def keep_history(setting: str, state: Mapping) -> bool:
  """Whether checkpoints carry the optimiser history (``checkpoint_history`` true/false/auto)."""
  if setting == 'auto':
    return history_bytes(state) < HISTORY_BYTES_LIMIT
  return setting == 'true'


def _flat(settings: Mapping, prefix: str = '') -> dict[str, Any]:
  """Nested settings as one level, their keys dotted (``losses.style.term``)."""
  flat = {}
  for key, value in settings.items():
    if isinstance(value, Mapping):
      flat.update(_flat(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def _differences(saved: str, current: str) -> str:
  """' (size=40 there, 48 now)': the settings two fingerprints disagree on ('' if unreadable)."""
  try:
    before, now = _flat(json.loads(saved)), _flat(json.loads(current))
  except (ValueError, TypeError, AttributeError):
    return ''  # an older checkpoint's hashed fingerprint
  fields = sorted(key for key in before.keys() | now.keys() if before.get(key) != now.get(key))
  if not fields:
    return ''
  shown = ', '.join(f'{key}={before.get(key)!r} there, {now.get(key)!r} now' for key in fields[:3])
  return f' ({shown}{", ..." if len(fields) > 3 else ""})'


def save(path: str, *, state: Mapping, scale: int, fingerprint: str, records: list[dict],
         with_history: bool) -> None:
  """Writes the resumable state, atomically.

  Without the history the file is about the image's size; a resume then restarts the history.
  In a distributed run every process must call this (the state is gathered from all of them);
  only process 0 writes, and the others resume from its file (a shared workdir).
  """
  saved = state if with_history else {k: v for k, v in state.items() if k != 'opt_state'}
  gathered = devices.to_host(saved)
  if jax.process_index() != 0:
    return
  payload = {'state': serialization.to_state_dict(gathered), 'scale': scale,
             'fingerprint': fingerprint, 'records': json.dumps(records),
             'history': with_history}
  files.write_bytes(path, serialization.msgpack_serialize(payload))


def load(path: str, *, template_for: Callable[[int], Any], fingerprint: str
         ) -> tuple[dict, int, list[dict]]:
  """Reads a checkpoint; ``template_for(scale)`` gives the state's structure at a scale.

  Returns:
    The state (without ``opt_state`` when written without the history), its scale, the records.

  Raises:
    errors.UserError: another config's checkpoint, or an unreadable one.
  """
  try:
    with open(path, 'rb') as handle:
      payload = serialization.msgpack_restore(handle.read())
    if payload['fingerprint'] != fingerprint:
      raise errors.UserError(f'checkpoint {path!r} was made with another config'
                             f'{_differences(payload["fingerprint"], fingerprint)}; run with the '
                             'same config, or without --config.resume to start afresh')
    scale = int(payload['scale'])
    records = json.loads(payload['records'])
    template = template_for(scale)
    if not payload.get('history', True):
      template = {k: v for k, v in template.items() if k != 'opt_state'}
    state = serialization.from_state_dict(template, payload['state'])
  except (OSError, ValueError, KeyError, TypeError) as exc:
    raise errors.UserError(f'checkpoint {path!r} cannot be read or does not match this config '
                           f'({exc}); delete it or run without --config.resume') from None
  if any(np.shape(leaf) != t.shape for leaf, t in zip(jax.tree.leaves(state),
                                                       jax.tree.leaves(template))):
    raise errors.UserError(f'checkpoint {path!r} does not match this config; delete it or run '
                           'without --config.resume')
  return state, scale, records
