"""Several processes (hosts) running one distributed run: joining, agreeing, stopping together.

Process 0 alone writes files and reports (:func:`writes_files`); the others compute their share of
every step and print nothing but errors (:func:`quiet_others`). Before anything is computed the
processes compare digests of their settings, checkpoint and inputs (:func:`check_agreement`), which
also opens their connections, so a process that dies later makes the others' next collective fail
at once; :func:`lost_process` turns that failure into one line and :func:`leave_at_once_on_failure`
keeps a process that fails alone from waiting in JAX's shutdown barrier. A process that hangs
(alive, its connections open, silent) is noticed by JAX's coordinator after ``heartbeat_timeout``
seconds without a heartbeat, and the others abort with JAX's own message: its client takes an
error callback, but jax 0.10.2 cannot hand it the error (casting the status to Python fails, which
aborts too), so that exit is JAX's C++ check failure rather than one line.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
import sys
import traceback
from collections.abc import Callable

import jax
import numpy as np

from nst_jax import errors
from nst_jax import inputs
from nst_jax import loop
from nst_jax import plan as plan_lib


def join(devices_plan: plan_lib.DevicesPlan) -> None:
  """``jax.distributed.initialize`` with the plan's coordinator, or the cluster's when unset."""
  # Processes whose devices are CPUs exchange data over TCP with gloo. The setting only concerns
  # the CPU backend (GPU and TPU use their own collectives), so it is set whatever the platform:
  # which one runs is not known before the backends start, and they must start after this.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  given = devices_plan.process_id >= 0  # the plan has all three or none
  address = devices_plan.coordinator_address or None
  try:
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=devices_plan.num_processes if given else None,
        process_id=devices_plan.process_id if given else None,
        initialization_timeout=JOIN_TIMEOUT_S,
        heartbeat_timeout_seconds=devices_plan.heartbeat_timeout)
  except (jax.errors.JaxRuntimeError, RuntimeError, ValueError) as exc:
    where = (f'the coordinator at {address} as process {devices_plan.process_id} of '
             f'{devices_plan.num_processes}' if given else 'the cluster\'s coordinator')
    raise errors.UserError(
        f'could not join {where}: {_first_line(exc)}; start every process within '
        f'{JOIN_TIMEOUT_S} s of each other with the same --config.coordinator_address (the host '
        'and a free port of process 0) and --config.num_processes') from None


def _first_line(exc: BaseException) -> str:
  lines = str(exc).strip().splitlines()
  return lines[0] if lines else type(exc).__name__


#: How long a process waits for all the others to join a distributed run (jax's default: 300).
JOIN_TIMEOUT_S = 300


def writes_files() -> bool:
  """Whether this process writes files and reports progress: process 0 of a distributed run.

  The others compute their share of every step and print nothing but errors; they read only a
  checkpoint to resume from (so the workdir must be shared, see :func:`check_agreement`).
  """
  return jax.process_index() == 0


def _digest(value: bytes | str) -> bytes:
  return hashlib.sha256(value.encode() if isinstance(value, str) else value).digest()


def settings_digest(plan: plan_lib.Plan) -> bytes:
  """The plan, less what may differ between processes: their id and compilation cache.

  Not the progress mode: the loop gathers the loss terms only when it shows them (see run).
  """
  same = dataclasses.replace(
      plan, devices=dataclasses.replace(plan.devices, process_id=-1),
      outputs=dataclasses.replace(plan.outputs, compilation_cache=''))
  return _digest(repr(same))  # plans hold names, numbers and tuples: a stable repr


def checkpoint_digest(path: str | None, *, resume: bool) -> bytes:
  """What a resume would start from: the checkpoint's bytes (none: empty)."""
  if not (resume and path and os.path.exists(path)):
    return _digest(b'')
  with open(path, 'rb') as handle:
    return _digest(handle.read())


def inputs_digest(plan: plan_lib.Plan, batch: inputs.Batch) -> bytes:
  """The images every process read, and the plan as it runs (the memory guard may change it)."""
  digest = hashlib.sha256(settings_digest(plan))
  masks = [mask for masks in batch.masks or [] for mask in masks]
  for image in [*batch.contents, *(style for styles in batch.styles for style in styles), *masks,
                *([] if batch.init_image is None else [batch.init_image])]:
    digest.update(np.ascontiguousarray(image).tobytes())
  return digest.digest()


class Disagreement(errors.UserError):
  """Processes of a distributed run started differently; raised alike on every process."""


AGREEMENT_FIXES = {
    'settings': 'start every process with the same command line, apart from '
                '--config.process_id (and --config.compilation_cache)',
    'checkpoint': 'every process resumes from the checkpoint process 0 wrote: give them one '
                  'shared --workdir (or copy it to each host\'s)',
    'inputs': 'every process must read the same content and style images (copy them to each '
              'host), and see the same device memory',
}


def check_agreement(digests: dict[str, bytes], *, fixes: dict[str, str]) -> None:
  """Refuses, on every process, a distributed run whose processes would compute different things.

  Each process contributes a digest per aspect; all of them are gathered (a collective: every
  process must call this at the same point). The first call also opens the connections between
  the processes, so from then on a process that dies makes the others' next collective fail at
  once, where before it they would wait for the coordinator's heartbeat timeout.

  Raises:
    Disagreement: naming the first aspect and process that differ from process 0, and
      ``fixes[aspect]``.
  """
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # only distributed runs need it
  names = list(digests)
  mine = np.frombuffer(b''.join(digests[name] for name in names), np.int32)
  # (processes, aspects, digest words); every process raises the same error, so all stop.
  every = np.asarray(multihost_utils.process_allgather(mine)).reshape(
      jax.process_count(), len(names), -1)
  for index, name in enumerate(names):
    differing = [process for process in range(len(every))
                 if not np.array_equal(every[process, index], every[0, index])]
    if differing:
      raise Disagreement(f'process {differing[0]} of this distributed run has other {name} '
                         f'than process 0; {fixes[name]}')


def stop_signal(requested: list[int]) -> Callable[[], int]:
  """The number of a signal that asked to stop (0: none), checked after every chunk.

  In a distributed run any process's signal stops them all after the same chunk: their
  collectives (the checkpoint's gather included) must pair up.
  """
  if jax.process_count() == 1:
    return lambda: requested[0] if requested else 0
  from jax.experimental import multihost_utils  # only distributed runs need it
  return lambda: int(np.max(multihost_utils.process_allgather(
      np.int32(requested[0] if requested else 0))))


#: Words of XLA's errors when another process of a distributed run is gone (its connection closed,
#: its heartbeats stopped, the coordinator unreachable).
LOST_PROCESS = re.compile(r'Gloo|Connection closed by peer|Connection reset|heartbeat|'
                           r'UNAVAILABLE|coordination service', re.IGNORECASE)


def lost_process(exc: BaseException) -> str:
  """One line for a collective that failed because another process stopped."""
  return (f'process {jax.process_index()}: another process of this distributed run stopped or '
          f'cannot be reached ({" ".join(str(exc).split())[:200]}); see its own error, then '
          'start them all again (--config.resume=True continues from the last checkpoint)')


def quiet_others() -> None:
  """On all but process 0 (after :func:`join`), standard output goes to /dev/null.

  Process 0 reports for the run. The others' only output is errors on stderr: muting their
  stdout also silences what the C++ runtime prints there (gloo's "Rank 1 is connected").
  """
  if not writes_files():
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


#: Failures that every process of a distributed run meets at the same point (their causes are
#: gathered from all of them): all leave through JAX's shutdown barrier, as after a success.
_AGREED_FAILURES = (Disagreement, loop.Stopped, loop.NonFinite)


def leave_at_once_on_failure(main):
  """In a distributed run, a process that fails alone exits at once, skipping the shutdown barrier.

  At exit JAX waits (up to 5 minutes) until every process reaches that barrier, while the others
  wait inside a collective for this one: all would hang. Leaving at once closes this process's
  connections, so the others' next collective fails and they stop too, each with one line.
  """

  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except SystemExit as exc:
      # The exception that main turned into this exit, if any.
      if (exc.code in (None, 0) or not jax.distributed.is_initialized()
          or isinstance(exc.__context__, _AGREED_FAILURES)):
        raise
      code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # a bug: shown in full, then the same quick exit
      if not jax.distributed.is_initialized():
        raise
      traceback.print_exc()
      code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

  return wrapped
