"""``python -m nst_jax.benchmark [flags]``: runs :func:`nst_jax.benchmark.cli.run`."""

import nst_jax.benchmark
from nst_jax.benchmark import cli

# absl's --help prints the main module's docstring: the package's describes the sections.
__doc__ = nst_jax.benchmark.__doc__  # pylint: disable=redefined-builtin

if __name__ == '__main__':
  cli.run()
