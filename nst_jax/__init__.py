"""nst_jax: neural style transfer (Gatys et al.) in JAX.

Importing the package sets one XLA flag unless the user set it already: XLA's CPU scheduler
that minimises memory, which measured 4-10% faster here and uses less memory (it only affects
the CPU backend, and only if JAX has not initialised its backends yet).
"""

import os

_CPU_SCHEDULER = '--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'
if 'xla_cpu_scheduler_type' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {_CPU_SCHEDULER}'.strip()
