"""Outputs: result file names, finished images, and every file a run writes (metrics included)."""

import json
import os

import numpy as np
import pytest

from nst_jax import color
from nst_jax import images
from nst_jax import inputs
from nst_jax import metrics
from nst_jax import outputs
from tests import helpers


def test_result_paths_number_a_batch_and_keep_the_extension(tmp_path):
  assert outputs.result_paths(str(tmp_path), 'result.png', 1) == [str(tmp_path / 'result.png')]
  assert outputs.result_paths(str(tmp_path), 'out.jpg', 3) == [
      str(tmp_path / f'out_{i}.jpg') for i in range(3)]


def test_finished_clips_and_the_luminance_mode_puts_the_content_chroma_back():
  rng = np.random.default_rng(0)
  content = rng.uniform(0, 255, (20, 24, 3)).astype(np.float32)
  optimized = rng.uniform(-50, 300, (20, 24, 3)).astype(np.float32)
  plain, = outputs.finished([optimized], contents=[content], preserve_color='none')
  np.testing.assert_array_equal(plain, np.clip(optimized, 0, 255))
  gray = np.repeat(color.luminance(optimized)[..., :1], 3, axis=-1)
  recoloured, = outputs.finished([gray], contents=[content], preserve_color='luminance')
  inside = (recoloured > 1) & (recoloured < 254)  # where clipping did not bite
  chroma = lambda x: color.rgb_to_yiq(x)[..., 1:]
  assert np.abs(chroma(recoloured) - chroma(content))[inside.all(-1)].max() < 1e-2


@pytest.fixture(scope='module')
def sweep():
  """A batch over style_weight read as a run reads it, and two stand-in results: the content
  itself (doing nothing) and the style resized to the output."""
  prepared = helpers.prepare(helpers.tiny_config(batch_over='style_weight',
                                                 batch_values='1e3,10'))
  height, width = prepared.plan.images.output_size(prepared.batch.contents[0].shape[:2])
  content = images.resize(prepared.batch.contents[0], height, width)
  stylish = images.resize(prepared.batch.styles[0][0], height, width)
  return prepared, [content, stylish]


def _write(prepared, results, workdir, records=()):
  return outputs.write(str(workdir), output='result.png', batch=prepared.batch,
                       images_plan=prepared.plan.images, batch_plan=prepared.plan.batch,
                       results=results, records=list(records) or [
                           {'scale': 0, 'step': 1, 'loss': [3.0, 2.0],
                            'parts': {'content': [1.0, 1.0], 'style': [2.0, 1.0]}}])


def _flat(nested, prefix=''):
  """``{'gram/block1_relu1': d, ..., 'content': d}`` of a nested metrics dict."""
  out = {}
  for key, value in nested.items():
    if isinstance(value, dict):
      out.update(_flat(value, f'{prefix}{key}/'))
    else:
      out[prefix + key] = value
  return out


def test_write_measures_every_result_against_the_runs_references(tmp_path, sweep):
  prepared, results = sweep
  paths = _write(prepared, results, tmp_path)
  names = [os.path.basename(path) for path in paths]
  assert names[:2] == ['result_0.png', 'result_1.png']
  assert {'grid.png', 'loss_curve.png', 'metrics.json', 'tradeoff.png',
          'contact_sheet.png'} <= set(names)
  text = (tmp_path / 'metrics.json').read_text()
  document = json.loads(text, parse_constant=lambda name: pytest.fail(f'{name} is not JSON'))
  assert document['batch_over'] == 'style_weight'
  assert document['style_layers'] == list(metrics.STYLE_LAYERS)
  first, second = document['results']  # batch order, not value order
  assert (first['index'], first['file'], first['style_weight'], first['label']) == (
      0, 'result_0.png', 1e3, 'style_weight=1000')
  assert (second['file'], second['style_weight']) == ('result_1.png', 10.0)
  # The references are the content at the result's size and the style as the run sizes it.
  height, width = results[0].shape[:2]
  style = inputs.scale_images(prepared.batch, 1, prepared.plan.images, height, width)[1][0]
  as_file = lambda image: images.to_uint8(image).astype(np.float32)  # as result.png holds it
  expected = metrics.evaluate(
      as_file(results[1]), content=as_file(images.resize(prepared.batch.contents[1], height,
                                                         width)), style=as_file(style))
  for part in ('result', 'reference'):
    assert _flat(second[part]) == pytest.approx(_flat(expected[part]), rel=1e-6), part
  # The content image as the result does exactly nothing: every style ratio is 1.
  assert first['reference'] == second['reference']
  assert all(first['ratio'][name]['sum'] == 1.0 for name in metrics.STYLE_METRICS)
  assert first['ratio']['content'] is None and second['ratio']['content'] is None
  assert all(second['ratio'][name]['sum'] < 1.0 for name in metrics.STYLE_METRICS)
  assert images.load(str(tmp_path / 'tradeoff.png')).shape == (420, 1200, 3)
  sheet = images.load(str(tmp_path / 'contact_sheet.png'))
  assert sheet.shape[0] > height and sheet.shape[1] >= 2 * width  # side by side, labels below
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith('.')] == []  # no temp files


def test_write_makes_no_tradeoff_without_a_weight_sweep(tmp_path, sweep):
  prepared, results = sweep
  single = helpers.prepare(helpers.tiny_config())
  paths = outputs.write(str(tmp_path), output='result.png', batch=single.batch,
                        images_plan=single.plan.images, batch_plan=single.plan.batch,
                        results=results[:1], records=[{'scale': 0, 'step': 1, 'loss': [1.0]}])
  names = {os.path.basename(path) for path in paths}
  assert 'metrics.json' in names and not names & {'tradeoff.png', 'contact_sheet.png'}
  result, = json.loads((tmp_path / 'metrics.json').read_text())['results']
  assert result['file'] == 'result.png' and 'label' not in result


def test_intermediate_metrics_one_line_per_result_and_save(tmp_path, sweep):
  prepared, results = sweep
  measure = outputs.Measurer(batch=prepared.batch, images_plan=prepared.plan.images)
  path = str(tmp_path / outputs.STEP_METRICS)
  step_metrics = outputs.StepMetrics(path, measure=measure, resume=False)
  on_chunk = outputs.intermediate_writer(str(tmp_path), every=4, chunk_size=2, indices=[0, 1],
                                         n=2, finish=list, step_metrics=step_metrics)
  for step in (2, 4, 6, 8):
    on_chunk(0, step, np.stack(results))
  lines = [json.loads(line) for line in open(path)]
  assert [(r['scale'], r['step'], r['index']) for r in lines] == [
      (0, 4, 0), (0, 4, 1), (0, 8, 0), (0, 8, 1)]
  assert os.path.exists(tmp_path / 'step_s0_00008_1.png')
  assert lines[0]['ratio']['gram']['sum'] == 1.0 and lines[1]['ratio']['gram']['sum'] < 1.0
  # A resumed run keeps the lines written and replaces those of steps it takes again.
  resumed = outputs.StepMetrics(path, measure=measure, resume=True)
  resumed.add(scale=0, step=8, indices=[1], finished_images=[results[0]])
  lines = [json.loads(line) for line in open(path)]
  assert len(lines) == 4 and lines[3]['ratio']['gram']['sum'] == 1.0
  fresh = outputs.StepMetrics(path, measure=measure, resume=False)
  fresh.add(scale=0, step=4, indices=[0], finished_images=[results[0]])
  assert len(open(path).readlines()) == 1


def test_results_larger_than_the_metrics_limit_are_measured_scaled_down(tmp_path, sweep,
                                                                         monkeypatch):
  prepared, results = sweep
  height, width = results[1].shape[:2]
  limit = max(height, width) // 2
  monkeypatch.setattr(outputs, 'METRICS_MAX_SIDE', limit)
  measured = outputs.measured_size(height, width)
  assert max(measured) == limit and outputs.measured_size(limit, limit - 1) == (limit, limit - 1)
  assert f'{width}x{height} result scaled to {measured[1]}x{measured[0]}' in (
      outputs.metrics_note(height, width))
  assert outputs.metrics_note(*measured) == ''
  _write(prepared, results, tmp_path)
  second = json.loads((tmp_path / 'metrics.json').read_text())['results'][1]
  assert second['measured_at'] == list(measured)
  # The same figures as measuring the scaled-down images directly.
  as_file = lambda image: images.to_uint8(image).astype(np.float32)
  style = inputs.scale_images(prepared.batch, 1, prepared.plan.images, height, width)[1][0]
  expected = metrics.evaluate(
      as_file(images.resize(results[1], *measured)),
      content=as_file(images.resize(images.resize(prepared.batch.contents[1], height, width),
                                    *measured)),
      style=as_file(images.resize(style, *outputs.measured_size(*style.shape[:2]))))
  assert _flat(second['result']) == pytest.approx(_flat(expected['result']), rel=1e-6)


def test_a_run_says_when_its_metrics_are_measured_scaled_down(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(outputs, 'METRICS_MAX_SIDE', 32)
  helpers.run(helpers.tiny_config(size=40, steps=2, progress='lines'), tmp_path)
  err = capsys.readouterr().err
  assert 'metrics.json measures the 40x40 result scaled to 32x32' in err, err
  assert json.loads((tmp_path / 'metrics.json').read_text())['results'][0]['measured_at'] == [
      32, 32]
