"""Fast stylisation: a feed-forward network trained per style (Johnson, Alahi & Fei-Fei 2016).

Train once with nst_jax's own loss terms (``python main.py --config=configs/fast_train.py``), then
stylise any image, folder or animated GIF in one forward pass (``configs/fast_apply.py``), or from
Python::

  stylize = nst_jax.fast.load('runs/fast/model.msgpack')
  result = stylize(photo)  # (H, W, 3) RGB in 0-255 -> the same, stylised

Modules, data flowing down the list: :mod:`~nst_jax.fast.settings` (the configs, checked),
:mod:`~nst_jax.fast.data` (training photos and crops), :mod:`~nst_jax.fast.network` (the Flax
module), :mod:`~nst_jax.fast.steps` (the compiled training steps), :mod:`~nst_jax.fast.model_files`
(models on disk), :mod:`~nst_jax.fast.apply` (stylising), :mod:`~nst_jax.fast.train` (a training
run).
"""

from nst_jax.fast.apply import load

__all__ = ['load']
