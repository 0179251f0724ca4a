r"""Speed, memory and quality figures of nst_jax, optionally side by side with pastiche (PyTorch).

  python -m nst_jax.benchmark                       # steps at 128/256/512 px, remat/bf16, batches
  python -m nst_jax.benchmark --sizes=512,1024,2048 --batches=1,2,4,8 --batch_px=256   # a GPU
  python -m nst_jax.benchmark --sections=none --e2e                  # nst_jax settings only
  python -m nst_jax.benchmark --torch_python=/path/to/venv/bin/python --e2e   # against pastiche
  python -m nst_jax.benchmark --sections=none --style_losses --style_dir=runs/styles
  python -m nst_jax.benchmark --sections=space --space_px=512 --space_devices=4   # shard=space
  python -m nst_jax.benchmark --sections=large --large_sizes=2048,4096 --large_tiles=0,512
  python -m nst_jax.benchmark --sections=fast --fast_model=runs/fast/model.msgpack

The loss is pastiche's (configs/pastiche.py, loaded as a config file), so both sides do the same
work. The entry point asks XLA for its memory-optimised CPU scheduler before JAX starts
(nst_jax.xla_flags); the first line printed shows XLA_FLAGS. Sections (--sections):

* step: compile seconds, then the median seconds per forward+backward (one loss-and-gradient
  evaluation, timed over a compiled scan of --chunk of them) and per fixed-step L-BFGS step inside
  a compiled chunk; XLA's planned memory
  (arguments + temporaries) of the L-BFGS chunk; with --torch_python, pastiche's seconds per
  forward+backward on the same pixels and the ratio.
* variants: remat and bfloat16 against the plain step: time, XLA's planned memory (total and
  temporaries, the part remat and bfloat16 change) and the measured peak rise of memory in use
  during one chunk (device bytes in use on a GPU, the process's resident memory on CPU).
* batch: N problems vmapped in one program against N sequential runs (throughput ratio).
* lbfgs: seconds per step of optimizer=lbfgs (optax L-BFGS, zoom line search) and lbfgs_fixed
  at N = 1 and 4, --batch_px. The line search keeps the last loss and gradient in its state
  (optim.init_state(loss_fn=...)); optax's value_and_grad_from_state, used before, hid a lax.cond
  whose predicate is batched under vmap, so both branches ran: measured at 128 px, N=1 went from
  0.945 to 0.336 s/step and N=4 from 10.96 to 6.74 s/step.
* largest: the largest square image whose L-BFGS chunk XLA plans within --memory_gib, per variant
  (compiled, not run).
* lbfgs_torch (with --torch_python): lbfgs_fixed's iterates against torch.optim.LBFGS's.
* space: config.shard=space, one image's rows split over --space_devices devices (forced host
  devices on a CPU, each side in a subprocess of its own since JAX fixes the device count when it
  starts) against one device: XLA's planned memory per device of pastiche's L-BFGS chunk at
  --space_px and the seconds per step. Measured at 512 px on a 2-core CPU (--chunk=2): 1336 MiB
  planned for one device, 418 MiB per device over 4 (0.31x); 10.1 and 10.5 s per step (the 4
  host devices share the same 2 cores: space saves memory per device, not time, here).
* large: one L-BFGS step of pastiche's loss (history --large_history) at each of --large_sizes,
  untiled and with each of --large_tiles, each row in a fresh subprocess: XLA's planned memory,
  compile seconds, seconds for the step, the process's peak resident memory after setup and after
  the step; rows planned over --memory_gib are reported and not run.
* fast: the feed-forward network (nst_jax.fast): seconds per training step at --fast_sizes
  (batch --fast_batch), seconds to stylise one 256 and one 512 px image; with --fast_model, its
  result against the default optimisation on a photo it never saw (seconds, distances).
* e2e (--e2e): nst_jax at --e2e_px: a single scale of --e2e_steps steps; 2 scales (from half the
  size) and 3 scales (from a quarter), each coarser scale running --e2e_steps // 8 steps (25 at
  the default 200) and each finer one starting from the upsampled coarser result plus the
  content's lost detail (scale_content_detail); and the 2 scales with plain upsampling. With
  --torch_python also pastiche's --e2e_steps L-BFGS steps and the 2 scales with history 30. Per
  setting: wall time (compilation included) and two distances of the final image
  (nst_jax.metrics: Gram distance to the style, relu4_2 distance to the content), beside those of
  the single-scale run after equal wall time: a setting is better only if no worse on both. With
  torch, also when each nst_jax setting reaches pastiche's final loss.
* style_losses (--style_losses): "Which style loss?": the default config with each style term
  (gram, wasserstein, sliced_wasserstein, histogram, mrf) and gram with the Laplacian-pyramid
  parameterisation, on astronaut x The Starry Night and chelsea x The Scream at --style_px for
  --style_steps; nst_jax.metrics of each final image at equal steps and at equal wall time.
* On a GPU, the achieved FLOP/s of the forward+backward against --peak_tflops.

Speed is measured here, never asserted in tests.

Modules, each importing only those listed above it; JAX is imported inside functions, and
importing the package defines no flags (only ``cli.run()`` does):

* ``measure``: problem setup, timing, XLA's planned memory, measured peaks, ``measure_step``.
* ``torch_side``: runs nst_jax/torch_reference.py under --torch_python; ``lbfgs_torch_table``.
* ``tables``: the step, variants, batch, lbfgs and largest tables.
* ``space``: the space table; run as a program, the measurement of one side.
* ``large``: the large table; run as a program, the measurement of one row.
* ``fast``: the fast-stylisation table.
* ``e2e``: the end-to-end comparison.
* ``style_losses``: the style-loss comparison (reuses ``e2e``'s timed run).
* ``cli``: flags, their checks, ``main`` and ``run``; ``__main__`` runs it.
"""
