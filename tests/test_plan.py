"""The plan: every config field checked at the edge, one clear line for a bad setting."""

import numpy as np
import pytest

from nst_jax import config_files
from nst_jax import errors
from nst_jax import plan
from tests import helpers


def test_masks_with_a_term_that_takes_no_mask_are_refused(tmp_path, monkeypatch):
  from nst_jax import losses

  @losses.term(reference='style', statistic=lambda features, **_: features.mean(axis=(0, 1)))
  def unmaskable(*, features, target, **unused):
    return ((features.mean(axis=(0, 1)) - target) ** 2).sum()

  monkeypatch.setitem(losses.TERMS, 'unmaskable', unmaskable)
  mask = helpers.write_image(tmp_path / 'm.png', np.full((40, 40, 3), 255))
  config = helpers.tiny_config(tmp_path, style_masks=mask)
  config.losses.style.term = 'unmaskable'
  config.losses.style.options = {}
  with pytest.raises(errors.UserError, match="term 'unmaskable'.* takes no mask keyword"):
    plan.from_config(config)


def test_settings_that_cannot_be_honoured_are_refused(tmp_path):
  a = helpers.write_image(tmp_path / 'a.png', np.full((40, 40, 3), 60))
  b = helpers.write_image(tmp_path / 'b.png', np.full((40, 40, 3), 200))
  for overrides, message in (
      ({'optimizer': 'lbfgs', 'learning_rate': 0.5}, 'no effect with optimizer=lbfgs'),
      ({'style_images': f'{a},{b}', 'batch_over': 'style', 'style_blend_weights': '1,2'},
       'drop one of the two')):
    with pytest.raises(errors.UserError, match=message):
      plan.from_config(helpers.tiny_config(tmp_path, **overrides))


@pytest.mark.parametrize('overrides, message', [
    ({'size': 8}, 'too small'),
    ({'network': 'vgg11'}, 'unknown network'),
    ({'optimizer': 'sgd'}, 'unknown optimizer'),
    ({'chunk_size': 0}, 'chunk_size=0'),
    ({'scales': 0}, 'scales=0'),
    ({'batch_over': 'size'}, 'cannot batch over'),
    ({'batch_over': 'seed'}, 'needs --config.batch_values'),
    ({'checkpoint_history': 'maybe'}, 'True, False or auto'),
    ({'parameterization': 'wavelet'}, 'unknown parameterization'),
    ({'pyramid_levels': 0}, 'pyramid_levels=0'),
    ({'output': '../x.png'}, 'inside --workdir'),
    ({'content_image': 'a.png,b.png'}, 'batch_over=content'),
    ({'style_images': 'a.png,b.png', 'style_blend_weights': '1'}, 'needs 2 non-negative'),
    ({'style_blend_weights': '1,2'}, "needs a positive number; got '1,2' for 1 style image$"),
    ({'style_masks': 'm.png,n.png'}, '2 style masks for 1 style images'),
    ({'history_dtype': 'float16'}, 'unknown history_dtype'),
    ({'compute_dtype': 'float16'}, 'unknown compute_dtype'),
    ({'init': 'gausian'}, "unknown init 'gausian'; choose one of content, style, uniform, gaussian"),
    ({'compute_dtype': 'float64'}, 'needs 64-bit JAX: run with JAX_ENABLE_X64=1'),
    ({'history_dtype': 'bfloat16', 'optimizer': 'adam'}, 'needs --config.optimizer=lbfgs_fixed'),
    ({'shard': 'layers'}, 'unknown shard'),
    ({'process_id': 1}, 'process_id needs --config.distributed=True'),
    ({'distributed': True, 'num_processes': 2}, 'go together'),
    ({'distributed': True, 'coordinator_address': '127.0.0.1:1', 'num_processes': 2,
      'process_id': 2}, r'process_id=2 must be in 0\.\.1'),
    ({'heartbeat_timeout': 0}, 'heartbeat_timeout=0 must be at least 1'),
])
def test_bad_settings_are_one_line_errors(overrides, message):
  with pytest.raises(errors.UserError, match=message) as raised:
    plan.from_config(helpers.tiny_config(**overrides))
  assert '\n' not in str(raised.value)


def test_the_plan_is_typed_and_frozen():
  the_plan = plan.from_config(helpers.tiny_config(scales=2, scale_factor=2.0, coarse_steps=4,
                                                  style_blend_weights='', init='gaussian'))
  assert the_plan.schedule.steps_per_scale == [4, 6]
  assert the_plan.schedule.sizes((40, 60)) == [(32, 32), (40, 60)]  # the 32 px floor
  assert the_plan.images.style_blend == (1.0,) and the_plan.images.init == 'gaussian'
  assert the_plan.entry_weights == {'content': 1.0, 'style': 1000.0}
  with pytest.raises(AttributeError):
    the_plan.images.size = 64
  hash(the_plan.network), hash(the_plan.optimizer)  # static arguments of the compiled step


def test_the_fingerprint_ignores_fields_that_do_not_change_the_result():
  base = plan.fingerprint(helpers.tiny_config())
  assert plan.fingerprint(helpers.tiny_config(steps=60, progress='lines')) == base
  assert plan.fingerprint(helpers.tiny_config(style_weight=2.0)) != base


def test_a_preset_loads_by_name_as_main_does():
  config = config_files.load_config_file('pastiche')
  assert config.optimizer == 'lbfgs_fixed' and config.losses.style.options['normalization'] == (
      'pastiche')
  with pytest.raises(errors.UserError, match='not found'):
    config_files.load_config_file('no_such_preset')
