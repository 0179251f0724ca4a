"""The optimisation loop: compiled chunks of steps, coarse-to-fine scales, checkpoints.

:func:`optimize_chunk` is the pure compiled step function (``lax.scan`` of ``chunk_size`` steps,
``jax.vmap`` over the N problems of a batch; on several devices the batch, or with
``shard='space'`` every image's rows, split across them);
:func:`optimize` drives it scale by scale, logging losses, checkpointing, and stopping cleanly
when asked (SIGINT/SIGTERM, via ``stop_signal``) or when the loss becomes non-finite.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from nst_jax import checkpoints
from nst_jax import devices
from nst_jax import errors
from nst_jax import images
from nst_jax import inputs
from nst_jax import optim
from nst_jax import plan as plan_lib
from nst_jax import problem
from nst_jax import report


@functools.partial(jax.jit, static_argnames=('program', 'image_size', 'shard'),
                   donate_argnames=('state',))
def optimize_chunk(state: dict, steps_to_take: jax.Array, net: Mapping, targets: Mapping, *,
                   program: problem.Program, image_size: tuple[int, int] | None = None,
                   shard: str = devices.BATCH_AXIS) -> tuple[dict, jax.Array]:
  """``chunk_size`` optimisation steps of every problem in the batch, in one program.

  Args:
    state: batched :func:`nst_jax.optim.init_state` (leading axis N).
    steps_to_take: how many of the chunk's steps to take (the rest are no-ops): no
      recompilation for a shorter last chunk.
    net: :func:`nst_jax.vgg.prepare` output, shared by the batch.
    targets: batched targets and weights (leading axis N), from :func:`problem.scale_targets`.
    program: the static description.
    image_size: (H, W) of the images, needed when the state holds a Laplacian pyramid
      (``program.optimizer.parameterization``); None for pixels.
    shard: ``'space'`` keeps the new state's image-shaped arrays split by rows across devices
      (:func:`nst_jax.devices.constrain_space`); place ``state`` so with ``shard_space``.

  Returns:
    The new state and the losses (N, chunk_size); NaN marks steps not taken.
  """
  optimizer = program.optimizer.make()

  def chunk_of_one_problem(state, problem_targets):
    loss_fn = lambda variables, step=0: problem.objective(
        program.decode(variables, image_size), net=net, targets=problem_targets,
        program=program, step=step)[0]
    return optim.run_chunk(state, loss_fn=loss_fn, optimizer=optimizer,
                           linesearch=optim.uses_linesearch(program.optimizer.name),
                           length=program.optimizer.chunk_size, active=steps_to_take,
                           stochastic=program.stochastic)

  new_state, losses = jax.vmap(chunk_of_one_problem)(state, targets)
  if shard == devices.SPACE_AXIS:
    new_state = devices.constrain_space(new_state, image_size=state['image'].shape[1:3])
  return new_state, losses


@functools.partial(jax.jit, static_argnames=('program', 'shard'))
def initial_state(images_: jax.Array, net: Mapping, targets: Mapping, *,
                  program: problem.Program, shard: str = devices.BATCH_AXIS) -> dict:
  """Batched :func:`nst_jax.optim.init_state` of images (N, H, W, 3), encoded as the program's
  parameterisation says (a line-search optimiser's first loss included); ``shard='space'``
  splits the new history by rows as the images are (see :func:`optimize_chunk`)."""
  optimizer = program.optimizer.make()
  size = images_.shape[1:3]
  state = jax.vmap(lambda image, problem_targets: optim.init_state(
      optimizer, program.encode(image), loss_fn=lambda x, step=0: problem.objective(
          program.decode(x, size), net=net, targets=problem_targets, program=program,
          step=step)[0],
      stochastic=program.stochastic))(images_, targets)
  if shard == devices.SPACE_AXIS:
    state = devices.constrain_space(state, image_size=size)
  return state


@functools.partial(jax.jit, static_argnames=('program', 'image_size'))
def _decoded(variables: jax.Array, *, program: problem.Program,
             image_size: tuple[int, int]) -> jax.Array:
  return jax.vmap(lambda v: program.decode(v, image_size))(variables)


def images_of(state: Mapping, *, program: problem.Program, image_size: tuple[int, int]
              ) -> jax.Array:
  """The batch's current images (N, H, W, 3), whatever the optimiser moves."""
  if program.optimizer.parameterization == 'pixels':
    return state['image']
  return _decoded(state['image'], program=program, image_size=tuple(image_size))


@dataclasses.dataclass(frozen=True)
class Task:
  """What to optimise: the problems, how their images are made, the network and the program."""

  batch: inputs.Batch
  images_plan: plan_lib.ImagesPlan
  net: Mapping
  program: problem.Program
  sizes: list[tuple[int, int]]       # (height, width) per scale, coarse to fine
  schedule: plan_lib.SchedulePlan
  shard: str = devices.BATCH_AXIS    # how devices share it: 'batch' or 'space' (plan.devices)


@dataclasses.dataclass(frozen=True)
class Saving:
  """Where and when the loop writes (None paths: nothing is written)."""

  checkpoint_path: str | None
  log_path: str | None
  checkpoint_every: int
  checkpoint_history: str
  resume: bool
  fingerprint: str


@dataclasses.dataclass
class Outcome:
  """What a run produced: final images (N, H, W, 3) and the loss records."""

  images: np.ndarray
  records: list[dict]


class Stopped(Exception):
  """The run was stopped by a signal after a chunk; ``images`` are the last good ones."""

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


def next_scale_start(previous: np.ndarray, *, contents: np.ndarray | None, height: int,
                     width: int) -> np.ndarray:
  """The start images of a finer scale: the coarser scale's results, upsampled.

  Args:
    previous: the coarser scale's results (N, h, w, 3).
    contents: the (colour-handled) content images at the finer scale (N, H, W, 3), to put back
      the detail the coarser scale could not hold: the start is then upsample(previous) +
      contents - upsample(downsample(contents)). None: plain upsampling.
    height: the finer scale's height.
    width: and width.
  """
  up = lambda batch: np.stack([images.resize(image, height, width) for image in batch])
  start = up(previous)
  if contents is not None:
    small = np.stack([images.resize(content, *previous.shape[1:3]) for content in contents])
    start = start + contents - up(small)
  return start


def _targets_at(task: Task, scale: int, final: tuple[dict, dict] | None) -> dict:
  """The targets of one scale; a coarser one's weights balanced like the final scale's terms."""
  final_targets, final_sizes = final if final is not None else (None, None)
  if final_targets is not None and scale == len(task.sizes) - 1:
    return final_targets  # computed once, for the balance, before the first scale
  height, width = task.sizes[scale]
  targets = problem.scale_targets(task.batch, task.images_plan, net=task.net,
                                  program=task.program, height=height, width=width)
  if final_sizes is not None:
    sizes = problem.term_sizes(task.batch, task.images_plan, targets, net=task.net,
                               program=task.program, height=height, width=width)
    targets = problem.balance_weights(targets, sizes=sizes, final_sizes=final_sizes)
  return targets


def _final_targets(task: Task) -> tuple[dict, dict] | None:
  """The final scale's targets and each term's size there, when coarser scales are balanced."""
  if len(task.sizes) == 1 or not task.schedule.scale_balance:
    return None
  height, width = task.sizes[-1]
  targets = problem.scale_targets(task.batch, task.images_plan, net=task.net,
                                  program=task.program, height=height, width=width)
  return targets, problem.term_sizes(task.batch, task.images_plan, targets, net=task.net,
                                     program=task.program, height=height, width=width)


def _resume(task: Task, saving: Saving, n_padded: int, progress) -> tuple[dict | None, int, list]:
  """The checkpoint's state, scale and records, or (None, 0, []) when not resuming."""
  path = saving.checkpoint_path
  if not (saving.resume and path):
    return None, 0, []
  if not os.path.exists(path):
    if progress:
      progress.message(f'no checkpoint at {path}; starting afresh')
    return None, 0, []
  optimizer, program = task.program.optimizer.make(), task.program
  template_for = lambda scale: jax.eval_shape(
      jax.vmap(lambda x: optim.init_state(optimizer, program.encode(x))), jax.ShapeDtypeStruct(
          (n_padded, *task.sizes[min(scale, len(task.sizes) - 1)], 3), program.image_dtype))
  state, scale, records = checkpoints.load(path, template_for=template_for,
                                           fingerprint=saving.fingerprint)
  if progress:
    done = int(np.asarray(state['step']).max())
    left = task.schedule.steps_per_scale[scale] - done
    progress.message(f'resuming from {path}: scale {scale + 1}, step {done}; '
                     + (f'{left} steps left at this scale' if left > 0 else
                        'no steps left at this scale (raise --config.steps to continue)'))
  return state, scale, records


class _Checkpointer:
  """Writes checkpoints, saying once when the optimiser history is left out."""

  def __init__(self, saving: Saving, progress: report.Progress | None):
    self.saving, self.progress, self.said = saving, progress, False

  def __call__(self, state: Mapping, *, scale: int, records: list[dict]) -> None:
    if self.saving.checkpoint_path is None:
      return
    keep = checkpoints.keep_history(self.saving.checkpoint_history, state)
    if not keep and not self.said and self.progress:
      self.progress.message(
          f'checkpoints leave out the {checkpoints.history_bytes(state) / 2**20:.0f} MB optimiser '
          'history (checkpoint_history=auto keeps it under '
          f'{checkpoints.HISTORY_BYTES_LIMIT // 2**20} MB); a resume restarts it')
      self.said = True
    checkpoints.save(self.saving.checkpoint_path, state=state, scale=scale,
                     fingerprint=self.saving.fingerprint, records=records, with_history=keep)


def _start_state(task: Task, scale: int, targets, *, resumed: dict | None,
                 previous: np.ndarray | None, n_padded: int, progress) -> dict:
  """The state a scale starts from: the checkpoint's, or fresh from the start/upsampled images."""
  shard = devices.placement(task.shard, n_padded=n_padded, image_size=tuple(task.sizes[scale]))
  fresh = lambda start: initial_state(
      shard(jnp.asarray(start, task.program.image_dtype)), task.net, targets,
      program=task.program, shard=task.shard)
  if resumed is not None and 'opt_state' not in resumed:
    # Saved without the history: the optimiser starts afresh from the saved image.
    if progress:
      progress.message('the checkpoint has no optimiser history (checkpoint_history): '
                       'the L-BFGS history restarts here')
    saved = images_of(shard(resumed), program=task.program, image_size=task.sizes[scale])
    return dict(shard(resumed), opt_state=fresh(saved)['opt_state'])
  if resumed is not None:
    return shard(resumed)
  height, width = task.sizes[scale]
  if previous is None:
    start = inputs.start_images(task.batch, task.images_plan,
                                mean_rgb=np.asarray(task.net['mean_rgb']), height=height,
                                width=width)
  else:
    contents = None
    if task.schedule.content_detail:
      contents = np.stack([inputs.scale_images(task.batch, index, task.images_plan, height,
                                               width)[0] for index in range(len(task.batch))])
    start = next_scale_start(previous, contents=contents, height=height, width=width)
  return fresh(devices.pad_batch(start, n_padded))


def _log_chunk(log: report.LossLog, *, scale: int, first_step: int, chunk_losses: np.ndarray,
               parts: Mapping | None, n: int) -> None:
  """One record per step taken; the chunk's last carries each term's share when computed.

  A step's ``loss`` is the value at the image it started from (the optimiser evaluates before it
  moves); ``parts`` are measured at the image after the chunk's last step, the next one's start.
  """
  taken = chunk_losses.shape[1]
  for offset in range(taken):
    record = {'scale': scale, 'step': first_step + offset + 1,
              'loss': [None if not np.isfinite(v) else float(v) for v in chunk_losses[:, offset]]}
    if offset == taken - 1 and parts is not None:
      record['parts'] = {name: [float(v) for v in np.asarray(values)[:n]]
                         for name, values in parts.items()}
    log.add(record)
  log.save()


def _run_scale(task: Task, scale: int, state: dict, targets, *, log: report.LossLog, n: int,
               checkpoint: _Checkpointer, saving: Saving, progress: report.Progress | None,
               on_chunk, stop_signal: Callable[[], int], done_before: int
               ) -> tuple[dict, np.ndarray]:
  """Runs one scale's chunks; returns the final state and the last good images (N, H, W, 3)."""
  program, steps = task.program, task.schedule.steps_per_scale[scale]
  chunk_size = program.optimizer.chunk_size
  label = (f'scale {scale + 1}/{len(task.sizes)} {task.sizes[scale][1]}x{task.sizes[scale][0]} '
           if len(task.sizes) > 1 else '')
  show = progress is not None and progress.mode != 'none'
  # Gathered: a resumed state is split across processes, which np.asarray cannot fetch.
  step = int(np.asarray(devices.to_host(state['step'])).max())
  if progress:
    progress.restart_clock(done_before + step)
  size = tuple(task.sizes[scale])
  current = lambda state: images_of(state, program=program, image_size=size)
  last_good = np.asarray(devices.to_host(current(state)))[:n]
  while step < steps:
    take = min(chunk_size, steps - step)
    if program.optimizer.lbfgs_restart and step > 0:
      state = dict(state, opt_state=initial_state(current(state), task.net, targets,
                                                  program=program, shard=task.shard)['opt_state'])
    state, chunk_losses = optimize_chunk(
        state, jnp.int32(take), task.net, targets, program=program,
        image_size=None if program.optimizer.parameterization == 'pixels' else size,
        shard=task.shard)
    finite = np.asarray(devices.to_host(state['finite']))[:n]
    images_now = current(state)
    last_good = np.asarray(devices.to_host(images_now))[:n]
    # Each term's share costs one more forward pass: only when it is shown, and at the end of
    # a scale so the log always closes with it.
    parts = (devices.to_host(problem.loss_parts(images_now, task.net, targets, program=program))
             if show or step + take >= steps else None)
    _log_chunk(log, scale=scale, first_step=step,
               chunk_losses=np.asarray(devices.to_host(chunk_losses))[:n, :take], parts=parts, n=n)
    step += take
    if show:
      shown = {name: float(np.asarray(values)[:n].mean()) for name, values in parts.items()}
      progress.update(done=done_before + step, losses=dict(shown, total=sum(shown.values())),
                      label=label)
    if on_chunk:
      on_chunk(scale, step, last_good)
    signal_number = stop_signal()
    # After a non-finite loss the optimiser state is not worth resuming: no checkpoint then.
    if finite.all() and (signal_number or (
        saving.checkpoint_every and step % saving.checkpoint_every < chunk_size)):
      checkpoint(state, scale=scale, records=log.records)
    if not finite.all():
      raise NonFinite(f'the loss became non-finite near step {step} of scale {scale + 1} '
                      f'(batch element {int(np.argmin(finite))}); kept the last finite image. '
                      'Lower --config.learning_rate or the loss weights', last_good, log.records)
    if signal_number:
      raise Stopped(signal_number, last_good, log.records)
  return state, last_good


def optimize(task: Task, saving: Saving, *, progress: report.Progress | None = None,
             on_chunk: Callable[[int, int, np.ndarray], None] | None = None,
             stop_signal: Callable[[], int] = lambda: 0, done_before: int = 0) -> Outcome:
  """Runs every scale's optimisation for the whole batch; saves checkpoints and the loss log.

  Args:
    task: what to optimise.
    saving: where and when to write checkpoints and the loss log.
    progress: optional progress display.
    on_chunk: called as ``on_chunk(scale, step, images)`` after every chunk.
    stop_signal: returns the number of a signal that asked to stop (0: none); checked after
      every chunk.
    done_before: steps already taken by earlier groups (for the progress display).

  Returns:
    The final images and loss records.

  Raises:
    Stopped: when ``stop_signal`` asked, after saving the last good state.
    NonFinite: when the loss became non-finite (the last finite images are kept).
  """
  n = len(task.batch)
  n_padded = devices.padded_batch_size(n, shard=task.shard)
  resumed, start_scale, records = _resume(task, saving, n_padded, progress)
  log = report.LossLog(saving.log_path, records)
  checkpoint = _Checkpointer(saving, progress)
  steps = task.schedule.steps_per_scale
  done_before += sum(steps[:start_scale])
  final = _final_targets(task)
  previous = None
  if task.shard == devices.SPACE_AXIS and task.program.network.tile_size and progress:
    progress.message('shard=space with tiles: the images and the L-BFGS history stay split by '
                     'rows, but every device evaluates every tile (memory per device is split, '
                     'the time is not)')
  for scale in range(start_scale, len(task.sizes)):
    height = task.sizes[scale][0]
    if task.shard == devices.SPACE_AXIS and not devices.splits_rows(height) and progress:
      progress.message(f'shard=space: scale {scale + 1} is {height} px high, not a multiple of '
                       f'the {jax.device_count()} devices, so each device holds all its rows')
    targets = devices.placement(task.shard, n_padded=n_padded, image_size=task.sizes[scale])(
        devices.pad_batch(_targets_at(task, scale, final), n_padded))
    state = _start_state(task, scale, targets, resumed=resumed, previous=previous,
                         n_padded=n_padded, progress=progress)
    resumed = None
    state, previous = _run_scale(task, scale, state, targets, log=log, n=n, checkpoint=checkpoint,
                                 saving=saving, progress=progress, on_chunk=on_chunk,
                                 stop_signal=stop_signal, done_before=done_before)
    done_before += steps[scale]
    log.save()  # also when a scale has no steps
    # A finished scale is checkpointed too, so a resume continues at the next one.
    checkpoint(state, scale=scale, records=log.records)
  return Outcome(images=previous, records=log.records)
