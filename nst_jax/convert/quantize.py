"""k-means quantisation of kernels to uint8 codes into float32 tables, and its inverse.

A quantised kernel is stored as ``kernel_codes`` (uint8, the kernel's shape) and ``kernel_table``
(float32, at most 256 entries), about a quarter of the float32 size; ``table[codes]`` restores it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from nst_jax.convert import common


def quantize_kernel(kernel: np.ndarray, *, levels: int = 256,
                    iterations: int = 100) -> tuple[np.ndarray, np.ndarray]:
  """Quantises an array to ``levels`` values by 1-D k-means (Lloyd's algorithm).

  Centroids start where high-resolution theory puts them (density proportional to the cube root
  of the values' density). Because the values are sorted once, every cluster is a contiguous run
  found by binary search and its mean comes from a cumulative sum, so an iteration costs
  O(levels log n) and many iterations are cheap. An array with at most ``levels`` distinct
  values is represented exactly.

  Args:
    kernel: float array of any shape.
    levels: table size, 1 to 256 (codes are uint8).
    iterations: the most Lloyd iterations; it stops earlier once the centroids are fixed.

  Returns:
    ``(codes, table)``: uint8 codes of ``kernel``'s shape and a float32 ``(K,)`` table, K <=
    ``levels``, such that ``table[codes]`` approximates ``kernel``.
  """
  if not 1 <= levels <= 256:
    raise ValueError(f'levels must be in [1, 256], got {levels}')
  flat = np.asarray(kernel, np.float32).ravel()
  values = np.sort(flat).astype(np.float64)
  distinct = np.unique(values)
  if distinct.size <= levels:
    table = distinct.astype(np.float32)
    codes = np.searchsorted(table, flat)
    return codes.astype(np.uint8).reshape(np.shape(kernel)), table
  count = values.size
  cumulative = np.concatenate([[0.0], np.cumsum(values)])
  # Start from the high-resolution optimum (Panter-Dite): centroid density proportional to the cube
  # root of the value density. Plain quantiles crowd the centre and Lloyd needs ~1000 iterations
  # to undo that; from here it settles in a few dozen.
  counts, edges = np.histogram(values, bins=min(4096, count))
  density = np.concatenate([[0.0], np.cumsum(np.cbrt(counts))])
  centroids = np.interp((np.arange(levels) + 0.5) / levels, density / density[-1], edges)
  for _ in range(iterations):
    splits = np.concatenate(
        [[0], np.searchsorted(values, (centroids[1:] + centroids[:-1]) / 2), [count]])
    sizes = np.diff(splits)
    sums = cumulative[splits[1:]] - cumulative[splits[:-1]]
    # An empty cluster keeps its centroid, which stays between its neighbours' new ones.
    updated = np.where(sizes > 0, sums / np.maximum(sizes, 1), centroids)
    if np.array_equal(updated, centroids):
      break
    centroids = updated
  table = centroids.astype(np.float32)
  # Assign against the float32 table actually stored, nearest entry wins.
  boundaries = (table[1:].astype(np.float64) + table[:-1]) / 2
  codes = np.searchsorted(boundaries, flat.astype(np.float64))
  return codes.astype(np.uint8).reshape(np.shape(kernel)), table


def quantize_weights(converted: common.Converted, *, levels: int = 256) -> common.Converted:
  """Quantises every float kernel to uint8 codes and a ``levels``-entry table; biases stay float.

  Args:
    converted: weights from a reader; already-quantised kernels are kept as they are.
    levels: table size, at most 256.

  Returns:
    The weights with every kernel quantised.
  """
  layers = {}
  for layer, arrays in converted.layers.items():
    if 'kernel' in arrays:
      codes, table = quantize_kernel(arrays['kernel'], levels=levels)
      layers[layer] = {'kernel_codes': codes, 'kernel_table': table, 'bias': arrays['bias']}
    else:
      layers[layer] = dict(arrays)
  return dataclasses.replace(converted, layers=layers)


def dequantize_weights(converted: common.Converted) -> common.Converted:
  """Expands every quantised kernel to float32 (``table[codes]``).

  Args:
    converted: weights from a reader.

  Returns:
    The weights with float32 kernels only.
  """
  layers = {}
  for layer, arrays in converted.layers.items():
    if 'kernel_codes' in arrays:
      layers[layer] = {'kernel': arrays['kernel_table'][arrays['kernel_codes']],
                       'bias': arrays['bias']}
    else:
      layers[layer] = dict(arrays)
  return dataclasses.replace(converted, layers=layers)
