"""The space section: one image's rows split across devices (config.shard=space) against one.

The device count is fixed when JAX starts, so each side runs in a subprocess of its own (this
module run as a program): one device, and --space_devices devices, forced on the CPU with
``--xla_force_host_platform_device_count`` added to the inherited XLA_FLAGS. Each reports XLA's
planned memory per device of pastiche's L-BFGS chunk at --space_px and its seconds per step.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags

from nst_jax.benchmark import measure

FLAGS = flags.FLAGS
#: What the host devices are forced to, appended to the XLA_FLAGS a subprocess inherits.
FORCE_DEVICES = '--xla_force_host_platform_device_count={count}'


def chunk_shapes(size: tuple[int, int], *, program, shard: str, batch: int = 1):
  """The batched optimiser state of ``size`` (H, W) images as shapes placed for ``shard``.

  'space': image-shaped leaves split by rows over all devices, the rest whole on each; anything
  else: everything on the first device (one device's program).
  """
  import jax
  import jax.numpy as jnp
  from jax.sharding import SingleDeviceSharding
  from nst_jax import devices
  from nst_jax import optim
  state = jax.eval_shape(lambda: jax.vmap(lambda x: optim.init_state(
      program.optimizer.make(), x))(jnp.zeros((batch, *size, 3))))
  sharding = lambda shape: (devices.space_sharding(shape, image_size=size) if shard == 'space'
                            else SingleDeviceSharding(jax.devices()[0]))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                     sharding=sharding(x.shape)), state)


def planned_chunk_bytes(prepared, targets, size: tuple[int, int], *, shard: str,
                        chunk: int) -> tuple[int, int]:
  """XLA's plan per device of the optimiser chunk (compiled, not run): (total, temporaries).

  Args:
    prepared: :func:`nst_jax.pipeline.prepare` output.
    targets: host targets at ``size`` (``prepared.scale_targets``), replicated for 'space'.
    size: (H, W) of the images.
    shard: 'space', or anything else for one device.
    chunk: steps in the chunk (the program's chunk_size is what is compiled; this is the
      number of active steps, a traced argument).
  """
  import jax
  import jax.numpy as jnp
  from nst_jax import devices
  from nst_jax import loop
  state = chunk_shapes(size, program=prepared.program, shard=shard)
  placed = (devices.shard_space(targets, image_size=size) if shard == 'space'
            else jax.device_put(targets, jax.devices()[0]))
  compiled = loop.optimize_chunk.lower(state, jnp.int32(chunk), prepared.net, placed,
                                       program=prepared.program, shard=shard).compile()
  return measure.planned_bytes(compiled)


def measure_here(px: int, *, chunk: int, repeats: int) -> dict:
  """In this process: pastiche's chunk at px x px with shard=space over every device.

  Returns the device count, XLA's planned bytes per device (total, temporaries) and the median
  seconds per step (compilation and a warm-up chunk excluded).
  """
  import jax
  import jax.numpy as jnp
  from nst_jax import devices
  from nst_jax import loop
  from nst_jax import pipeline
  from nst_jax import plan as plan_lib
  config = measure.pastiche_config()
  config.update(size=px, square=True, chunk_size=chunk, compilation_cache='', shard='space')
  prepared = pipeline.prepare(plan_lib.from_config(config))
  size = (px, px)
  targets = prepared.scale_targets(*size)
  planned, temp = planned_chunk_bytes(prepared, targets, size, shard='space', chunk=chunk)
  placed = devices.shard_space(targets, image_size=size)
  state = loop.initial_state(devices.shard_space(prepared.start_images(*size), image_size=size),
                             prepared.net, placed, program=prepared.program, shard='space')
  box = [state]

  def run_chunk():
    box[0], losses = loop.optimize_chunk(box[0], jnp.int32(chunk), prepared.net, placed,
                                         program=prepared.program, shard='space')
    jax.block_until_ready(losses)

  run_chunk()  # compile
  run_chunk()  # warm: first-touch page faults
  seconds = measure.median_seconds(run_chunk, repeats) / chunk
  return {'devices': jax.device_count(), 'planned_bytes': planned, 'temp_bytes': temp,
          'step_s': seconds}


def measure_in_subprocess(px: int, *, device_count: int, chunk: int, repeats: int) -> dict:
  """:func:`measure_here` in a fresh Python whose CPU has ``device_count`` host devices."""
  env = dict(os.environ)
  flags_now = env.get('XLA_FLAGS', '')
  if device_count > 1:
    env['XLA_FLAGS'] = f'{flags_now} {FORCE_DEVICES.format(count=device_count)}'.strip()
  return measure.module_in_subprocess(
      'nst_jax.benchmark.space', {'px': px, 'chunk': chunk, 'repeats': repeats}, env=env,
      what=f'{device_count}-device')


def space_table() -> None:
  px, count = FLAGS.space_px, FLAGS.space_devices
  print(f'\n== shard=space at {px} px: pastiche\'s L-BFGS chunk ({FLAGS.chunk} steps) on 1 '
        f'device and its rows split over {count}; planned = XLA\'s plan per device ==')
  print(f'{"devices":>8} {"planned mem":>12} {"planned temp":>13} {"vs 1 device":>12} '
        f'{"step s":>8}')
  single = None
  for device_count in (1, count):
    row = measure_in_subprocess(px, device_count=device_count, chunk=FLAGS.chunk,
                                repeats=max(1, FLAGS.repeats // 2))
    single = single or row['planned_bytes']
    print(f'{row["devices"]:>8} {measure.mib(row["planned_bytes"]):>12} '
          f'{measure.mib(row["temp_bytes"]):>13} {row["planned_bytes"] / single:>11.2f}x '
          f'{row["step_s"]:>8.3f}', flush=True)


if __name__ == '__main__':
  # The subprocess of measure_in_subprocess: one JSON line of figures.
  print(json.dumps(measure_here(**json.loads(sys.argv[1]))))
