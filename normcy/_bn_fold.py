"""Fold an inference-mode BatchNorm into the linear / 1x1 convolution layer before it."""
import numpy as np

from normcy._norms import param64, fold_batch_norm
from normcy._validate import as_float, refuse_masked


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
    for name, p in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var), ("bn_weight", bn_weight),
                    ("bn_bias", bn_bias)):
        refuse_masked(p, name)
    try:
        w = np.asarray(weight)
    except Exception as exc:
        raise TypeError("weight must be a float array of shape (out_features, ...), got %s"
                        % type(weight).__name__) from exc
    if w.dtype.kind not in "fiu":
        raise TypeError("weight must be a float array of shape (out_features, ...), got "
                        "shape %s dtype %s" % (w.shape, w.dtype))
    if w.ndim < 2:
        raise ValueError("weight must be a float array of shape (out_features, ...), got "
                         "shape %s dtype %s" % (w.shape, w.dtype))
    cout = w.shape[0]
    # Every per-channel parameter is converted once (an object's __array__ is not asked
    # twice) with fold_batch_norm's rules: a real float/int array of shape (out_features,);
    # complex and bool are refused, never silently cast; the error names the argument.
    p64 = {}
    for name, p in (("running_mean", running_mean), ("running_var", running_var),
                    ("bn_weight", bn_weight), ("bn_bias", bn_bias), ("bias", bias)):
        if p is None and name in ("running_mean", "running_var"):
            param64(p, name, cout)        # TypeError naming the argument
        if p is not None:
            try:
                a = np.asarray(p)
            except Exception as exc:
                raise TypeError("%s must be a 1-d float array, got %s"
                                % (name, type(p).__name__)) from exc
            if a.shape != (cout,):
                raise ValueError("%s must have shape (%d,) to match weight of shape %s, got %s"
                                 % (name, cout, w.shape, a.shape))
            p64[name] = param64(a, name, cout)
    eps = as_float(eps, "eps", minimum=0.0)
    # validates eps and running_var + eps > 0 the same way batch_norm does
    fold_batch_norm(p64["running_mean"], p64["running_var"], p64.get("bn_weight"),
                    p64.get("bn_bias"), eps)
    scale64 = p64["bn_weight"] if bn_weight is not None else np.ones(cout)
    scale64 = scale64 / np.sqrt(p64["running_var"] + eps)
    b64 = np.zeros(cout) if bias is None else p64["bias"]
    shift = (b64 - p64["running_mean"]) * scale64
    if bn_bias is not None:
        shift = shift + p64["bn_bias"]
    out_dtype = w.dtype if w.dtype.kind == "f" else np.dtype(np.float32)
    w_new = w.astype(np.float64) * scale64.reshape((cout,) + (1,) * (w.ndim - 1))
    return w_new.astype(out_dtype), shift.astype(out_dtype)
