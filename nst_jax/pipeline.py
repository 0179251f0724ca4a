"""The orchestrator: plan -> inputs -> problem -> optimisation loop -> outputs.

:func:`run` reads top to bottom in that order. It owns what belongs to the whole run: JAX's
process settings, the progress display, Ctrl-C/SIGTERM (stop after the current chunk, write the
last good image, keep a checkpoint to resume from) and the one-program-per-content-shape split.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nst_jax import devices
from nst_jax import errors
from nst_jax import files
from nst_jax import inputs
from nst_jax import loop
from nst_jax import losses
from nst_jax import outputs
from nst_jax import plan as plan_lib
from nst_jax import problem
from nst_jax import processes
from nst_jax import report
from nst_jax import runtime
from nst_jax import tiling
from nst_jax import vgg
from nst_jax import weights

CHECKPOINT = 'checkpoint.msgpack'
LOSS_LOG = 'losses.jsonl'


@dataclasses.dataclass
class Prepared:
  """A plan's inputs read and checked, ready to optimise."""

  plan: plan_lib.Plan
  batch: inputs.Batch
  net: dict                          # vgg.prepare output
  program: problem.Program
  memory_note: str = ''              # said when the L-BFGS history was shortened to fit

  def task(self, indices: Sequence[int], size: tuple[int, int]) -> loop.Task:
    """The optimisation of the problems at ``indices``, whose results are ``size``."""
    return loop.Task(batch=self.batch.select(indices), images_plan=self.plan.images, net=self.net,
                     program=self.program, sizes=self.plan.schedule.sizes(size),
                     schedule=self.plan.schedule, shard=self.plan.devices.shard)

  def whole_task(self) -> loop.Task:
    """The optimisation of the whole batch (its contents must share one shape)."""
    return self.task(range(len(self.batch)),
                     self.plan.images.output_size(self.batch.contents[0].shape[:2]))

  def scale_targets(self, height: int, width: int) -> dict:
    """Every problem's targets at a height x width scale (host arrays, leading axis N)."""
    return problem.scale_targets(self.batch, self.plan.images, net=self.net,
                                 program=self.program, height=height, width=width)

  def start_images(self, height: int, width: int) -> np.ndarray:
    """Every problem's start image at a height x width scale, (N, H, W, 3)."""
    return inputs.start_images(self.batch, self.plan.images,
                               mean_rgb=np.asarray(self.net['mean_rgb']), height=height,
                               width=width)


@dataclasses.dataclass
class Result:
  """Finished images (one (H, W, 3) float array in 0-255 per problem) and the files written."""

  images: list[np.ndarray]
  paths: list[str]


def configure_jax(outputs_plan: plan_lib.OutputPlan, devices_plan: plan_lib.DevicesPlan) -> None:
  """Process-wide JAX settings: the multi-host start, the compilation cache.

  Call before any JAX computation; a second call changes nothing (``main.py`` joins the other
  processes before :func:`run` does).

  Raises:
    errors.UserError: the coordinator cannot be reached or started.
  """
  if devices_plan.distributed and not jax.distributed.is_initialized():
    processes.join(devices_plan)
  runtime.use_compilation_cache(outputs_plan.compilation_cache)


#: The shortest L-BFGS history chosen automatically when the configured one would not fit.
MIN_AUTO_MEMORY_SIZE = 5


def _fit_memory(plan: plan_lib.Plan, batch: inputs.Batch) -> tuple[plan_lib.Plan, str]:
  """The plan with an L-BFGS history short enough for 80% of the device's memory, and a note.

  Refuses, in one line, a run that does not fit even with a history of MIN_AUTO_MEMORY_SIZE.
  """
  height, width = plan.images.output_size(batch.contents[0].shape[:2])
  lbfgs = 'lbfgs' in plan.optimizer.name
  layers = losses.feature_layers(plan.entries)
  window = 0
  if plan.network.tile_size:
    window = tiling.window_size(plan.network.tile_size, plan.entries, network=plan.network.name)
  space = plan.devices.shard == 'space' and devices.splits_rows(height)
  needed = lambda memory_size: devices.planned_bytes(
      height, width, layers=layers, network=plan.network.name,
      compute_dtype=plan.network.compute_dtype, history_images=2 * memory_size if lbfgs else 0,
      history_dtype=plan.optimizer.history_dtype, batch=len(batch), tile_window=window,
      space_devices=jax.device_count() if space else 1)
  available, where = devices.device_memory()
  memory_size = plan.optimizer.memory_size
  if needed(memory_size) <= 0.8 * available:
    return plan, ''
  fitting = [m for m in range(memory_size - 1, MIN_AUTO_MEMORY_SIZE - 1, -1)
             if needed(m) <= 0.8 * available] if lbfgs else []
  if not fitting:
    raise errors.UserError(
        f'a {width}x{height} output needs about {needed(memory_size) / 2**30:.1f} GiB, more than '
        f'{where} has ({available / 2**30:.1f} GiB); lower --config.size or '
        '--config.memory_size (L-BFGS keeps 2 x memory_size images), set '
        '--config.history_dtype=bfloat16, or use --config.optimizer=adam')
  optimizer = dataclasses.replace(plan.optimizer, memory_size=fitting[0])
  note = (f'--config.memory_size={memory_size} would need {needed(memory_size) / 2**30:.1f} GiB, '
          f'more than {where} has ({available / 2**30:.1f} GiB): using memory_size={fitting[0]} '
          f'({needed(fitting[0]) / 2**30:.1f} GiB)')
  return dataclasses.replace(plan, optimizer=optimizer), note


def prepare(plan: plan_lib.Plan, *, contents: Sequence[inputs.Source] = (),
            styles: Sequence[inputs.Source] = ()) -> Prepared:
  """Reads every input, checks the memory, loads the network (raises UserError on bad input)."""
  batch = inputs.read_batch(plan.images, plan.batch, entry_weights=plan.entry_weights,
                            contents=contents, styles=styles)
  plan, memory_note = _fit_memory(plan, batch)
  vgg_weights = weights.load(plan.network.weights_path or None, network=plan.network.name)
  net = vgg.prepare(vgg_weights, dtype=jnp.dtype(plan.network.compute_dtype))
  program = problem.Program(entries=plan.entries, network=plan.network, optimizer=plan.optimizer)
  return Prepared(plan=plan, batch=batch, net=net, program=program, memory_note=memory_note)


def _tagged(name: str, tag: str) -> str:
  stem, extension = os.path.splitext(name)
  return f'{stem}{tag}{extension}'


def saving(plan: plan_lib.Plan, workdir: str | None, tag: str = '', *,
           writes: bool = True) -> loop.Saving:
  """Where the loop writes checkpoints and the loss log (workdir None: nowhere).

  ``writes=False`` (processes other than 0 of a distributed run): the loss log stays in memory;
  the checkpoint path is kept, to resume from, while :func:`nst_jax.checkpoints.save` gathers
  the state on every process and writes it on process 0 only.
  """
  where = (lambda name: None) if workdir is None else (
      lambda name: os.path.join(workdir, _tagged(name, tag)))
  return loop.Saving(checkpoint_path=where(CHECKPOINT),
                     log_path=where(LOSS_LOG) if writes else None,
                     checkpoint_every=plan.outputs.checkpoint_every,
                     checkpoint_history=plan.outputs.checkpoint_history,
                     resume=plan.outputs.resume, fingerprint=plan.fingerprint)


def _announce(prepared: Prepared, groups, progress: report.Progress, *, measures: bool) -> None:
  plan, n = prepared.plan, len(prepared.batch)
  steps = sum(plan.schedule.steps_per_scale)
  shapes = ', '.join(f'{width}x{height}' for _, (height, width) in groups)
  progress.message(
      f'stylising {n} image{"s" if n > 1 else ""} at {shapes} px (width x height) on '
      f'{jax.device_count()} {jax.devices()[0].platform} device(s); {steps} '
      f'{plan.optimizer.name} steps' + (f' per shape ({len(groups)} programs)' if len(groups) > 1
                                        else '') + '; the first chunk includes compilation')
  if prepared.memory_note:
    progress.message(prepared.memory_note)
  tile = plan.network.tile_size
  if tile and all(max(size) <= tile for _, size in groups):
    window = tiling.window_size(tile, plan.entries, network=plan.network.name)
    progress.message(f'--config.tile_size={tile} covers the whole image: one tile, evaluated on a '
                     f'{window} px window (tile and halo), only costs time; tiles are for images '
                     'larger than a tile (--config.tile_size=0 turns them off)')
  if measures:  # the metrics are written only with a workdir
    for note in sorted({outputs.metrics_note(*size) for _, size in groups} - {''}):
      progress.message(note)


def _optimize_groups(prepared: Prepared, groups, *, workdir: str | None, writes: bool,
                     progress: report.Progress) -> tuple[list[np.ndarray], list[dict]]:
  """Optimises each shape group in turn; returns the finished images in batch order.

  ``writes=False``: the loss log and intermediate images are not written, checkpoints only read.
  """
  plan, n = prepared.plan, len(prepared.batch)
  finish = lambda indices: lambda optimized: outputs.finished(
      optimized, contents=[prepared.batch.contents[i] for i in indices],
      preserve_color=plan.images.preserve_color)
  results: list = [None] * n
  records: list[dict] = []
  steps = sum(plan.schedule.steps_per_scale)
  keeps_files = workdir is not None and writes
  step_metrics = None if not (keeps_files and plan.outputs.save_every) else outputs.StepMetrics(
      os.path.join(workdir, outputs.STEP_METRICS), resume=plan.outputs.resume,
      measure=outputs.Measurer(batch=prepared.batch, images_plan=plan.images))
  with runtime.stop_requests() as requested:
    for group_index, (indices, size) in enumerate(groups):
      tag = f'_{size[1]}x{size[0]}' if len(groups) > 1 else ''
      on_chunk = None if not keeps_files else outputs.intermediate_writer(
          workdir, every=plan.outputs.save_every, chunk_size=plan.optimizer.chunk_size,
          indices=indices, n=n, finish=finish(indices), step_metrics=step_metrics)
      try:
        outcome = loop.optimize(prepared.task(indices, size),
                                saving(plan, workdir, tag, writes=writes), progress=progress,
                                on_chunk=on_chunk, stop_signal=processes.stop_signal(requested),
                                done_before=group_index * steps)
      except (loop.Stopped, loop.NonFinite) as exc:
        # The group that stopped gives its last good images; groups not reached keep their start.
        for index, image in zip(indices, finish(indices)(exc.images)):
          results[index] = image
        for later, later_size in groups[group_index + 1:]:
          start = prepared.start_images(*later_size)[later]
          for index, image in zip(later, finish(later)(start)):
            results[index] = image
        exc.images, exc.records = results, records + exc.records
        raise
      for index, image in zip(indices, finish(indices)(outcome.images)):
        results[index] = image
      records += outcome.records
  return results, records


def _prepare_alike(plan: plan_lib.Plan, workdir: str | None, *,
                   contents: Sequence[inputs.Source], styles: Sequence[inputs.Source]) -> Prepared:
  """:func:`prepare` (before the workdir is created), every process of a distributed run checked
  to start from the same settings, checkpoint and inputs (nothing to check in one process)."""
  checkpoint_path = None if workdir is None else os.path.join(workdir, CHECKPOINT)
  processes.check_agreement(
      {'settings': processes.settings_digest(plan),
       'checkpoint': processes.checkpoint_digest(checkpoint_path, resume=plan.outputs.resume)},
      fixes=processes.AGREEMENT_FIXES)
  prepared = prepare(plan, contents=contents, styles=styles)
  processes.check_agreement({'inputs': processes.inputs_digest(prepared.plan, prepared.batch)},
                            fixes=processes.AGREEMENT_FIXES)
  return prepared


def run(plan: plan_lib.Plan, workdir: str | None, *, contents: Sequence[inputs.Source] = (),
        styles: Sequence[inputs.Source] = ()) -> Result:
  """Stylises as the plan says; writes everything into ``workdir`` (None: nothing is written).

  Args:
    plan: from :func:`nst_jax.plan.from_config`.
    workdir: output folder (created if needed), or None to keep everything in memory.
    contents: content images replacing the plan's paths (arrays or paths; the Python API).
    styles: style images replacing the plan's paths.

  Returns:
    The finished images and the paths written.

  Raises:
    errors.UserError: bad input, or a non-finite loss (after writing the last finite image);
      in a distributed run, processes started with other settings, inputs or checkpoint.
    loop.Stopped: SIGINT/SIGTERM (after writing the last good image and a checkpoint).
  """
  configure_jax(plan.outputs, plan.devices)
  if workdir is not None and os.path.exists(workdir) and not os.path.isdir(workdir):
    raise errors.UserError(f'--workdir {workdir!r} exists and is not a directory; choose another')
  prepared = _prepare_alike(plan, workdir, contents=contents, styles=styles)
  writes = processes.writes_files()
  if workdir is not None and writes:
    files.ensure_directory(workdir)
  groups = inputs.shape_groups(prepared.batch, plan.images)
  # The other processes keep the mode, writing nowhere: the loop computes the loss terms it
  # shows, which gathers them from every process, so all must do it or none.
  progress = report.Progress(total=len(groups) * sum(plan.schedule.steps_per_scale),
                             mode=plan.outputs.progress,
                             stream=None if writes else report.Nowhere())
  _announce(prepared, groups, progress, measures=workdir is not None)
  start = time.perf_counter()
  write = lambda results, records: [] if workdir is None or not writes else outputs.write(
      workdir, output=plan.outputs.output, batch=prepared.batch, images_plan=plan.images,
      batch_plan=plan.batch, results=results, records=records)
  try:
    results, records = _optimize_groups(prepared, groups, workdir=workdir, writes=writes,
                                        progress=progress)
  except (loop.Stopped, loop.NonFinite) as exc:
    with runtime.signals_ignored():  # a second Ctrl-C must not cut the last good image short
      paths = write(exc.images, exc.records)
    if paths:
      progress.message(f'stopped ({exc}); last good image written to {paths[0]}; resume with '
                       '--config.resume=True' if isinstance(exc, loop.Stopped) else
                       f'last finite image written to {paths[0]}')
    raise
  with runtime.signals_ignored():
    paths = write(results, records)
  progress.message(f'done in {time.perf_counter() - start:.1f} s'
                   + (f'; wrote {", ".join(paths)}' if paths else ''))
  checkpoint = None if workdir is None else os.path.join(workdir, CHECKPOINT)
  if checkpoint and os.path.exists(checkpoint):
    progress.message(f'and {checkpoint} ({os.path.getsize(checkpoint) / 2**20:.0f} MB, mostly the '
                     'L-BFGS history) for --config.resume; delete it when you are done')
  return Result(images=results, paths=paths)
