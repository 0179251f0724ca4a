"""VGG19 and VGG16 feature extraction as pure functions.

Layer names follow pastiche/torchvision practice: ``blockB_convC`` is a convolution's output before
its ReLU, ``blockB_reluC`` after it, ``blockB_pool`` after the block's 2x2 pooling. (Keras names the
post-ReLU output ``blockB_convC``; the seed presets therefore ask for ``blockB_reluC``.)

Speed notes (measured on a 2-core CPU; see ``python -m nst_jax.benchmark``):

* The image gradient of a 3x3 SAME convolution is a convolution of the cotangent with the kernel
  flipped in space and transposed in channels. XLA's default gradient re-flips every kernel on every
  step; :func:`prepare` flips each kernel once and :func:`_conv` uses it in a custom VJP. The
  weights are constants, so no kernel gradient is ever formed.
* 2x2 pooling is a reshape followed by a max or mean, whose gradient is elementwise, instead of
  ``reduce_window`` whose gradient is a scatter.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nst_jax import errors
from nst_jax import weights as weights_lib

Params = Mapping[str, Mapping[str, jax.Array]]

POOLINGS = ('max', 'avg')


@functools.cache
def layer_names(network: str = 'vgg19') -> tuple[str, ...]:
  """Every layer name of ``network`` in forward order (conv, relu, ..., pool per block)."""
  names = []
  for layer, _, _ in weights_lib.CONV_SPECS[network]:
    block, conv = layer.split('_')
    if conv == 'conv1' and names:
      names.append(names[-1].split('_')[0] + '_pool')
    names += [layer, f'{block}_relu{conv[4:]}']
  names.append(names[-1].split('_')[0] + '_pool')
  return tuple(names)


def check_layers(layers: Iterable[str], *, network: str = 'vgg19') -> None:
  """Raises a UserError naming the valid layers if any of ``layers`` is not a layer of ``network``."""
  valid = layer_names(network)
  unknown = [layer for layer in layers if layer not in valid]
  if unknown:
    raise errors.UserError(
        f'unknown {network.upper()} layer {unknown[0]!r}; valid layers are ' + ', '.join(valid))


def channels(layer: str, *, network: str = 'vgg19') -> int:
  """Number of channels of ``layer``'s output."""
  check_layers([layer], network=network)
  block = layer.split('_')[0]
  return max(out for name, _, out in weights_lib.CONV_SPECS[network] if name.startswith(block + '_'))


def downsampling(layer: str) -> int:
  """Spatial stride of ``layer`` relative to the input (1, 2, 4, 8, 16 or 32)."""
  block = int(layer.split('_')[0][5:])
  return 2 ** (block if layer.endswith('_pool') else block - 1)


def prepare(vgg: weights_lib.VggWeights, *, dtype: jnp.dtype = jnp.float32) -> dict:
  """Turns loaded weights into the device arrays :func:`features` takes.

  Adds each kernel flipped in space and transposed in channels (the kernel of the input gradient),
  computed once here rather than on every step.

  Args:
    vgg: loaded weights.
    dtype: compute dtype of kernels (float32, bfloat16 to halve activation memory, or float64
      under x64 for reference runs).

  Returns:
    ``{"layers": {layer: {"kernel", "kernel_backward", "bias"}}, "mean_rgb", "std_rgb"}``: a
    pytree of arrays, ready to pass into jitted functions.
  """
  pre = vgg.preprocessing
  # Everything is expressed in RGB order so the image never needs reordering: for BGR weights the
  # first kernel's input channels and the mean/std are reversed once, here.
  rgb = slice(None, None, -1) if pre.channel_order == 'BGR' else slice(None)
  layers = {}
  for index, (layer, arrays) in enumerate(vgg.params.items()):
    kernel = np.asarray(arrays['kernel'], np.float32)
    if index == 0:
      kernel = kernel[:, :, rgb]
    layers[layer] = {
        'kernel': jnp.asarray(kernel, dtype),
        'kernel_backward': jnp.asarray(kernel[::-1, ::-1].transpose(0, 1, 3, 2), dtype),
        'bias': jnp.asarray(arrays['bias'], jnp.float32),
    }
  return {
      'layers': layers,
      'mean_rgb': jnp.asarray(np.asarray(pre.mean)[rgb], jnp.float32),
      'std_rgb': jnp.asarray(np.asarray(pre.std)[rgb], jnp.float32),
  }


def _accumulation_dtype(dtype) -> jnp.dtype:
  """float32 for float32 and bfloat16 activations; float64 (a reference run under x64) stays."""
  return jnp.promote_types(dtype, jnp.float32)


def _conv_forward(x, kernel):
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(1, 1), padding='SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      preferred_element_type=_accumulation_dtype(x.dtype)).astype(x.dtype)


@jax.custom_vjp
def _conv(x: jax.Array, kernel: jax.Array, kernel_backward: jax.Array) -> jax.Array:
  return _conv_forward(x, kernel)


def _conv_fwd(x, kernel, kernel_backward):
  return _conv_forward(x, kernel), kernel_backward


def _conv_bwd(kernel_backward, cotangent):
  # The weights are constants of the optimisation: only the input gradient is needed.
  return _conv_forward(cotangent, kernel_backward), None, None


_conv.defvjp(_conv_fwd, _conv_bwd)


def _pool(x: jax.Array, pooling: str) -> jax.Array:
  n, h, w, c = x.shape
  # 2x2/2 'valid' pooling, as Keras and torch do: an odd last row or column is dropped.
  x = x[:, :h - h % 2, :w - w % 2]
  x = x.reshape(n, h // 2, 2, w // 2, 2, c)
  return x.max(axis=(2, 4)) if pooling == 'max' else x.mean(axis=(2, 4))


def preprocess(image: jax.Array, net: Mapping) -> jax.Array:
  """Maps an RGB 0-255 image (..., 3) to the network's input (mean subtracted, scaled).

  The channel order needs no change: :func:`prepare` already put the first kernel in RGB order.
  """
  return (image - net['mean_rgb']) / net['std_rgb']


def _blocks(names: Sequence[str]) -> list[list[str]]:
  """The layers grouped by block (block1_conv1, ... block1_pool), so each block can be
  rematerialised as a unit."""
  blocks: dict[str, list[str]] = {}
  for name in names:
    blocks.setdefault(name.split('_')[0], []).append(name)
  return list(blocks.values())


def features(net: Mapping, image: jax.Array, *, layers: Sequence[str], network: str = 'vgg19',
             pooling: str = 'max', remat: bool = False,
             compute_dtype: jnp.dtype = jnp.float32,
             boundary: Callable[[jax.Array, int], jax.Array] | None = None
             ) -> dict[str, jax.Array]:
  """Activations of ``layers`` for one image; only layers up to the deepest requested are computed.

  Args:
    net: the output of :func:`prepare`.
    image: float (H, W, 3) RGB image in 0-255 pixel units.
    layers: layer names (see :func:`layer_names`), in any order.
    network: ``"vgg19"`` or ``"vgg16"``.
    pooling: ``"max"`` (as trained) or ``"avg"`` (Gatys et al. found it gives smoother results).
    remat: recompute each block's activations in the backward pass instead of storing them
      (``jax.checkpoint``); trades about a third more compute for much less memory.
    compute_dtype: dtype of activations (float32 or bfloat16, accumulated in float32; or float64).
    boundary: for a window of a larger image (:mod:`nst_jax.tiling`), ``boundary(x, stride)``
      zeroes the positions of ``x`` (1, h, w, C) at that stride that lie outside the image; it is
      applied to the input and to every convolution's and pooling's output, so the window's
      convolutions see the whole image's zero padding at its edges. None: ``image`` is the image.

  Returns:
    ``{layer: float32 (H_l, W_l, C_l)}`` for each requested layer.
  """
  order = layer_names(network)
  check_layers(layers, network=network)
  if pooling not in POOLINGS:
    raise errors.UserError(f'unknown pooling {pooling!r}; choose one of {", ".join(POOLINGS)}')
  if not layers:
    return {}
  wanted = set(layers)
  last = max(order.index(layer) for layer in layers)
  clip = boundary or (lambda x, stride: x)
  x = clip(preprocess(image, net)[None].astype(compute_dtype), 1)

  outputs = {}
  for block_layers in _blocks(order[:last + 1]):

    def run_block(x, block_layers=tuple(block_layers)):
      taken = {}
      for name in block_layers:
        kind = name.split('_')[1]
        if kind.startswith('conv'):
          params = net['layers'][name]
          x = _conv(x, params['kernel'], params['kernel_backward'])
          x = clip(x + params['bias'].astype(x.dtype), downsampling(name))
        elif kind.startswith('relu'):
          x = jax.nn.relu(x)
        else:
          x = clip(_pool(x, pooling), downsampling(name))
        if name in wanted:
          taken[name] = x[0].astype(_accumulation_dtype(x.dtype))
      return x, taken

    if remat:
      run_block = jax.checkpoint(run_block)
    x, taken = run_block(x)
    outputs.update(taken)
  return outputs
