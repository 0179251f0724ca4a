"""The problem at one scale: targets, the balance of terms across scales, the compiled objective."""

import jax
import jax.numpy as jnp
import numpy as np

from nst_jax import problem
from tests import helpers


def _targets_and_sizes(prepared, height, width):
  targets = prepared.scale_targets(height, width)
  return targets, problem.term_sizes(prepared.batch, prepared.plan.images, targets,
                                     net=prepared.net, program=prepared.program, height=height,
                                     width=width)


def test_coarse_scales_keep_the_final_balance_of_terms():
  prepared = helpers.prepare(helpers.tiny_config(size=64, scales=2, scale_factor=2.0))
  assert prepared.plan.schedule.sizes((64, 64)) == [(32, 32), (64, 64)]
  (coarse_targets, coarse), (_, final) = (_targets_and_sizes(prepared, 32, 32),
                                          _targets_and_sizes(prepared, 64, 64))
  assert coarse['style'][0] > 0 and coarse['content'][0] > 0
  # Unbalanced, the ratio of style to content differs between the scales ...
  ratio = lambda s: s['style'][0] / s['content'][0]
  assert abs(np.log(ratio(coarse) / ratio(final))) > 0.1
  # ... balanced, each weighted term has its final-scale size again.
  balanced = problem.balance_weights(coarse_targets, sizes=coarse, final_sizes=final)
  again = problem.term_sizes(prepared.batch, prepared.plan.images, balanced, net=prepared.net,
                             program=prepared.program, height=32, width=32)
  for name in final:
    np.testing.assert_allclose(again[name], final[name], rtol=1e-4)


def test_remat_and_bfloat16_change_the_program_not_the_loss():
  base = helpers.prepare(helpers.tiny_config(init='gaussian'))  # away from the content
  image = base.start_images(40, 40)
  plain = problem.loss_parts(image, base.net, base.scale_targets(40, 40), program=base.program)

  def gradient_program(prepared):
    targets = prepared.scale_targets(40, 40)
    loss = lambda x: problem.objective(x, net=prepared.net, targets=jax.tree.map(
        lambda v: v[0], targets), program=prepared.program)[0]
    jaxpr = str(jax.make_jaxpr(jax.grad(loss))(image[0]))
    hlo = jax.jit(jax.grad(loss)).lower(image[0]).as_text()
    return targets, jaxpr, hlo

  _, plain_jaxpr, plain_hlo = gradient_program(base)
  assert 'remat' not in plain_jaxpr and 'checkpoint' not in plain_jaxpr
  assert 'bf16' not in plain_hlo
  for overrides, tolerance in (({'remat': True}, 1e-5), ({'compute_dtype': 'bfloat16'}, 5e-2)):
    other = helpers.prepare(helpers.tiny_config(init='gaussian', **overrides))
    targets, jaxpr, hlo = gradient_program(other)
    if 'remat' in overrides:
      assert 'checkpoint' in jaxpr or 'remat' in jaxpr  # jax.checkpoint around each block
    else:
      assert 'bf16' in hlo and 'convolution' in hlo  # convolutions run in bfloat16
    got = problem.loss_parts(image, other.net, targets, program=other.program)
    for name in plain:  # bfloat16: within 5% of float32
      np.testing.assert_allclose(got[name], plain[name], rtol=tolerance, atol=1e-3)


def test_layer_shapes_follow_the_poolings():
  assert problem.layer_shapes(40, 70, ['block1_relu1', 'block3_relu1', 'block5_relu1']) == {
      'block1_relu1': (40, 70), 'block3_relu1': (10, 17), 'block5_relu1': (2, 4)}


def test_masks_are_resized_to_each_style_layer(tmp_path):
  left = np.zeros((40, 40, 3))
  left[:, :20] = 255
  mask = helpers.write_image(tmp_path / 'left.png', left)
  prepared = helpers.prepare(helpers.tiny_config(style_masks=mask))
  masks = prepared.scale_targets(40, 40)['style_masks'][0]
  assert masks['block2_relu1'].shape == (1, 20, 20)
  # Left half white, right half black, with a little resampling blur at the edge.
  np.testing.assert_allclose(masks['block2_relu1'][0, :, :8], 1.0, atol=0.01)
  np.testing.assert_allclose(masks['block2_relu1'][0, :, 12:], 0.0, atol=0.01)


def test_random_draws_follow_the_step_and_the_problem_seed():
  prepared = helpers.prepare(helpers.tiny_config(
      batch_over='seed', batch_values='0,1', **{'losses.style.term': 'sliced_wasserstein',
                                                'losses.style.options': {}}))
  assert prepared.program.stochastic
  targets = prepared.scale_targets(40, 40)
  assert targets['key'].shape == (2, 2)
  image = jnp.asarray(prepared.start_images(40, 40)[0])
  style_part = lambda problem_index, step: float(problem.objective(
      image, net=prepared.net, targets=jax.tree.map(lambda v: v[problem_index], targets),
      program=prepared.program, step=step)[1]['style'])
  assert style_part(0, 3) == style_part(0, 3)
  assert style_part(0, 3) != style_part(0, 4)  # projections redrawn at the next step
  assert style_part(0, 3) != style_part(1, 3)  # and differently for another seed
