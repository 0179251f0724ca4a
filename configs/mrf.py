r"""Li & Wand (CVPR 2016): the MRF style term on 3x3 patches of relu3_1 and relu4_1.

Run:

  python main.py --config=configs/mrf.py --workdir=runs/mrf

Every other field is the default's. The MRF term compares every result patch with every style
patch at each step, so it is kept to the paper's two layers (at 256 px relu3_1 has 62x62 patches
of 2304 values); the shallow layers of the Gram default would cost far more. Its distance is put
on the Gram term's scale (normalization 'gram'), so the default style_weight stylises.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.losses.style.term = 'mrf'
  config.losses.style.layers = ('block3_relu1', 'block4_relu1')
  config.losses.style.layer_weights = ()
  config.losses.style.options = {'normalization': 'gram'}
  return config
