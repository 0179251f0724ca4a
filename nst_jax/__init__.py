"""nst_jax: neural style transfer (Gatys et al.) in JAX.

Importing nst_jax or any of its modules changes no process state: not ``XLA_FLAGS``, not
``jax.config``, not Pillow's limits, not the umask. The entry points (``main.py``,
``python -m nst_jax.benchmark``) set the XLA flags they prefer; see :mod:`nst_jax.xla_flags`.
"""
