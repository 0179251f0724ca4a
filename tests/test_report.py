"""Progress display, the loss log and the loss plot."""

import io
import json


from nst_jax import images
from nst_jax import report


class FakeTerminal(io.StringIO):
  def isatty(self):
    return True


def test_progress_draws_a_bar_on_a_terminal_and_lines_otherwise():
  terminal = FakeTerminal()
  bar = report.Progress(total=10, stream=terminal)
  bar.update(done=5, losses={'style': 2.0, 'total': 3.0})
  bar.update(done=10, losses={'style': 1.0, 'total': 1.5})
  text = terminal.getvalue()
  assert bar.mode == 'bar' and text.startswith('\r[')
  assert '5/10' in text and 'style=2' in text and 'steps/s' in text and 'left' in text
  assert text.endswith('\n')  # the finished bar ends its line
  pipe = io.StringIO()
  lines = report.Progress(total=10, stream=pipe)
  lines.update(done=5, losses={'total': 3.0})
  assert lines.mode == 'lines' and pipe.getvalue().startswith('step 5/10 total=3')
  assert '\r' not in pipe.getvalue()
  silent = io.StringIO()
  report.Progress(total=10, mode='none', stream=silent).update(done=1, losses={})
  assert silent.getvalue() == ''


def test_loss_log_is_json_lines_and_the_curve_a_png(tmp_path):
  log = report.LossLog(str(tmp_path / 'losses.jsonl'))
  for step in range(1, 6):
    log.add({'step': step, 'loss': [10.0 / step]})
  log.save()
  records = [json.loads(line) for line in (tmp_path / 'losses.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records] == [1, 2, 3, 4, 5]
  report.loss_curve([10.0 / s for s in range(1, 6)], str(tmp_path / 'curve.png'))
  curve = images.load(str(tmp_path / 'curve.png'))
  assert curve.shape == (400, 640, 3)
  red = (curve[..., 0] > 150) & (curve[..., 1] < 100)
  assert red.sum() > 100  # the curve was drawn
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith('.')] == []  # no temp files
