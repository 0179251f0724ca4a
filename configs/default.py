r"""Gatys et al. (2016) with VGG19: every default of nst_jax, each field commented.

Run (stylises the embedded example, the astronaut in the style of The Starry Night, 256 px):

  python main.py --config=configs/default.py --workdir=runs/default

Override any field, e.g. your own images and a stronger style:

  python main.py --workdir=runs/mine --config.content_image=photo.jpg \
      --config.style_images=painting.jpg --config.style_weight=1e4 --config.size=512

It writes runs/default/result.png, grid.png (content | style | result), losses.jsonl (one JSON
object per step), loss_curve.png, metrics.json (style and content distances of the result, see
nst_jax/metrics.py) and checkpoint.msgpack, and takes about four minutes on a 2-core CPU.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """The default configuration; presets import this and change a few fields."""
  config = ml_collections.ConfigDict()

  # --- Images -------------------------------------------------------------------------------
  # Content photo. Empty: the embedded example (astronaut Eileen Collins, NASA, public domain).
  config.content_image = ''
  # Style image(s), comma-separated. Empty: the embedded The Starry Night (van Gogh, public domain).
  config.style_images = ''
  # Blend weight per style image, comma-separated (normalised to sum 1). Empty: equal weights.
  config.style_blend_weights = ''
  # Longer side of the output in pixels (the content image is resized to it; aspect kept).
  config.size = 256
  # Resize content and style to size x size regardless of aspect (the Keras tutorial, seed 001).
  config.square = False
  # Style image's longer side relative to the output's (style scale of jcjohnson/neural-style):
  # above 1 gives larger brush strokes (a stroke spans more pixels of the style read), below 1
  # finer ones.
  config.style_scale = 1.0
  # Spatial control: a mask image per style image, comma-separated (white = that style's region;
  # Gatys et al. 2017). Empty: each style covers the whole image. Unmasked regions keep content.
  config.style_masks = ''
  # Colour preservation (Gatys et al. 2016): 'none', 'histogram' (recolour the style with the
  # content's colour statistics first) or 'luminance' (transfer style in luminance only).
  config.preserve_color = 'none'

  # --- Network ------------------------------------------------------------------------------
  # 'vgg19' (Gatys et al.) or 'vgg16' (the Keras tutorial, seed 001; needs converted weights).
  config.network = 'vgg19'
  # Weights file in nst_jax's format. Empty: the embedded VGG19 (Keras ImageNet weights,
  # 8-bit quantised; see README). Convert others with `python -m nst_jax.convert`.
  config.weights = ''
  # 'max' (as the network was trained) or 'avg' (Gatys et al. report smoother gradients).
  config.pooling = 'max'
  # Recompute each VGG block's activations in the backward pass instead of storing them
  # (jax.checkpoint per block). Measured at 256 px on CPU with the pastiche loss: +26-40% time
  # and no memory saved (planned 412 MiB either way, measured peak 158 vs 160 MiB; python -m
  # nst_jax.benchmark --sections=variants): the image gradient stores only ReLU/pooling masks, and
  # the L-BFGS history (2 x memory_size images) dominates, so --config.memory_size is the lever.
  config.remat = False
  # Activation dtype: 'float32', or 'bfloat16' to halve activation memory (accumulation stays
  # float32; no speed gain on CPU, faster on GPU/TPU), or 'float64' (image, network and
  # optimiser in float64, free of float32 rounding: a reference for checks; needs
  # JAX_ENABLE_X64=1 in the environment).
  config.compute_dtype = 'float32'
  # Exact tiled evaluation: the loss and its gradient over tiles of tile_size px (a multiple of
  # 16 for relu5_1), memory of one tile plus its halo; 0 = off. Additive terms only (README).
  config.tile_size = 0

  # --- Loss ---------------------------------------------------------------------------------
  # Weights of the three standard entries below; shortcuts linked to losses.<entry>.weight.
  # Content and style weights follow Gatys' ratio alpha/beta = 1e-3...1e-4 for these
  # normalisations: the style term starts about 1e4 times smaller than the content term here.
  config.content_weight = 1.0
  config.style_weight = 1e3
  config.tv_weight = 0.0
  # The total loss: entries of {term, weight, layers, layer_weights, options,
  # normalize_gradients}. `term` is a built-in name or 'module:function' for your own (see
  # README, "Add your own loss"). Built-in content terms: content, content_mse, self_similarity
  # (STROTSS); style terms: gram, wasserstein, mean_std, sliced_wasserstein (Heitz et al. 2021),
  # histogram (Risser et al. 2017; activations, not the preserve_color mode), mrf (Li & Wand 2016;
  # configs/mrf.py), relaxed_emd (STROTSS); image terms: tv, tv_l2, tv_l1. Every style term but
  # gram puts itself on the Gram term's scale (options.normalization: gram), so style_weight
  # needs no change when switching terms. layer_weights empty means equal weights
  # 1/len(layers). normalize_gradients: divide each layer's gradient by its L1 norm in the
  # backward pass (jcjohnson/neural-style's -normalize_gradients; weights still scale it).
  # Add an entry from the command line with a config file of your own.
  config.losses = ml_collections.ConfigDict({
      # Gatys: content at conv4_2 (after its ReLU, as in Caffe), 1/2 * sum of squared errors
      # (reduction: half_sum | sum | mean).
      'content': {
          'term': 'content',
          'weight': config.get_ref('content_weight'),
          'layers': ('block4_relu2',),
          'layer_weights': (),
          'options': {'reduction': 'half_sum'},
          'normalize_gradients': False,
      },
      # Gatys: Gram matrices of conv1_1 ... conv5_1 (after ReLU), w_l = 1/5,
      # E_l = sum (G - A)^2 / (4 N^2 M^2). normalization: gatys | keras | jcjohnson | pastiche.
      'style': {
          'term': 'gram',
          'weight': config.get_ref('style_weight'),
          'layers': ('block1_relu1', 'block2_relu1', 'block3_relu1', 'block4_relu1',
                     'block5_relu1'),
          'layer_weights': (),
          'options': {'normalization': 'gatys'},
          'normalize_gradients': False,
      },
      # Total variation, the seed's power form sum((dx^2 + dy^2)^power); off by default.
      'tv': {
          'term': 'tv',
          'weight': config.get_ref('tv_weight'),
          'layers': (),
          'layer_weights': (),
          'options': {'power': 1.25},
      },
  })

  # --- Optimisation -------------------------------------------------------------------------
  # 'lbfgs_fixed' (L-BFGS, unit step, no line search: pastiche's torch LBFGS(max_iter=1); best
  # quality per second measured here), 'lbfgs' (optax L-BFGS with zoom line search) or 'adam'.
  config.optimizer = 'lbfgs_fixed'
  # Adam's step in pixel units (0-255); the step scale of lbfgs_fixed (1 = full quasi-Newton step).
  config.learning_rate = 1.0
  # L-BFGS history length (pastiche/torch use 100).
  config.memory_size = 100
  # Precision of lbfgs_fixed's history (its 2 x memory_size images dominate memory at large
  # sizes): 'float32', or 'bfloat16' (half of it; the recursion's dot products stay float32).
  config.history_dtype = 'float32'
  # Most loss evaluations per step of the zoom line search ('lbfgs' only).
  config.max_linesearch_steps = 20
  # Start a fresh L-BFGS history at every chunk (the Keras tutorial calls scipy's
  # fmin_l_bfgs_b once per round of chunk_size evaluations, so its history restarts).
  config.lbfgs_restart = False
  # Adam's moment decays and epsilon (optax defaults; the TensorFlow tutorial uses b1=0.99, eps=0.1).
  config.adam_b1 = 0.9
  config.adam_b2 = 0.999
  config.adam_eps = 1e-8
  # Optimisation steps (per scale when multi-scale).
  config.steps = 300
  # Steps per compiled chunk (lax.scan): the host sees progress, logs and checks Ctrl-C between
  # chunks. Larger chunks: fewer host round trips; smaller: quicker reaction.
  config.chunk_size = 25
  # What the optimiser moves: 'pixels', or 'laplacian' (the levels of a Laplacian pyramid of the
  # image, as STROTSS does: coarse structure forms first, high-frequency noise late).
  config.parameterization = 'pixels'
  # Halvings of that pyramid (stopping before a level's shorter side falls under 8 px).
  config.pyramid_levels = 4
  # Start image: 'content', 'style', 'uniform' (mean pixel + U(-128, 128), the Keras tutorial),
  # 'gaussian' (mean pixel + N(0, init_noise_scale)) or a path to an image file.
  config.init = 'content'
  # Standard deviation in pixel units of 'gaussian' initial noise.
  config.init_noise_scale = 32.0
  # Random seed: noise initialisation, and the draws of terms that take a PRNG key
  # (sliced_wasserstein's projections, relaxed_emd's and self_similarity's positions), redrawn
  # every step from this seed and the step, so a run is reproducible.
  config.seed = 0

  # --- Scale --------------------------------------------------------------------------------
  # Coarse-to-fine: number of scales. 1 = optimise at `size` only; k = start at
  # size / scale_factor^(k-1), upsample the result and continue, ending at `size`.
  config.scales = 1
  # Ratio between consecutive scales.
  config.scale_factor = 2 ** 0.5
  # Steps at each coarser scale (the final scale runs `steps`). 0: `steps` at every scale.
  config.coarse_steps = 0
  # Keep the balance of the loss terms at coarser scales as at the final one: each entry's weight
  # at a coarse scale is multiplied by (its size at the final scale) / (its size at this scale),
  # a term's size being its value on the content or the style image, whichever is larger.
  # Without it the style term outweighs content ~10x at 64 px and the content is lost (README).
  config.scale_balance = True
  # A finer scale starts from the upsampled coarser result plus the content's detail that the
  # coarser scale could not hold (content - upsample(downsample(content))), instead of a blurred
  # picture. Measured at 256 px, 2 scales: both distances lower than plain upsampling (README).
  config.scale_content_detail = True
  # Batch: stylise several problems in one vmapped program. '' (none), 'style' (each style image
  # separately, instead of blending them), 'content' (content_image holds comma-separated images)
  # or the name of a numeric field (content_weight, style_weight, tv_weight, seed,
  # init_noise_scale) whose values are in batch_values.
  config.batch_over = ''
  # Comma-separated values of the batched field, e.g. '1e2,1e3,1e4'.
  config.batch_values = ''

  # --- Devices ------------------------------------------------------------------------------
  # How several devices share a run: 'batch' (the N problems split across devices) or 'space'
  # (every image's rows split evenly across all devices, with its L-BFGS history: one large image
  # over several accelerators). For space, each scale's height should be a multiple of the device
  # count (otherwise that scale stays whole on every device, said once); not with
  # parameterization=laplacian.
  config.shard = 'batch'
  # Several processes (hosts): call jax.distributed.initialize() first, so the batch is sharded
  # over every process's devices; only process 0 writes files and prints progress (README).
  config.distributed = False
  # 'host:port' of process 0's coordinator; '' = from the cluster environment (SLURM, ...).
  config.coordinator_address = ''
  # How many processes take part, and which this is (-1: from the cluster environment).
  config.num_processes = -1
  config.process_id = -1
  # Seconds without a heartbeat after which JAX's coordinator counts a process as lost (one that
  # hangs rather than dies) and the others abort (JAX's default, 100).
  config.heartbeat_timeout = 100

  # --- Outputs ------------------------------------------------------------------------------
  # Result file name inside --workdir (.png or .jpg); batches add _0, _1, ...
  config.output = 'result.png'
  # Save an intermediate image every k steps (0: never).
  config.save_every = 0
  # Save the resumable state (image, optimiser state, step) every k steps (0: only at the end).
  config.checkpoint_every = 100
  # Whether checkpoints carry the optimiser state (L-BFGS: 2 x memory_size images, 153 MB at
  # 256 px, 2.4 GB at 1024 px): True, False or 'auto' (only while under 256 MB; said once when
  # left out). Without it a checkpoint is about the image's size and a resume restarts the history.
  config.checkpoint_history = 'auto'
  # Continue from --workdir/checkpoint.msgpack if it exists (same config).
  config.resume = False
  # Progress display: 'auto' (a bar on a terminal, log lines otherwise), 'bar', 'lines', 'none'.
  config.progress = 'auto'
  # Persistent XLA compilation cache folder ('' to disable): a second run of the same shapes
  # starts without recompiling.
  config.compilation_cache = '~/.cache/nst_jax/xla'
  return config
