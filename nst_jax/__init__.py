"""nst_jax: neural style transfer (Gatys et al.) in JAX.

  import nst_jax
  result = nst_jax.stylize('photo.jpg', 'painting.jpg', size=512)   # uint8 (H, W, 3)

Importing nst_jax or any of its modules changes no process state: not ``XLA_FLAGS``, not
``jax.config``, not Pillow's limits, not the umask. The entry points (``main.py``,
``python -m nst_jax.benchmark``) set the XLA flags they prefer; see :mod:`nst_jax.xla_flags`.
"""


def stylize(content, style, **overrides):
  """Stylises ``content`` like ``style``; see :func:`nst_jax.api.stylize` (imported on first use,
  so ``import nst_jax`` stays light)."""
  from nst_jax import api
  return api.stylize(content, style, **overrides)
