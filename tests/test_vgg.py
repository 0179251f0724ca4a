"""VGG features against an independent NumPy reference, and the custom gradients against autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nst_jax import errors
from nst_jax import vgg
from nst_jax import weights
from tests import helpers


def numpy_conv_same(x, kernel, bias):
  """Plain 3x3 SAME cross-correlation, (H, W, Cin) x (3, 3, Cin, Cout), in float64."""
  h, w, _ = x.shape
  padded = np.pad(x, ((1, 1), (1, 1), (0, 0)))
  out = np.zeros((h, w, kernel.shape[-1]))
  for dy in range(3):
    for dx in range(3):
      out += padded[dy:dy + h, dx:dx + w] @ kernel[dy, dx]
  return out + bias


def numpy_features(vgg_weights, image, *, network, pooling='max'):
  """Every layer's activation computed with NumPy loops, following the published recipe."""
  pre = vgg_weights.preprocessing
  x = np.asarray(image, np.float64)
  if pre.channel_order == 'BGR':
    x = x[..., ::-1]
  x = (x - np.asarray(pre.mean)) / np.asarray(pre.std)
  out = {}
  for name in vgg.layer_names(network):
    kind = name.split('_')[1]
    if kind.startswith('conv'):
      params = vgg_weights.params[name]
      x = numpy_conv_same(x, params['kernel'].astype(np.float64), params['bias'])
    elif kind.startswith('relu'):
      x = np.maximum(x, 0)
    else:
      h, w, c = x.shape
      blocks = x[:h // 2 * 2, :w // 2 * 2].reshape(h // 2, 2, w // 2, 2, c)
      x = blocks.max(axis=(1, 3)) if pooling == 'max' else blocks.mean(axis=(1, 3))
    out[name] = x
  return out


def relative_error(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - b) / (np.linalg.norm(b) + 1e-12))


@pytest.mark.parametrize('network,pooling', [('vgg19', 'max'), ('vgg16', 'avg')])
def test_features_match_numpy_reference_random_weights(network, pooling, rng):
  vgg_weights = helpers.random_weights(network=network, seed=1)
  image = rng.uniform(0, 255, (35, 42, 3)).astype(np.float32)  # odd sizes exercise pooling
  layers = [name for name in vgg.layer_names(network) if name.startswith(('block1', 'block2',
                                                                          'block3_conv1'))]
  got = vgg.features(vgg.prepare(vgg_weights), jnp.asarray(image), layers=layers,
                     network=network, pooling=pooling)
  reference = numpy_features(vgg_weights, image, network=network, pooling=pooling)
  assert set(got) == set(layers)
  for layer in layers:
    assert got[layer].shape == reference[layer].shape, layer
    assert relative_error(got[layer], reference[layer]) < 1e-4, layer


def test_features_match_numpy_reference_embedded_weights(rng):
  vgg_weights = weights.load()
  image = rng.uniform(0, 255, (32, 32, 3)).astype(np.float32)
  layers = ['block1_relu1', 'block2_relu1', 'block3_relu1', 'block4_relu2', 'block5_relu1']
  got = vgg.features(vgg.prepare(vgg_weights), jnp.asarray(image), layers=layers)
  reference = numpy_features(vgg_weights, image, network='vgg19')
  for layer in layers:
    # Relative L2, not per element: float32 ReLU and max-pool ties flip a few values.
    assert relative_error(got[layer], reference[layer]) < 1e-3, layer
    assert np.abs(reference[layer]).max() > 0, layer


def test_custom_conv_and_pool_gradients_match_autodiff(rng):
  vgg_weights = helpers.random_weights(network='vgg19', seed=2)
  net = vgg.prepare(vgg_weights)
  image = jnp.asarray(rng.uniform(0, 255, (24, 24, 3)), jnp.float32)
  layers = ['block1_relu2', 'block2_relu2', 'block3_relu1']
  probe = {layer: jnp.asarray(rng.standard_normal(shape.shape), jnp.float32)
           for layer, shape in vgg.features(net, image, layers=layers).items()}

  def ours(x):
    feats = vgg.features(net, x, layers=layers)
    return sum(jnp.sum(feats[k] * probe[k]) for k in layers)

  def plain(x):
    # Autodiff through lax.conv and reduce_window, no custom rules.
    x = vgg.preprocess(x, net)[None]
    total = 0.0
    for name in vgg.layer_names('vgg19')[:vgg.layer_names('vgg19').index('block3_relu1') + 1]:
      kind = name.split('_')[1]
      if kind.startswith('conv'):
        x = jax.lax.conv_general_dilated(x, net['layers'][name]['kernel'], (1, 1), 'SAME',
                                         dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
        x = x + net['layers'][name]['bias']
      elif kind.startswith('relu'):
        x = jax.nn.relu(x)
      else:
        x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), 'VALID')
      if name in probe:
        total = total + jnp.sum(x[0] * probe[name])
    return total

  np.testing.assert_allclose(ours(image), plain(image), rtol=1e-5)
  g_ours, g_plain = jax.grad(ours)(image), jax.grad(plain)(image)
  assert relative_error(g_ours, np.asarray(g_plain)) < 1e-4


def test_only_layers_up_to_the_deepest_requested_are_computed():
  net = vgg.prepare(helpers.random_weights(network='vgg19'))
  image = jnp.zeros((32, 32, 3))

  def count_convs(layers):
    jaxpr = jax.make_jaxpr(lambda x: vgg.features(net, x, layers=layers))(image)
    return str(jaxpr).count('conv_general_dilated')

  assert count_convs(['block1_relu1']) == 1
  assert count_convs(['block2_conv1', 'block1_relu2']) == 3
  assert count_convs(['block5_relu4']) == 16


def test_layer_names_and_errors():
  assert len([n for n in vgg.layer_names('vgg19') if '_conv' in n]) == 16
  assert len([n for n in vgg.layer_names('vgg16') if '_conv' in n]) == 13
  assert vgg.channels('block3_relu2') == 256
  assert vgg.downsampling('block3_relu2') == 4 and vgg.downsampling('block3_pool') == 8
  with pytest.raises(errors.UserError, match="unknown VGG16 layer 'block3_conv4'.*block1_conv1"):
    vgg.check_layers(['block3_conv4'], network='vgg16')


def test_rgb_weights_give_the_same_features_as_equivalent_bgr_weights(rng):
  """Channel order and normalisation stored with the weights are honoured."""
  bgr = helpers.random_weights(network='vgg16', seed=3)
  params = {k: dict(v) for k, v in bgr.params.items()}
  params['block1_conv1']['kernel'] = params['block1_conv1']['kernel'][:, :, ::-1] * 2.0
  rgb = weights.VggWeights('vgg16', params, weights.Preprocessing(
      'RGB', tuple(reversed(weights.CAFFE_MEAN_BGR)), (2.0, 2.0, 2.0)))
  image = jnp.asarray(rng.uniform(0, 255, (16, 16, 3)), jnp.float32)
  a = vgg.features(vgg.prepare(bgr), image, layers=['block2_relu1'], network='vgg16')
  b = vgg.features(vgg.prepare(rgb), image, layers=['block2_relu1'], network='vgg16')
  np.testing.assert_allclose(a['block2_relu1'], b['block2_relu1'], rtol=1e-4, atol=1e-3)
