r"""Seed 001: the Keras VGG16 tutorial, faithfully (260x260, L-BFGS 10 rounds x 20).

Needs VGG16 weights (not embedded). Convert the Keras file once, then run:

  python -m nst_jax.convert --input=vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5 \
      --output=vgg16.npz
  python main.py --config=configs/keras_vgg16.py --config.weights=vgg16.npz \
      --workdir=runs/keras_vgg16

Without --config.weights it stops with one line saying how to convert them.

What it reproduces: VGG16; content and style resized to 260x260; content layer block2_conv2
(Keras names include the ReLU: block2_relu2 here) with Σ(F−P)² and weight 0.02; style layers
block1_conv2, block2_conv2, block3_conv3, block4_conv3, block5_conv3 (relu outputs), weight 4.5
split evenly, with the tutorial's normaliser 4·3²·(H·W)² (3 channels hard-coded, H·W the image
size); total variation Σ((dx²+dy²)^1.25) with weight 0.995; random uniform initialisation around
the mean pixel (U(0,255) − 128 in the network's input space); L-BFGS in 10 rounds of 20 steps,
its history restarting each round as with the tutorial's 10 calls of fmin_l_bfgs_b(maxfun=20)
(optax's zoom line search in place of scipy's, and steps in place of function evaluations); the
loss printed every round; the output and the side-by-side picture content | style | output.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.network = 'vgg16'
  config.size = 260
  config.square = True
  config.losses.content.layers = ('block2_relu2',)
  config.losses.content.options = {'reduction': 'sum'}
  config.losses.style.layers = ('block1_relu2', 'block2_relu2', 'block3_relu3', 'block4_relu3',
                                'block5_relu3')
  config.losses.style.options = {'normalization': 'keras'}
  config.losses.tv.options = {'power': 1.25}
  config.content_weight = 0.02
  config.style_weight = 4.5
  config.tv_weight = 0.995
  config.init = 'uniform'
  config.optimizer = 'lbfgs'
  config.memory_size = 10  # scipy's fmin_l_bfgs_b default m=10
  config.lbfgs_restart = True
  config.chunk_size = 20
  config.steps = 200
  config.progress = 'lines'
  return config
