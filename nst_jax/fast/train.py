"""``python main.py --config=configs/fast_train.py``: a training run, from files to model files.

:func:`run` reads top to bottom: the loss network and the style targets, the photos, fresh or
resumed networks, then chunks of steps (the next chunk's crops are prepared on the host while the
current one runs) with, at chunk ends, the loss log, a samples grid every ``save_every`` steps and
a checkpoint plus the model files every ``checkpoint_every`` steps and at the end. Chunks end
exactly at those multiples (a traced step count, so still one compiled program).

Nothing is lost: every file is written atomically; Ctrl-C (SIGINT/SIGTERM) stops after the current
chunk and writes the checkpoint and the models of the last step; a non-finite loss keeps the
models of the step before it. The workdir holds ``model.msgpack`` (N styles: ``model_0.msgpack``,
...), ``checkpoint.msgpack``, ``losses.jsonl``, ``loss_curve.png`` and ``samples_STEP.png``.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Iterator

import jax
import numpy as np

from nst_jax import checkpoints
from nst_jax import errors
from nst_jax import files
from nst_jax import images
from nst_jax import report
from nst_jax import runtime
from nst_jax import vgg
from nst_jax import weights
from nst_jax.fast import apply
from nst_jax.fast import data
from nst_jax.fast import model_files
from nst_jax.fast import settings
from nst_jax.fast import steps

CHECKPOINT = 'checkpoint.msgpack'
LOSS_LOG = 'losses.jsonl'
LOSS_CURVE = 'loss_curve.png'
#: Longer side of the photos in the samples grid (at least the training size).
SAMPLE_SIZE = 256


class Stopped(Exception):
  """SIGINT/SIGTERM ended training early (after the checkpoint and the models were written)."""

  def __init__(self, signal_number: int, step: int):
    super().__init__(f'stopped by signal {signal_number} at step {step}')
    self.signal_number, self.step = signal_number, step


def model_paths(workdir: str, name: str, count: int) -> list[str]:
  """The model files of a run: ``name``, or ``name`` with ``_0``, ``_1``, ... for N styles."""
  if count == 1:
    return [os.path.join(workdir, name)]
  stem, extension = os.path.splitext(name)
  return [os.path.join(workdir, f'{stem}_{index}{extension}') for index in range(count)]


def _chunks(first: int, plan: settings.TrainPlan) -> Iterator[tuple[int, int]]:
  """(first step, length) of each chunk, ending at multiples of save_every/checkpoint_every."""
  step = first
  while step < plan.steps:
    end = min(plan.steps, step + plan.chunk_size)
    for every in (plan.save_every, plan.checkpoint_every):
      if every:
        end = min(end, (step // every + 1) * every)
    yield step, end - step
    step = end


def _styles(plan: settings.TrainPlan, net, setup: steps.Setup) -> tuple[list[np.ndarray], dict]:
  """The style images at ``style_size`` and their targets, stacked over styles."""
  pictures, targets = [], []
  for path in plan.style_paths:
    pixels = images.load(path, what='style image')
    pixels = images.resize(pixels, *images.fit_size(*pixels.shape[:2], size=plan.style_size))
    pictures.append(pixels)
    targets.append(steps.style_targets(net, pixels, setup=setup, weights=plan.entry_weights))
  return pictures, jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *targets)


def _sample_photos(plan: settings.TrainPlan) -> list[np.ndarray]:
  """The held-out embedded photo, then up to three training photos, for the samples grid."""
  size = max(plan.size, SAMPLE_SIZE)
  paths = [data.HELD_OUT] + [path for path in plan.train_paths[:3] if path != data.HELD_OUT]
  out = []
  for path in paths:
    pixels = images.load(path, what='training image')
    out.append(images.resize(pixels, *images.fit_size(*pixels.shape[:2], size=size)))
  return out


def _write_samples(path: str, models: dict, *, photos: list[np.ndarray],
                   style_pictures: list[np.ndarray], setup: steps.Setup) -> None:
  """A grid: the photos (the first never trained on), then each network's outputs and its style."""
  rows = [photos]
  for index, style in enumerate(style_pictures):
    params = jax.tree.map(lambda x, index=index: x[index], models['params'])
    outputs = [np.asarray(apply.stylize_batch(params, photo[None],
                                              architecture=setup.architecture)[0])
               for photo in photos]
    rows.append(outputs + [style])
  images.save(images.grid(rows, height=min(photo.shape[0] for photo in photos)), path)


def _write_models(workdir: str, models: dict, *, plan: settings.TrainPlan, step: int) -> None:
  host = jax.device_get(models['params'])
  paths = model_paths(workdir, plan.model_name, len(plan.style_paths))
  for index, (path, style) in enumerate(zip(paths, plan.style_paths)):
    model_files.save(path, model_files.Model(
        architecture=plan.architecture, params=jax.tree.map(lambda x: x[index], host),
        style=style, size=plan.size, style_size=plan.style_size, step=step))


def _save(workdir: str, models: dict, *, plan: settings.TrainPlan, step: int,
          log: report.LossLog) -> None:
  """The checkpoint, the model files, the loss log and its plot, each atomically."""
  state = dict(models, step=np.int32(step))
  checkpoints.save(os.path.join(workdir, CHECKPOINT), state=state, scale=0,
                   fingerprint=plan.fingerprint, records=log.records, with_history=True)
  _write_models(workdir, models, plan=plan, step=step)
  log.save()
  if log.records:
    report.loss_curve(log.records, os.path.join(workdir, LOSS_CURVE))


def _start(plan: settings.TrainPlan, workdir: str, setup: steps.Setup
           ) -> tuple[dict, int, list[dict]]:
  models = steps.init_models(setup=setup, seed=plan.seed, count=len(plan.style_paths))
  path = os.path.join(workdir, CHECKPOINT)
  if not (plan.resume and os.path.exists(path)):
    return models, 0, []
  template = dict(jax.device_get(models), step=np.int32(0))
  state, _, records = checkpoints.load(path, template_for=lambda scale: template,
                                       fingerprint=plan.fingerprint)
  step = int(state.pop('step'))
  return state, step, records[:step]


def _records(first: int, chunk_losses: np.ndarray, parts: dict) -> list[dict]:
  return [{'step': first + index + 1, 'loss': chunk_losses[index].tolist(),
           'parts': {name: value[index].tolist() for name, value in parts.items()}}
          for index in range(len(chunk_losses))]


def run(plan: settings.TrainPlan, workdir: str) -> list[str]:
  """Trains the networks as the plan says; returns the model files written.

  Raises:
    errors.UserError: bad input, or a non-finite loss (the last finite models are kept).
    Stopped: SIGINT/SIGTERM (after writing the checkpoint and the models).
  """
  runtime.use_compilation_cache(plan.compilation_cache)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise errors.UserError(f'--workdir {workdir!r} exists and is not a directory; choose another')
  files.ensure_directory(workdir)
  setup = steps.setup_of(plan)
  net = vgg.prepare(weights.load(plan.network.weights_path or None, network=plan.network.name),
                    dtype=np.dtype(plan.network.compute_dtype))
  style_pictures, styles = _styles(plan, net, setup)
  photo_sharding, model_sharding = steps.mesh_placement(plan.batch_size)
  crops = data.Crops(plan.train_paths, size=plan.size, batch_size=plan.batch_size,
                     crop_scale=plan.crop_scale, seed=plan.seed)
  models, step, records = _start(plan, workdir, setup)
  models = jax.device_put(models, model_sharding)
  log = report.LossLog(os.path.join(workdir, LOSS_LOG), records)
  photos = _sample_photos(plan) if plan.save_every else []
  progress = report.Progress(total=plan.steps, mode=plan.progress)
  parameters = sum(x[0].size for x in jax.tree.leaves(models['params']))
  progress.message(
      f'training {len(plan.style_paths)} network(s) of {parameters:,} parameters on '
      f'{len(plan.train_paths)} photo(s), {plan.size} px crops, batch {plan.batch_size}, '
      f'{plan.steps} steps' + (f' from step {step}' if step else '') +
      f'; {jax.device_count()} x {jax.devices()[0].device_kind}')
  seed_key = jax.random.key(plan.seed)
  schedule = list(_chunks(step, plan))
  with runtime.stop_requests() as requested, \
      concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    upcoming = [pool.submit(crops.chunk, first, length) for first, length in schedule[:1]]
    for number, (first, length) in enumerate(schedule):
      batches = upcoming.pop().result()
      if number + 1 < len(schedule):  # the next chunk's crops, read while this one runs
        upcoming.append(pool.submit(crops.chunk, *schedule[number + 1]))
      if length < plan.chunk_size:  # one compiled shape for every chunk
        batches = np.concatenate([batches, np.repeat(batches[-1:], plan.chunk_size - length, 0)])
      new_models, chunk_losses, parts = steps.train_chunk(
          models, jax.device_put(batches, photo_sharding), length, first, seed_key, net=net,
          styles=styles, setup=setup)
      chunk_losses = np.asarray(chunk_losses)[:length]
      if not np.isfinite(chunk_losses).all():
        bad = first + 1 + int(np.argmin(np.isfinite(chunk_losses).all(axis=1)))
        _save(workdir, models, plan=plan, step=step, log=log)
        raise errors.UserError(f'the training loss became non-finite at step {bad}; the models '
                               f'of step {step} are kept in {workdir}; lower '
                               '--config.learning_rate')
      models, step = new_models, first + length
      for record in _records(first, chunk_losses, jax.device_get(parts)):
        log.add(record)
      progress.update(done=step, losses={'loss': float(np.mean(chunk_losses[-1]))})
      if number == 0:
        progress.restart_clock(step)  # the speed leaves out compilation
      if plan.save_every and step % plan.save_every == 0:
        _write_samples(os.path.join(workdir, f'samples_{step:06d}.png'), models, photos=photos,
                       style_pictures=style_pictures, setup=setup)
      end = step == plan.steps or requested
      if end or (plan.checkpoint_every and step % plan.checkpoint_every == 0):
        with runtime.signals_ignored():
          _save(workdir, models, plan=plan, step=step, log=log)
      if requested and step < plan.steps:
        raise Stopped(requested[0], step)
  if not schedule:
    _save(workdir, models, plan=plan, step=step, log=log)
  return model_paths(workdir, plan.model_name, len(plan.style_paths))
