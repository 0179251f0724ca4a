r"""Speed and memory figures of nst_jax, optionally side by side with the PyTorch peer (pastiche).

  python -m nst_jax.benchmark                       # steps at 128/256/512 px, remat/bf16, batches
  python -m nst_jax.benchmark --sizes=512,1024,2048 --batches=1,2,4,8 --batch_px=256   # a GPU
  python -m nst_jax.benchmark --torch_python=/path/to/venv/bin/python --e2e   # against pastiche

The loss is pastiche's (configs/pastiche.py), so both sides do the same work. Figures:

* step: compile seconds, then the median seconds per forward+backward (one loss-and-gradient
  evaluation, timed over a compiled scan of --chunk of them) and per fixed-step L-BFGS step inside
  a compiled chunk; XLA's planned memory
  (arguments + temporaries) of the L-BFGS chunk; with --torch_python, pastiche's seconds per
  forward+backward on the same pixels and the ratio.
* variants: remat and bfloat16 against the plain step: time and planned memory.
* batch: N problems vmapped in one program against N sequential runs (throughput ratio).
* largest: the largest square image whose L-BFGS chunk XLA plans within --memory_gib, per variant
  (compiled, not run).
* e2e (--e2e with --torch_python): pastiche's 200 L-BFGS steps at 256 px, then nst_jax on the same
  pixels; the wall time nst_jax needs to reach pastiche's final loss.
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
import time

from absl import app
from absl import flags

from nst_jax import errors

FLAGS = flags.FLAGS


def _define_flags() -> None:
  flags.DEFINE_list('sizes', ['128', '256', '512'], 'Square image sizes for the step table.')
  flags.DEFINE_integer('repeats', 5, 'Timed repetitions per figure (the median is reported).')
  flags.DEFINE_integer('chunk', 5, 'Steps per compiled chunk when timing L-BFGS steps.')
  flags.DEFINE_list('batches', ['1', '2', '4', '8'], 'Batch sizes N for the vmap table.')
  flags.DEFINE_integer('batch_px', 128, 'Image size of the batch table.')
  flags.DEFINE_integer('variant_px', 256, 'Image size of the remat/bfloat16 table.')
  flags.DEFINE_float('memory_gib', 24.0, 'Memory budget for the largest-size search.')
  flags.DEFINE_string('torch_python', '', 'A Python with torch and pastiche==1.6.0, for the '
                      'side-by-side figures.')
  flags.DEFINE_bool('e2e', False, 'Run the end-to-end comparison (needs --torch_python).')
  flags.DEFINE_integer('e2e_steps', 200, 'pastiche L-BFGS steps in the end-to-end comparison.')
  flags.DEFINE_float('peak_tflops', 0.0, 'Chip peak float32 TFLOP/s for utilisation (GPU).')
  flags.DEFINE_list('sections', ['step', 'variants', 'batch', 'largest', 'lbfgs_torch'],
                    'Which tables to print.')


def _median_seconds(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _setup(size: int, *, batch: int = 1, **overrides):
  """A pastiche-loss problem at size x size: (prepared, config, problems, state)."""
  import jax
  import jax.numpy as jnp
  from configs import pastiche as pastiche_config
  from nst_jax import optim
  from nst_jax import stylize

  config = pastiche_config.get_config()
  config.size = size
  config.square = True
  config.chunk_size = FLAGS.chunk
  config.compilation_cache = ''
  for key, value in overrides.items():
    config[key] = value
  if batch > 1:
    config.batch_over = 'seed'
    config.batch_values = ','.join(str(i) for i in range(batch))
  prepared = stylize.prepare(config)
  problems = jax.device_put(stylize.build_problems(prepared, config, size, size))
  start = stylize.initial_images(prepared, config, size, size)
  state = stylize.initial_state(jnp.asarray(start), prepared.net, problems, spec=prepared.spec)
  return prepared, config, problems, state


def _value_and_grad_fn(prepared, length: int):
  """``length`` loss-and-gradient evaluations in one compiled scan (no dispatch in the timing).

  Each evaluation moves the image by a negligible step so XLA cannot hoist it out of the loop.
  """
  import jax
  from nst_jax import stylize
  spec = prepared.spec

  @jax.jit
  def fn(images, problems):
    def one(image, problem):
      value_and_grad = jax.value_and_grad(
          lambda x: stylize.objective(x, net=prepared.net, problem=problem, spec=spec)[0])

      def body(image, _):
        value, grad = value_and_grad(image)
        return image - 1e-12 * grad, value

      return jax.lax.scan(body, image, None, length=length)
    return jax.vmap(one)(images, problems)

  return fn


def _planned_bytes(compiled) -> int:
  analysis = compiled.memory_analysis()
  if analysis is None:
    return -1
  return int(analysis.temp_size_in_bytes + analysis.argument_size_in_bytes
             + analysis.output_size_in_bytes - analysis.alias_size_in_bytes)


def measure_step(size: int, *, batch: int = 1, **overrides) -> dict:
  """Compile time, seconds per forward+backward and per L-BFGS step, planned memory."""
  import jax
  import jax.numpy as jnp
  from nst_jax import stylize

  prepared, config, problems, state = _setup(size, batch=batch, **overrides)
  grad_fn = _value_and_grad_fn(prepared, FLAGS.chunk)
  start = time.perf_counter()
  jax.block_until_ready(grad_fn(state['image'], problems))
  compile_seconds = time.perf_counter() - start
  jax.block_until_ready(grad_fn(state['image'], problems))  # warm: first-touch page faults
  forward_backward = _median_seconds(
      lambda: jax.block_until_ready(grad_fn(state['image'], problems)),
      FLAGS.repeats) / FLAGS.chunk
  active = jnp.int32(FLAGS.chunk)
  lowered = stylize.optimize_chunk.lower(state, active, prepared.net, problems,
                                         spec=prepared.spec)
  compiled = lowered.compile()
  planned = _planned_bytes(compiled)
  flops = None
  cost = _value_and_grad_fn(prepared, 1).lower(state['image'], problems).compile().cost_analysis()
  if cost:
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = cost.get('flops')

  def chunk():
    nonlocal state
    state, losses = stylize.optimize_chunk(state, active, prepared.net, problems,
                                           spec=prepared.spec)
    jax.block_until_ready(losses)

  chunk()  # compile
  chunk()  # warm
  per_step = _median_seconds(chunk, max(2, FLAGS.repeats // 2)) / FLAGS.chunk
  return {'size': size, 'batch': batch, 'compile_s': compile_seconds,
          'forward_backward_s': forward_backward, 'lbfgs_step_s': per_step,
          'planned_bytes': planned, 'flops': flops}


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
  from nst_jax import stylize
  paths = []
  for name, example in (('content', stylize.DEFAULT_CONTENT), ('style', stylize.DEFAULT_STYLE)):
    pixels = images.resize(images.load(stylize.example_path(example)), size, size)
    path = os.path.join(directory, f'{name}_{size}.png')
    images.save(pixels, path)
    paths.append(path)
  return paths[0], paths[1]


def _peak_rss_gib() -> float:
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def _gib(n: int) -> str:
  return 'n/a' if n < 0 else f'{n / 2**30:.2f} GiB'


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
          f'{reference if reference else float("nan"):>16.3f} {ratio:>10} {tflops:>8.2f}{utilisation}',
          flush=True)


def variants_table() -> None:
  size = FLAGS.variant_px
  print(f'\n== variants at {size} px ==')
  print(f'{"variant":>10} {"fwd+bwd s":>10} {"L-BFGS step s":>14} {"planned mem":>12}')
  for name, overrides in (('plain', {}), ('remat', {'remat': True}),
                          ('bfloat16', {'compute_dtype': 'bfloat16'}),
                          ('both', {'remat': True, 'compute_dtype': 'bfloat16'})):
    row = measure_step(size, **overrides)
    print(f'{name:>10} {row["forward_backward_s"]:>10.3f} {row["lbfgs_step_s"]:>14.3f} '
          f'{_gib(row["planned_bytes"]):>12}', flush=True)


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


def largest_table() -> None:
  import jax
  import jax.numpy as jnp
  from nst_jax import optim
  from nst_jax import stylize
  budget = FLAGS.memory_gib * 2**30
  print(f'\n== largest square image whose L-BFGS chunk XLA plans within {FLAGS.memory_gib} GiB ==')
  # The L-BFGS history (2 x memory_size images) dominates large images: the image gradient needs
  # no stored conv inputs (weights are constants), so activations are small.
  for name, overrides in (('plain', {}), ('remat', {'remat': True}),
                          ('bfloat16', {'compute_dtype': 'bfloat16'}),
                          ('history 10', {'memory_size': 10}),
                          ('hist10+remat+bf16', {'memory_size': 10, 'remat': True,
                                                 'compute_dtype': 'bfloat16'})):
    prepared, config, _, _ = _setup(64, **overrides)

    # Targets are computed once at 64 px; for the plan only their shapes matter, and only the
    # content features' shapes depend on the image size.
    problems = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                            stylize.build_problems(prepared, config, 64, 64))

    def planned(size):
      for targets in problems['content_targets'].values():
        for layer, (h, w) in stylize.layer_shapes(size, size, list(targets)).items():
          targets[layer] = jax.ShapeDtypeStruct(
              (targets[layer].shape[0], h, w, targets[layer].shape[-1]), targets[layer].dtype)
      state = jax.eval_shape(lambda: jax.vmap(
          lambda x: optim.init_state(prepared.spec.make_optimizer(), x))(
              jnp.zeros((1, size, size, 3))))
      compiled = stylize.optimize_chunk.lower(state, jnp.int32(1), prepared.net, problems,
                                              spec=prepared.spec).compile()
      return _planned_bytes(compiled)

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


def e2e_table(directory: str) -> None:
  import numpy as np
  from configs import pastiche as pastiche_config
  from nst_jax import stylize
  content, style = _write_pair(directory, 256)
  reference = _torch('e2e', '--content', content, '--style', style, '--steps',
                     str(FLAGS.e2e_steps), '--output', os.path.join(directory, 'torch.png'))
  target = reference['losses'][-1]
  print(f'\n== end to end, 256 px, pastiche loss: pastiche {FLAGS.e2e_steps} L-BFGS steps reach '
        f'{target:.6g} in {reference["times"][-1]:.1f} s (+{reference["setup_seconds"]:.1f} s '
        'setup) ==')
  for label, overrides in (('single scale', {}),
                           ('3 scales (64, 128, 256 px)', {'scales': 3, 'scale_factor': 2.0,
                                                           'coarse_steps': 100}),
                           ('3 scales, history 30', {'scales': 3, 'scale_factor': 2.0,
                                                     'coarse_steps': 100, 'memory_size': 30})):
    config = pastiche_config.get_config()
    config.content_image, config.style_images = content, style
    config.size, config.square = 256, True
    config.steps = FLAGS.e2e_steps
    config.chunk_size = 10
    config.checkpoint_every = 0
    config.progress = 'none'
    for key, value in overrides.items():
      config[key] = value
    workdir = os.path.join(directory, label.split()[0])
    prepared = stylize.prepare(config)  # file reading: pastiche's setup time is excluded too
    start = time.perf_counter()
    times = []
    outcome_steps = []

    def on_chunk(scale, step, raw, times=times, outcome_steps=outcome_steps):
      times.append(time.perf_counter() - start)
      outcome_steps.append((scale, step))

    outcome = stylize.optimize(prepared, config, workdir=workdir, on_chunk=on_chunk)
    final_scale = len(prepared.sizes) - 1
    reached = None
    chunk_index = -1
    for record in outcome.records:
      if record['scale'] == final_scale and record['loss'][0] is not None:
        if record['loss'][0] <= target:
          reached = record
          break
    if reached is not None:
      # Time at the end of the chunk containing that step (losses are known per chunk).
      chunk_index = next(i for i, (scale, step) in enumerate(outcome_steps)
                         if scale == final_scale and step >= reached['step'])
      seconds = times[chunk_index]
      print(f'{label:>24}: reached it at step {reached["step"]} after {seconds:.1f} s '
            f'(compile included) = {seconds / reference["times"][-1]:.2f}x pastiche\'s time')
    else:
      final = np.nanmin([r['loss'][0] for r in outcome.records if r['scale'] == final_scale
                         and r['loss'][0] is not None])
      print(f'{label:>24}: not reached in {config.steps} steps (best {final:.6g}) after '
            f'{times[-1]:.1f} s')


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
  if FLAGS.e2e and not FLAGS.torch_python:
    raise errors.UserError('--e2e needs --torch_python=PYTHON with torch and pastiche==1.6.0')
  unknown = set(FLAGS.sections) - {'step', 'variants', 'batch', 'largest', 'lbfgs_torch',
                                   'none'}
  if unknown:
    raise errors.UserError(f'unknown --sections {sorted(unknown)}; choose from step, variants, '
                           'batch, largest, lbfgs_torch, none')


@errors.report_user_errors
def main(argv) -> None:
  if len(argv) > 1:
    raise errors.UserError(f'unexpected arguments {argv[1:]}; see --help')
  _check_flags()
  logging.getLogger('jax._src.xla_bridge').setLevel(logging.WARNING)  # "no TPU" at INFO
  import jax
  print(f'jax {jax.__version__} on {jax.device_count()} x {jax.devices()[0].device_kind}; '
        f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
  with tempfile.TemporaryDirectory() as directory:
    if 'lbfgs_torch' in FLAGS.sections: lbfgs_torch_table()
    if 'step' in FLAGS.sections:
      step_table(directory)
    if 'variants' in FLAGS.sections:
      variants_table()
    if 'batch' in FLAGS.sections:
      batch_table()
    if 'largest' in FLAGS.sections:
      largest_table()
    print(f'\nprocess peak resident memory: {_peak_rss_gib():.2f} GiB')
    if FLAGS.e2e:
      e2e_table(directory)


def run() -> None:
  """Entry point: ``python -m nst_jax.benchmark``."""
  # The repository root holds `configs`; make it importable when run as a module from anywhere.
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if root not in sys.path:
    sys.path.insert(0, root)
  _define_flags()
  app.run(main)


if __name__ == '__main__':
  run()
