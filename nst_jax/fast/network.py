"""The image transformation network of Johnson, Alahi & Fei-Fei (2016), with instance norm.

Johnson et al.'s architecture ("Perceptual Losses for Real-Time Style Transfer and
Super-Resolution", ECCV 2016, supplementary material) with Ulyanov, Vedaldi & Lempitsky's instance
normalisation ("Instance Normalization: The Missing Ingredient for Fast Stylization", 2016) in
place of batch norm: a 9x9 convolution, two stride-2 3x3 convolutions, five residual blocks, two
upsampling convolutions and a 9x9 convolution to RGB. The upsampling is a nearest-neighbour resize
followed by a convolution, not a transposed convolution, which leaves checkerboard artefacts
(Odena, Dumoulin & Olah, "Deconvolution and Checkerboard Artifacts", Distill 2016). Every
convolution pads by reflection, so the borders carry no dark frame. Input and output are RGB in
0-255 pixel units, like everything else in nst_jax; the output passes through a scaled tanh.

Flax Linen, not NNX: training vmaps the train step over the parameters of N networks
(``batch_over=style``) and shards the batch over devices, which wants the parameters as a plain
pytree passed into a pure function; Linen's ``init``/``apply`` is exactly that, where NNX keeps
state in mutable objects that must be split and merged around every transformation.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

#: The spatial sizes the network keeps exactly: both stride-2 convolutions halve evenly.
MULTIPLE = 4


_DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """A VALID convolution (NHWC, HWIO) whose gradients are convolutions of the same layouts.

  The values are exactly ``lax.conv_general_dilated``'s (and so are the gradients: tested). Why
  its own backward pass: inside a compiled loop (the training chunk), XLA's CPU backend leaves the
  gradient convolutions JAX derives in their transposed layouts, which it runs ~8x slower than
  the canonical NHWC x HWIO -> NHWC form it gives them in straight-line code (measured at 64 px:
  5 steps of the network's fwd+bwd in a lax.scan 14.3 s, unrolled 1.7 s; the optimized HLO showed
  ``f01b_i01o->01bf`` convolutions only in the loop). Written here in the canonical form, the
  loop runs as fast as straight-line code.
  """
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), 'VALID',
                                      dimension_numbers=_DIMENSIONS)


def _conv_fwd(x, kernel, stride):
  return conv(x, kernel, stride), (x, kernel)


def _conv_bwd(stride, residuals, cotangent):
  x, kernel = residuals
  size = kernel.shape[0]
  # Input rows and columns the strided windows never reach, at the high end.
  rest_h, rest_w = (x.shape[1] - size) % stride, (x.shape[2] - size) % stride
  flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
  d_x = jax.lax.conv_general_dilated(
      cotangent, flipped, (1, 1), [(size - 1, size - 1 + rest_h), (size - 1, size - 1 + rest_w)],
      lhs_dilation=(stride, stride), dimension_numbers=_DIMENSIONS)
  # The kernel's gradient as a convolution of the input (channels as batch) with the cotangent
  # (batch as input channels), dilated by the stride.
  d_kernel = jax.lax.conv_general_dilated(
      x.transpose(3, 1, 2, 0), cotangent.transpose(1, 2, 0, 3), (1, 1), 'VALID',
      rhs_dilation=(stride, stride), dimension_numbers=_DIMENSIONS)
  return d_x, d_kernel[:, :size, :size, :].transpose(1, 2, 0, 3).astype(kernel.dtype)


conv.defvjp(_conv_fwd, _conv_bwd)


class Conv(nn.Module):
  """A VALID convolution with Flax's default initialisers (LeCun normal kernel, zero bias)."""

  features: int
  kernel: int
  stride: int = 1
  use_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (self.kernel, self.kernel, x.shape[-1], self.features), jnp.float32)
    y = conv(x.astype(self.dtype), kernel.astype(self.dtype), self.stride)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32
                         ).astype(self.dtype)
    return y


def _reflect_pad(x: jax.Array, pad: int) -> jax.Array:
  return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode='reflect')


class ConvNorm(nn.Module):
  """Reflection-padded convolution, then instance norm and ReLU (each optional)."""

  features: int
  kernel: int
  stride: int = 1
  norm: bool = True
  relu: bool = True
  shift: bool = True                 # the instance norm's learned bias
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = _reflect_pad(x, self.kernel // 2)
    # No bias before instance norm: it subtracts each channel's mean, so a bias has no effect
    # and its gradient is rounding noise, which Adam would scale up into random steps.
    x = Conv(self.features, self.kernel, stride=self.stride, use_bias=not self.norm,
             dtype=self.dtype)(x)
    if self.norm:
      # Statistics over each image's own positions, per channel (Ulyanov et al.), in float32.
      x = nn.InstanceNorm(epsilon=1e-5, use_bias=self.shift, dtype=jnp.float32)(x)
      x = x.astype(self.dtype)
    return nn.relu(x) if self.relu else x


class ResidualBlock(nn.Module):
  """Two 3x3 ConvNorms, the second without ReLU, added to the input (He et al. 2016).

  The second instance norm has no learned bias: a constant per channel added here reaches only
  convolutions followed by instance norm (the next block's, the upsampling's), which remove it, so
  it would have a zero gradient and Adam would turn its rounding noise into random steps.
  """

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = ConvNorm(self.features, 3, dtype=self.dtype)(x)
    return x + ConvNorm(self.features, 3, relu=False, shift=False, dtype=self.dtype)(y)


def upsample(x: jax.Array) -> jax.Array:
  """Nearest-neighbour resize by 2 in height and width."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class TransformNet(nn.Module):
  """Johnson et al.'s transformation network: (N, H, W, 3) 0-255 -> (N, H, W, 3) in 0-255.

  H and W must be multiples of :data:`MULTIPLE` (:func:`nst_jax.fast.apply.stylize_batch` pads
  any other size by reflection and crops the result).

  Attributes:
    channels: the first convolution's channels (Johnson: 32); the downsampled ones have 2x and 4x.
    residual_blocks: how many residual blocks at the lowest resolution (Johnson: 5).
    dtype: the activations' dtype (float32, or bfloat16 on an accelerator); the output is float32.
  """

  channels: int = 32
  residual_blocks: int = 5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, image: jax.Array) -> jax.Array:
    c = self.channels
    x = (image / 127.5 - 1.0).astype(self.dtype)
    x = ConvNorm(c, 9, dtype=self.dtype)(x)
    x = ConvNorm(2 * c, 3, stride=2, dtype=self.dtype)(x)
    x = ConvNorm(4 * c, 3, stride=2, dtype=self.dtype)(x)
    for _ in range(self.residual_blocks):
      x = ResidualBlock(4 * c, dtype=self.dtype)(x)
    x = ConvNorm(2 * c, 3, dtype=self.dtype)(upsample(x))
    x = ConvNorm(c, 3, dtype=self.dtype)(upsample(x))
    x = ConvNorm(3, 9, norm=False, relu=False, dtype=self.dtype)(x)
    return 127.5 * (jnp.tanh(x.astype(jnp.float32)) + 1.0)


@dataclasses.dataclass(frozen=True)
class Architecture:
  """What a model file records about its network (enough to rebuild it)."""

  channels: int = 32
  residual_blocks: int = 5

  def module(self, dtype: Any = jnp.float32) -> TransformNet:
    return TransformNet(channels=self.channels, residual_blocks=self.residual_blocks, dtype=dtype)


def init_params(architecture: Architecture, *, key: jax.Array, size: int = 64) -> Any:
  """Fresh parameters (Flax's default initialisers) of ``architecture``."""
  dummy = jnp.zeros((1, size, size, 3), jnp.float32)
  return architecture.module().init(key, dummy)['params']


def param_shapes(architecture: Architecture) -> Any:
  """The parameter tree's shapes and dtypes, without computing anything."""
  return jax.eval_shape(lambda: init_params(architecture, key=jax.random.key(0)))
