"""Shared test setup: small, quick, deterministic; never the network, never ../shared."""

import os
import sys

# Tests import `configs` and `nst_jax` from the repository root, wherever pytest is started.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import numpy as np
import pytest


@pytest.fixture
def rng():
  return np.random.default_rng(0)
