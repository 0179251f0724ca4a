r"""Seed 000: the TensorFlow/Keras tutorial as the blog post describes it (VGG19, Adam).

Run:

  python main.py --config=configs/tf_tutorial.py --workdir=runs/tf_tutorial

What it reproduces: VGG19; content layer block5_conv2 and style layers block1_conv1 ...
block5_conv1 (Keras names: their outputs include the ReLU, so here block5_relu2 and
block1_relu1 ... block5_relu1); the seed's formulas L_content = 1/2 Σ(F−P)² and
E_l = Σ(G−A)²/(4N²M²) with w_l = 1/5; L = α L_content + β L_style; the generated image starts as
the content image; Adam with the tutorial's b1 = 0.99 and epsilon = 0.1. The tutorial's
learning rate 0.02 is for pixels in 0-1; here pixels are 0-255, so 0.02 * 255 ≈ 5. The blog does
not give α and β; α = β = 1 balances the two terms at block5 (both near 2e8 after 300 steps). Writes result.png, the
grid, losses.jsonl and loss_curve.png; about 3.5 minutes on a 2-core CPU (204 s measured).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.network = 'vgg19'
  config.losses.content.layers = ('block5_relu2',)
  config.losses.content.options = {'reduction': 'half_sum'}
  config.losses.style.layers = ('block1_relu1', 'block2_relu1', 'block3_relu1', 'block4_relu1',
                                'block5_relu1')
  config.losses.style.options = {'normalization': 'gatys'}
  config.content_weight = 1.0
  config.style_weight = 1.0
  config.tv_weight = 0.0
  config.init = 'content'
  config.optimizer = 'adam'
  config.learning_rate = 5.0
  config.adam_b1 = 0.99
  config.adam_eps = 0.1
  config.steps = 300
  return config
