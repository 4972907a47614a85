"""The .pyi stubs of the compiled modules agree with what the modules export at run time
(mypy's stubtest: every name, every signature); runs where mypy is installed (CI installs
it)."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("mypy.stubtest")

HERE = os.path.dirname(os.path.abspath(__file__))


def test_stubs_match_the_compiled_modules():
    from conftest import normcy_pythonpath_env
    from mypy import stubtest
    # PEP 800's @disjoint_base check (newer stubtest) would flag every Cython class
    extra = (["--ignore-disjoint-bases"]
             if "ignore_disjoint_bases" in stubtest.parse_options([]).__dict__ else [])
    r = subprocess.run([sys.executable, "-m", "mypy.stubtest", *extra,
                        "--allowlist", os.path.join(HERE, "stubtest_allowlist.txt"),
                        "normcy._norms", "normcy._ops", "normcy._gemm", "normcy._parallel"],
                       capture_output=True, text=True, env=normcy_pythonpath_env(), cwd=HERE,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
