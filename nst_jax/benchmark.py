r"""Speed, memory and quality figures of nst_jax, optionally side by side with pastiche (PyTorch).

  python -m nst_jax.benchmark                       # steps at 128/256/512 px, remat/bf16, batches
  python -m nst_jax.benchmark --sizes=512,1024,2048 --batches=1,2,4,8 --batch_px=256   # a GPU
  python -m nst_jax.benchmark --sections=none --e2e                  # nst_jax settings only
  python -m nst_jax.benchmark --torch_python=/path/to/venv/bin/python --e2e   # against pastiche

The loss is pastiche's (configs/pastiche.py, loaded as a config file), so both sides do the same
work. The entry point asks XLA for its memory-optimised CPU scheduler before JAX starts
(nst_jax.xla_flags); the first line printed shows XLA_FLAGS. Sections (--sections):

* step: compile seconds, then the median seconds per forward+backward (one loss-and-gradient
  evaluation, timed over a compiled scan of --chunk of them) and per fixed-step L-BFGS step inside
  a compiled chunk; XLA's planned memory
  (arguments + temporaries) of the L-BFGS chunk; with --torch_python, pastiche's seconds per
  forward+backward on the same pixels and the ratio.
* variants: remat and bfloat16 against the plain step: time, XLA's planned memory (total and
  temporaries, the part remat and bfloat16 change) and the measured peak rise of memory in use
  during one chunk (device bytes in use on a GPU, the process's resident memory on CPU).
* batch: N problems vmapped in one program against N sequential runs (throughput ratio).
* lbfgs: seconds per step of optimizer=lbfgs (optax L-BFGS, zoom line search) and lbfgs_fixed
  at N = 1 and 4, --batch_px. The line search keeps the last loss and gradient in its state
  (optim.init_state(loss_fn=...)); optax's value_and_grad_from_state, used before, hid a lax.cond
  whose predicate is batched under vmap, so both branches ran: measured at 128 px, N=1 went from
  0.945 to 0.336 s/step and N=4 from 10.96 to 6.74 s/step.
* largest: the largest square image whose L-BFGS chunk XLA plans within --memory_gib, per variant
  (compiled, not run).
* lbfgs_torch (with --torch_python): lbfgs_fixed's iterates against torch.optim.LBFGS's.
* e2e (--e2e): nst_jax single scale (--e2e_steps), 3 scales with scale_balance on and off, at
  --e2e_px; with --torch_python also pastiche's --e2e_steps L-BFGS steps and 3 scales with history
  30. Per setting: wall time (compilation included) and two distances of the final image
  (nst_jax.metrics: Gram distance to the style, relu4_2 distance to the content), beside those of
  the single-scale run after equal wall time: a setting is better only if no worse on both. With
  torch, also when each nst_jax setting reaches pastiche's final loss.
* On a GPU, the achieved FLOP/s of the forward+backward against --peak_tflops.

Speed is measured here, never asserted in tests.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from absl import app
from absl import flags

from nst_jax import errors

FLAGS = flags.FLAGS
SECTIONS = ('step', 'variants', 'batch', 'lbfgs', 'largest', 'lbfgs_torch', 'none')
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _define_flags() -> None:
  flags.DEFINE_list('sizes', ['128', '256', '512'], 'Square image sizes for the step table.')
  flags.DEFINE_integer('repeats', 5, 'Timed repetitions per figure (the median is reported).')
  flags.DEFINE_integer('chunk', 5, 'Steps per compiled chunk when timing L-BFGS steps.')
  flags.DEFINE_list('batches', ['1', '2', '4', '8'], 'Batch sizes N for the vmap table.')
  flags.DEFINE_integer('batch_px', 128, 'Image size of the batch and lbfgs tables.')
  flags.DEFINE_integer('variant_px', 256, 'Image size of the remat/bfloat16 table.')
  flags.DEFINE_float('memory_gib', 24.0, 'Memory budget for the largest-size search.')
  flags.DEFINE_string('torch_python', '', 'A Python with torch and pastiche==1.6.0, for the '
                      'side-by-side figures.')
  flags.DEFINE_bool('e2e', False, 'Run the end-to-end comparison (with pastiche if '
                    '--torch_python is given).')
  flags.DEFINE_integer('e2e_steps', 200, 'Steps at the final scale in the end-to-end comparison '
                       '(half as many at each coarser scale).')
  flags.DEFINE_integer('e2e_px', 256, 'Image size of the end-to-end comparison.')
  flags.DEFINE_float('peak_tflops', 0.0, 'Chip peak float32 TFLOP/s for utilisation (GPU).')
  flags.DEFINE_list('sections', ['step', 'variants', 'batch', 'lbfgs', 'largest', 'lbfgs_torch'],
                    f'Which tables to print: {", ".join(SECTIONS)}.')


def _median_seconds(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def pastiche_config():
  """A fresh copy of pastiche's configuration: configs/pastiche.py loaded as a config file."""
  from nst_jax import plan as plan_lib
  return plan_lib.load_config_file(os.path.join(plan_lib.ROOT, 'configs', 'pastiche.py'))


def _setup(size: int, *, batch: int = 1, **overrides):
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


def _planned_bytes(compiled) -> tuple[int, int]:
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


def _step_seconds(prepared, targets, state, *, memory: bool = False
                  ) -> tuple[float, int, dict]:
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
  seconds = _median_seconds(chunk, max(2, FLAGS.repeats // 2)) / FLAGS.chunk
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

  prepared, targets, state = _setup(size, batch=batch, **overrides)
  grad_fn = _value_and_grad_fn(prepared, FLAGS.chunk)
  start = time.perf_counter()
  jax.block_until_ready(grad_fn(state['image'], targets))
  compile_seconds = time.perf_counter() - start
  jax.block_until_ready(grad_fn(state['image'], targets))  # warm: first-touch page faults
  forward_backward = _median_seconds(
      lambda: jax.block_until_ready(grad_fn(state['image'], targets)),
      FLAGS.repeats) / FLAGS.chunk
  planned, temp = _planned_bytes(loop.optimize_chunk.lower(
      state, jnp.int32(FLAGS.chunk), prepared.net, targets, program=prepared.program).compile())
  flops = None
  cost = _value_and_grad_fn(prepared, 1).lower(state['image'], targets).compile().cost_analysis()
  if cost:
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = cost.get('flops')
  per_step, peak, _ = _step_seconds(prepared, targets, state, memory=memory)
  return {'size': size, 'batch': batch, 'compile_s': compile_seconds,
          'forward_backward_s': forward_backward, 'lbfgs_step_s': per_step,
          'planned_bytes': planned, 'temp_bytes': temp, 'peak_bytes': peak, 'flops': flops}


def _torch(mode: str, *args: str) -> dict:
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'torch_reference.py')
  try:
    done = subprocess.run([FLAGS.torch_python, script, mode, *args], capture_output=True,
                          text=True, check=False)
  except OSError as exc:
    raise errors.UserError(f'cannot run --torch_python={FLAGS.torch_python!r} ({exc.strerror}); '
                           'give the python of a virtual environment with torch and '
                           'pastiche==1.6.0') from None
  if done.returncode != 0:
    raise errors.UserError(f'the PyTorch reference failed under {FLAGS.torch_python!r}: '
                           f'{done.stderr.strip().splitlines()[-1] if done.stderr else "?"}; it '
                           'needs torch and pastiche==1.6.0 installed there')
  return json.loads(done.stdout.strip().splitlines()[-1])


def _write_pair(directory: str, size: int) -> tuple[str, str]:
  """The example content and style at exactly size x size, as PNGs both sides read."""
  from nst_jax import images
  from nst_jax import plan as plan_lib
  paths = []
  for name, example in (('content', plan_lib.DEFAULT_CONTENT), ('style', plan_lib.DEFAULT_STYLE)):
    pixels = images.resize(images.load(plan_lib.example_path(example)), size, size)
    path = os.path.join(directory, f'{name}_{size}.png')
    images.save(pixels, path)
    paths.append(path)
  return paths[0], paths[1]


def _peak_rss_gib() -> float:
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def _gib(n: int) -> str:
  return 'n/a' if n < 0 else f'{n / 2**30:.2f} GiB'


def _mib(n: int) -> str:
  return 'n/a' if n < 0 else f'{n / 2**20:.1f} MiB'


def step_table(directory: str) -> None:
  import jax
  sizes = [int(s) for s in FLAGS.sizes]
  torch_seconds = [None] * len(sizes)
  if FLAGS.torch_python:
    pairs = [':'.join(_write_pair(directory, size)) for size in sizes]
    torch_out = _torch('step', '--pairs', *pairs, '--repeats', str(FLAGS.repeats))
    torch_seconds = torch_out['seconds']
    print(f'PyTorch {torch_out["torch"]} ({torch_out["threads"]} threads), pastiche 1.6.0')
  print(f'\n== step (pastiche loss, {jax.devices()[0].platform}, median of {FLAGS.repeats}) ==')
  print(f'{"size":>6} {"compile s":>10} {"fwd+bwd s":>10} {"L-BFGS step s":>14} '
        f'{"planned mem":>12} {"torch fwd+bwd s":>16} {"jax/torch":>10} {"TFLOP/s":>8}')
  for size, reference in zip(sizes, torch_seconds):
    row = measure_step(size)
    ratio = f'{row["forward_backward_s"] / reference:.2f}' if reference else '-'
    tflops = (row['flops'] / row['forward_backward_s'] / 1e12) if row['flops'] else float('nan')
    utilisation = (f' ({100 * tflops / FLAGS.peak_tflops:.0f}% of peak)'
                   if FLAGS.peak_tflops else '')
    print(f'{size:>6} {row["compile_s"]:>10.2f} {row["forward_backward_s"]:>10.3f} '
          f'{row["lbfgs_step_s"]:>14.3f} {_gib(row["planned_bytes"]):>12} '
          f'{reference if reference else float("nan"):>16.3f} {ratio:>10} {tflops:>8.2f}'
          f'{utilisation}', flush=True)


def variants_table() -> None:
  size = FLAGS.variant_px
  print(f'\n== variants at {size} px: planned = XLA\'s plan of the L-BFGS chunk (total, '
        'temporaries); measured = peak rise of memory in use during one chunk ==')
  print(f'{"variant":>10} {"fwd+bwd s":>10} {"L-BFGS step s":>14} {"planned mem":>12} '
        f'{"planned temp":>13} {"measured peak":>14}')
  for name, overrides in (('plain', {}), ('remat', {'remat': True}),
                          ('bfloat16', {'compute_dtype': 'bfloat16'}),
                          ('both', {'remat': True, 'compute_dtype': 'bfloat16'})):
    row = measure_step(size, memory=True, **overrides)
    print(f'{name:>10} {row["forward_backward_s"]:>10.3f} {row["lbfgs_step_s"]:>14.3f} '
          f'{_mib(row["planned_bytes"]):>12} {_mib(row["temp_bytes"]):>13} '
          f'{_mib(row["peak_bytes"]):>14}', flush=True)


def batch_table() -> None:
  size = FLAGS.batch_px
  print(f'\n== vmapped batch at {size} px: N problems in one program vs N sequential ==')
  print(f'{"N":>4} {"L-BFGS step s":>14} {"per image s":>12} {"throughput vs N=1":>18}')
  single = None
  for n in (int(b) for b in FLAGS.batches):
    row = measure_step(size, batch=n)
    single = single or row['lbfgs_step_s']
    print(f'{n:>4} {row["lbfgs_step_s"]:>14.3f} {row["lbfgs_step_s"] / n:>12.3f} '
          f'{n * single / row["lbfgs_step_s"]:>17.2f}x', flush=True)


def lbfgs_table() -> None:
  """Seconds per step of optax L-BFGS with its zoom line search and of lbfgs_fixed, N = 1, 4."""
  import numpy as np
  import optax
  size = FLAGS.batch_px
  print(f'\n== L-BFGS at {size} px: seconds per step in a compiled chunk of {FLAGS.chunk} '
        '(lbfgs: zoom line search; lbfgs_fixed: one evaluation per step) ==')
  print(f'{"optimizer":>12} {"N":>3} {"step s":>8} {"per image s":>12} '
        f'{"line-search evals, last step":>29}')
  for optimizer in ('lbfgs', 'lbfgs_fixed'):
    for n in (1, 4):
      prepared, targets, state = _setup(size, batch=n, optimizer=optimizer)
      seconds, _, state = _step_seconds(prepared, targets, state)
      evaluations = optax.tree.get(state['opt_state'], 'num_linesearch_steps', None)
      shown = '-' if evaluations is None else ' '.join(
          str(int(v)) for v in np.asarray(evaluations).ravel())
      print(f'{optimizer:>12} {n:>3} {seconds:>8.3f} {seconds / n:>12.3f} {shown:>29}',
            flush=True)


def largest_table() -> None:
  import jax
  import jax.numpy as jnp
  from nst_jax import loop
  from nst_jax import optim
  from nst_jax import problem
  budget = FLAGS.memory_gib * 2**30
  print(f'\n== largest square image whose L-BFGS chunk XLA plans within {FLAGS.memory_gib} GiB ==')
  # The L-BFGS history (2 x memory_size images) dominates large images: the image gradient needs
  # no stored conv inputs (weights are constants), so activations are small.
  for name, overrides in (('plain', {}), ('remat', {'remat': True}),
                          ('bfloat16', {'compute_dtype': 'bfloat16'}),
                          ('history 10', {'memory_size': 10}),
                          ('hist10+remat+bf16', {'memory_size': 10, 'remat': True,
                                                 'compute_dtype': 'bfloat16'})):
    prepared, _, _ = _setup(64, **overrides)

    # Targets are computed once at 64 px; for the plan only their shapes matter, and only the
    # content features' shapes depend on the image size.
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          prepared.scale_targets(64, 64))

    def planned(size):
      for targets in shapes['content_targets'].values():
        for layer, (h, w) in problem.layer_shapes(size, size, list(targets)).items():
          targets[layer] = jax.ShapeDtypeStruct(
              (targets[layer].shape[0], h, w, targets[layer].shape[-1]), targets[layer].dtype)
      state = jax.eval_shape(lambda: jax.vmap(
          lambda x: optim.init_state(prepared.program.optimizer.make(), x))(
              jnp.zeros((1, size, size, 3))))
      compiled = loop.optimize_chunk.lower(state, jnp.int32(1), prepared.net, shapes,
                                           program=prepared.program).compile()
      return _planned_bytes(compiled)[0]

    low, high = 256, 256
    while planned(high) <= budget and high < 16384:
      low, high = high, high * 2
    while high - low > 64:
      middle = (low + high) // 2 // 32 * 32
      if planned(middle) <= budget:
        low = middle
      else:
        high = middle
    print(f'{name:>10}: {low} x {low} px ({_gib(planned(low))} planned)', flush=True)


class _Enough(Exception):
  """Ends the single-scale run once it has run as long as the longest other setting."""


def _e2e_settings(with_torch: bool) -> list[tuple[str, dict]]:
  """(label, config overrides) of the nst_jax settings; the single scale first."""
  px = FLAGS.e2e_px
  three = {'scales': 3, 'scale_factor': 2.0, 'coarse_steps': FLAGS.e2e_steps // 2}
  settings = [('single scale', {}),
              (f'3 scales ({px // 4}-{px} px), balanced', dict(three, scale_balance=True)),
              (f'3 scales ({px // 4}-{px} px), unbalanced', dict(three, scale_balance=False))]
  if with_torch:
    settings.append(('3 scales, balanced, history 30', dict(three, memory_size=30)))
  return settings


def _e2e_config(content: str, style: str, overrides: dict):
  config = pastiche_config()
  config.content_image, config.style_images = content, style
  config.size, config.square = FLAGS.e2e_px, True
  config.steps = FLAGS.e2e_steps
  config.chunk_size = 10
  config.checkpoint_every = 0
  config.progress = 'none'
  config.compilation_cache = ''
  for key, value in overrides.items():
    config[key] = value
  return config


def _e2e_run(config, workdir: str, *, until_seconds: float | None = None) -> dict:
  """One nst_jax run, timed from after file reading (pastiche's setup is excluded too).

  Args:
    config: from :func:`_e2e_config`.
    workdir: for the loss log.
    until_seconds: keep going past ``config.steps`` until this wall time (the single scale).

  Returns:
    ``chunks``: (seconds, step, image) after every chunk of the final scale (compilation
    included); ``records``: the loss log; ``seconds``/``image``: at step --e2e_steps.
  """
  import jax
  from nst_jax import loop
  from nst_jax import outputs
  from nst_jax import pipeline
  from nst_jax import plan as plan_lib
  jax.clear_caches()  # every setting compiles its own programs, as a fresh process would
  steps = config.steps
  if until_seconds is not None:
    config.steps = 100 * steps  # stopped by _Enough long before
  prepared = pipeline.prepare(plan_lib.from_config(config))
  task = prepared.whole_task()
  os.makedirs(workdir, exist_ok=True)
  final, chunks = len(task.sizes) - 1, []
  start = time.perf_counter()

  def on_chunk(scale, step, optimized):
    seconds = time.perf_counter() - start
    if scale == final:
      chunks.append((seconds, step, outputs.finished(
          optimized, contents=prepared.batch.contents,
          preserve_color=prepared.plan.images.preserve_color)[0]))
      if until_seconds is not None and step >= steps and seconds >= until_seconds:
        raise _Enough

  try:
    loop.optimize(task, pipeline.saving(prepared.plan, workdir), on_chunk=on_chunk)
  except _Enough:
    pass
  with open(os.path.join(workdir, pipeline.LOSS_LOG)) as f:
    records = [json.loads(line) for line in f]
  seconds, _, image = next(chunk for chunk in chunks if chunk[1] >= steps)
  return {'chunks': chunks, 'records': records, 'seconds': seconds, 'image': image,
          'final_scale': final}


def _reached(run: dict, target: float, reference_seconds: float) -> str:
  """When ``run`` first reached pastiche's final loss (at the end of that step's chunk)."""
  import numpy as np
  losses = [(r['step'], r['loss'][0]) for r in run['records']
            if r['scale'] == run['final_scale'] and r['loss'][0] is not None]
  step = next((step for step, loss in losses if loss <= target), None)
  if step is None:
    return f'no (best {np.nanmin([loss for _, loss in losses]):.4g})'
  seconds = next(s for s, chunk_step, _ in run['chunks'] if chunk_step >= step)
  return f'step {step}, {seconds:.1f} s = {seconds / reference_seconds:.2f}x'


def _at_time(single: dict, seconds: float):
  """The single-scale run's last chunk finished within ``seconds``: (step, image), or None."""
  within = [(step, image) for s, step, image in single['chunks'] if s <= seconds]
  return within[-1] if within else None


def _e2e_pastiche(content: str, style: str, directory: str) -> dict:
  from nst_jax import images
  output = os.path.join(directory, 'pastiche.png')
  reference = _torch('e2e', '--content', content, '--style', style, '--steps',
                     str(FLAGS.e2e_steps), '--output', output)
  return {'seconds': reference['times'][-1], 'setup': reference['setup_seconds'],
          'target': reference['losses'][-1], 'image': images.load(output),
          'torch': reference['torch'], 'threads': reference['threads']}


def e2e_table(directory: str) -> None:
  """End to end: wall time and final-image distances of every setting (see the docstring)."""
  from nst_jax import images
  from nst_jax import metrics
  content, style = _write_pair(directory, FLAGS.e2e_px)
  pixels = {'content': images.load(content), 'style': images.load(style)}

  def measure(image):
    return metrics.distances(images.to_uint8(image), **pixels)

  rows = []  # (label, steps, seconds, image, reached)
  pastiche = None
  if FLAGS.torch_python:
    pastiche = _e2e_pastiche(content, style, directory)
    rows.append((f'pastiche (PyTorch {pastiche["torch"]})', str(FLAGS.e2e_steps),
                 pastiche['seconds'], pastiche['image'], '-'))
  settings = _e2e_settings(with_torch=pastiche is not None)
  runs = {}
  for label, overrides in settings[1:]:
    runs[label] = _e2e_run(_e2e_config(content, style, overrides),
                           os.path.join(directory, f'run{len(runs)}'))
  longest = max([run['seconds'] for run in runs.values()]
                + [pastiche['seconds'] if pastiche else 0.0])
  single = _e2e_run(_e2e_config(content, style, {}), os.path.join(directory, 'single'),
                    until_seconds=longest)
  half = FLAGS.e2e_steps // 2
  for label, _ in settings:
    run = single if label == 'single scale' else runs[label]
    steps = str(FLAGS.e2e_steps) if run is single else f'{half}+{half}+{FLAGS.e2e_steps}'
    reached = _reached(run, pastiche['target'], pastiche['seconds']) if pastiche else '-'
    rows.append((label, steps, run['seconds'], run['image'], reached))
  _print_e2e(rows, single, measure, pastiche)


def _print_e2e(rows, single: dict, measure, pastiche: dict | None) -> None:
  """The table: each row's distances beside the single-scale run's after equal wall time."""
  title = (f'pastiche ({pastiche["threads"]} torch threads) reaches loss '
           f'{pastiche["target"]:.6g} in {FLAGS.e2e_steps} steps, its setup '
           f'({pastiche["setup"]:.1f} s) excluded' if pastiche else 'nst_jax only')
  print(f'\n== end to end at {FLAGS.e2e_px} px, pastiche loss, chunks of 10 steps; seconds '
        f'include compilation; {title} ==')
  print(f'{"setting":>34} {"steps":>12} {"seconds":>8} {"style":>10} {"content":>10} '
        + (f'{"reaches pastiche loss":>28} ' if pastiche else '')
        + f'| {"single scale at equal time: step":>33} {"style":>10} {"content":>10} '
        f'{"no worse on both":>17}')
  for label, steps, seconds, image, reached in rows:
    ours = measure(image)
    line = (f'{label:>34} {steps:>12} {seconds:>8.1f} {ours["style"]:>10.4g} '
            f'{ours["content"]:>10.4g} ' + (f'{reached:>28} ' if pastiche else '') + '| ')
    equal = None if label == 'single scale' else _at_time(single, seconds)
    if equal is None:
      line += f'{"-":>33}'
    else:
      theirs = measure(equal[1])
      better = ours['style'] <= theirs['style'] and ours['content'] <= theirs['content']
      line += (f'{equal[0]:>33} {theirs["style"]:>10.4g} {theirs["content"]:>10.4g} '
               f'{"yes" if better else "no":>17}')
    print(line, flush=True)


def lbfgs_torch_table(steps: int = 20) -> None:
  """lbfgs_fixed against torch.optim.LBFGS(max_iter=1) itself: the largest difference of iterates.

  Both take ``steps`` steps from the same point on the same small non-convex problems
  (torch_reference.py defines them in torch), one loss evaluation per step as pastiche drives
  torch, with history 100 (pastiche's) and 5 (pairs dropped), in float64, where only rounding
  should separate them, and in float32, pastiche's dtype, where rounding grows along the
  trajectory: the last column, torch float32 against torch float64, is that rounding's size.
  Runs only with --torch_python; asked for by name without it, it is an error.
  """
  if not FLAGS.torch_python:
    if FLAGS['sections'].present:
      raise errors.UserError('--sections=lbfgs_torch needs --torch_python=PYTHON with torch')
    return
  import functools
  import jax
  import jax.numpy as jnp
  import numpy as np
  from nst_jax import optim

  a = np.random.default_rng(0).normal(size=(20, 12))
  starts = {'rosenbrock': np.zeros(12), 'least_squares': np.full(12, -0.5)}

  def loss(problem, x):  # torch_reference._lbfgs_loss, in JAX
    if problem == 'rosenbrock':
      return (10.0 * jnp.sum((x[1:] - x[:-1] ** 2) ** 2) + jnp.sum((1.0 - x) ** 2)
              + 0.01 * jnp.sum(x ** 2))
    ax = jnp.asarray(a, x.dtype) @ x
    return 0.5 * jnp.sum((jnp.sin(ax) + 0.1 * ax ** 2 - 0.5) ** 2)

  runs = [{'problem': problem, 'start': start.tolist(), 'steps': steps, 'lr': 1.0,
           'history_size': history, 'dtype': dtype}
          for problem, start in starts.items() for history in (100, 5)
          for dtype in ('float64', 'float32')]
  with tempfile.TemporaryDirectory() as directory:
    spec = os.path.join(directory, 'lbfgs.json')
    with open(spec, 'w') as f:
      json.dump({'a': a.tolist(), 'runs': runs}, f)
    reference = _torch('lbfgs', '--spec', spec)
  print(f'\n== lbfgs_fixed against PyTorch {reference["torch"]} LBFGS(max_iter=1, lr=1), '
        f'{steps} steps, 12 unknowns ==')
  print(f'{"problem":>14} {"history":>8} {"dtype":>8} {"max |x_jax - x_torch|":>22} '
        f'{"at step":>8} {"max |x|":>8} {"torch pairs kept":>17} {"torch f32 vs f64":>17}')
  float64 = {}
  for run, theirs in zip(runs, reference['runs']):
    with jax.enable_x64(run['dtype'] == 'float64'):
      optimizer = optim.make('lbfgs_fixed', learning_rate=run['lr'],
                             memory_size=run['history_size'])
      step = jax.jit(functools.partial(
          optim.step, loss_fn=functools.partial(loss, run['problem']), optimizer=optimizer,
          linesearch=False))
      state = optim.init_state(optimizer, jnp.asarray(run['start'], run['dtype']))
      ours = []
      for _ in range(steps):
        state, _ = step(state)
        ours.append(np.asarray(state['image'], np.float64))
    iterates = np.array(theirs['iterates'])
    difference = np.abs(np.array(ours) - iterates).max(axis=1)
    key = (run['problem'], run['history_size'])
    if run['dtype'] == 'float64':  # listed before float32
      float64[key], rounding = iterates, '-'
    else:
      rounding = f'{np.abs(iterates - float64[key]).max():.2e}'
    print(f'{run["problem"]:>14} {run["history_size"]:>8} {run["dtype"]:>8} '
          f'{difference.max():>22.2e} {int(difference.argmax()) + 1:>8} '
          f'{np.abs(iterates).max():>8.3g} {theirs["pairs"][-1]:>17} {rounding:>17}', flush=True)


def _check_flags() -> None:
  for name in ('sizes', 'batches'):
    values = getattr(FLAGS, name)
    if not all(v.strip().isdigit() and int(v) > 0 for v in values):
      raise errors.UserError(f'--{name}={",".join(values)} must be positive integers, e.g. '
                             '128,256,512')
  for name in ('batch_px', 'variant_px'):
    if getattr(FLAGS, name) < 32:
      raise errors.UserError(f'--{name}={getattr(FLAGS, name)} must be at least 32 (VGG pools '
                             'five times)')
  if FLAGS.e2e and FLAGS.e2e_px < 128:
    raise errors.UserError(f'--e2e_px={FLAGS.e2e_px} must be at least 128 (its 3-scale settings '
                           'start at a quarter of it, and VGG needs 32 px)')
  if FLAGS.e2e and FLAGS.e2e_steps < 2:
    raise errors.UserError(f'--e2e_steps={FLAGS.e2e_steps} must be at least 2 (coarser scales '
                           'run half as many)')
  unknown = set(FLAGS.sections) - set(SECTIONS)
  if unknown:
    raise errors.UserError(f'unknown --sections {sorted(unknown)}; choose from '
                           f'{", ".join(SECTIONS)}')


@errors.report_user_errors
def main(argv) -> None:
  if len(argv) > 1:
    raise errors.UserError(f'unexpected arguments {argv[1:]}; see --help')
  _check_flags()
  logging.getLogger('jax._src.xla_bridge').setLevel(logging.WARNING)  # "no TPU" at INFO
  import jax
  print(f'jax {jax.__version__} on {jax.device_count()} x {jax.devices()[0].device_kind}; '
        f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
  tables = {'lbfgs_torch': lbfgs_torch_table, 'step': step_table, 'variants': variants_table,
            'batch': batch_table, 'lbfgs': lbfgs_table, 'largest': largest_table}
  with tempfile.TemporaryDirectory() as directory:
    for name, table in tables.items():
      if name in FLAGS.sections:
        table(**({'directory': directory} if name == 'step' else {}))
    print(f'\nprocess peak resident memory: {_peak_rss_gib():.2f} GiB')
    if FLAGS.e2e:
      e2e_table(directory)


def run() -> None:
  """Entry point: ``python -m nst_jax.benchmark``."""
  # Before anything initialises JAX's backends: XLA reads XLA_FLAGS once, then.
  from nst_jax import xla_flags
  xla_flags.prefer_memory_optimized_cpu_scheduler()
  # configs/pastiche.py imports `configs.default`: the repository root must be importable.
  if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
  _define_flags()
  app.run(main)


if __name__ == '__main__':
  run()
