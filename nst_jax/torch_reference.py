"""The PyTorch peer for ``python -m nst_jax.benchmark --torch_python=...``: pastiche 1.6.0.

Run only by that benchmark, in a separate interpreter that has torch and pastiche (never a
dependency of nst_jax). It reads images already resized by the benchmark, so both sides optimise
the same loss on the same pixels, and prints one JSON object.

  step mode: median seconds per forward+backward (one L-BFGS closure call) for each image pair.
  e2e mode:  pastiche's own PasticheArtist, L-BFGS(max_iter=1), content init; the loss and
             wall time after every step.
  lbfgs mode: torch.optim.LBFGS(max_iter=1), driven as pastiche drives it (one closure call per
             step), on the small problems of a JSON --spec; the iterate and the number of
             curvature pairs kept after every step.
"""

import os
import sys

# Run as a script, this file's folder (nst_jax/) is sys.path[0], whose modules (images.py,
# files.py, ...) could hide standard or third-party modules of the same name from torch.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
  del sys.path[0]

# pylint: disable=wrong-import-position
import argparse
import json
import statistics
import time

import pastiche
import torch
from pastiche import pastiche as pastiche_main
from pastiche.vgg19 import VGG19


def _step_times(vgg, content_path, style_path, repeats):
  content = pastiche_main.load_image(content_path)
  style = pastiche_main.load_image(style_path)
  content_layers = pastiche_main.DEFAULT_CONTENT_LAYERS
  style_layers = pastiche_main.DEFAULT_STYLE_LAYERS
  with torch.no_grad():
    content_targets = vgg.forward(content, content_layers)
    style_targets = {k: pastiche_main.gram(v) for k, v in vgg.forward(style, style_layers).items()}
  image = content.clone().requires_grad_()

  def step():
    image.grad = None
    acts = vgg.forward(image, content_layers + style_layers)
    loss = torch.zeros(())
    for layer in content_layers:
      loss = loss + 0.01 * torch.nn.functional.mse_loss(acts[layer], content_targets[layer])
    for layer in style_layers:
      weight = 10.0 / acts[layer].shape[1] ** 2
      loss = loss + weight * torch.nn.functional.mse_loss(
          pastiche_main.gram(acts[layer]), style_targets[layer])
    loss.backward()
    return loss.item()

  for _ in range(2):
    step()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _lbfgs_loss(problem, x, a):
  """The small problems of lbfgs mode; nst_jax/benchmark/torch_side.py has the same in JAX."""
  if problem == 'rosenbrock':
    return (10.0 * torch.sum((x[1:] - x[:-1] ** 2) ** 2) + torch.sum((1.0 - x) ** 2)
            + 0.01 * torch.sum(x ** 2))
  if problem == 'least_squares':
    ax = a @ x
    return 0.5 * torch.sum((torch.sin(ax) + 0.1 * ax ** 2 - 0.5) ** 2)
  raise ValueError(f'unknown problem {problem!r}')


def _lbfgs_iterates(run, a):
  """torch.optim.LBFGS(max_iter=1) from run['start']: the iterates and the pairs kept per step."""
  dtype = getattr(torch, run['dtype'])
  x = torch.tensor(run['start'], dtype=dtype, requires_grad=True)
  a = torch.tensor(a, dtype=dtype)
  optimizer = torch.optim.LBFGS([x], lr=run['lr'], max_iter=1, history_size=run['history_size'])

  def closure():  # as pastiche's PasticheArtist.draw
    optimizer.zero_grad()
    loss = _lbfgs_loss(run['problem'], x, a)
    loss.backward()
    return loss

  iterates, pairs = [], []
  for _ in range(run['steps']):
    optimizer.step(closure)
    iterates.append(x.detach().double().tolist())
    pairs.append(len(optimizer.state[x].get('old_dirs', ())))
  return {'iterates': iterates, 'pairs': pairs}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('mode', choices=('step', 'e2e', 'lbfgs'))
  parser.add_argument('--pairs', nargs='+', help='content.png:style.png pairs (step mode)')
  parser.add_argument('--content')
  parser.add_argument('--style')
  parser.add_argument('--steps', type=int, default=200)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--output', help='where e2e mode writes its image')
  parser.add_argument('--spec', help='lbfgs mode: JSON {"a": matrix, "runs": [{"problem", '
                      '"start", "steps", "lr", "history_size", "dtype"}, ...]}')
  args = parser.parse_args()
  torch.manual_seed(0)
  out = {'torch': torch.__version__, 'threads': torch.get_num_threads()}
  if args.mode == 'step':
    vgg = VGG19.from_quantized_bin(pastiche.__path__[0] + '/'
                                   'vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin')
    for param in vgg.parameters():
      param.requires_grad = False
    out['seconds'] = [_step_times(vgg, *pair.split(':'), args.repeats) for pair in args.pairs]
  elif args.mode == 'lbfgs':
    with open(args.spec) as f:
      spec = json.load(f)
    out['runs'] = [_lbfgs_iterates(run, spec['a']) for run in spec['runs']]
  else:
    start = time.perf_counter()
    artist = pastiche_main.PasticheArtist(args.content, [args.style], device='cpu')
    out['setup_seconds'] = time.perf_counter() - start
    losses, times = [], []
    start = time.perf_counter()
    for _ in range(args.steps):
      artist.draw()
      losses.append(artist.loss)  # the loss before this step's update, as pastiche prints it
      times.append(time.perf_counter() - start)
    out.update(losses=losses, times=times)
    if args.output:
      pastiche_main.save_image(artist.pastiche, args.output)
  print(json.dumps(out))


if __name__ == '__main__':
  main()
