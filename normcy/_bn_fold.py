"""Fold an inference-mode BatchNorm into the linear / 1x1 convolution layer before it."""
import numpy as np

from normcy._norms import _param64, fold_batch_norm
from normcy._validate import as_float


def fold_batch_norm_into_linear(weight, bias, running_mean, running_var, bn_weight=None,
                                bn_bias=None, eps=1e-5):
    """Fold ``BatchNorm(linear(x))`` into a single linear layer.

    With ``z = x @ weight.T + bias`` followed by inference BatchNorm over the output
    features, the folded layer is ``x @ weight'.T + bias'`` where
    ``weight' = weight * scale[:, None]`` and ``bias' = (bias - running_mean) * scale + bn_bias``,
    ``scale = bn_weight / sqrt(running_var + eps)``.  Works for convolution weights too
    (``(out_channels, in_channels, kH, kW)``: the first axis is the output channel).

    Parameters
    ----------
    weight : array_like, shape (out_features, ...)
        Weight of the linear/convolution layer before the BatchNorm.
    bias : array_like of shape (out_features,) or None
    running_mean, running_var : array_like of shape (out_features,)
    bn_weight, bn_bias : array_like of shape (out_features,), optional
    eps : float, default 1e-5

    Returns
    -------
    weight, bias : ndarray
        The folded parameters, in ``weight``'s floating dtype (float32 for integer input);
        computed in float64.
    """
    w = np.asarray(weight)
    if w.dtype.kind not in "fiu":
        raise TypeError("weight must be a float array of shape (out_features, ...), got "
                        "shape %s dtype %s" % (w.shape, w.dtype))
    if w.ndim < 2:
        raise ValueError("weight must be a float array of shape (out_features, ...), got "
                         "shape %s dtype %s" % (w.shape, w.dtype))
    cout = w.shape[0]
    for name, p in (("running_mean", running_mean), ("running_var", running_var),
                    ("bn_weight", bn_weight), ("bn_bias", bn_bias), ("bias", bias)):
        if p is not None and np.shape(p) != (cout,):
            raise ValueError("%s must have shape (%d,) to match weight of shape %s, got %s"
                             % (name, cout, w.shape, np.shape(p)))
    # every per-channel parameter gets fold_batch_norm's dtype rules (a real float/int array:
    # complex and bool are refused, never silently cast), with its own name in the error
    for name, p in (("bias", bias), ("bn_weight", bn_weight), ("bn_bias", bn_bias)):
        if p is not None:
            _param64(p, name, cout)
    eps = as_float(eps, "eps", minimum=0.0)
    # validates eps, dtypes and running_var >= 0 the same way batch_norm does
    fold_batch_norm(running_mean, running_var, bn_weight, bn_bias, eps)
    scale64 = np.asarray(bn_weight if bn_weight is not None else np.ones(cout), np.float64)
    scale64 = scale64 / np.sqrt(np.asarray(running_var, np.float64) + float(eps))
    b64 = np.zeros(cout) if bias is None else np.asarray(bias, np.float64)
    shift = (b64 - np.asarray(running_mean, np.float64)) * scale64
    if bn_bias is not None:
        shift = shift + np.asarray(bn_bias, np.float64)
    out_dtype = w.dtype if w.dtype.kind == "f" else np.dtype(np.float32)
    w_new = w.astype(np.float64) * scale64.reshape((cout,) + (1,) * (w.ndim - 1))
    return w_new.astype(out_dtype), shift.astype(out_dtype)
