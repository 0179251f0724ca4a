"""Optimisers: L-BFGS reaches scipy's minimum; chunks compile once; non-finite steps are refused."""

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
  state = optim.init_state(optimizer, jnp.zeros(12))
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
