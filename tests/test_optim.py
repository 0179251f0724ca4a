"""Optimisers: L-BFGS reaches scipy's minimum; lbfgs_fixed is torch's L-BFGS(max_iter=1) step by
step; chunks compile once; non-finite steps are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from nst_jax import errors
from nst_jax import optim


def rosenbrock_like(x):
  return (10.0 * jnp.sum((x[1:] - x[:-1] ** 2) ** 2) + jnp.sum((1.0 - x) ** 2)
          + 0.01 * jnp.sum(x ** 2))


def run(name, steps, chunk, **kwargs):
  optimizer = optim.make(name, **kwargs)
  state = optim.init_state(optimizer, jnp.zeros(12), loss_fn=rosenbrock_like)
  fn = jax.jit(lambda s, a: optim.run_chunk(s, loss_fn=rosenbrock_like, optimizer=optimizer,
                                             linesearch=optim.uses_linesearch(name),
                                             length=chunk, active=a))
  done = 0
  while done < steps:
    state, _ = fn(state, min(chunk, steps - done))
    done += chunk
  return state, fn


@pytest.mark.parametrize('name,kwargs,tolerance', [
    ('lbfgs', {}, 1e-4), ('lbfgs_fixed', {}, 1e-4),
    ('adam', {'learning_rate': 0.02}, 1e-2)])  # first-order: close, not to L-BFGS precision
def test_reaches_scipy_lbfgs_minimum(name, kwargs, tolerance):
  reference = scipy.optimize.minimize(
      lambda x: float(rosenbrock_like(jnp.asarray(x, jnp.float32))), np.zeros(12),
      jac=lambda x: np.asarray(jax.grad(rosenbrock_like)(jnp.asarray(x, jnp.float32)), float),
      method='L-BFGS-B', options={'gtol': 1e-10, 'ftol': 1e-14})
  state, _ = run(name, 400 if name != 'adam' else 3000, 100, **kwargs)
  assert float(rosenbrock_like(state['image'])) == pytest.approx(reference.fun, rel=tolerance)
  np.testing.assert_allclose(state['image'], reference.x, atol=20 * tolerance)


def test_lbfgs_fixed_bfloat16_history_halves_its_memory_and_still_converges():
  state, _ = run('lbfgs_fixed', 400, 100, history_dtype='bfloat16')
  history = state['opt_state']
  leaves = [leaf for leaf in jax.tree.leaves(history) if leaf.ndim >= 2]
  # The (s, y) buffers: bfloat16 bits (uint16), two bytes a value.
  assert leaves and all(leaf.dtype == jnp.uint16 for leaf in leaves)
  full, _ = run('lbfgs_fixed', 400, 100)
  early = [run('lbfgs_fixed', 20, 100, **kwargs)[0]['image']
           for kwargs in ({}, {'history_dtype': 'bfloat16'})]
  assert not np.array_equal(*early)  # the rounding is really there on the way
  # Rounded pairs still give a consistent quasi-Newton model: the same minimum, looser.
  np.testing.assert_allclose(state['image'], full['image'], atol=2e-3)


@pytest.mark.parametrize('history_dtype', ['float32', 'bfloat16'])
def test_a_compiled_chunk_keeps_one_history_only(history_dtype):
  # XLA's plan of a batched, donated chunk: its temporaries must not hold a second history. Two
  # ways they did, both measured: a lax.cond per step (steps past `active`) copied the whole
  # state, and a bfloat16 history was widened to float32 all at once, out of the two-loop.
  memory_size, shape = 20, (1, 64, 64, 3)
  optimizer = optim.make('lbfgs_fixed', memory_size=memory_size, history_dtype=history_dtype)
  loss = lambda x: jnp.sum(jnp.sin(x) ** 2)
  chunk = jax.jit(lambda state, active: jax.vmap(lambda one: optim.run_chunk(
      one, loss_fn=loss, optimizer=optimizer, linesearch=False, length=5, active=active))(state),
                  donate_argnums=0)
  state = jax.eval_shape(lambda: jax.vmap(lambda x: optim.init_state(optimizer, x))(
      jnp.zeros(shape)))
  temporary = chunk.lower(state, jnp.int32(5)).compile().memory_analysis().temp_size_in_bytes
  history = 2 * memory_size * np.prod(shape) * (2 if history_dtype == 'bfloat16' else 4)
  assert temporary < 0.5 * history, (temporary, history)


class TorchLbfgsMaxIter1:
  """``torch.optim.LBFGS(lr, max_iter=1, history_size)``, no line search, transcribed to NumPy.

  A line-by-line transcription of ``LBFGS.step`` in torch/optim/lbfgs.py (torch 2.x), kept
  independent of nst_jax: the same state carried across ``step`` calls (``d``, ``t``,
  ``old_dirs``, ``old_stps``, ``ro``, ``H_diag``, ``prev_flat_grad``, ``n_iter``, ``func_evals``)
  and the same early returns. pastiche calls ``step`` once per iteration with a closure that
  evaluates the loss once: with ``max_iter=1`` the loop body runs once and the closure is not
  called again after the move.

  ``events`` counts what a test needs to know was exercised: rejected curvature pairs, pairs
  dropped from a full history, a capped first step, the early returns.

  Args:
    lr: torch's ``lr``.
    history_size: torch's ``history_size``.
    cap_every_empty_step: False is torch. True caps every step taken with an empty history
      (``min(1, 1/|g|₁) * lr``), not only the first: nst_jax's one documented difference.
  """

  def __init__(self, lr=1.0, history_size=100, cap_every_empty_step=False):
    self.lr = lr
    self.history_size = history_size
    self.cap_every_empty_step = cap_every_empty_step
    self.tolerance_grad = 1e-7  # torch's defaults
    self.tolerance_change = 1e-9
    self.state = {'func_evals': 0, 'n_iter': 0}
    self.events = dict(rejected=0, rejected_with_empty_history=0, dropped=0, first_step_capped=0,
                       stopped_small_grad=0, stopped_small_gtd=0)

  def step(self, x, closure):
    """One ``optimizer.step(closure)``.

    Args:
      x: the parameters, a flat float64 array.
      closure: x -> (loss, flat gradient), called once.

    Returns:
      The new parameters.
    """
    state = self.state
    loss, flat_grad = closure(x)
    state['func_evals'] += 1
    if np.abs(flat_grad).max() <= self.tolerance_grad:
      self.events['stopped_small_grad'] += 1
      return x  # torch returns before touching its state
    d, t = state.get('d'), state.get('t')
    old_dirs, old_stps, ro = state.get('old_dirs'), state.get('old_stps'), state.get('ro')
    h_diag, prev_flat_grad = state.get('H_diag'), state.get('prev_flat_grad')

    state['n_iter'] += 1  # max_iter=1: the `while n_iter < max_iter` loop runs once
    if state['n_iter'] == 1:
      d = -flat_grad
      old_dirs, old_stps, ro, h_diag = [], [], [], 1.0
    else:
      y = flat_grad - prev_flat_grad
      s = d * t
      ys = y @ s
      if ys > 1e-10:
        if len(old_dirs) == self.history_size:
          old_dirs.pop(0)
          old_stps.pop(0)
          ro.pop(0)
          self.events['dropped'] += 1
        old_dirs.append(y)
        old_stps.append(s)
        ro.append(1.0 / ys)
        h_diag = ys / (y @ y)
      else:
        self.events['rejected'] += 1
        if not old_dirs:
          self.events['rejected_with_empty_history'] += 1
      num_old = len(old_dirs)
      al = [None] * self.history_size
      q = -flat_grad
      for i in range(num_old - 1, -1, -1):
        al[i] = (old_stps[i] @ q) * ro[i]
        q = q - al[i] * old_dirs[i]
      r = q * h_diag
      for i in range(num_old):
        be_i = (old_dirs[i] @ r) * ro[i]
        r = r + (al[i] - be_i) * old_stps[i]
      d = r
    prev_flat_grad = flat_grad.copy()
    state['prev_loss'] = loss

    capped = state['n_iter'] == 1 or (self.cap_every_empty_step and not old_dirs)
    t = min(1.0, 1.0 / np.abs(flat_grad).sum()) * self.lr if capped else self.lr
    if state['n_iter'] == 1 and t < self.lr:
      self.events['first_step_capped'] += 1
    state.update(d=d, t=t, old_dirs=old_dirs, old_stps=old_stps, ro=ro, H_diag=h_diag,
                 prev_flat_grad=prev_flat_grad)
    gtd = flat_grad @ d
    if gtd > -self.tolerance_change:
      self.events['stopped_small_gtd'] += 1
      return x  # `break` before `_add_grad`: no move, but d and t are kept
    return x + t * d  # `_add_grad(t, d)`; n_iter == max_iter ends the loop


def least_squares(x):
  """A small non-convex nonlinear least squares (20 residuals, 12 unknowns)."""
  a = jnp.asarray(np.random.default_rng(0).normal(size=(20, x.shape[0])), x.dtype)
  ax = a @ x
  return 0.5 * jnp.sum((jnp.sin(ax) + 0.1 * ax ** 2 - 0.5) ** 2)


def lbfgs_fixed_and_torch_iterates(loss, start, steps, **reference_kwargs):
  """Runs optim's ``lbfgs_fixed`` and :class:`TorchLbfgsMaxIter1` side by side in float64.

  Ours goes through :func:`optim.make` and :func:`optim.step`, as a run does.

  Args:
    loss: x -> scalar, in JAX.
    start: the first iterate.
    steps: how many steps each takes.
    **reference_kwargs: for :class:`TorchLbfgsMaxIter1`; its ``lr`` and ``history_size`` are ours.

  Returns:
    (ours, torch, reference): (steps, n) iterates after each step, and the reference (its events).
  """
  with jax.enable_x64(True):
    reference = TorchLbfgsMaxIter1(**reference_kwargs)
    optimizer = optim.make('lbfgs_fixed', learning_rate=reference.lr,
                           memory_size=reference.history_size)
    state = optim.init_state(optimizer, jnp.asarray(start, jnp.float64))
    step = jax.jit(lambda s: optim.step(s, loss_fn=loss, optimizer=optimizer, linesearch=False))
    value_and_grad = jax.jit(jax.value_and_grad(loss))

    def closure(x):
      value, grad = value_and_grad(jnp.asarray(x))
      return float(value), np.asarray(grad)

    ours, torch = [], []
    x = np.asarray(start, np.float64)
    for _ in range(steps):
      state, _ = step(state)
      ours.append(np.asarray(state['image']))
      x = reference.step(x, closure)
      torch.append(x)
  assert np.asarray(state['image']).dtype == np.float64
  assert reference.state['func_evals'] == steps  # one closure call per step, as pastiche drives it
  return np.array(ours), np.array(torch), reference


# Float64 on both sides: the only differences are rounding (summation order in the dot products,
# x + t*d against storing x_{k+1} - x_k), and these non-convex trajectories amplify it to about
# 5e-9 in 30 steps; any change to the algorithm moves the iterates by orders of magnitude more.
@pytest.mark.parametrize('loss,start,history_size,lr,events', [
    # Rosenbrock from the origin: two pairs with yᵀs < 0 are rejected; |g₀|₁ = 24 caps step one.
    (rosenbrock_like, np.zeros(12), 100, 1.0, {'rejected': 2}),
    # The same with history 5: 22 pairs dropped from a full history.
    (rosenbrock_like, np.zeros(12), 5, 1.0, {'rejected': 2, 'dropped': 22}),
    # A second problem: 12 rejected pairs; and a learning rate other than 1.
    (least_squares, np.full(12, -0.5), 100, 1.0, {'rejected': 12}),
    (least_squares, np.full(12, -0.5), 5, 0.5, {'dropped': 24}),
])
def test_lbfgs_fixed_is_torch_lbfgs_max_iter_1_step_by_step(loss, start, history_size, lr,
                                                            events):
  ours, torch, reference = lbfgs_fixed_and_torch_iterates(loss, start, 30,
                                                          history_size=history_size, lr=lr)
  for name, count in events.items():
    assert reference.events[name] == count, reference.events
  # What this comparison exercises, and the paths where nst_jax knowingly differs, which it avoids.
  assert reference.events['first_step_capped'] == 1
  assert reference.events['rejected_with_empty_history'] == 0
  assert reference.events['stopped_small_grad'] == reference.events['stopped_small_gtd'] == 0
  assert np.abs(np.diff(torch, axis=0)).max(axis=1).min() > 1e-6  # it moved at every step
  for step, (mine, theirs) in enumerate(zip(ours, torch)):
    np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-7, err_msg=f'step {step + 1}')


# Problems whose first curvature pair is rejected, so the second step again has no history:
# torch takes it uncapped (t = lr); nst_jax caps it like the first, its one documented difference,
# and is otherwise torch's algorithm.
@pytest.mark.parametrize('loss', [
    # A double well started on its concave hump: yᵀs < 0 for the first five pairs.
    lambda x: jnp.sum((x ** 2 - 1.0) ** 2) + 0.1 * jnp.sum(x),
    # Almost linear: 0 < yᵀs ≈ 2e-14 ≤ 1e-10 every step (the threshold, not just the sign).
    lambda x: jnp.sum(x) + 1e-13 * jnp.sum(x ** 2),
], ids=['double_well', 'almost_linear'])
def test_lbfgs_fixed_caps_every_step_taken_with_an_empty_history(loss):
  start = np.linspace(0.05, 0.15, 12)
  ours, torch, reference = lbfgs_fixed_and_torch_iterates(loss, start, 30)
  assert reference.events['rejected_with_empty_history'] >= 1
  np.testing.assert_allclose(ours[0], torch[0], rtol=0, atol=1e-12)
  assert np.abs(ours[1] - torch[1]).max() > 0.1
  ours, capped, reference = lbfgs_fixed_and_torch_iterates(loss, start, 30,
                                                           cap_every_empty_step=True)
  assert reference.events['rejected_with_empty_history'] >= 1
  assert reference.events['stopped_small_grad'] == reference.events['stopped_small_gtd'] == 0
  for step, (mine, theirs) in enumerate(zip(ours, capped)):
    np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-7, err_msg=f'step {step + 1}')


def test_chunks_compile_once_and_partial_chunks_do_not_recompile():
  traces = []

  def loss(x):
    traces.append(1)  # runs only while tracing
    return rosenbrock_like(x)

  optimizer = optim.make('lbfgs_fixed')
  fn = jax.jit(lambda s, a: optim.run_chunk(s, loss_fn=loss, optimizer=optimizer,
                                             linesearch=False, length=10, active=a))
  state = optim.init_state(optimizer, jnp.zeros(12))
  state, losses = fn(state, 10)
  count = len(traces)
  for active in (10, 3, 7):
    state, losses = fn(state, active)
  assert len(traces) == count
  assert fn._cache_size() == 1
  assert int(state['step']) == 30
  assert np.isnan(np.asarray(losses)[7:]).all() and np.isfinite(np.asarray(losses)[:7]).all()


def test_non_finite_loss_keeps_the_last_finite_image():
  optimizer = optim.make('adam', learning_rate=0.7)
  # Adam walks x up by about 0.7 a step; past 3 the square root is NaN.
  loss = lambda x: jnp.sum(jnp.sqrt(3.0 - x))
  state = optim.init_state(optimizer, jnp.zeros(2))
  state, losses = optim.run_chunk(state, loss_fn=loss, optimizer=optimizer, linesearch=False,
                                  length=20, active=20)
  assert not bool(state['finite'])
  assert np.all(np.isfinite(np.asarray(state['image'])))
  assert np.all(np.asarray(state['image']) < 3.0)  # the last image whose loss was finite
  assert np.isfinite(float(loss(state['image'])))
  assert int(state['step']) < 20


def test_unknown_optimizer():
  with pytest.raises(errors.UserError, match="unknown optimizer 'sgd'; choose one of lbfgs"):
    optim.make('sgd')


@pytest.mark.parametrize('name', ['lbfgs', 'lbfgs_fixed'])
def test_a_stochastic_loss_is_one_function_per_step(name):
  """A loss that takes the step counter: every evaluation of a step (the line search's too) sees
  that step's counter, and the loss reported is that step's function at the step's image."""
  seen = []

  def loss(x, step):
    jax.debug.callback(lambda s: seen.append(int(s)), step)
    centre = 1.0 + 0.5 * jnp.sin(step.astype(jnp.float32))  # the function moves every step
    return jnp.sum((x - centre) ** 2) + 0.1 * jnp.sum(x ** 4)

  optimizer = optim.make(name)
  state = optim.init_state(optimizer, jnp.zeros(3), loss_fn=loss, stochastic=True)
  one_step = jax.jit(lambda s: optim.run_chunk(
      s, loss_fn=loss, optimizer=optimizer, linesearch=optim.uses_linesearch(name), length=1,
      active=1, stochastic=True))
  for expected_step in range(4):
    image = state['image']
    seen.clear()
    state, losses = one_step(state)
    assert set(seen) == {expected_step}, seen
    if name == 'lbfgs':
      assert len(seen) > 1  # the line search evaluated again, with the same counter
    np.testing.assert_allclose(losses[0], loss(image, jnp.int32(expected_step)), rtol=1e-6)
  assert int(state['step']) == 4
