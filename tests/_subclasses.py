"""An ndarray subclass for the tests of "a subclass is used as its buffer" (README,
Guarantees): honest about its shape, strides and dtype, while every NumPy method and
function called on it returns zeros of its dtype (a boundary that ran any of them would
compute on those zeros).  test_hardening.py's Liar lies about the attributes instead."""
import numpy as np


class Hijacker(np.ndarray):
    def _zeros(self, shape=1):
        return np.zeros(shape, np.ndarray.dtype.__get__(self))

    def __array_function__(self, func, types, args, kwargs):
        return self._zeros()

    def __getitem__(self, i):
        return self._zeros((1, 1, 1))

    def transpose(self, *a):
        return self._zeros((1, 1, 1))

    def reshape(self, *a, **k):
        return self._zeros((1, 1))

    def astype(self, *a, **k):
        return self._zeros()

    def view(self, *a, **k):
        return self._zeros()

    def copy(self, *a, **k):
        return self._zeros()

    def all(self, *a, **k):
        return False

    def __ne__(self, other):
        return np.ones(np.ndarray.shape.__get__(self), bool)
