r"""Fast stylisation, applying a trained network: every field, commented.

Run (after configs/fast_train.py wrote runs/fast/model.msgpack):

  python main.py --config=configs/fast_apply.py --config.model=runs/fast/model.msgpack \
      --config.content_image=photo.jpg --workdir=runs/fast_out

content_image may be one image (written as result.png), a folder (each image under its own name,
as .png) or an animated GIF (written back as a GIF with the same frame durations and loop count).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """The defaults of applying a model."""
  config = ml_collections.ConfigDict()
  # What main.py runs: 'fast_apply' (this file), 'fast_train' or 'optimize' (configs/default.py).
  config.mode = 'fast_apply'
  # The trained model file (written by configs/fast_train.py into its --workdir). Required.
  config.model = ''
  # An image, a folder of images or an animated GIF. Empty: the embedded coffee photo, which the
  # demo never trains on.
  config.content_image = ''
  # Longer side of the outputs in px; 0 keeps each input's size. The network is convolutional:
  # brush strokes keep the pixel scale it learned, so larger outputs look finer.
  config.size = 0
  # Images (GIF frames) of one size per compiled batch.
  config.batch_size = 8
  # Activation dtype of the network ('float32', or 'bfloat16' on an accelerator).
  config.compute_dtype = 'float32'
  # Persistent XLA compilation cache ('' to disable).
  config.compilation_cache = '~/.cache/nst_jax/xla'
  return config
