"""Exact tiled evaluation (nst_jax/tiling.py): tiles give the untiled loss and gradient.

The equality tests run the embedded VGG19 at 256 px with 64 px tiles (16 tiles; relu5_1 needs an
80 px halo, so each tile runs on a 224 px window), each term alone, and compare every weighted
part and its image gradient with the untiled objective's. Wasserstein's float32 gradient is
compared in float64 as well: its square roots of near-zero eigenvalues make the term's own float32
gradient differ from its float64 one by 1e-2 to 1e-1 per layer, tiles or not.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from nst_jax import errors
from nst_jax import losses
from nst_jax import plan
from nst_jax import problem
from nst_jax import tiling
from nst_jax.benchmark import measure
from tests import helpers

SIZE, TILE = 256, 64
DEEP = ('block1_relu1', 'block2_relu1', 'block3_relu1', 'block4_relu1', 'block5_relu1')
TOLERANCE = 1e-4


def _relative_error(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _untiled(program: problem.Program) -> problem.Program:
  return dataclasses.replace(program, network=dataclasses.replace(program.network, tile_size=0))


def _problem(config, *, float64: bool = False):
  """The prepared config's tiled program, net, one problem's targets and a start image."""
  prepared = helpers.prepare(config)
  height, width = prepared.plan.images.output_size(prepared.batch.contents[0].shape[:2])
  targets = jax.tree.map(lambda v: v[0], prepared.scale_targets(height, width))
  image, net, program = prepared.start_images(height, width)[0], prepared.net, prepared.program
  if float64:  # called inside jax.enable_x64
    widen = lambda tree: jax.tree.map(
        lambda v: jnp.asarray(v, jnp.float64) if np.issubdtype(np.asarray(v).dtype, np.floating)
        else v, tree)
    net, targets, image = widen(net), widen(targets), widen(image)
    program = dataclasses.replace(program, network=dataclasses.replace(
        program.network, compute_dtype='float64'))
  return program, net, targets, jnp.asarray(image)


def _parts_and_gradients(program, net, targets, image) -> dict[str, tuple[jax.Array, jax.Array]]:
  """Each weighted part and its own image gradient (one backward per part, one forward)."""
  names = [entry.name for entry in program.entries]

  def parts(x):
    values = problem.objective(x, net=net, targets=targets, program=program)[1]
    return jnp.stack([values[name] for name in names])

  values, jacobian = jax.jit(lambda x: (parts(x), jax.jacrev(parts)(x)))(image)
  return {name: (values[index], jacobian[index]) for index, name in enumerate(names)}


def _errors(program, net, targets, image) -> dict[str, tuple[float, float]]:
  """``{part: (loss error, gradient error)}`` of the tiled program against the untiled one."""
  tiled = _parts_and_gradients(program, net, targets, image)
  untiled = _parts_and_gradients(_untiled(program), net, targets, image)
  for name, (value, gradient) in untiled.items():
    assert float(value) > 0 and float(jnp.abs(gradient).max()) > 0, name  # a real comparison
  return {name: (_relative_error(tiled[name][0], untiled[name][0]),
                 _relative_error(tiled[name][1], untiled[name][1])) for name in tiled}


def _config(**overrides):
  """The default terms at SIZE px with TILE px tiles, away from the content (Gaussian start)."""
  return helpers.tiny_config(size=SIZE, tile_size=TILE, init='gaussian', **overrides)


CASES = {
    'gram': {'losses.style.layers': DEEP, 'content_weight': 0.0},
    'mean_std': {'losses.style.term': 'mean_std', 'losses.style.options': {},
                 'losses.style.layers': DEEP, 'content_weight': 0.0},
    'content': {'losses.content.layers': ('block4_relu2',), 'style_weight': 0.0},
    'tv': {'tv_weight': 1.0, 'content_weight': 0.0, 'style_weight': 0.0},
}


@pytest.mark.parametrize('case', list(CASES))
def test_tiles_give_the_untiled_loss_and_gradient(case):
  found = _errors(*_problem(_config(**CASES[case])))
  assert len(found) == 1
  for name, (loss_error, gradient_error) in found.items():
    assert loss_error < TOLERANCE and gradient_error < TOLERANCE, (name, found)


def _masks(tmp_path, *, height: int, width: int, styles: int) -> str:
  """``styles`` masks of a content of height x width: vertical bands, left to right."""
  paths = []
  for index in range(styles):
    band = np.zeros((height, width, 3))
    band[:, index * width // styles:(index + 1) * width // styles] = 255
    paths.append(helpers.write_image(tmp_path / f'mask{index}.png', band))
  return ','.join(paths)


def test_masked_terms_and_an_image_not_a_multiple_of_the_tile(tmp_path):
  # 256 x 200: the last row of tiles overhangs the image by 56 px, and relu4_1's 25 rows end
  # inside a tile; two styles, each confined to half of the picture.
  content = helpers.write_image(tmp_path / 'content.png', helpers.example('content')[:300])
  styles = f'{plan.example_path(plan.DEFAULT_STYLE)},{plan.example_path(plan.DEFAULT_CONTENT)}'
  config = _config(content_image=content, style_images=styles, tv_weight=1.0,
                   style_masks=_masks(tmp_path, height=300, width=384, styles=2),
                   **{'losses.style.layers': ('block1_relu1', 'block3_relu1', 'block4_relu1'),
                      'losses.content.layers': ('block4_relu2',), 'losses.tv.term': 'tv_l1'})
  config.losses.mean_std = ml_collections.ConfigDict(dict(config.losses.style.to_dict(),
                                                          term='mean_std', options={}))
  program, net, targets, image = _problem(config)
  assert image.shape == (200, 256, 3) and 'style_masks' in targets
  found = _errors(program, net, targets, image)
  assert sorted(found) == ['content', 'mean_std', 'style', 'tv']
  for name, (loss_error, gradient_error) in found.items():
    assert loss_error < TOLERANCE and gradient_error < TOLERANCE, (name, found)


@pytest.mark.parametrize('masked', [False, True])
def test_wasserstein_tiles_exactly(tmp_path, masked):
  # In float32 the term's own gradient is noisy (see the module docstring): there, tiles keep
  # the loss to 1e-4 and the gradient within that noise. In float64 (relu1_1-relu3_1, where its
  # 256 channels have more positions than channels) both agree to 1e-9.
  overrides = {'losses.style.term': 'wasserstein', 'losses.style.options': {},
               'losses.style.layers': DEEP, 'content_weight': 0.0}
  if masked:
    overrides['style_masks'] = _masks(tmp_path, height=384, width=384, styles=1)
  config = helpers.tiny_config(size=128, tile_size=TILE, init='gaussian', **overrides)
  loss_error, gradient_error = _errors(*_problem(config))['style']
  assert loss_error < TOLERANCE and gradient_error < 1e-2, (loss_error, gradient_error)
  config.losses.style.layers = DEEP[:3]
  with jax.enable_x64(True):
    loss_error, gradient_error = _errors(*_problem(config, float64=True))['style']
  assert loss_error < 1e-9 and gradient_error < 1e-9, (loss_error, gradient_error)
