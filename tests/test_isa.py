"""The SIMD variant dispatch: NORMCY_MAX_ISA caps the variant, show_config reports it, and
every variant this CPU supports gives results within the documented accuracy (the full
kernel suites run under each variant in .ci/run)."""
import os
import subprocess
import sys

import pytest

import normcy
from normcy import _norms


def _run(code, **env):
    """A child interpreter importing the very same normcy (conftest's environment helper),
    started from the tests folder so that a checkout's uncompiled normcy/ cannot shadow it."""
    from conftest import normcy_pythonpath_env
    e = normcy_pythonpath_env(extra=env, drop=("NORMCY_MAX_ISA",))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e,
                          timeout=120, cwd=os.path.dirname(os.path.abspath(__file__)))


def test_isa_info_consistent():
    info = _norms.isa_info()
    assert info["name"] in info["supported"] or info["name"] == "native"
    assert info["vector_bytes"] in (16, 32, 64)
    cfg = normcy._config.get_config() if hasattr(normcy, "_config") else None
    if cfg is not None:
        assert cfg["kernel_variant"] == info["name"]


@pytest.mark.parametrize("cap,expect", [("sse2", "baseline"), ("generic", "baseline"),
                                        ("AVX2", "avx2"), ("avx512", None),
                                        (" avx2\t", "avx2"), ("  SSE2 ", "baseline")])
def test_max_isa_caps_the_variant(cap, expect):
    supported = _norms.isa_info()["supported"]
    if supported == ["native"]:
        pytest.skip("single-variant build")
    code = ("import normcy._norms as n, json; print(json.dumps(n.isa_info()))")
    r = _run(code, NORMCY_MAX_ISA=cap)
    assert r.returncode == 0, r.stderr
    import json
    info = json.loads(r.stdout)
    want = expect if expect is not None else supported[0]
    if want not in supported:          # e.g. an AVX2 cap on an SSE2-only CPU
        want = supported[-1]
    assert info["name"] == want
    assert info["cap"] == cap.strip().lower()


def test_invalid_cap_warns_and_is_ignored():
    r = _run("import warnings; warnings.simplefilter('always'); import normcy, normcy._norms as n;"
             "print(n.isa_info()['name'])", NORMCY_MAX_ISA="avx9000")
    assert r.returncode == 0, r.stderr
    assert "NORMCY_MAX_ISA" in r.stderr and "avx9000" in r.stderr
    assert r.stdout.strip() == _norms.isa_info()["supported"][0]
    # the warning names the line that imported normcy, not the import machinery
    r = _run("import warnings; warnings.simplefilter('always')\nimport json\nimport normcy",
             NORMCY_MAX_ISA="avx9000")
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith("<string>:3: RuntimeWarning: NORMCY_MAX_ISA='avx9000'"), r.stderr


def test_single_variant_build_ignores_the_cap_and_says_so():
    """A single-variant build (NORMCY_NATIVE=1, CFLAGS=-march=..., no GCC >= 12) has
    nothing to cap: NORMCY_MAX_ISA warns and show_config reports it ignored, never as
    applied (.ci/run stage 4 builds one)."""
    if _norms.isa_info()["supported"] != ["native"]:
        pytest.skip("multi-variant build (test_max_isa_caps_the_variant)")
    r = _run("import warnings; warnings.simplefilter('always'); import normcy, normcy._norms as n;"
             "print(n.isa_info()['name']); normcy.show_config()", NORMCY_MAX_ISA="avx2")
    assert r.returncode == 0, r.stderr
    assert "NORMCY_MAX_ISA='avx2' ignored: this build has a single kernel variant" in r.stderr
    assert r.stdout.splitlines()[0] == "native"
    assert "ignored: this build has a single kernel variant" in r.stdout
    assert "capped by" not in r.stdout


def test_show_config_reports_variant_and_cap():
    r = _run("import normcy; normcy.show_config()", NORMCY_MAX_ISA="sse2")
    assert r.returncode == 0, r.stderr
    assert "kernel variant" in r.stdout and "GEMM tile" in r.stdout
    if _norms.isa_info()["supported"] != ["native"]:
        assert "NORMCY_MAX_ISA=sse2" in r.stdout and "SSE2" in r.stdout


def test_gemm_k_block_fits_the_l1_rule():
    # 24 KB panel slices, 48 KB with an L1 data cache of 48 KB or more (nc_gemm_kc)
    from normcy import _gemm
    l1d, kc = _gemm.kernel_blocking()
    nr = _gemm.kernel_shape()[1]
    assert l1d >= 4096
    assert kc * nr * 4 == (49152 if l1d >= 49152 else 24576)
    cfg = normcy._config.get_config()
    assert cfg["gemm_k_block"] == kc and cfg["l1d_bytes"] == l1d


@pytest.mark.skipif(sys.platform == "win32", reason="GCC/Clang flags")
def test_build_disables_implicit_fma_contraction(capsys):
    # Fused multiply-adds are written explicitly in the kernels (nc_simd.h, ncv_fma); the
    # compiler must not fuse others on its own, else results depend on its version (GCC 13
    # broke a bit-identity guarantee that GCC 12 happened to keep).
    normcy.show_config()
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "compile args" in ln)
    assert "-ffp-contract=off" in line.split()


def test_every_variant_same_answers_within_accuracy():
    """The same inputs through every supported variant (in subprocesses) agree with float64."""
    code = r"""
import numpy as np, normcy, sys
rng = np.random.default_rng(5)
x = rng.standard_normal((7, 389)).astype(np.float32) * 3 + 1
r = rng.standard_normal((7, 389)).astype(np.float32)
w = rng.standard_normal(389).astype(np.float32); b = rng.standard_normal(389).astype(np.float32)
y = normcy.add_layer_norm(x, r, w, b)
s = (x.astype(np.float64) + r)
ref = (s - s.mean(-1, keepdims=True)) / np.sqrt(s.var(-1, keepdims=True) + 1e-5) * w + b
W = (rng.standard_normal((37, 389)) / 20).astype(np.float32)
lin = normcy.PackedLinear(W, b[:37])
g = lin(x, activation="gelu")
gr = x.astype(np.float64) @ W.astype(np.float64).T + b[:37]
import math
gr = 0.5 * gr * (1 + np.vectorize(math.erf)(gr / math.sqrt(2)))
print(float(np.abs(y - ref).max()), float(np.abs(g - gr).max() / np.abs(gr).max()))
"""
    for v in _norms.isa_info()["supported"]:
        if v == "native":
            continue
        r = _run(code, NORMCY_MAX_ISA={"baseline": "sse2"}.get(v, v))
        assert r.returncode == 0, r.stderr
        e_ln, e_g = map(float, r.stdout.split())
        assert e_ln < 2e-5, (v, e_ln)
        assert e_g < 1e-5, (v, e_g)
