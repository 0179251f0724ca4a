"""Measuring one pastiche-loss problem: setup, timing, XLA's planned memory, measured peaks.

The lowest module of the package: it imports no other benchmark module. JAX is imported inside
the functions, so that the entry point can set XLA's flags before JAX starts.
"""

from __future__ import annotations

import os
import statistics
import threading
import time

from absl import flags

FLAGS = flags.FLAGS


def median_seconds(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def pastiche_config():
  """A fresh copy of pastiche's configuration: configs/pastiche.py loaded as a config file."""
  from nst_jax import config_files
  return config_files.load_config_file(os.path.join(config_files.ROOT, 'configs', 'pastiche.py'))


def setup(size: int, *, batch: int = 1, **overrides):
  """A pastiche-loss problem at size x size: (prepared, targets, state)."""
  import jax
  import jax.numpy as jnp
  from nst_jax import loop
  from nst_jax import pipeline
  from nst_jax import plan as plan_lib

  config = pastiche_config()
  config.size = size
  config.square = True
  config.chunk_size = FLAGS.chunk
  config.compilation_cache = ''
  for key, value in overrides.items():
    config[key] = value
  if batch > 1:
    config.batch_over = 'seed'
    config.batch_values = ','.join(str(i) for i in range(batch))
  prepared = pipeline.prepare(plan_lib.from_config(config))
  targets = jax.device_put(prepared.scale_targets(size, size))
  state = loop.initial_state(jnp.asarray(prepared.start_images(size, size)), prepared.net,
                             targets, program=prepared.program)
  return prepared, targets, state


def write_pair(directory: str, size: int) -> tuple[str, str]:
  """The example content and style at exactly size x size, as PNGs both sides read."""
  from nst_jax import config_files
  from nst_jax import images
  paths = []
  for name, example in (('content', config_files.DEFAULT_CONTENT),
                        ('style', config_files.DEFAULT_STYLE)):
    pixels = images.resize(images.load(config_files.example_path(example)), size, size)
    path = os.path.join(directory, f'{name}_{size}.png')
    images.save(pixels, path)
    paths.append(path)
  return paths[0], paths[1]


def _value_and_grad_fn(prepared, length: int):
  """``length`` loss-and-gradient evaluations in one compiled scan (no dispatch in the timing).

  Each evaluation moves the image by a negligible step so XLA cannot hoist it out of the loop.
  """
  import jax
  from nst_jax import problem

  @jax.jit
  def fn(images, targets):
    def one(image, problem_targets):
      value_and_grad = jax.value_and_grad(lambda x: problem.objective(
          x, net=prepared.net, targets=problem_targets, program=prepared.program)[0])

      def body(image, _):
        value, grad = value_and_grad(image)
        return image - 1e-12 * grad, value

      return jax.lax.scan(body, image, None, length=length)
    return jax.vmap(one)(images, targets)

  return fn


def planned_bytes(compiled) -> tuple[int, int]:
  """XLA's plan of a compiled program: (arguments + temporaries + outputs − aliased, temporaries).

  -1 where the backend gives no plan.
  """
  analysis = compiled.memory_analysis()
  if analysis is None:
    return -1, -1
  total = (analysis.temp_size_in_bytes + analysis.argument_size_in_bytes
           + analysis.output_size_in_bytes - analysis.alias_size_in_bytes)
  return int(total), int(analysis.temp_size_in_bytes)


def _resident_bytes() -> int:
  """The process's resident memory (Linux), -1 elsewhere."""
  try:
    with open('/proc/self/statm') as f:
      return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
  except (OSError, ValueError, IndexError):
    return -1


def _peak_rise(fn) -> int:
  """Peak rise of memory in use while ``fn()`` runs, sampled every millisecond; -1 if unknown.

  The device's bytes in use where it reports them (GPU); otherwise the process's resident memory,
  after returning freed heap to the system (malloc_trim) so that reused free memory is not missed.
  """
  import ctypes
  import jax
  device = jax.devices()[0]

  def current():
    stats = device.memory_stats()
    return stats['bytes_in_use'] if stats and 'bytes_in_use' in stats else _resident_bytes()

  try:
    ctypes.CDLL(None).malloc_trim(0)
  except (OSError, AttributeError):
    pass
  base = current()
  peak = [base]
  done = threading.Event()

  def sample():
    while not done.is_set():
      peak[0] = max(peak[0], current())
      done.wait(0.001)

  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  try:
    fn()
  finally:
    done.set()
    sampler.join()
  return -1 if base < 0 else max(peak[0], current()) - base


def step_seconds(prepared, targets, state, *, memory: bool = False) -> tuple[float, int, dict]:
  """Median seconds per optimiser step inside a compiled chunk of --chunk steps.

  Returns:
    The seconds, the measured peak rise during one chunk (``memory``; else -1) and the state
    after the last chunk (the input state is donated).
  """
  import jax
  import jax.numpy as jnp
  from nst_jax import loop
  steps_to_take = jnp.int32(FLAGS.chunk)
  box = [state]

  def chunk():
    box[0], losses = loop.optimize_chunk(box[0], steps_to_take, prepared.net, targets,
                                         program=prepared.program)
    jax.block_until_ready(losses)

  chunk()  # compile
  chunk()  # warm: first-touch page faults
  seconds = median_seconds(chunk, max(2, FLAGS.repeats // 2)) / FLAGS.chunk
  peak = _peak_rise(chunk) if memory else -1
  return seconds, peak, box[0]


def measure_step(size: int, *, batch: int = 1, memory: bool = False, **overrides) -> dict:
  """Compile time, seconds per forward+backward and per optimiser step, planned memory.

  Args:
    size: square image size.
    batch: number of vmapped problems.
    memory: also measure the peak rise of memory in use during one chunk.
    **overrides: config fields (e.g. ``remat=True``, ``optimizer='lbfgs'``).
  """
  import jax
  import jax.numpy as jnp
  from nst_jax import loop

  prepared, targets, state = setup(size, batch=batch, **overrides)
  grad_fn = _value_and_grad_fn(prepared, FLAGS.chunk)
  start = time.perf_counter()
  jax.block_until_ready(grad_fn(state['image'], targets))
  compile_seconds = time.perf_counter() - start
  jax.block_until_ready(grad_fn(state['image'], targets))  # warm: first-touch page faults
  forward_backward = median_seconds(
      lambda: jax.block_until_ready(grad_fn(state['image'], targets)),
      FLAGS.repeats) / FLAGS.chunk
  planned, temp = planned_bytes(loop.optimize_chunk.lower(
      state, jnp.int32(FLAGS.chunk), prepared.net, targets, program=prepared.program).compile())
  flops = None
  cost = _value_and_grad_fn(prepared, 1).lower(state['image'], targets).compile().cost_analysis()
  if cost:
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = cost.get('flops')
  per_step, peak, _ = step_seconds(prepared, targets, state, memory=memory)
  return {'size': size, 'batch': batch, 'compile_s': compile_seconds,
          'forward_backward_s': forward_backward, 'lbfgs_step_s': per_step,
          'planned_bytes': planned, 'temp_bytes': temp, 'peak_bytes': peak, 'flops': flops}


def peak_rss_bytes() -> int:
  """The process's peak resident memory so far (Linux reports kB)."""
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss_gib() -> float:
  return peak_rss_bytes() / 2**30


def module_in_subprocess(module: str, arguments: dict, *, what: str,
                         env: dict | None = None) -> dict:
  """Runs ``python -m module '<arguments as JSON>'`` in a fresh Python at the repository root and
  returns the JSON object its last line prints; ``what`` names the measurement in the error."""
  import json
  import subprocess
  import sys
  result = subprocess.run([sys.executable, '-m', module, json.dumps(arguments)], env=env,
                          capture_output=True, text=True, check=False,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
  if result.returncode:
    raise RuntimeError(f'the {what} measurement failed:\n{result.stderr[-3000:]}')
  return json.loads(result.stdout.strip().splitlines()[-1])


def gib(n: int) -> str:
  return 'n/a' if n < 0 else f'{n / 2**30:.2f} GiB'


def mib(n: int) -> str:
  return 'n/a' if n < 0 else f'{n / 2**20:.1f} MiB'
