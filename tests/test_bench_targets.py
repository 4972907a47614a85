"""bench/targets.py: the targets of several bench runs summarized (synthetic run files)."""
import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "bench")
pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(BENCH, "targets.py")),
                                reason="bench/ not beside the tests")


def _run_file(path, values, model="CPU X", variant="x86-64-v3 (AVX2+FMA)", family="25"):
    targets = [{"target": "softmax: >= 1.5x torch", "value": values[0], "goal": 1.5,
                "kind": "ratio", "met": values[0] >= 1.5, "note": "1T 2.0 µs",
                "contended": False},
               {"target": "copy share", "value": values[1], "goal": 0.8, "kind": "fraction",
                "met": values[1] >= 0.8, "note": "contended", "contended": True}]
    cpu = {"model": model, "vendor": "AuthenticAMD", "family": family, "model_number": "1",
           "caches": {"L1d": "32K", "L2": "512K"}}
    doc = {"targets": targets, "environment": {"cpu": cpu}, "cpu_isa": "AVX2+FMA",
           "all_cores": 2, "kernel_variant": variant}
    path.write_text(json.dumps(doc))
    return str(path)


def _targets(*files):
    return subprocess.run([sys.executable, os.path.join(BENCH, "targets.py")] + list(files),
                          capture_output=True, text=True, timeout=60)


def test_ranges_and_counts(tmp_path):
    a = _run_file(tmp_path / "a.json", (1.62, 0.91))
    b = _run_file(tmp_path / "b.json", (1.41, 0.78))
    p = _targets(a, b)
    assert p.returncode == 0, p.stderr
    assert ("CPU X (AuthenticAMD family 25 model 1; L1d 32K,L2 512K; AVX2+FMA, 2 cores); "
            "normcy kernel variant: x86-64-v3 (AVX2+FMA); 2 runs") in p.stdout
    assert "| softmax: >= 1.5x torch | 1.50× | 1.62×, 1.41× | 1.41×-1.62× | **1 of 2** |" \
        in p.stdout
    assert "| copy share | 80% | 91%†, 78%† | 78%-91% | **1 of 2** |" in p.stdout


def test_runs_of_different_machines_are_not_combined(tmp_path):
    a = _run_file(tmp_path / "a.json", (1.6, 0.9))
    b = _run_file(tmp_path / "b.json", (1.6, 0.9), variant="x86-64-v4 (AVX-512)")
    p = _targets(a, b)
    assert p.returncode != 0 and "different machines or kernel variants" in p.stderr
    # the same model string, another CPU family (two Zen generations behind "AMD EPYC")
    c = _run_file(tmp_path / "c2.json", (1.6, 0.9), family="26")
    p = _targets(a, c)
    assert p.returncode != 0 and "different machines or kernel variants" in p.stderr
    (tmp_path / "c.json").write_text("{}")
    p = _targets(str(tmp_path / "c.json"))
    assert p.returncode != 0 and "not a bench/run.py --json file" in p.stderr
