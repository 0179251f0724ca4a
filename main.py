r"""Neural style transfer from the command line.

  python main.py                                   # the embedded example, into runs/default
  python main.py --workdir=runs/mine --config.content_image=photo.jpg \
      --config.style_images=painting.jpg --config.size=512
  python main.py --config=configs/tf_tutorial.py   # a preset (see configs/)
  python main.py --config=configs/fast_train.py --workdir=runs/fast   # train a fast network
  python main.py --config=configs/fast_apply.py --config.model=runs/fast/model.msgpack \
      --config.content_image=photo.jpg --workdir=runs/fast_out       # and apply it

Every setting is a field of the config file (configs/default.py lists and explains them all),
overridable as --config.FIELD=VALUE.
"""

import logging
import os
import re
import sys

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from nst_jax import errors
from nst_jax import loop
from nst_jax import pipeline
from nst_jax import plan as plan_lib
from nst_jax import processes
from nst_jax import xla_flags
from nst_jax.fast import apply as fast_apply
from nst_jax.fast import settings as fast_settings
from nst_jax.fast import train as fast_train

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configs',
                               'default.py')
# ml_collections applies --config.FIELD overrides while these flags are parsed: a mistyped field
# or an unloadable config file surfaces as KeyError/AttributeError/OSError, reported in one line.
_CONFIG_ERRORS = (KeyError, AttributeError, OSError, flags.Error)


def _config_error(exc: BaseException) -> None:
  text = str(exc.args[0] if exc.args else exc)
  missing = re.search(r'\[Errno \d+\] ([^\n]*)', text)
  if isinstance(exc, OSError) and missing:
    text = f'cannot load the --config file: {missing.group(1)}'
  else:
    # ml_collections' KeyError messages are reprs with escaped newlines: make them one line.
    text = text.replace('\\n', '; ').replace("\\'", "'")
    if len(text) > 1 and text[0] == text[-1] and text[0] in '\'"':
      text = text[1:-1]
  print(f'error: bad command line: {" ".join(text.split())} (see python main.py --help and '
        'configs/default.py for the fields)', file=sys.stderr)
  sys.exit(errors.EXIT_USER_ERROR)


try:
  _CONFIG = config_flags.DEFINE_config_file(
      'config', _DEFAULT_CONFIG, 'Config file; fields overridable as --config.FIELD=VALUE.',
      lock_config=True)
except _CONFIG_ERRORS as exc:
  _config_error(exc)
_WORKDIR = flags.DEFINE_string('workdir', 'runs/default', 'Folder for the result and logs.')


def _out_of_memory(plan: plan_lib.Plan, exc: BaseException) -> str:
  """One line for XLA's RESOURCE_EXHAUSTED: what ran out and the settings that need less."""
  n = plan.batch_size
  what = (f'a batch of {n} outputs' if n > 1 else 'an output') + f' of {plan.images.size} px'
  # CPU: 'Out of memory allocating 1125899906842624 bytes.'; GPU: '... to allocate 12.50GiB.'
  amount = re.search(r'allocat(?:e|ing) (\d+) bytes|allocate (\d[\d.]*\s*[KMGTPE]i?B)', str(exc))
  if amount:
    size = (f'{int(amount.group(1)) / 2**30:.1f} GiB' if amount.group(1) else amount.group(2))
    what += f' (XLA could not allocate {size})'
  lbfgs = 'lbfgs' in plan.optimizer.name
  levers = []
  if lbfgs:
    levers.append(f'a smaller --config.memory_size (now {plan.optimizer.memory_size}; L-BFGS '
                  'keeps 2 x memory_size images per output)')
  levers.append('a smaller --config.size')
  if n > 1:
    levers.append(f'fewer than {n} outputs per run (--config.batch_over={plan.batch.over})')
  if lbfgs:
    levers.append('--config.optimizer=adam (no history)')
  elif plan.network.compute_dtype != 'bfloat16':
    levers.append('--config.compute_dtype=bfloat16 (half the activation memory)')
  elif not plan.network.remat:
    levers.append('--config.remat=True')
  levers = ' or '.join(filter(None, [', '.join(levers[:-1]), levers[-1]]))
  return f'out of memory (XLA RESOURCE_EXHAUSTED) stylising {what}; use {levers}'


def _run_fast(mode: str, config) -> None:
  """configs/fast_train.py and configs/fast_apply.py (nst_jax.fast)."""
  if mode == 'fast_apply':
    fast_apply.run(fast_settings.apply_plan(config), _WORKDIR.value)
    return
  try:
    fast_train.run(fast_settings.train_plan(config), _WORKDIR.value)
  except fast_train.Stopped as stopped:
    sys.exit(128 + stopped.signal_number)


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except _CONFIG_ERRORS as exc:
    _config_error(exc)


@processes.leave_at_once_on_failure
@errors.report_user_errors
def main(argv):
  # JAX logs at INFO that it found no TPU, and how it joins other processes; users only need to
  # know which devices run (we say).
  for name in ('jax._src.xla_bridge', 'jax._src.distributed'):
    logging.getLogger(name).setLevel(logging.WARNING)
  if len(argv) > 1:
    raise errors.UserError(f'unexpected arguments {argv[1:]}; settings are --config.FIELD=VALUE')
  try:
    config = _CONFIG.value
    config.keys()  # a --config file that failed to load raises here
  except OSError as exc:
    _config_error(exc)
  mode = fast_settings.mode(config)
  if mode != 'optimize':
    _run_fast(mode, config)
    return
  plan = plan_lib.from_config(config)  # every field checked: one line for a bad one
  if plan.devices.distributed:
    pipeline.configure_jax(plan.outputs, plan.devices)  # joins the other processes
    processes.quiet_others()
  try:
    pipeline.run(plan, _WORKDIR.value)
  except loop.Stopped as stopped:
    sys.exit(128 + stopped.signal_number)
  except (jax.errors.JaxRuntimeError, ValueError) as exc:
    # A collective whose peer process is gone fails with the status text of gloo or the
    # coordinator (gloo's as a ValueError).
    if plan.devices.distributed and processes.LOST_PROCESS.search(str(exc)):
      raise errors.UserError(processes.lost_process(exc)) from None
    # XLA reports running out of (device or host) memory this way, not as MemoryError; any other
    # runtime error is a bug to show in full.
    if not isinstance(exc, jax.errors.JaxRuntimeError) or 'RESOURCE_EXHAUSTED' not in str(exc):
      raise
    raise errors.UserError(_out_of_memory(plan, exc)) from None


if __name__ == '__main__':
  # Before JAX initialises its backends (pipeline.run does): nothing above does, and the default
  # config file loaded while the flags were defined only builds a ConfigDict.
  xla_flags.prefer_memory_optimized_cpu_scheduler()
  app.run(main, flags_parser=_parse_flags)
