"""The Python API for notebooks: ``nst_jax.stylize(content, style, **overrides)``.

Runs the same pipeline as ``main.py``, with the same checks and the same one-line errors (raised
as :class:`nst_jax.errors.UserError`), on paths or arrays, and returns the result as a uint8
array. Nothing is written to disk unless ``workdir`` is given.

  import nst_jax
  result = nst_jax.stylize('photo.jpg', 'painting.jpg', size=512, style_weight=1e4)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np

from nst_jax import config_files
from nst_jax import errors
from nst_jax import images
from nst_jax import inputs
from nst_jax import pipeline
from nst_jax import plan as plan_lib

#: What a content or style argument may be: one source or a list of them.
Sources = inputs.Source | Sequence[inputs.Source]


def _as_list(sources: Sources) -> list[inputs.Source]:
  if isinstance(sources, (str, np.ndarray)):
    return [sources]
  return list(sources)


def _field_text(sources: list[inputs.Source], what: str) -> str:
  """The config field's comma-separated paths; arrays stand in as '<array K>'."""
  names = []
  for i, source in enumerate(sources):
    if isinstance(source, str):
      if ',' in source:
        raise errors.UserError(f'{what} path {source!r} contains a comma; rename the file')
      names.append(source)
    else:
      names.append(f'<{what} array {i + 1}>')
  return ','.join(names)


def config_with(config, overrides: dict[str, Any]):
  """``config`` with top-level fields replaced; an unknown field or a wrong type is one line."""
  for key, value in overrides.items():
    if key not in config:
      raise errors.UserError(f'unknown config field {key!r}; see configs/default.py for the fields')
    current = config[key]
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    try:
      config[key] = value
    except (TypeError, ValueError) as exc:
      raise errors.UserError(f'{key}={value!r}: {" ".join(str(exc).split())} (the field holds '
                             f'{type(current).__name__})') from None
  return config


def stylize(content: Sources, style: Sources, *, workdir: str | None = None,
            config: Any = 'default', **overrides: Any) -> np.ndarray | list[np.ndarray]:
  """Stylises ``content`` in the style of ``style``.

  Args:
    content: a path or an (H, W, 3) RGB array (uint8, or floats in 0-255); a list of them with
      ``batch_over='content'``.
    style: a path or array; a list of them is blended (``style_blend_weights``), or stylised
      separately with ``batch_over='style'``.
    workdir: a folder for the result, grid, loss log and checkpoints; None writes nothing.
    config: the starting config: a preset's name (``'default'``, ``'pastiche'``, ...), a config
      file's path, or a ``ConfigDict``.
    **overrides: config fields, e.g. ``size=512, style_weight=1e4, steps=200``.

  Returns:
    The result as a uint8 (H, W, 3) array; a list of them for a batch (``batch_over``).

  Raises:
    errors.UserError: a bad setting or input, with the same one-line message as the CLI.
  """
  # A copy keeps the field references (content_weight -> losses.content.weight) alive.
  base = config_files.load_config_file(config) if isinstance(config, str) else copy.deepcopy(config)
  contents, styles = _as_list(content), _as_list(style)
  if workdir is None and 'compilation_cache' not in overrides:
    overrides['compilation_cache'] = ''  # nothing on disk without a workdir
  base = config_with(base, dict(overrides, content_image=_field_text(contents, 'content'),
                                style_images=_field_text(styles, 'style')))
  plan = plan_lib.from_config(base)
  result = pipeline.run(plan, workdir, contents=contents, styles=styles)
  finished = [images.to_uint8(image) for image in result.images]
  return finished if plan.batch.over else finished[0]
