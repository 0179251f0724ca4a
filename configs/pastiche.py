r"""pastiche 1.6.0's defaults, for side-by-side comparisons with the PyTorch peer.

Run:

  python main.py --config=configs/pastiche.py --workdir=runs/pastiche

Content block4_relu2 with 0.01 * MSE; style block1_relu1 ... block5_relu1 with 10/C² * MSE of
F·Fᵀ/(H·W) per layer; no total variation; content initialisation; L-BFGS with unit steps and a
history of 100 (torch.optim.LBFGS(max_iter=1, lr=1)). `python -m nst_jax.benchmark` uses it.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.losses.content.term = 'content_mse'
  config.losses.content.layers = ('block4_relu2',)
  config.losses.content.layer_weights = (0.01,)
  config.losses.content.options = {}
  config.losses.style.layers = ('block1_relu1', 'block2_relu1', 'block3_relu1', 'block4_relu1',
                                'block5_relu1')
  config.losses.style.layer_weights = tuple(10.0 / c ** 2 for c in (64, 128, 256, 512, 512))
  config.losses.style.options = {'normalization': 'pastiche'}
  config.content_weight = 1.0
  config.style_weight = 1.0
  config.tv_weight = 0.0
  config.init = 'content'
  config.optimizer = 'lbfgs_fixed'
  config.memory_size = 100
  config.steps = 200
  return config
