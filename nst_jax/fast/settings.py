"""The fast network's two configs (configs/fast_train.py, configs/fast_apply.py), checked and typed.

Like :mod:`nst_jax.plan` for the optimisation path: every field is checked here, a bad one raises
the one-line :class:`nst_jax.errors.UserError`, and below this module nothing reads a config.
"""

from __future__ import annotations

import dataclasses
import os

from nst_jax import config_files
from nst_jax import errors
from nst_jax import losses
from nst_jax import plan as plan_lib
from nst_jax import report
from nst_jax import vgg
from nst_jax.fast import data
from nst_jax.fast import network

#: What ``config.mode`` selects (main.py dispatches on it).
MODES = ('optimize', 'fast_train', 'fast_apply')
COMPUTE_DTYPES = ('float32', 'bfloat16')
#: Fields that do not change the trained parameters, left out of a checkpoint's fingerprint.
_NOT_FINGERPRINTED = ('resume', 'progress', 'steps', 'save_every', 'checkpoint_every',
                      'compilation_cache', 'chunk_size')


@dataclasses.dataclass(frozen=True)
class TrainPlan:
  """Everything a training run needs, typed."""

  train_paths: tuple[str, ...]
  style_paths: tuple[str, ...]       # one, or several with batch_over=style (one model each)
  size: int                          # training crops are size x size
  batch_size: int
  crop_scale: float
  style_size: int                    # the style image's longer side in px
  steps: int
  chunk_size: int
  learning_rate: float
  seed: int
  architecture: network.Architecture
  network: plan_lib.NetworkPlan      # the loss network (VGG)
  entries: tuple[losses.Entry, ...]
  entry_weights: dict[str, float]
  save_every: int
  checkpoint_every: int
  resume: bool
  progress: str
  compilation_cache: str
  model_name: str                    # the model file's name (N styles: _0, _1, ... added)
  fingerprint: str


@dataclasses.dataclass(frozen=True)
class ApplyPlan:
  """What to stylise with which model."""

  model_path: str
  content: str                       # an image, a folder of images, or an animated GIF
  size: int                          # longer side of the output; 0 = the input's size
  batch_size: int                    # images (GIF frames) per compiled batch
  compute_dtype: str
  compilation_cache: str


def mode(config) -> str:
  """The config's ``mode`` (a config without the field is the optimisation path's)."""
  value = config.get('mode', 'optimize')
  if value not in MODES:
    raise errors.UserError(f'unknown --config.mode={value!r}; choose one of {", ".join(MODES)} '
                           '(each has its own config file: configs/default.py, '
                           'configs/fast_train.py, configs/fast_apply.py)')
  return value


def _positive_int(config, field: str, *, at_least: int = 1) -> int:
  value = config[field]
  if not isinstance(value, int) or value < at_least:
    raise errors.UserError(f'--config.{field}={value!r} must be an integer of at least {at_least}')
  return value


def _style_paths(config) -> tuple[str, ...]:
  paths = tuple(plan_lib.split(config.style_images)) or (
      config_files.example_path(config_files.DEFAULT_STYLE),)
  if config.batch_over not in ('', 'style'):
    raise errors.UserError(f"--config.batch_over={config.batch_over!r}: fast training batches "
                           "over 'style' only (one network per style image) or '' (one style)")
  if len(paths) > 1 and config.batch_over != 'style':
    raise errors.UserError(f'{len(paths)} style images given: a fast network learns one style; '
                           'add --config.batch_over=style to train one network per style at once')
  return paths


def train_plan(config) -> TrainPlan:
  """Checks a configs/fast_train.py-like config and returns its typed plan."""
  size = _positive_int(config, 'size', at_least=plan_lib.MIN_SIZE)
  if size % network.MULTIPLE:
    raise errors.UserError(f'--config.size={size} must be a multiple of {network.MULTIPLE} (the '
                           'network halves the crops twice)')
  if config.crop_scale < 1.0:
    raise errors.UserError(f'--config.crop_scale={config.crop_scale} must be at least 1 (crops '
                           'come from images scaled to size x [1, crop_scale] on the shorter side)')
  if config.learning_rate <= 0:
    raise errors.UserError(f'--config.learning_rate={config.learning_rate} must be positive')
  plan_lib.check_choice(config.compute_dtype, COMPUTE_DTYPES, field='compute_dtype')
  plan_lib.check_choice(config.pooling, vgg.POOLINGS, field='pooling')
  plan_lib.check_choice(config.network, ('vgg19', 'vgg16'), field='network')
  plan_lib.check_choice(config.progress, report.PROGRESS_MODES, field='progress')
  entries, entry_weights = plan_lib.loss_entries(config)
  if not any(entry.reference == 'style' for entry in entries):
    raise errors.UserError('no style term has a non-zero weight; a fast network learns a style '
                           '(set --config.style_weight)')
  model_name = config.output
  if not model_name.endswith('.msgpack') or os.sep in model_name:
    raise errors.UserError(f'--config.output={model_name!r} must be a file name ending in '
                           '.msgpack (written inside --workdir)')
  return TrainPlan(
      train_paths=data.find(config.train_images), style_paths=_style_paths(config), size=size,
      batch_size=_positive_int(config, 'batch_size'), crop_scale=float(config.crop_scale),
      style_size=_positive_int(config, 'style_size', at_least=plan_lib.MIN_SIZE),
      steps=_positive_int(config, 'steps'), chunk_size=_positive_int(config, 'chunk_size'),
      learning_rate=float(config.learning_rate), seed=int(config.seed),
      architecture=network.Architecture(
          channels=_positive_int(config, 'channels'),
          residual_blocks=_positive_int(config, 'residual_blocks', at_least=0)),
      network=plan_lib.NetworkPlan(name=config.network, weights_path=config.weights,
                                   pooling=config.pooling, remat=False,
                                   compute_dtype=config.compute_dtype),
      entries=entries, entry_weights=entry_weights,
      save_every=_positive_int(config, 'save_every', at_least=0),
      checkpoint_every=_positive_int(config, 'checkpoint_every', at_least=0),
      resume=bool(config.resume), progress=config.progress,
      compilation_cache=config.compilation_cache, model_name=model_name,
      fingerprint=plan_lib.fingerprint(config, leave_out=_NOT_FINGERPRINTED))


def apply_plan(config) -> ApplyPlan:
  """Checks a configs/fast_apply.py-like config and returns its typed plan."""
  if not config.model:
    raise errors.UserError('no model given; pass --config.model=DIR/model.msgpack (train one '
                           'with python main.py --config=configs/fast_train.py --workdir=DIR)')
  if not isinstance(config.size, int) or (config.size and config.size < plan_lib.MIN_SIZE):
    raise errors.UserError(f'--config.size={config.size!r} must be 0 (keep the input size) or at '
                           f'least {plan_lib.MIN_SIZE}')
  plan_lib.check_choice(config.compute_dtype, COMPUTE_DTYPES, field='compute_dtype')
  return ApplyPlan(model_path=os.path.expanduser(config.model),
                   content=os.path.expanduser(config.content_image) or data.HELD_OUT,
                   size=config.size, batch_size=_positive_int(config, 'batch_size'),
                   compute_dtype=config.compute_dtype,
                   compilation_cache=config.compilation_cache)
