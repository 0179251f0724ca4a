"""A trained fast network on disk: its parameters and what is needed to rebuild and describe it.

A model file is a flax msgpack of ``{format, architecture, params, style, size, style_size, step}``
written atomically. :func:`load` checks the format tag and that the parameters fit the recorded
architecture, so a checkpoint, a VGG weights file or another network's model gets one line.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from flax import serialization

from nst_jax import errors
from nst_jax import files
from nst_jax.fast import network

#: The format tag written in every model file (a new layout would get a new tag).
FORMAT = 'nst_jax.fast.johnson2016/1'


@dataclasses.dataclass(frozen=True)
class Model:
  """A loaded model: the architecture, its parameters, and how it was trained."""

  architecture: network.Architecture
  params: Any
  style: str                         # the style image it learned (its path at training time)
  size: int                          # training crop size
  style_size: int
  step: int


def save(path: str, model: Model) -> None:
  """Writes ``model`` to ``path`` atomically."""
  payload = {'format': FORMAT, 'architecture': dataclasses.asdict(model.architecture),
             'params': serialization.to_state_dict(jax.device_get(model.params)),
             'style': model.style, 'size': model.size, 'style_size': model.style_size,
             'step': model.step}
  files.write_bytes(path, serialization.msgpack_serialize(payload))


def _bad(path: str, why: str) -> errors.UserError:
  return errors.UserError(f'{path!r} is not an nst_jax fast-stylisation model ({why}); give a '
                          'model file written by python main.py --config=configs/fast_train.py')


def load(path: str) -> Model:
  """Reads a model file.

  Raises:
    errors.UserError: a missing or unreadable file, another kind of file, or parameters that do
      not fit the recorded architecture.
  """
  try:
    with open(path, 'rb') as handle:
      payload = serialization.msgpack_restore(handle.read())
  except OSError as exc:
    raise errors.UserError(f'cannot read the model {path!r}: {exc.strerror}') from None
  except Exception as exc:  # msgpack raises its own types for a file of another format
    raise _bad(path, f'not a msgpack file: {type(exc).__name__}') from None
  if not isinstance(payload, dict) or payload.get('format') != FORMAT:
    found = payload.get('format') if isinstance(payload, dict) else None
    raise _bad(path, f'format {found!r}, expected {FORMAT!r}' if found else 'no format tag')
  try:
    architecture = network.Architecture(**payload['architecture'])
    shapes = network.param_shapes(architecture)
    params = serialization.from_state_dict(shapes, payload['params'])
  except (TypeError, KeyError, ValueError) as exc:
    raise _bad(path, f'its parameters do not fit the recorded network: {exc}') from None
  for leaf, shape in zip(jax.tree.leaves(params), jax.tree.leaves(shapes)):
    if np.shape(leaf) != shape.shape:
      raise _bad(path, f'a parameter of shape {np.shape(leaf)} where the network has '
                       f'{shape.shape}')
  params = jax.tree.map(lambda leaf: np.asarray(leaf, np.float32), params)
  return Model(architecture=architecture, params=params, style=str(payload.get('style', '')),
               size=int(payload.get('size', 0)), style_size=int(payload.get('style_size', 0)),
               step=int(payload.get('step', 0)))
