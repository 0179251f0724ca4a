"""Progress display, the loss log and the loss plot."""

import io
import json

import numpy as np

from nst_jax import images
from nst_jax import report


class FakeTerminal(io.StringIO):
  def isatty(self):
    return True


def test_progress_draws_a_tqdm_bar_on_a_terminal_and_lines_otherwise():
  terminal = FakeTerminal()
  bar = report.Progress(total=10, stream=terminal)
  bar.message('stylising 1 image')  # before the first update: a plain line, no bar yet
  bar.update(done=5, losses={'style': 2.0, 'total': 3.0}, label='scale 1/2 ')
  bar.message('a note while the bar is drawn')
  bar.update(done=10, losses={'style': 1.0, 'total': 1.5})
  text = terminal.getvalue()
  assert bar.mode == 'bar' and text.startswith('stylising 1 image\n\r')
  assert ' 50%|' in text and '5/10' in text and 'scale 1/2' in text  # tqdm's bar
  assert 'style=2' in text and 'steps/s' in text and 'left' in text
  assert '\ra note while the bar is drawn\n' in text  # tqdm.write: the bar is cleared first
  assert '100%|' in text and text.endswith('\n')  # the finished bar ends its line
  pipe = io.StringIO()
  lines = report.Progress(total=10, stream=pipe)
  lines.update(done=5, losses={'total': 3.0})
  lines.message('done')
  assert lines.mode == 'lines' and pipe.getvalue().startswith('step 5/10 total=3')
  assert pipe.getvalue().endswith('\ndone\n')
  assert '\r' not in pipe.getvalue() and '%|' not in pipe.getvalue()
  silent = io.StringIO()
  quiet = report.Progress(total=10, mode='none', stream=silent)
  quiet.update(done=1, losses={})
  quiet.message('nothing')
  assert silent.getvalue() == ''


def test_loss_log_is_json_lines(tmp_path):
  log = report.LossLog(str(tmp_path / 'losses.jsonl'))
  for step in range(1, 6):
    log.add({'step': step, 'loss': [10.0 / step]})
  log.save()
  records = [json.loads(line) for line in (tmp_path / 'losses.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records] == [1, 2, 3, 4, 5]


def _two_scale_records():
  """Two scales of 6 steps, two problems; each term's share at the end of every 3-step chunk."""
  records = []
  for scale in range(2):
    for step in range(1, 7):
      total = 100.0 / (step + 6 * scale)
      record = {'scale': scale, 'step': step, 'loss': [total, 2 * total]}
      if step % 3 == 0:
        record['parts'] = {'content': [0.1 * total, 0.2 * total], 'style': [0.9 * total, 0]}
      records.append(record)
  return records


def test_loss_figure_has_a_log_line_per_term_and_the_total_and_marks_scales():
  axes, = report.loss_figure(_two_scale_records()).axes
  lines = {line.get_label(): line for line in axes.get_lines()}
  assert axes.get_yscale() == 'log'
  assert [text.get_text() for text in axes.get_legend().get_texts()] == ['total', 'content',
                                                                        'style']
  np.testing.assert_allclose(lines['total'].get_xdata(), np.arange(1, 13))
  # A batch is shown by its mean; a term's 0 (log scale: no value) leaves the mean of the rest.
  np.testing.assert_allclose(lines['total'].get_ydata()[0], 150.0)
  np.testing.assert_allclose(lines['content'].get_xdata(), [3, 6, 9, 12])
  np.testing.assert_allclose(lines['style'].get_ydata(), [0.9 * 100 / s for s in (3, 6, 9, 12)])
  boundaries = [line for line in axes.get_lines() if line.get_linestyle() == '--']
  assert len(boundaries) == 1 and boundaries[0].get_xdata()[0] == 6.5
  assert any(text.get_text() == 'scale 2' for text in axes.texts)


def test_loss_curve_is_a_png_of_the_requested_size(tmp_path):
  report.loss_curve(_two_scale_records(), str(tmp_path / 'curve.png'))
  curve = images.load(str(tmp_path / 'curve.png'))
  assert curve.shape == (400, 640, 3)
  assert (curve < 128).any() and (curve > 250).any()  # drawn on white
  report.loss_curve([], str(tmp_path / 'empty.png'))  # an empty log still gives a picture
  assert images.load(str(tmp_path / 'empty.png')).shape == (400, 640, 3)
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith('.')] == []  # no temp files


def _measured(style, content, reference):
  return {'result': {'gram': {'sum': style}, 'sliced': {'sum': style / 2}, 'content': content},
          'reference': {'gram': {'sum': reference}, 'sliced': {'sum': reference / 2},
                        'content': 0.0}}


def test_tradeoff_figure_has_a_labelled_point_per_result_and_the_do_nothing_line(tmp_path):
  measured = [_measured(1e-1, 10.0, 2.0), _measured(1e-2, 100.0, 2.0),
              _measured(1e-3, 1000.0, 2.0)]
  figure = report.tradeoff_figure(measured, labels=['10', '100', '1000'],
                                  style_metrics=('gram', 'sliced'), title='style_weight')
  assert len(figure.axes) == 2
  for axes, scale in zip(figure.axes, (1.0, 0.5)):
    points, reference = axes.get_lines()
    np.testing.assert_allclose(points.get_xdata(), [scale * 1e-1, scale * 1e-2, scale * 1e-3])
    np.testing.assert_allclose(points.get_ydata(), [10.0, 100.0, 1000.0])
    assert [text.get_text() for text in axes.texts] == ['10', '100', '1000']
    assert reference.get_xdata()[0] == 2.0 * scale  # the content image's own style distance
    assert axes.get_xscale() == 'log' and axes.get_yscale() == 'log'  # spans decades
  narrow = report.tradeoff_figure([_measured(1.0, 10.0, 1.5), _measured(1.2, 11.0, 1.5)],
                                  labels=['a', 'b'], style_metrics=('gram',), title='')
  assert narrow.axes[0].get_xscale() == 'linear' and narrow.axes[0].get_yscale() == 'linear'
  report.tradeoff_curve(measured, str(tmp_path / 'tradeoff.png'), labels=['10', '100', '1000'],
                        style_metrics=('gram', 'sliced'), title='style_weight')
  assert images.load(str(tmp_path / 'tradeoff.png')).shape == (420, 1200, 3)
