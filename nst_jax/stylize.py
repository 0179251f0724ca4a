"""The stylisation pipeline: config -> images -> targets -> compiled optimisation -> files.

Data flows one way. :func:`prepare` reads every file and checks the config (all user errors
surface here, before anything is compiled); :func:`optimize` runs coarse-to-fine scales of
compiled chunks (``lax.scan``) on a batch of N problems at once (``jax.vmap``, sharded over devices
when there are several); :func:`run` adds outputs, checkpoints, progress and Ctrl-C handling.

A batch of one is the ordinary single stylisation: there is one code path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib import resources
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nst_jax import color
from nst_jax import errors
from nst_jax import files
from nst_jax import images
from nst_jax import losses
from nst_jax import optim
from nst_jax import report
from nst_jax import vgg
from nst_jax import weights as weights_lib

#: Fields that may be batched with ``batch_over`` (numeric, so they can differ inside one program).
BATCHABLE_FIELDS = ('content_weight', 'style_weight', 'tv_weight', 'seed', 'init_noise_scale')
INITS = ('content', 'style', 'uniform', 'gaussian')
#: Smallest output side: VGG's five poolings need at least 32 px to leave a 1x1 block5 feature.
MIN_SIZE = 32
#: Largest output side accepted at all (memory is checked separately).
MAX_SIZE = 16384
CHECKPOINT = 'checkpoint.msgpack'
LOSS_LOG = 'losses.jsonl'


def example_path(name: str) -> str:
  """Path of an embedded example image (see nst_jax/assets/README.md for licences)."""
  return str(resources.files('nst_jax').joinpath('assets', 'examples', name))


DEFAULT_CONTENT = 'astronaut.jpg'
DEFAULT_STYLE = 'starry_night.jpg'


# ------------------------------------------------------------------------------------------
# Static description of the compiled program.


@dataclasses.dataclass(frozen=True)
class Spec:
  """Everything the compiled step depends on statically (hashable; a change recompiles)."""

  entries: tuple[losses.Entry, ...]
  network: str
  pooling: str
  remat: bool
  compute_dtype: str
  optimizer: str
  learning_rate: float
  memory_size: int
  max_linesearch_steps: int
  adam: tuple[float, float, float]
  chunk_size: int

  @property
  def layers(self) -> tuple[str, ...]:
    return losses.feature_layers(self.entries)

  def make_optimizer(self):
    return optim.make(self.optimizer, learning_rate=self.learning_rate,
                      memory_size=self.memory_size,
                      max_linesearch_steps=self.max_linesearch_steps,
                      adam_b1=self.adam[0], adam_b2=self.adam[1], adam_eps=self.adam[2])

  def features(self, net: Mapping, image: jax.Array, layers: Sequence[str]) -> dict:
    return vgg.features(net, image, layers=layers, network=self.network, pooling=self.pooling,
                        remat=self.remat, compute_dtype=jnp.dtype(self.compute_dtype))


def objective(image: jax.Array, *, net: Mapping, problem: Mapping, spec: Spec
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss of one generated image and its weighted parts, for one problem of a batch."""
  features = spec.features(net, image, spec.layers)
  return losses.total(
      image=image, features=features, entries=spec.entries, weights=problem['weights'],
      content_targets=problem['content_targets'], style_targets=problem['style_targets'],
      style_blend=problem['style_blend'], style_masks=problem.get('style_masks'))


@functools.partial(jax.jit, static_argnames=('spec',), donate_argnames=('state',))
def optimize_chunk(state: dict, active: jax.Array, net: Mapping, problems: Mapping, *,
                   spec: Spec) -> tuple[dict, jax.Array]:
  """``spec.chunk_size`` optimisation steps of every problem in the batch, in one program.

  Args:
    state: batched :func:`nst_jax.optim.init_state` (leading axis N).
    active: how many of the chunk's steps to take (the rest are no-ops): no recompilation for a
      shorter last chunk.
    net: :func:`nst_jax.vgg.prepare` output, shared by the batch.
    problems: batched targets and weights (leading axis N).
    spec: the static description.

  Returns:
    The new state and the losses (N, chunk_size); NaN marks steps not taken.
  """
  optimizer = spec.make_optimizer()

  def one(state, problem):
    loss_fn = lambda image: objective(image, net=net, problem=problem, spec=spec)[0]
    return optim.run_chunk(state, loss_fn=loss_fn, optimizer=optimizer,
                           linesearch=optim.uses_linesearch(spec.optimizer),
                           length=spec.chunk_size, active=active)

  return jax.vmap(one)(state, problems)


@functools.partial(jax.jit, static_argnames=('spec',))
def initial_state(images_: jax.Array, net: Mapping, problems: Mapping, *, spec: Spec) -> dict:
  """Batched :func:`nst_jax.optim.init_state` (a line-search optimiser's first loss included)."""
  optimizer = spec.make_optimizer()
  return jax.vmap(lambda image, problem: optim.init_state(
      optimizer, image,
      loss_fn=lambda x: objective(x, net=net, problem=problem, spec=spec)[0]))(images_, problems)


@functools.partial(jax.jit, static_argnames=('spec',))
def loss_parts(images_: jax.Array, net: Mapping, problems: Mapping, *, spec: Spec
               ) -> dict[str, jax.Array]:
  """Each entry's weighted loss for a batch of images (for logs and the progress line)."""
  return jax.vmap(lambda image, problem: objective(image, net=net, problem=problem, spec=spec)[1]
                  )(images_, problems)


@functools.partial(jax.jit, static_argnames=('spec', 'layers'))
def reference_features(net: Mapping, image: jax.Array, *, spec: Spec, layers: tuple[str, ...]):
  """Activations of a content or style image (computed once per scale)."""
  return spec.features(net, image, layers)


# ------------------------------------------------------------------------------------------
# Reading and checking the config.


@dataclasses.dataclass
class Prepared:
  """Everything read from files and checked, ready to optimise (host arrays)."""

  spec: Spec
  net: dict
  contents: list[np.ndarray]          # per batch element, full-size RGB
  styles: list[list[np.ndarray]]      # per batch element, its style images
  style_blend: list[np.ndarray]       # per batch element, (S,)
  masks: list[list[np.ndarray]] | None  # per batch element, per style, content-sized (H, W)
  weights: list[dict[str, float]]     # per batch element, per entry
  seeds: list[int]
  noise_scales: list[float]
  init_image: np.ndarray | None       # a given start image, if config.init is a path
  sizes: list[tuple[int, int]]        # (height, width) per scale, coarse to fine
  checkpoint_history: str             # 'true', 'false' or 'auto'
  steps: list[int]                    # steps per scale
  fingerprint: str


def _split(text: str) -> list[str]:
  return [item.strip() for item in str(text).split(',') if item.strip()]


def _floats(text: str, *, field: str) -> list[float]:
  try:
    return [float(item) for item in _split(text)]
  except ValueError:
    raise errors.UserError(f'--config.{field}={text!r} must be comma-separated numbers') from None


def _check_choice(value: str, choices: Sequence[str], *, field: str) -> None:
  if value not in choices:
    raise errors.UserError(f'unknown {field} {value!r}; choose one of {", ".join(choices)}')


def entries_from_config(config) -> tuple[losses.Entry, ...]:
  """The loss entries named in ``config.losses``, with zero-weight entries left out."""
  entries = []
  for name, entry in config.losses.items():
    if float(entry.weight) == 0.0 and config.get('batch_over') not in (f'{name}_weight',):
      continue
    entries.append(losses.make_entry(
        name=name, term=entry.term, layers=tuple(entry.layers),
        layer_weights=tuple(entry.get('layer_weights', ()) or ()),
        options=dict(entry.get('options', {}) or {})))
  if not entries:
    raise errors.UserError('every loss weight is zero; set --config.content_weight or '
                           '--config.style_weight')
  for entry in entries:
    vgg.check_layers(entry.layers, network=config.network)
  return tuple(entries)


def activation_bytes(height: int, width: int, *, layers: Sequence[str], network: str,
                     dtype_bytes: int = 4) -> int:
  """Memory one forward+backward keeps alive, roughly: one copy of every conv output.

  The image gradient stores no conv inputs (the weights are constants), only ReLU and pooling
  masks, so this matched XLA's planned temporaries within 10% at 512 and 1024 px.
  """
  if not layers:
    return 0  # only image terms (total variation): no network pass at all
  order = vgg.layer_names(network)
  last = max(order.index(layer) for layer in layers)
  total = 0
  h, w = height, width
  for name in order[:last + 1]:
    if name.endswith('_pool'):
      h, w = h // 2, w // 2
    elif '_conv' in name:
      total += h * w * vgg.channels(name, network=network) * dtype_bytes
  return total


def device_memory() -> tuple[int, str]:
  """Bytes the optimisation may use, and where: the accelerator's own memory, or host RAM."""
  device = jax.devices()[0]
  if device.platform != 'cpu':
    stats = device.memory_stats() or {}
    if stats.get('bytes_limit'):
      return int(stats['bytes_limit']), f'this {device.device_kind}'
  try:
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'), 'this machine'
  except (ValueError, OSError, AttributeError):
    return 1 << 40, 'this machine'


def _scale_sizes(config, content_shape: tuple[int, int]) -> list[tuple[int, int]]:
  final = images.fit_size(*content_shape, size=config.size, square=config.square)
  if config.scales < 1:
    raise errors.UserError(f'--config.scales={config.scales} must be at least 1')
  if config.scales > 1 and config.scale_factor <= 1:
    raise errors.UserError(f'--config.scale_factor={config.scale_factor} must exceed 1')
  sizes = []
  for k in range(config.scales - 1, -1, -1):
    factor = config.scale_factor ** k
    sizes.append((max(MIN_SIZE, round(final[0] / factor)), max(MIN_SIZE, round(final[1] / factor))))
  return sizes


def _checkpoint_history(value: Any) -> str:
  text = str(value).strip().lower()
  if text not in ('true', 'false', 'auto'):
    raise errors.UserError(f'--config.checkpoint_history={value!r} must be True, False or auto')
  return text


def _config_fingerprint(config) -> str:
  skip = {'resume', 'progress', 'steps', 'save_every', 'checkpoint_every', 'compilation_cache',
          'checkpoint_history'}
  data = {k: v for k, v in json.loads(config.to_json_best_effort()).items() if k not in skip}
  return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def prepare(config) -> Prepared:
  """Reads every input the config names and checks every field; raises UserError on bad input."""
  _check_choice(config.network, tuple(weights_lib.CONV_SPECS), field='network')
  _check_choice(config.pooling, vgg.POOLINGS, field='pooling')
  _check_choice(config.optimizer, optim.OPTIMIZERS, field='optimizer')
  _check_choice(config.preserve_color, color.MODES, field='preserve_color')
  _check_choice(config.compute_dtype, ('float32', 'bfloat16'), field='compute_dtype')
  _check_choice(config.progress, report.PROGRESS_MODES, field='progress')
  if not isinstance(config.size, int) or config.size < MIN_SIZE:
    raise errors.UserError(f'--config.size={config.size} is too small; VGG needs at least '
                           f'{MIN_SIZE} px for its five poolings')
  if config.size > MAX_SIZE:
    raise errors.UserError(f'--config.size={config.size} is absurd (at most {MAX_SIZE})')
  if config.steps < 0 or config.chunk_size < 1:
    raise errors.UserError('--config.steps must be >= 0 and --config.chunk_size >= 1')
  if config.style_scale <= 0:
    raise errors.UserError(f'--config.style_scale={config.style_scale} must be positive')
  if config.batch_over not in ('', 'style', 'content') + BATCHABLE_FIELDS:
    raise errors.UserError(f'cannot batch over {config.batch_over!r}; choose style, content or '
                           f'one of {", ".join(BATCHABLE_FIELDS)}')

  entries = entries_from_config(config)
  if config.optimizer == 'lbfgs' and float(config.learning_rate) != 1.0:
    raise errors.UserError(
        f'--config.learning_rate={config.learning_rate} has no effect with optimizer=lbfgs (its '
        'line search chooses every step); leave it at 1, or use optimizer=lbfgs_fixed or adam')
  if config.batch_over == 'style' and _split(config.style_blend_weights):
    raise errors.UserError('--config.style_blend_weights blends styles, but batch_over=style '
                           'stylises each style separately; drop one of the two')
  if _split(config.style_masks):
    for entry in entries:
      if entry.reference == 'style' and not losses.accepts_mask(entry):
        raise errors.UserError(
            f'loss {entry.name!r} (term {entry.term!r}) takes no mask keyword, so it cannot honour '
            '--config.style_masks; use a term that does (gram, wasserstein, mean_std) or add '
            '`mask=None` to its signature (README, "Add your own loss")')
  spec = Spec(entries=entries, network=config.network, pooling=config.pooling,
              remat=bool(config.remat), compute_dtype=config.compute_dtype,
              optimizer=config.optimizer, learning_rate=float(config.learning_rate),
              memory_size=int(config.memory_size),
              max_linesearch_steps=int(config.max_linesearch_steps),
              adam=(float(config.adam_b1), float(config.adam_b2), float(config.adam_eps)),
              chunk_size=int(config.chunk_size))

  # Images.
  content_paths = _split(config.content_image) or [example_path(DEFAULT_CONTENT)]
  if len(content_paths) > 1 and config.batch_over != 'content':
    raise errors.UserError('several content images need --config.batch_over=content')
  contents = [images.load(path, what='content image') for path in content_paths]
  style_paths = _split(config.style_images) or [example_path(DEFAULT_STYLE)]
  style_images = [images.load(path, what=f'style image {i + 1}')
                  for i, path in enumerate(style_paths)]
  blend = _floats(config.style_blend_weights, field='style_blend_weights') or [1.0] * len(
      style_images)
  if len(blend) != len(style_images) or min(blend) < 0 or sum(blend) <= 0:
    raise errors.UserError(f'--config.style_blend_weights needs {len(style_images)} non-negative '
                           'numbers, one per style image, not all zero')
  blend = np.asarray(blend, np.float32) / sum(blend)

  sizes = _scale_sizes(config, contents[0].shape[:2])
  height, width = sizes[-1]
  layers = losses.feature_layers(entries)
  needed = activation_bytes(height, width, layers=layers, network=config.network,
                            dtype_bytes=2 if config.compute_dtype == 'bfloat16' else 4)
  lbfgs = 2 * config.memory_size * height * width * 3 * 4 if 'lbfgs' in config.optimizer else 0
  batch_guess = max(len(content_paths), len(style_images), len(_split(config.batch_values)), 1)
  available, where = device_memory()
  if (needed + lbfgs) * batch_guess > 0.8 * available:
    raise errors.UserError(
        f'a {width}x{height} output needs about {(needed + lbfgs) * batch_guess / 2**30:.1f} GiB, '
        f'more than {where} has ({available / 2**30:.1f} GiB); lower --config.size '
        'or --config.memory_size (L-BFGS keeps 2 x memory_size images), or use '
        '--config.optimizer=adam')

  masks = None
  if _split(config.style_masks) and len({c.shape[:2] for c in contents}) > 1:
    raise errors.UserError('--config.style_masks with content images of different shapes: masks '
                           'follow one content\'s shape; batch contents of one shape, or no masks')
  if _split(config.style_masks):
    mask_paths = _split(config.style_masks)
    if len(mask_paths) != len(style_images):
      raise errors.UserError(f'{len(mask_paths)} style masks for {len(style_images)} style images; '
                             'give one mask per style image')
    masks = []
    for i, path in enumerate(mask_paths):
      mask = images.load(path, what=f'style mask {i + 1}').mean(axis=-1) / 255.0
      if abs(mask.shape[0] / mask.shape[1] - contents[0].shape[0] / contents[0].shape[1]) > 0.02:
        raise errors.UserError(
            f'style mask {i + 1} {path!r} is {mask.shape[1]}x{mask.shape[0]} but the content image '
            f'is {contents[0].shape[1]}x{contents[0].shape[0]}; masks must have the content\'s '
            'aspect ratio')
      masks.append(mask)

  init_image = None
  if config.init not in INITS:
    init_image = images.load(config.init, what='init image')

  # The batch: N problems that differ in one thing.
  base_weights = {entry.name: float(config.losses[entry.name].weight) for entry in entries}
  n = 1
  values: list[float] = []
  if config.batch_over == 'content':
    n = len(contents)
  elif config.batch_over == 'style':
    n = len(style_images)
  elif config.batch_over:
    values = _floats(config.batch_values, field='batch_values')
    if not values:
      raise errors.UserError(f'--config.batch_over={config.batch_over} needs '
                             '--config.batch_values, e.g. 1e2,1e3,1e4')
    n = len(values)
  batch_contents, batch_styles, batch_blend, batch_masks = [], [], [], []
  batch_weights, seeds, noise_scales = [], [], []
  for index in range(n):
    batch_contents.append(contents[index] if config.batch_over == 'content' else contents[0])
    if config.batch_over == 'style':
      batch_styles.append([style_images[index]])
      batch_blend.append(np.ones(1, np.float32))
      batch_masks.append([masks[index]] if masks else None)
    else:
      batch_styles.append(style_images)
      batch_blend.append(blend)
      batch_masks.append(masks)
    element_weights = dict(base_weights)
    seed, noise_scale = int(config.seed), float(config.init_noise_scale)
    if values:
      field, value = config.batch_over, values[index]
      if field == 'seed':
        seed = int(value)
      elif field == 'init_noise_scale':
        noise_scale = value
      else:
        element_weights[field[:-len('_weight')]] = value
    batch_weights.append(element_weights)
    seeds.append(seed)
    noise_scales.append(noise_scale)

  vgg_weights = weights_lib.load(config.weights or None, network=config.network)
  net = vgg.prepare(vgg_weights, dtype=jnp.dtype(config.compute_dtype))
  coarse = config.coarse_steps or config.steps
  return Prepared(
      spec=spec, net=net, contents=batch_contents, styles=batch_styles, style_blend=batch_blend,
      masks=batch_masks if masks else None, weights=batch_weights, seeds=seeds,
      noise_scales=noise_scales, init_image=init_image, sizes=sizes,
      checkpoint_history=_checkpoint_history(config.checkpoint_history),
      steps=[coarse] * (len(sizes) - 1) + [config.steps],
      fingerprint=_config_fingerprint(config))


def shape_groups(prepared: Prepared, config) -> list[tuple[list[int], Prepared]]:
  """Splits a batch into groups whose contents share a shape: one vmapped program per group.

  A batch over contents of different aspect ratios is optimised group by group, so every result
  keeps its own content's shape (never squashed to the first one's).
  """
  by_sizes: dict[tuple, list[int]] = {}
  for index, content in enumerate(prepared.contents):
    by_sizes.setdefault(tuple(_scale_sizes(config, content.shape[:2])), []).append(index)
  if len(by_sizes) == 1:
    return [(list(range(len(prepared.contents))), prepared)]
  groups = []
  for sizes, indices in by_sizes.items():
    take = lambda values: None if values is None else [values[i] for i in indices]
    groups.append((indices, dataclasses.replace(
        prepared, contents=take(prepared.contents), styles=take(prepared.styles),
        style_blend=take(prepared.style_blend), masks=take(prepared.masks),
        weights=take(prepared.weights), seeds=take(prepared.seeds),
        noise_scales=take(prepared.noise_scales), sizes=list(sizes))))
  return groups


# ------------------------------------------------------------------------------------------
# Per-scale problems.


def layer_shapes(height: int, width: int, layers: Sequence[str]) -> dict[str, tuple[int, int]]:
  """Spatial (height, width) of each layer for a height x width input (pools floor)."""
  shapes = {}
  for layer in layers:
    h, w = height, width
    for _ in range(int(math.log2(vgg.downsampling(layer)))):
      h, w = h // 2, w // 2
    shapes[layer] = (h, w)
  return shapes


def _style_inputs(prepared: Prepared, index: int, config, height: int, width: int
                  ) -> tuple[np.ndarray, list[np.ndarray]]:
  """The content and style images of batch element ``index`` at one scale, colour-handled."""
  content = images.resize(prepared.contents[index], height, width)
  styles = []
  for style in prepared.styles[index]:
    if config.square:
      style_height = style_width = round(max(height, width) * config.style_scale)
    else:
      style_height, style_width = images.fit_size(
          *style.shape[:2], size=max(MIN_SIZE, round(max(height, width) * config.style_scale)))
    style = images.resize(style, max(style_height, MIN_SIZE), max(style_width, MIN_SIZE))
    if config.preserve_color == 'histogram':
      style = color.match_histogram(style, reference=content)
    elif config.preserve_color == 'luminance':
      style = color.match_luminance(style, content=content)
    styles.append(style)
  if config.preserve_color == 'luminance':
    content = color.luminance(content)
  return content, styles


def build_problems(prepared: Prepared, config, height: int, width: int) -> dict:
  """Targets, weights and masks of every batch element at one scale, stacked on axis 0."""
  spec, net = prepared.spec, prepared.net
  content_layers = losses.feature_layers(spec.entries, 'content')
  style_layers = losses.feature_layers(spec.entries, 'style')
  elements = []
  for index in range(len(prepared.contents)):
    content, styles = _style_inputs(prepared, index, config, height, width)
    problem: dict[str, Any] = {
        'weights': {name: np.float32(value) for name, value in prepared.weights[index].items()},
        'style_blend': prepared.style_blend[index],
        'content_targets': {}, 'style_targets': [],
    }
    if content_layers:
      feats = reference_features(net, jnp.asarray(content), spec=spec, layers=content_layers)
      problem['content_targets'] = losses.targets(
          entries=spec.entries, reference_features=feats, reference='content')
    for style in styles:
      feats = (reference_features(net, jnp.asarray(style), spec=spec, layers=style_layers)
               if style_layers else {})
      problem['style_targets'].append(losses.targets(
          entries=spec.entries, reference_features=feats, reference='style'))
    if prepared.masks is not None:
      shapes = layer_shapes(height, width, style_layers)
      problem['style_masks'] = [
          {layer: images.resize(mask[..., None], *shape)[..., 0].clip(0, 1)
           for layer, shape in shapes.items()}
          for mask in prepared.masks[index]]
    elements.append(problem)
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *elements)


def term_sizes(prepared: Prepared, config, problems: Mapping, height: int, width: int
               ) -> dict[str, np.ndarray]:
  """Each entry's size at one scale, per batch element: its weighted value on the content image or
  on the first style image (resized to the scale), whichever is larger.

  Content terms are zero on the content and style terms small on the style, so this measures the
  range a term spans between the two ends of the trade-off.
  """
  probes = []
  for index in range(len(prepared.contents)):
    content, styles = _style_inputs(prepared, index, config, height, width)
    probes.append((content, images.resize(styles[0], height, width)))
  sizes = None
  for which in range(2):
    batch = jnp.asarray(np.stack([pair[which] for pair in probes]), jnp.float32)
    parts = to_host(loss_parts(batch, prepared.net, problems, spec=prepared.spec))
    parts = {name: np.abs(np.asarray(value)) for name, value in parts.items()}
    sizes = parts if sizes is None else {name: np.maximum(sizes[name], parts[name])
                                         for name in parts}
  return sizes


def balance_weights(problems: dict, *, sizes: Mapping[str, np.ndarray],
                    final_sizes: Mapping[str, np.ndarray]) -> dict:
  """Scales each entry's weight so its size at this scale equals its size at the final scale."""
  weights = {}
  for name, weight in problems['weights'].items():
    ratio = np.where(sizes[name] > 0, final_sizes[name] / np.maximum(sizes[name], 1e-30), 1.0)
    weights[name] = (np.asarray(weight) * ratio).astype(np.float32)
  return dict(problems, weights=weights)


def initial_images(prepared: Prepared, config, height: int, width: int) -> np.ndarray:
  """The start image of every batch element at the first scale, (N, H, W, 3)."""
  mean = np.asarray(prepared.net['mean_rgb'])
  out = []
  for index in range(len(prepared.contents)):
    content, styles = _style_inputs(prepared, index, config, height, width)
    rng = np.random.default_rng(prepared.seeds[index])
    if config.init == 'content':
      image = content
    elif config.init == 'style':
      image = images.resize(styles[0], height, width)
    elif config.init == 'uniform':
      image = mean + rng.uniform(-128.0, 128.0, (height, width, 3))
    elif config.init == 'gaussian':
      image = mean + prepared.noise_scales[index] * rng.standard_normal((height, width, 3))
    else:
      image = images.resize(prepared.init_image, height, width)
      if config.preserve_color == 'luminance':
        image = color.luminance(image)
    out.append(np.asarray(image, np.float32))
  return np.stack(out)


# ------------------------------------------------------------------------------------------
# Devices.


def shard_batch(tree: Any, n: int) -> Any:
  """Places a batched pytree so its leading axis is split across all devices (if N divides)."""
  devices = jax.devices()
  if len(devices) == 1 or n % len(devices):
    return jax.device_put(tree)
  mesh = Mesh(np.asarray(devices), ('batch',))

  def put(x):
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    spec = PartitionSpec('batch', *([None] * (x.ndim - 1)))
    return jax.device_put(x, NamedSharding(mesh, spec))

  return jax.tree.map(put, tree)


def to_host(tree: Any) -> Any:
  """Fetches a (possibly sharded) pytree to NumPy; across hosts, gathers every host's shards."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


def padded_batch_size(n: int) -> int:
  """N rounded up to a multiple of the device count (padding repeats the last element)."""
  count = jax.device_count()
  return -(-n // count) * count


def pad_batch(tree: Any, n_padded: int) -> Any:
  """Repeats the last batch element so the leading axis is ``n_padded`` long."""
  def pad(x):
    x = np.asarray(x)
    extra = n_padded - x.shape[0]
    return x if extra == 0 else np.concatenate([x, np.repeat(x[-1:], extra, axis=0)])
  return jax.tree.map(pad, tree)


# ------------------------------------------------------------------------------------------
# The loop.


class Stopped(Exception):
  """The run was stopped by SIGINT/SIGTERM after a chunk; ``images`` are the last good ones."""

  def __init__(self, signal_number: int, images_: np.ndarray, records: list[dict]):
    super().__init__(signal.Signals(signal_number).name)
    self.signal_number = signal_number
    self.images = images_
    self.records = records


class NonFinite(errors.UserError):
  """The loss became non-finite; ``images`` are the last finite ones."""

  def __init__(self, message: str, images_: np.ndarray, records: list[dict]):
    super().__init__(message)
    self.images = images_
    self.records = records


@contextlib.contextmanager
def _stop_requests() -> Iterator[list[int]]:
  """Turns the first SIGINT/SIGTERM into a request to stop after the current chunk."""
  requested: list[int] = []
  previous = {}

  def handler(signal_number, frame):
    requested.append(signal_number)
    # A second Ctrl-C interrupts at once (the last good image is still written by `run`).
    signal.signal(signal_number, previous[signal_number])

  try:
    for number in (signal.SIGINT, signal.SIGTERM):
      previous[number] = signal.signal(number, handler)
  except ValueError:  # not the main thread: no signal handling
    pass
  try:
    yield requested
  finally:
    for number, old in previous.items():
      signal.signal(number, old)


@dataclasses.dataclass
class Outcome:
  """What a run produced: final images (N, H, W, 3) and the loss records."""

  images: np.ndarray
  records: list[dict]


#: ``checkpoint_history=auto`` keeps the optimiser history in checkpoints only below this size.
HISTORY_BYTES_LIMIT = 256 * 2**20


def history_bytes(state: Mapping) -> int:
  """Bytes of the optimiser's state (L-BFGS: 2 x memory_size images per batch element)."""
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state['opt_state']))


def keep_history(setting: str, state: Mapping) -> bool:
  """Whether checkpoints carry the optimiser history (``checkpoint_history`` True/False/auto)."""
  if setting == 'auto':
    return history_bytes(state) < HISTORY_BYTES_LIMIT
  return setting == 'true'


def _save_checkpoint(path: str, *, state: dict, scale: int, fingerprint: str,
                     records: list[dict], with_history: bool) -> None:
  """Writes the resumable state (flax msgpack of the state pytree), atomically.

  Without the history the file is about the image's size; a resume then restarts the history.
  """
  saved = state if with_history else {k: v for k, v in state.items() if k != 'opt_state'}
  payload = {'state': serialization.to_state_dict(to_host(saved)), 'scale': scale,
             'fingerprint': fingerprint, 'records': json.dumps(records),
             'history': with_history}
  files.write_bytes(path, serialization.msgpack_serialize(payload))


def _load_checkpoint(path: str, *, template_for: Callable[[int], Any], fingerprint: str
                     ) -> tuple[dict, int, list[dict]]:
  """Reads a checkpoint; ``template_for(scale)`` gives the state's structure at a scale.

  The state has no ``opt_state`` when the checkpoint was written without the history.
  """
  try:
    with open(path, 'rb') as handle:
      payload = serialization.msgpack_restore(handle.read())
    if payload['fingerprint'] != fingerprint:
      raise errors.UserError(f'checkpoint {path!r} was made with another config; run with the '
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


def _tagged(name: str, tag: str) -> str:
  stem, extension = os.path.splitext(name)
  return f'{stem}{tag}{extension}'


def optimize(prepared: Prepared, config, *, workdir: str,
             progress: report.Progress | None = None,
             on_chunk: Callable[[int, int, np.ndarray], None] | None = None,
             tag: str = '', done_before: int = 0) -> Outcome:
  """Runs every scale's optimisation for the whole batch; saves checkpoints and the loss log.

  Args:
    prepared: from :func:`prepare`.
    config: the run's config.
    workdir: where checkpoints and the loss log go.
    progress: optional progress display.
    on_chunk: called as ``on_chunk(scale, step, images)`` after every chunk (intermediate
      images).
    tag: suffix of the checkpoint and loss-log names (one per shape group of a batch).
    done_before: steps already taken by earlier groups (for the progress display).

  Returns:
    The final images and loss records.

  Raises:
    Stopped: on SIGINT/SIGTERM, after saving the last good state.
    errors.UserError: when the loss became non-finite (the last finite image is kept).
  """
  spec = prepared.spec
  n = len(prepared.contents)
  n_padded = padded_batch_size(n)
  checkpoint_path = os.path.join(workdir, _tagged(CHECKPOINT, tag))
  log = report.LossLog(os.path.join(workdir, _tagged(LOSS_LOG, tag)))
  optimizer = spec.make_optimizer()
  start_scale, resumed_state = 0, None
  if config.resume and os.path.exists(checkpoint_path):
    template_for = lambda scale: jax.eval_shape(
        jax.vmap(lambda x: optim.init_state(optimizer, x)), jax.ShapeDtypeStruct(
            (n_padded, *prepared.sizes[min(scale, len(prepared.sizes) - 1)], 3), jnp.float32))
    resumed_state, start_scale, log.records = _load_checkpoint(
        checkpoint_path, template_for=template_for, fingerprint=prepared.fingerprint)
    if progress:
      done = int(np.asarray(resumed_state['step']).max())
      left = prepared.steps[start_scale] - done
      progress.message(f'resuming from {checkpoint_path}: scale {start_scale + 1}, step {done}; '
                       + (f'{left} steps left at this scale' if left > 0 else
                          'no steps left at this scale (raise --config.steps to continue)'))
  elif config.resume and progress:
    progress.message(f'no checkpoint in {workdir}; starting afresh')

  said_without_history = []

  def with_history(state: Mapping) -> bool:
    keep = keep_history(prepared.checkpoint_history, state)
    if not keep and not said_without_history and progress:
      progress.message(f'checkpoints leave out the {history_bytes(state) / 2**20:.0f} MB '
                       'optimiser history (checkpoint_history=auto keeps it under '
                       f'{HISTORY_BYTES_LIMIT // 2**20} MB); a resume restarts it')
    said_without_history.append(keep)
    return keep

  images_now = None
  done_before += sum(prepared.steps[:start_scale])
  final_sizes = None
  if len(prepared.sizes) > 1 and config.scale_balance:
    final_sizes = term_sizes(prepared, config, build_problems(prepared, config, *prepared.sizes[-1]),
                             *prepared.sizes[-1])
  with _stop_requests() as stop_requested:
    for scale in range(start_scale, len(prepared.sizes)):
      height, width = prepared.sizes[scale]
      problems = build_problems(prepared, config, height, width)
      if final_sizes is not None and scale < len(prepared.sizes) - 1:
        problems = balance_weights(problems, final_sizes=final_sizes,
                                   sizes=term_sizes(prepared, config, problems, height, width))
      problems = shard_batch(pad_batch(problems, n_padded), n_padded)
      if resumed_state is not None and 'opt_state' not in resumed_state:
        # Saved without the history: the optimiser starts afresh from the saved image.
        fresh = initial_state(shard_batch(jnp.asarray(resumed_state['image']), n_padded),
                              prepared.net, problems, spec=spec)
        state = dict(shard_batch(resumed_state, n_padded), opt_state=fresh['opt_state'])
        resumed_state = None
        if progress:
          progress.message('the checkpoint has no optimiser history (checkpoint_history): '
                           'the L-BFGS history restarts here')
      elif resumed_state is not None:
        state = shard_batch(resumed_state, n_padded)
        resumed_state = None
      else:
        if images_now is None:
          start = initial_images(prepared, config, height, width)
        else:
          start = np.stack([images.resize(image, height, width) for image in images_now])
        start = pad_batch(start, n_padded)
        state = initial_state(shard_batch(jnp.asarray(start), n_padded), prepared.net, problems,
                              spec=spec)
      steps = prepared.steps[scale]
      label = f'scale {scale + 1}/{len(prepared.sizes)} {width}x{height} ' if len(
          prepared.sizes) > 1 else ''
      step = int(np.asarray(state['step']).max())
      if progress:
        progress.restart_clock(done_before + step)
      last_good = np.asarray(to_host(state['image']))[:n]
      while step < steps:
        active = min(spec.chunk_size, steps - step)
        if config.lbfgs_restart and step > 0:
          state = dict(state, opt_state=initial_state(state['image'], prepared.net, problems,
                                                      spec=spec)['opt_state'])
        state, chunk_losses = optimize_chunk(state, jnp.int32(active), prepared.net, problems,
                                             spec=spec)
        chunk_losses = np.asarray(to_host(chunk_losses))[:n]
        finite = np.asarray(to_host(state['finite']))[:n]
        last_good = np.asarray(to_host(state['image']))[:n]
        # Each term's share costs one more forward pass: only when it is shown, and at the end of
        # a scale so the log always closes with it.
        show = progress is not None and progress.mode != 'none'
        parts = (to_host(loss_parts(state['image'], prepared.net, problems, spec=spec))
                 if show or step + active >= steps else None)
        for offset in range(active):
          record = {'scale': scale, 'step': step + offset + 1,
                    'loss': [None if not np.isfinite(v) else float(v)
                             for v in chunk_losses[:, offset]]}
          if offset == active - 1 and parts is not None:
            record['parts'] = {name: [float(v) for v in np.asarray(values)[:n]]
                               for name, values in parts.items()}
          log.add(record)
        step += active
        log.save()
        if show:
          shown = {name: float(np.asarray(values)[:n].mean()) for name, values in parts.items()}
          shown['total'] = float(sum(shown.values()))
          progress.update(done=done_before + step, losses=shown, label=label)
        if on_chunk:
          on_chunk(scale, step, last_good)
        # After a non-finite loss the optimiser state is not worth resuming: no checkpoint then.
        if finite.all() and (stop_requested or (
            config.checkpoint_every and step % config.checkpoint_every < spec.chunk_size)):
          _save_checkpoint(checkpoint_path, state=state, scale=scale,
                           fingerprint=prepared.fingerprint, records=log.records,
                           with_history=with_history(state))
        if not finite.all():
          bad = int(np.argmin(finite))
          raise NonFinite(f'the loss became non-finite near step {step} of scale {scale + 1} '
                          f'(batch element {bad}); kept the last finite image. Lower '
                          '--config.learning_rate or the loss weights', last_good, log.records)
        if stop_requested:
          raise Stopped(stop_requested[0], last_good, log.records)
      images_now = last_good
      done_before += steps
      log.save()  # also when a scale has no steps
      # A finished scale is checkpointed too, so a resume continues at the next one.
      _save_checkpoint(checkpoint_path, state=state, scale=scale,
                       fingerprint=prepared.fingerprint, records=log.records,
                       with_history=with_history(state))
  return Outcome(images=images_now, records=log.records)


# ------------------------------------------------------------------------------------------
# Outputs.


def output_paths(config, workdir: str, n: int) -> list[str]:
  """The result file of each batch element: ``result.png``, or ``result_0.png``, ... for N > 1."""
  stem, extension = os.path.splitext(config.output)
  if os.path.isabs(config.output) or '..' in config.output.replace('\\', '/').split('/'):
    raise errors.UserError(f'--config.output={config.output!r} must be a file name inside '
                           '--workdir (no absolute path, no ..); set --workdir to choose the folder')
  images.encode(np.zeros((1, 1, 3)), config.output)  # fails early on an unknown extension
  if n == 1:
    return [os.path.join(workdir, config.output)]
  return [os.path.join(workdir, f'{stem}_{i}{extension}') for i in range(n)]


def finish_images(prepared: Prepared, config, raw: np.ndarray) -> list[np.ndarray]:
  """Optimised images as the user sees them (luminance mode puts the content's chroma back)."""
  out = []
  for index, image in enumerate(raw):
    if config.preserve_color == 'luminance':
      content = images.resize(prepared.contents[index], *image.shape[:2])
      image = color.recombine(image, content=content)
    out.append(np.clip(image, 0, 255))
  return out


def write_outputs(prepared: Prepared, config, workdir: str, raw: Sequence[np.ndarray],
                  records: Sequence[Mapping]) -> list[str]:
  """Writes the result(s), the grid and the loss curve; returns the paths written.

  ``raw`` holds one optimised image per batch element (shapes may differ between elements).
  """
  finished = finish_images(prepared, config, raw)
  paths = output_paths(config, workdir, len(finished))
  for image, path in zip(finished, paths):
    images.save(image, path)
  rows = [[prepared.contents[i], *prepared.styles[i], finished[i]] for i in range(len(finished))]
  grid_path = os.path.join(workdir, 'grid.png')
  images.save(images.grid(rows, height=min(256, finished[0].shape[0])), grid_path)
  curve_path = os.path.join(workdir, 'loss_curve.png')
  totals = [float(np.nanmean([v for v in r['loss'] if v is not None] or [np.nan]))
            for r in records]
  report.loss_curve(totals, curve_path)
  logs = sorted(name for name in os.listdir(workdir)
                if name.startswith('losses') and name.endswith('.jsonl'))
  return paths + [grid_path, curve_path] + [os.path.join(workdir, name) for name in logs]


def configure_jax(config) -> None:
  """Process-wide JAX settings from the config: multi-host start, the compilation cache."""
  if config.distributed:
    jax.distributed.initialize()  # reads the coordinator from the environment (see README)
  if config.compilation_cache:
    cache = os.path.expanduser(config.compilation_cache)
    try:
      os.makedirs(cache, exist_ok=True)
    except OSError:
      return  # an unwritable cache only costs compile time
    jax.config.update('jax_compilation_cache_dir', cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def run(config, workdir: str) -> list[str]:
  """Stylises as the config says and writes everything into ``workdir``.

  Args:
    config: a config like ``configs/default.py``'s.
    workdir: output folder (created if needed).

  Returns:
    The paths written.

  Raises:
    errors.UserError: bad input, or a non-finite loss (after writing the last finite image).
    Stopped: SIGINT/SIGTERM (after writing the last good image and a checkpoint).
  """
  configure_jax(config)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise errors.UserError(f'--workdir {workdir!r} exists and is not a directory; choose another')
  prepared = prepare(config)  # reads and checks everything before the workdir is created
  files.ensure_directory(workdir)
  output_paths(config, workdir, len(prepared.contents))
  groups = shape_groups(prepared, config)
  progress = report.Progress(total=len(groups) * sum(prepared.steps), mode=config.progress)
  n = len(prepared.contents)
  shapes = ', '.join(f'{group.sizes[-1][1]}x{group.sizes[-1][0]}' for _, group in groups)
  progress.message(
      f'stylising {n} image{"s" if n > 1 else ""} at {shapes} px (width x height) on '
      f'{jax.device_count()} {jax.devices()[0].platform} device(s); {sum(prepared.steps)} '
      f'{config.optimizer} steps' + (f' per shape ({len(groups)} programs)' if len(groups) > 1
                                     else '') + '; the first chunk includes compilation')

  results: list[np.ndarray | None] = [None] * n
  records: list[dict] = []
  start = time.perf_counter()
  try:
    for group_index, (indices, group) in enumerate(groups):
      tag = f'_{group.sizes[-1][1]}x{group.sizes[-1][0]}' if len(groups) > 1 else ''
      outcome = optimize(group, config, workdir=workdir, progress=progress, tag=tag,
                         done_before=group_index * sum(prepared.steps),
                         on_chunk=_intermediate_writer(group, config, workdir, indices, n))
      for index, image in zip(indices, outcome.images):
        results[index] = image
      records += outcome.records
  except (Stopped, NonFinite) as exc:
    # The group that stopped gives its last good images; groups not reached keep their start.
    for index, image in zip(indices, exc.images):
      results[index] = image
    for later_indices, later in groups[group_index + 1:]:
      for index, image in zip(later_indices, initial_images(later, config, *later.sizes[-1])):
        results[index] = image
    with _signals_ignored():  # a second Ctrl-C must not cut the last good image short
      paths = write_outputs(prepared, config, workdir, results, records + exc.records)
    progress.message(f'stopped ({exc}); last good image written to {paths[0]}; resume with '
                     '--config.resume=True' if isinstance(exc, Stopped) else
                     f'last finite image written to {paths[0]}')
    raise
  with _signals_ignored():
    paths = write_outputs(prepared, config, workdir, results, records)
  progress.message(f'done in {time.perf_counter() - start:.1f} s; wrote ' + ', '.join(paths))
  checkpoint = os.path.join(workdir, CHECKPOINT)
  if os.path.exists(checkpoint):
    progress.message(f'and {checkpoint} ({os.path.getsize(checkpoint) / 2**20:.0f} MB, mostly the '
                     'L-BFGS history) for --config.resume; delete it when you are done')
  return paths


def _intermediate_writer(group: Prepared, config, workdir: str, indices: Sequence[int], n: int
                         ) -> Callable[[int, int, np.ndarray], None]:
  """``on_chunk`` for :func:`optimize`: writes intermediate images every ``save_every`` steps."""

  def on_chunk(scale: int, step: int, raw: np.ndarray) -> None:
    every = config.save_every
    if every and step % every < group.spec.chunk_size:
      for index, image in zip(indices, finish_images(group, config, raw)):
        suffix = f'_{index}' if n > 1 else ''
        images.save(image, os.path.join(workdir, f'step_s{scale}_{step:05d}{suffix}.png'))

  return on_chunk


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
  """Ignores SIGINT/SIGTERM while the final images are written (main thread only)."""
  previous = {}
  try:
    for number in (signal.SIGINT, signal.SIGTERM):
      previous[number] = signal.signal(number, signal.SIG_IGN)
  except ValueError:  # not the main thread
    pass
  try:
    yield
  finally:
    for number, old in previous.items():
      signal.signal(number, old)
