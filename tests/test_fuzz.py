"""A short fuzz run in the normal test suite (the long one: ``python -m tests.fuzz``).

Seeded random malformed calls to every public normcy function, in child processes: each call
must raise TypeError/ValueError naming a parameter (and modify nothing), or return the
float64 reference's result and write nothing outside its outputs; no crash, no hang.
NORMCY_FUZZ_SEED picks another seed (the failure message prints the replay command).
"""
import os
import sys

import pytest

import normcy

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz"))

import fuzz_engine as engine  # noqa: E402
from fuzz_targets import TARGETS  # noqa: E402

# Model classes: their constructor arguments are fuzzed through TransformerEncoderLayer;
# their forward passes are covered by the model tests.
NOT_FUZZED = {"fork_serial", "show_config", "TransformerEncoder", "BertModel", "SentenceEncoder"}

SHORT_CALLS = int(os.environ.get("NORMCY_FUZZ_CALLS", "3000"))


def test_every_public_function_has_a_fuzz_target():
    public = {n for n in normcy.__all__ if callable(getattr(normcy, n))}
    missing = public - set(TARGETS) - NOT_FUZZED
    assert not missing, "add fuzz targets (tests/fuzz/fuzz_targets.py) for %s" % sorted(missing)


def test_short_fuzz_run():
    seed = int(os.environ.get("NORMCY_FUZZ_SEED", "20261128"))
    failures = engine.fuzz(SHORT_CALLS, seed=seed, batch=SHORT_CALLS)
    msg = "\n\n".join("call %d (%s): %s\nreplay: %s" % (f["index"], f["target"], f["error"],
                                                       f["repro"]) for f in failures)
    assert not failures, msg


def test_fuzzer_detects_a_crash_and_reports_the_call(tmp_path, monkeypatch):
    """The harness itself: a child killed by a signal is a failure, with the replay command."""
    import subprocess

    real_run = subprocess.run

    def crashing_run(cmd, **kw):
        # the worker's command line, with a target that segfaults on its first call
        code = ("import ctypes, sys; print('S 7', flush=True); ctypes.string_at(0)")
        return real_run([sys.executable, "-c", code], **kw)

    monkeypatch.setattr(engine.subprocess, "run", crashing_run)
    failures = engine.fuzz(3, seed=5, start=7, batch=3, max_failures=1)
    assert len(failures) == 1
    f = failures[0]
    # -11 (SIGSEGV), or 1 under AddressSanitizer, which reports the SEGV and exits
    assert f["index"] == 7 and "child died with exit status" in f["error"], f
    assert "exit status 0" not in f["error"], f
    assert f["repro"] == "python -m tests.fuzz --seed 5 --start 7 --calls 1"
