"""Downloads the published full-precision Keras VGG weights and checks their MD5.

The only module that touches the network; a failed download says how to get the file by hand.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request

from nst_jax import errors
from nst_jax.convert import common

#: The published full-precision Keras files, ``network: (url, md5)``; Keras itself checks the MD5s.
KERAS_DOWNLOADS = {
    'vgg19': ('https://storage.googleapis.com/tensorflow/keras-applications/vgg19/'
              'vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5',
              '253f8cb515780f3b799900260a226db6'),
    'vgg16': ('https://storage.googleapis.com/tensorflow/keras-applications/vgg16/'
              'vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5',
              '6d6bbae143d832006294945121d1f1fc'),
}

#: ``--input`` values that mean "download the Keras file of this network".
FETCH_ALIASES = {'keras_vgg19': 'vgg19', 'keras_vgg16': 'vgg16'}


def fetch_keras(network: str, directory: str, *, timeout_s: float = 60.0) -> str:
  """Downloads the full-precision Keras VGG weights file and checks its published MD5.

  Args:
    network: ``"vgg19"`` or ``"vgg16"``.
    directory: an existing folder to download into.
    timeout_s: socket timeout.

  Returns:
    The path of the downloaded ``.h5`` file.

  Raises:
    errors.UserError: the download failed (the message says how to get the file by hand) or the
      file's MD5 is not the published one.
  """
  common.check_network_name(network)
  url, expected_md5 = KERAS_DOWNLOADS[network]
  filename = url.rsplit('/', 1)[1]
  destination = os.path.join(directory, filename)
  by_hand = (f'download {url} by hand (browser or curl, on any machine) and run `python -m '
             f'nst_jax.convert --input={filename} --output=OUT.npz`')
  digest = hashlib.md5(usedforsecurity=False)
  try:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
      with open(destination, 'wb') as handle:
        while chunk := response.read(1 << 20):
          digest.update(chunk)
          handle.write(chunk)
  except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
    if isinstance(exc, urllib.error.HTTPError):
      reason = f'HTTP {exc.code} {exc.reason}'
    elif isinstance(exc, urllib.error.URLError):
      reason = exc.reason
    else:
      reason = exc
    raise errors.UserError(f'could not download the Keras {network.upper()} weights '
                           f'({common.reason(reason)}); {by_hand}') from None
  if digest.hexdigest() != expected_md5:
    raise errors.UserError(f'the downloaded {filename} has MD5 {digest.hexdigest()}, not the '
                           f'published {expected_md5}, so it is damaged or altered; try again, or '
                           f'{by_hand}')
  return destination
