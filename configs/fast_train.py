r"""Fast stylisation, training (Johnson et al. 2016): every field of a training run, commented.

Run (the demo: the embedded photos, The Starry Night, 128 px; under 15 minutes on a 2-core CPU):

  python main.py --config=configs/fast_train.py --workdir=runs/fast

Then stylise any photo, folder or animated GIF in one forward pass:

  python main.py --config=configs/fast_apply.py --config.model=runs/fast/model.msgpack \
      --config.content_image=photo.jpg --workdir=runs/fast_out

Johnson et al.'s setting (COCO 2014 train, 83k photos, 256 px, batch 4, 40k steps = 2 epochs;
hours on a GPU): download train2014.zip from cocodataset.org, unzip it, then

  python main.py --config=configs/fast_train.py --workdir=runs/coco_starry \
      --config.train_images=/data/coco/train2014 --config.size=256 --config.steps=40000 \
      --config.crop_scale=1.0 --config.style_images=painting.jpg --config.save_every=1000

It writes model.msgpack (several styles: model_0.msgpack, ...), checkpoint.msgpack,
losses.jsonl, loss_curve.png and samples_STEP.png (the first photo is never trained on).
"""

import ml_collections

#: Johnson et al.'s loss layers (VGG-16's relu2_2 for content; relu1_2, relu2_2, relu3_3, relu4_3
#: for style), here on the embedded VGG19, whose first layers are VGG-16's.
CONTENT_LAYERS = ('block2_relu2',)
STYLE_LAYERS = ('block1_relu2', 'block2_relu2', 'block3_relu3', 'block4_relu3')


def get_config() -> ml_collections.ConfigDict:
  """The training defaults (the demo); see the docstring for COCO."""
  config = ml_collections.ConfigDict()
  # What main.py runs: 'fast_train' (this file), 'fast_apply' or 'optimize' (configs/default.py).
  config.mode = 'fast_train'

  # --- Data ---------------------------------------------------------------------------------
  # Training photos: a folder (searched recursively), a glob ('photos/*.jpg', quoted) or
  # comma-separated files. Empty: the embedded astronaut, cat and rocket photos (the demo).
  config.train_images = ''
  # Style image(s), comma-separated (several need batch_over=style). Empty: The Starry Night.
  config.style_images = ''
  # '' (one style) or 'style': one network per style image, all trained in one vmapped program.
  config.batch_over = ''
  # Side of the square training crops in px (Johnson: 256), a multiple of 4.
  config.size = 128
  # Photos per step (Johnson: 4); on several devices a multiple of the device count.
  config.batch_size = 4
  # Each photo is resized so its shorter side is size x U(1, crop_scale), then cropped: objects at
  # several scales. 1.0 = Johnson's single scale; the demo's three photos need the variety.
  config.crop_scale = 2.0
  # The style image's longer side in px: the network learns brush strokes of this pixel scale,
  # whatever size it is later applied to.
  config.style_size = 256

  # --- Network ------------------------------------------------------------------------------
  # The transformation network: channels of its first convolution (Johnson: 32) and residual blocks
  # (Johnson: 5).
  config.channels = 32
  config.residual_blocks = 5
  # The loss network, as in configs/default.py: 'vgg19' (embedded) or 'vgg16' (converted weights).
  config.network = 'vgg19'
  config.weights = ''
  config.pooling = 'max'
  # The loss network's activation dtype ('float32' or 'bfloat16').
  config.compute_dtype = 'float32'

  # --- Loss ---------------------------------------------------------------------------------
  # The same entries as configs/default.py (any registered term works): Johnson's content and Gram
  # style layers. Content: mean squared error of the features (Johnson's ||.||^2 / CHW). The style
  # weight was chosen by looking at samples of four networks trained at once (64 px, 200 steps):
  # 1e-5 barely changes the photo, 1e-4 paints strongly with the objects kept, 1e-3 and 1e-2
  # lose them (README, "Fast stylisation").
  config.content_weight = 1.0
  config.style_weight = 5e-5
  config.tv_weight = 0.0
  config.losses = ml_collections.ConfigDict({
      'content': {
          'term': 'content',
          'weight': config.get_ref('content_weight'),
          'layers': CONTENT_LAYERS,
          'layer_weights': (),
          'options': {'reduction': 'mean'},
          'normalize_gradients': False,
      },
      'style': {
          'term': 'gram',
          'weight': config.get_ref('style_weight'),
          'layers': STYLE_LAYERS,
          'layer_weights': (),
          'options': {'normalization': 'gatys'},
          'normalize_gradients': False,
      },
      'tv': {
          'term': 'tv',
          'weight': config.get_ref('tv_weight'),
          'layers': (),
          'layer_weights': (),
          'options': {'power': 1.25},
      },
  })

  # --- Optimisation -------------------------------------------------------------------------
  # Adam (Johnson: learning rate 1e-3).
  config.learning_rate = 1e-3
  # Training steps (Johnson: 40000 on COCO).
  config.steps = 200
  # Steps per compiled chunk: progress, logs and Ctrl-C between chunks.
  config.chunk_size = 25
  # Seed of the network's initialisation, the photo order and crops, and the flips.
  config.seed = 0

  # --- Outputs ------------------------------------------------------------------------------
  # The model file's name inside --workdir (several styles: _0, _1, ... added).
  config.output = 'model.msgpack'
  # Write samples_STEP.png (held-out and training photos through the network) every k steps (0: never).
  config.save_every = 100
  # Write the checkpoint and the model files every k steps (and at the end; 0: only at the end).
  config.checkpoint_every = 100
  # Continue from --workdir/checkpoint.msgpack if it exists (same config).
  config.resume = False
  # Progress display: 'auto', 'bar', 'lines', 'none'.
  config.progress = 'auto'
  # Persistent XLA compilation cache ('' to disable).
  config.compilation_cache = '~/.cache/nst_jax/xla'
  return config
