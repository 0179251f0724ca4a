"""The command line of ``python -m nst_jax.benchmark``: flags, their checks, main and run.

``--help`` prints the package's docstring (``__main__`` carries it; absl shows the main
module's), which describes the sections.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile

from absl import app
from absl import flags

from nst_jax import errors
from nst_jax.benchmark import e2e
from nst_jax.benchmark import fast
from nst_jax.benchmark import large
from nst_jax.benchmark import measure
from nst_jax.benchmark import space
from nst_jax.benchmark import style_losses
from nst_jax.benchmark import tables
from nst_jax.benchmark import torch_side

FLAGS = flags.FLAGS
SECTIONS = ('step', 'variants', 'batch', 'lbfgs', 'largest', 'lbfgs_torch', 'space', 'large',
            'fast', 'none')
#: The repository root (configs/pastiche.py imports `configs.default` from it).
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _define_flags(module_name: str) -> None:
  """Defines the flags, registered as ``module_name``'s so that ``--help`` lists them."""
  # Defined only when run as a program, so importing this package defines no flags.
  key = {'module_name': module_name}
  flags.DEFINE_list('sizes', ['128', '256', '512'], 'Square image sizes for the step table.',
                    **key)
  flags.DEFINE_integer('repeats', 5, 'Timed repetitions per figure (the median is reported).',
                       **key)
  flags.DEFINE_integer('chunk', 5, 'Steps per compiled chunk when timing L-BFGS steps.', **key)
  flags.DEFINE_list('batches', ['1', '2', '4', '8'], 'Batch sizes N for the vmap table.', **key)
  flags.DEFINE_integer('batch_px', 128, 'Image size of the batch and lbfgs tables.', **key)
  flags.DEFINE_integer('variant_px', 256, 'Image size of the remat/bfloat16 table.', **key)
  flags.DEFINE_float('memory_gib', 24.0, 'Memory budget for the largest-size search.', **key)
  flags.DEFINE_string('torch_python', '', 'A Python with torch and pastiche==1.6.0, for the '
                      'side-by-side figures.', **key)
  flags.DEFINE_bool('e2e', False, 'Run the end-to-end comparison (with pastiche if '
                    '--torch_python is given).', **key)
  flags.DEFINE_integer('e2e_steps', 200, 'Steps at the final scale in the end-to-end comparison '
                       '(an eighth as many at each coarser scale).', **key)
  flags.DEFINE_integer('e2e_px', 256, 'Image size of the end-to-end comparison.', **key)
  flags.DEFINE_bool('style_losses', False, 'Run the "Which style loss?" comparison: every style '
                    'term on the embedded pairs, judged by nst_jax.metrics.', **key)
  flags.DEFINE_integer('style_px', 256, 'Image size of the style-loss comparison.', **key)
  flags.DEFINE_integer('style_steps', 200, 'Steps of each style-loss setting.', **key)
  flags.DEFINE_list('style_settings', [], 'Only the style-loss settings whose label contains one '
                    'of these (default: all).', **key)
  flags.DEFINE_string('style_dir', '', 'Where the style-loss comparison writes its images '
                      '(default: a temporary folder).', **key)
  flags.DEFINE_integer('space_px', 512, 'Image size of the space table (config.shard=space).',
                       **key)
  flags.DEFINE_integer('space_devices', 4, 'Devices the space table splits the rows over (host '
                       'devices forced on a CPU).', **key)
  flags.DEFINE_list('large_sizes', ['2048', '4096'], 'Square sizes of the large table.', **key)
  flags.DEFINE_list('large_tiles', ['0', '512'], 'Tile sizes of the large table (0: untiled).',
                    **key)
  flags.DEFINE_integer('large_history', 10, 'L-BFGS memory_size in the large table.', **key)
  flags.DEFINE_list('fast_sizes', ['128', '256'], 'Training crop sizes of the fast table.',
                    **key)
  flags.DEFINE_integer('fast_batch', 4, 'Photos per training step in the fast table.', **key)
  flags.DEFINE_string('fast_model', '', 'A trained fast model (model.msgpack): the fast table '
                      'then compares its result with the optimisation\'s.', **key)
  flags.DEFINE_list('fast_px', ['256'], 'Image sizes of the fast-vs-optimisation comparison '
                    '(the optimisation runs 300 L-BFGS steps at each).', **key)
  flags.DEFINE_string('fast_dir', '', 'Where the fast comparison writes its images (default: a '
                      'temporary folder).', **key)
  flags.DEFINE_float('peak_tflops', 0.0, 'Chip peak float32 TFLOP/s for utilisation (GPU).',
                     **key)
  flags.DEFINE_list('sections', ['step', 'variants', 'batch', 'lbfgs', 'largest', 'lbfgs_torch'],
                    f'Which tables to print: {", ".join(SECTIONS)}.', **key)


def _check_flags() -> None:
  for name in ('sizes', 'batches', 'large_sizes', 'fast_sizes', 'fast_px'):
    values = getattr(FLAGS, name)
    if not all(v.strip().isdigit() and int(v) > 0 for v in values):
      raise errors.UserError(f'--{name}={",".join(values)} must be positive integers, e.g. '
                             '128,256,512')
  for name in ('batch_px', 'variant_px'):
    if getattr(FLAGS, name) < 32:
      raise errors.UserError(f'--{name}={getattr(FLAGS, name)} must be at least 32 (VGG pools '
                             'five times)')
  if 'space' in FLAGS.sections and (FLAGS.space_devices < 2 or FLAGS.space_px < 32
                                     or FLAGS.space_px % FLAGS.space_devices):
    raise errors.UserError(f'--space_px={FLAGS.space_px} must be at least 32 and a multiple of '
                           f'--space_devices={FLAGS.space_devices} (at least 2): shard=space '
                           'splits the rows evenly')
  if FLAGS.e2e and FLAGS.e2e_px < 64:
    raise errors.UserError(f'--e2e_px={FLAGS.e2e_px} must be at least 64 (its 2-scale settings '
                           'start at half of it, and VGG needs 32 px)')
  if FLAGS.style_losses and (FLAGS.style_px < 32 or FLAGS.style_steps < 10):
    raise errors.UserError('--style_px must be at least 32 and --style_steps at least 10')
  if FLAGS.e2e and FLAGS.e2e_steps < 8:
    raise errors.UserError(f'--e2e_steps={FLAGS.e2e_steps} must be at least 8 (coarser scales '
                           'run an eighth as many)')
  if not all(v.strip().isdigit() for v in FLAGS.large_tiles):
    raise errors.UserError(f'--large_tiles={",".join(FLAGS.large_tiles)} must be tile sizes in px '
                           '(0: untiled), e.g. 0,512')
  if 'fast' in FLAGS.sections and not all(int(v) % 4 == 0 and int(v) >= 32
                                          for v in FLAGS.fast_sizes):
    raise errors.UserError(f'--fast_sizes={",".join(FLAGS.fast_sizes)} must be multiples of 4 of '
                           'at least 32 (the network halves twice; VGG pools five times)')
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
  sections = {'lbfgs_torch': torch_side.lbfgs_torch_table, 'step': tables.step_table,
              'variants': tables.variants_table, 'batch': tables.batch_table,
              'lbfgs': tables.lbfgs_table, 'largest': tables.largest_table,
              'space': space.space_table, 'large': large.large_table, 'fast': fast.fast_table}
  with tempfile.TemporaryDirectory() as directory:
    for name, table in sections.items():
      if name in FLAGS.sections:
        table(**({'directory': directory} if name in ('step', 'fast') else {}))
    print(f'\nprocess peak resident memory: {measure.peak_rss_gib():.2f} GiB')
    if FLAGS.e2e:
      e2e.e2e_table(directory)
    if FLAGS.style_losses:
      style_losses.style_losses_table(FLAGS.style_dir or os.path.join(directory, 'styles'))


def run() -> None:
  """Entry point: ``python -m nst_jax.benchmark``."""
  # Before anything initialises JAX's backends: XLA reads XLA_FLAGS once, then.
  from nst_jax import xla_flags
  xla_flags.prefer_memory_optimized_cpu_scheduler()
  # configs/pastiche.py imports `configs.default`: the repository root must be importable.
  if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
  # absl's --help lists the flags of the main module, which it names by sys.argv[0].
  _define_flags(module_name=sys.argv[0])
  app.run(main)
