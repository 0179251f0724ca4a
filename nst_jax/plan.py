"""The config, checked and turned into a frozen, typed plan: the only module that reads a config.

:func:`from_config` checks every field of a ``configs/default.py``-like ``ConfigDict`` and raises
the one-line :class:`nst_jax.errors.UserError` of a bad setting; below it no module reads a config
field, each function takes the few typed values it needs. Files are not read here (see
:mod:`nst_jax.inputs`), so a plan can also be built for arrays (:mod:`nst_jax.api`).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from nst_jax import color
from nst_jax import config_files
from nst_jax import errors
from nst_jax import images
from nst_jax import losses
from nst_jax import optim
from nst_jax import parameterization
from nst_jax import report
from nst_jax import tiling
from nst_jax import vgg
from nst_jax import weights

#: Fields that may be batched with ``batch_over`` (numeric, so they can differ inside one program).
BATCHABLE_FIELDS = ('content_weight', 'style_weight', 'tv_weight', 'seed', 'init_noise_scale')
INITS = ('content', 'style', 'uniform', 'gaussian')
#: Smallest output side: VGG's five poolings need at least 32 px to leave a 1x1 block5 feature.
MIN_SIZE = 32
#: Largest output side accepted at all (memory is checked separately).
MAX_SIZE = 16384
#: Fields that do not change the result, left out of a checkpoint's config fingerprint.
_NOT_FINGERPRINTED = ('resume', 'progress', 'steps', 'save_every', 'checkpoint_every',
                      'compilation_cache', 'checkpoint_history', 'coordinator_address',
                      'num_processes', 'process_id', 'heartbeat_timeout',
                      'tile_size')  # tiles give the same result: a run may resume with them

#: How several devices share a run (config.shard).
SHARD_MODES = ('batch', 'space')
#: Precisions of lbfgs_fixed's history (config.history_dtype).
HISTORY_DTYPES = ('float32', 'bfloat16')
#: Activation dtypes; float64 (image, network and optimiser) is a reference mode under x64.
COMPUTE_DTYPES = ('float32', 'bfloat16', 'float64')


@dataclasses.dataclass(frozen=True)
class ImagesPlan:
  """Which images to read and how to size, colour-handle and initialise them."""

  content_paths: tuple[str, ...]     # one, or several with batch_over=content
  style_paths: tuple[str, ...]
  style_blend: tuple[float, ...]     # one per style image, summing to 1
  mask_paths: tuple[str, ...]        # empty, or one per style image
  size: int                          # longer side of the output
  square: bool
  style_scale: float
  preserve_color: str                # one of color.MODES
  init: str                          # one of INITS, or 'file' (init_path)
  init_path: str
  init_noise_scale: float
  seed: int

  def output_size(self, content_shape: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the result for a content of ``content_shape``."""
    return images.fit_size(*content_shape, size=self.size, square=self.square)


@dataclasses.dataclass(frozen=True)
class NetworkPlan:
  """The feature network (hashable: part of the compiled program's static description)."""

  name: str                          # 'vgg19' or 'vgg16'
  weights_path: str                  # '' = the embedded weights
  pooling: str
  remat: bool
  compute_dtype: str                 # 'float32', 'bfloat16' or 'float64' (x64 only)
  tile_size: int = 0                 # exact tiled evaluation over tiles of this side (0: off)


@dataclasses.dataclass(frozen=True)
class OptimizerPlan:
  """The optimiser and how many of its steps one compiled chunk takes (hashable)."""

  name: str                          # one of optim.OPTIMIZERS
  learning_rate: float
  memory_size: int
  max_linesearch_steps: int
  adam_b1: float
  adam_b2: float
  adam_eps: float
  lbfgs_restart: bool
  chunk_size: int
  parameterization: str = 'pixels'   # what the optimiser moves: 'pixels' or 'laplacian'
  pyramid_levels: int = 4            # halvings of the Laplacian pyramid
  history_dtype: str = 'float32'     # lbfgs_fixed's (s, y) history: 'float32' or 'bfloat16'

  def make(self):
    """The optax transformation."""
    return optim.make(self.name, learning_rate=self.learning_rate,
                      memory_size=self.memory_size, max_linesearch_steps=self.max_linesearch_steps,
                      adam_b1=self.adam_b1, adam_b2=self.adam_b2, adam_eps=self.adam_eps,
                      history_dtype=self.history_dtype)


@dataclasses.dataclass(frozen=True)
class SchedulePlan:
  """Coarse to fine: the scales and the steps at each."""

  scales: int
  scale_factor: float
  steps: int                         # at the final scale
  coarse_steps: int                  # at each coarser scale
  scale_balance: bool
  content_detail: bool               # finer scales start with the content's detail put back

  def sizes(self, final: tuple[int, int]) -> list[tuple[int, int]]:
    """(height, width) of every scale, coarse to fine, ending at ``final``."""
    return [(max(MIN_SIZE, round(final[0] / self.scale_factor ** k)),
             max(MIN_SIZE, round(final[1] / self.scale_factor ** k)))
            for k in range(self.scales - 1, -1, -1)]

  @property
  def steps_per_scale(self) -> list[int]:
    return [self.coarse_steps] * (self.scales - 1) + [self.steps]


@dataclasses.dataclass(frozen=True)
class BatchPlan:
  """What the N problems of one vmapped program differ in."""

  over: str                          # '', 'style', 'content' or one of BATCHABLE_FIELDS
  values: tuple[float, ...]          # the batched field's values


@dataclasses.dataclass(frozen=True)
class OutputPlan:
  """What is written, when, and how the run reports and resumes."""

  output: str                        # result file name inside the workdir
  save_every: int
  checkpoint_every: int
  checkpoint_history: str            # 'true', 'false' or 'auto'
  resume: bool
  progress: str
  compilation_cache: str


@dataclasses.dataclass(frozen=True)
class DevicesPlan:
  """How the run is spread over devices and processes."""

  shard: str                         # 'batch' or 'space'
  distributed: bool                  # several processes: jax.distributed.initialize() first
  coordinator_address: str           # 'host:port' of process 0 ('' = from the environment)
  num_processes: int                 # -1 = from the environment
  process_id: int                    # -1 = from the environment
  heartbeat_timeout: int             # seconds before a silent process counts as lost


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything a run does, checked."""

  images: ImagesPlan
  network: NetworkPlan
  entries: tuple[losses.Entry, ...]
  entry_weights: dict[str, float]    # each loss entry's weight (before batching)
  optimizer: OptimizerPlan
  schedule: SchedulePlan
  batch: BatchPlan
  outputs: OutputPlan
  devices: DevicesPlan
  fingerprint: str                   # identifies the config in checkpoints

  @property
  def batch_size(self) -> int:
    """How many results one run makes (N problems)."""
    return {'content': len(self.images.content_paths),
            'style': len(self.images.style_paths)}.get(self.batch.over, len(self.batch.values) or 1)


def split(text: Any) -> list[str]:
  """Items of a comma-separated field."""
  return [item.strip() for item in str(text).split(',') if item.strip()]


def _floats(text: str, *, field: str) -> list[float]:
  try:
    return [float(item) for item in split(text)]
  except ValueError:
    raise errors.UserError(f'--config.{field}={text!r} must be comma-separated numbers') from None


def check_choice(value: str, choices: Sequence[str], *, field: str) -> None:
  if value not in choices:
    raise errors.UserError(f'unknown {field} {value!r}; choose one of {", ".join(choices)}')


def loss_entries(config) -> tuple[tuple[losses.Entry, ...], dict[str, float]]:
  """The loss entries named in ``config.losses`` (zero-weight ones left out) and their weights.

  Also used by the fast network's training config (:mod:`nst_jax.fast.settings`), which has the
  same ``losses``, ``network`` and ``batch_over`` fields and no ``style_masks``.
  """
  entries = []
  for name, entry in config.losses.items():
    if float(entry.weight) == 0.0 and config.get('batch_over') != f'{name}_weight':
      continue
    entries.append(losses.make_entry(
        name=name, term=entry.term, layers=tuple(entry.layers),
        layer_weights=tuple(entry.get('layer_weights', ()) or ()),
        options=dict(entry.get('options', {}) or {}),
        normalize_gradients=bool(entry.get('normalize_gradients', False))))
  if not entries:
    raise errors.UserError('every loss weight is zero; set --config.content_weight or '
                           '--config.style_weight')
  for entry in entries:
    vgg.check_layers(entry.layers, network=config.network)
  if split(config.get('style_masks', '')):
    for entry in entries:
      if entry.reference == 'style' and not losses.accepts_mask(entry):
        maskable = sorted(name for name, fn in losses.TERMS.items() if fn.reference == 'style'
                          and 'mask' in inspect.signature(fn).parameters)
        raise errors.UserError(
            f'loss {entry.name!r} (term {entry.term!r}) takes no mask keyword, so it cannot honour '
            f'--config.style_masks; use a term that does ({", ".join(maskable)}) or add '
            '`mask=None` to its signature (README, "Add your own loss")')
  return tuple(entries), {entry.name: float(config.losses[entry.name].weight) for entry in entries}


def _images(config) -> ImagesPlan:
  if not isinstance(config.size, int) or config.size < MIN_SIZE:
    raise errors.UserError(f'--config.size={config.size} is too small; VGG needs at least '
                           f'{MIN_SIZE} px for its five poolings')
  if config.size > MAX_SIZE:
    raise errors.UserError(f'--config.size={config.size} is absurd (at most {MAX_SIZE})')
  if config.style_scale <= 0:
    raise errors.UserError(f'--config.style_scale={config.style_scale} must be positive')
  check_choice(config.preserve_color, color.MODES, field='preserve_color')
  contents = tuple(split(config.content_image)) or (config_files.example_path(config_files.DEFAULT_CONTENT),)
  if len(contents) > 1 and config.batch_over != 'content':
    raise errors.UserError('several content images need --config.batch_over=content')
  styles = tuple(split(config.style_images)) or (config_files.example_path(config_files.DEFAULT_STYLE),)
  blend = _floats(config.style_blend_weights, field='style_blend_weights')
  if blend and config.batch_over == 'style':
    raise errors.UserError('--config.style_blend_weights blends styles, but batch_over=style '
                           'stylises each style separately; drop one of the two')
  blend = blend or [1.0] * len(styles)
  if len(blend) != len(styles) or min(blend) < 0 or sum(blend) <= 0:
    numbers = 'a positive number' if len(styles) == 1 else (
        f'{len(styles)} non-negative numbers, one per style image, not all zero')
    raise errors.UserError(f'--config.style_blend_weights needs {numbers}; got '
                           f'{config.style_blend_weights!r} for {len(styles)} style image'
                           f'{"s" if len(styles) > 1 else ""}')
  masks = tuple(split(config.style_masks))
  if masks and len(masks) != len(styles):
    raise errors.UserError(f'{len(masks)} style masks for {len(styles)} style images; '
                           'give one mask per style image')
  looks_like_name = not os.path.splitext(config.init)[1] and os.sep not in config.init
  if config.init not in INITS and looks_like_name:  # most likely a misspelt choice
    raise errors.UserError(f'unknown init {config.init!r}; choose one of {", ".join(INITS)}, '
                           'or give an image file')
  return ImagesPlan(
      content_paths=contents, style_paths=styles,
      style_blend=tuple(value / sum(blend) for value in blend), mask_paths=masks,
      size=config.size, square=bool(config.square), style_scale=float(config.style_scale),
      preserve_color=config.preserve_color,
      init=config.init if config.init in INITS else 'file',
      init_path='' if config.init in INITS else config.init,
      init_noise_scale=float(config.init_noise_scale), seed=int(config.seed))


def _network(config) -> NetworkPlan:
  check_choice(config.network, tuple(weights.CONV_SPECS), field='network')
  check_choice(config.pooling, vgg.POOLINGS, field='pooling')
  check_choice(config.compute_dtype, COMPUTE_DTYPES, field='compute_dtype')
  if config.compute_dtype == 'float64' and not jax.config.jax_enable_x64:
    raise errors.UserError('compute_dtype=float64 needs 64-bit JAX: run with JAX_ENABLE_X64=1 '
                           'in the environment, or choose float32')
  return NetworkPlan(name=config.network, weights_path=config.weights or '',
                     pooling=config.pooling, remat=bool(config.remat),
                     compute_dtype=config.compute_dtype, tile_size=int(config.tile_size))


def _optimizer(config) -> OptimizerPlan:
  check_choice(config.optimizer, optim.OPTIMIZERS, field='optimizer')
  if config.optimizer == 'lbfgs' and float(config.learning_rate) != 1.0:
    raise errors.UserError(
        f'--config.learning_rate={config.learning_rate} has no effect with optimizer=lbfgs (its '
        'line search chooses every step); leave it at 1, or use optimizer=lbfgs_fixed or adam')
  if config.chunk_size < 1:
    raise errors.UserError(f'--config.chunk_size={config.chunk_size} must be at least 1')
  check_choice(config.parameterization, parameterization.PARAMETERIZATIONS,
                field='parameterization')
  check_choice(config.history_dtype, HISTORY_DTYPES, field='history_dtype')
  if config.history_dtype != 'float32' and config.optimizer != 'lbfgs_fixed':
    raise errors.UserError(f'--config.history_dtype={config.history_dtype} needs '
                           '--config.optimizer=lbfgs_fixed (the only optimiser whose history it '
                           'stores)')
  if config.pyramid_levels < 1:
    raise errors.UserError(f'--config.pyramid_levels={config.pyramid_levels} must be at least 1')
  return OptimizerPlan(
      name=config.optimizer, learning_rate=float(config.learning_rate),
      memory_size=int(config.memory_size), max_linesearch_steps=int(config.max_linesearch_steps),
      adam_b1=float(config.adam_b1), adam_b2=float(config.adam_b2),
      adam_eps=float(config.adam_eps), lbfgs_restart=bool(config.lbfgs_restart),
      chunk_size=int(config.chunk_size), parameterization=config.parameterization,
      pyramid_levels=int(config.pyramid_levels), history_dtype=config.history_dtype)


def _schedule(config) -> SchedulePlan:
  if config.steps < 0 or config.coarse_steps < 0:
    raise errors.UserError('--config.steps and --config.coarse_steps must be >= 0')
  if config.scales < 1:
    raise errors.UserError(f'--config.scales={config.scales} must be at least 1')
  if config.scales > 1 and config.scale_factor <= 1:
    raise errors.UserError(f'--config.scale_factor={config.scale_factor} must exceed 1')
  return SchedulePlan(scales=int(config.scales), scale_factor=float(config.scale_factor),
                      steps=int(config.steps),
                      coarse_steps=int(config.coarse_steps or config.steps),
                      scale_balance=bool(config.scale_balance),
                      content_detail=bool(config.scale_content_detail))


def _batch(config) -> BatchPlan:
  if config.batch_over not in ('', 'style', 'content') + BATCHABLE_FIELDS:
    raise errors.UserError(f'cannot batch over {config.batch_over!r}; choose style, content or '
                           f'one of {", ".join(BATCHABLE_FIELDS)}')
  values = ()
  if config.batch_over in BATCHABLE_FIELDS:
    values = tuple(_floats(config.batch_values, field='batch_values'))
    if not values:
      raise errors.UserError(f'--config.batch_over={config.batch_over} needs '
                             '--config.batch_values, e.g. 1e2,1e3,1e4')
  return BatchPlan(over=config.batch_over, values=values)


def _outputs(config) -> OutputPlan:
  check_choice(config.progress, report.PROGRESS_MODES, field='progress')
  history = str(config.checkpoint_history).strip().lower()
  if history not in ('true', 'false', 'auto'):
    raise errors.UserError(f'--config.checkpoint_history={config.checkpoint_history!r} must be '
                           'True, False or auto')
  output = config.output
  if os.path.isabs(output) or '..' in output.replace('\\', '/').split('/'):
    raise errors.UserError(f'--config.output={output!r} must be a file name inside '
                           '--workdir (no absolute path, no ..); set --workdir to choose the folder')
  images.encode(np.zeros((1, 1, 3)), output)  # fails early on an unknown extension
  return OutputPlan(output=output, save_every=int(config.save_every),
                    checkpoint_every=int(config.checkpoint_every), checkpoint_history=history,
                    resume=bool(config.resume), progress=config.progress,
                    compilation_cache=config.compilation_cache)


def _devices(config) -> DevicesPlan:
  check_choice(config.shard, SHARD_MODES, field='shard')
  if config.shard == 'space' and config.parameterization != 'pixels':
    raise errors.UserError(f'--config.shard=space splits the image\'s rows across devices, but '
                           f'parameterization={config.parameterization} optimises one flat vector '
                           'of pyramid levels that has no rows; use parameterization=pixels, or '
                           'shard=batch')
  given = [name for name in ('coordinator_address', 'num_processes', 'process_id')
           if config[name] not in ('', -1)]
  if given and not config.distributed:
    raise errors.UserError(f'--config.{given[0]} needs --config.distributed=True')
  if config.distributed and given and len(given) < 3:
    raise errors.UserError('--config.coordinator_address, --config.num_processes and '
                           '--config.process_id go together (or none, to read them from the '
                           'cluster environment)')
  if config.distributed and given and not 0 <= config.process_id < config.num_processes:
    raise errors.UserError(f'--config.process_id={config.process_id} must be in '
                           f'0..{config.num_processes - 1} (--config.num_processes)')
  if config.heartbeat_timeout < 1:
    raise errors.UserError(f'--config.heartbeat_timeout={config.heartbeat_timeout} must be at '
                           'least 1 (seconds)')
  return DevicesPlan(shard=config.shard, distributed=bool(config.distributed),
                     coordinator_address=str(config.coordinator_address),
                     num_processes=int(config.num_processes), process_id=int(config.process_id),
                     heartbeat_timeout=int(config.heartbeat_timeout))


def fingerprint(config, *, leave_out: Sequence[str] = _NOT_FINGERPRINTED) -> str:
  """Every field that changes the result, as canonical JSON (checkpoints must match it).

  The settings themselves, not a hash of them, so a checkpoint that does not match can say
  which fields differ (:func:`nst_jax.checkpoints.load`).
  """
  data = {key: value for key, value in json.loads(config.to_json_best_effort()).items()
          if key not in leave_out}
  return json.dumps(data, sort_keys=True)


def from_config(config) -> Plan:
  """Checks every field of ``config`` and returns the typed plan.

  Raises:
    errors.UserError: a setting that is bad or cannot be honoured, in one line naming the fix.
  """
  network = _network(config)
  optimizer = _optimizer(config)
  batch = _batch(config)
  entries, entry_weights = loss_entries(config)
  tiling.check(entries, tile_size=network.tile_size, network=network.name)
  return Plan(images=_images(config), network=network, entries=entries,
              entry_weights=entry_weights, optimizer=optimizer, schedule=_schedule(config),
              batch=batch, outputs=_outputs(config), devices=_devices(config),
              fingerprint=fingerprint(config))
