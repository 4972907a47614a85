"""Fuzz driver: seeded random malformed calls to every public normcy function, in child
processes.

Call ``i`` of seed ``S`` is fully determined by ``(S, i)``; a failure is reported with the
command that replays exactly that call.  A call passes when it

- raises TypeError or ValueError whose message names one of the function's parameters, and
  modifies no array at all; or
- returns a result equal to the float64 reference (the documented tolerances) and writes no
  memory outside its outputs (guard bytes around and between every array are checked).

Anything else fails: another exception type, a crash (the child dies by a signal: segfault,
abort, sanitizer report), or a hang (no progress within the time limit).

The parent runs children as scripts (``python fuzz_engine.py --worker ...``) so that they
import the installed normcy, not a source tree that happens to be the current directory.

Long run: ``python -m tests.fuzz --calls 100000`` (from the directory that holds tests/).
"""
import argparse
import faulthandler
import inspect
import json
import os
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))


def _target_names(only=None):
    from fuzz_targets import TARGETS
    names = sorted(TARGETS)
    if only:
        unknown = set(only) - set(names)
        if unknown:
            raise SystemExit("unknown fuzz targets: %s (known: %s)" % (sorted(unknown), names))
        names = [n for n in names if n in only]
    return names


def _param_names(fn):
    try:
        return list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return []


def run_one(seed, i, names):
    """Run call i; returns None (pass) or a failure description."""
    import numpy as np
    from fuzz_arena import Arena
    from fuzz_targets import TARGETS, Ctx

    rng = np.random.default_rng([seed, i])
    name = names[int(rng.integers(len(names)))]
    ctx = Ctx(rng, Arena(rng))
    call = TARGETS[name](ctx)
    ctx.arena.snapshot()
    raised = None
    try:
        with np.errstate(all="ignore"):
            result = call.fn(*call.args, **call.kwargs)
    except (TypeError, ValueError) as e:
        raised = e
    except Exception:
        return name, "unexpected exception (mutated: %s):\n%s" % (ctx.mutated,
                                                                   traceback.format_exc())
    try:
        bad = ctx.arena.changed(allow_writes=raised is None)
        if bad:
            return name, "%s (%s) but changed memory it must not: %s" % (
                "raised %r" % raised if raised else "returned", ctx.mutated, "; ".join(bad))
        if raised is not None:
            msg = str(raised)
            params = _param_names(call.fn) or [name]
            if not any(p in msg for p in params):
                return name, "%s names none of the parameters %s (mutated: %s)" % (
                    repr(raised), params, ctx.mutated)
            return None
        if call.check is not None:
            try:
                with np.errstate(all="ignore"):
                    call.check(result)
            except AssertionError as e:
                return name, "wrong result (mutated: %s, accepted): %s\n%s" % (
                    ctx.mutated, e, traceback.format_exc(limit=3))
        return None
    finally:
        if call.cleanup is not None:
            call.cleanup()


def worker(seed, start, count, names, low_thresholds):
    faulthandler.enable()
    sys.path.insert(0, HERE)
    import normcy
    if low_thresholds:
        # parallel code paths on small inputs too (results are thread-count independent)
        normcy._parallel._set_parallel_thresholds(min_parallel_work=0, min_work_per_thread=1)
    out = sys.stdout
    for i in range(start, start + count):
        out.write("S %d\n" % i)
        out.flush()
        fail = run_one(seed, i, names)
        if fail is not None:
            out.write("F %s\n" % json.dumps({"index": i, "target": fail[0], "error": fail[1]}))
            out.flush()
            return 3
    out.write("D %d\n" % count)
    out.flush()
    return 0


def _child(seed, start, count, only, low_thresholds, timeout):
    cmd = [sys.executable, os.path.join(HERE, "fuzz_engine.py"), "--worker",
           "--seed", str(seed), "--start", str(start), "--calls", str(count)]
    if only:
        cmd += ["--only", ",".join(only)]
    if not low_thresholds:
        cmd += ["--default-thresholds"]
    # children import the very same normcy as this process
    import normcy
    env = dict(os.environ)
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(normcy.__file__)))
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"]
                                      if env.get("PYTHONPATH") else "")
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                           cwd=HERE)
        out, err, rc, hung = p.stdout, p.stderr, p.returncode, False
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        rc, hung = None, True
    return out, err, rc, hung, time.monotonic() - t0


def fuzz(calls, seed=0, start=0, batch=2000, only=None, low_thresholds=True, max_failures=5,
         per_call_timeout=0.05, log=None):
    """Run calls [start, start + calls) of `seed` in child processes; returns the failures
    (dicts with index, target, error, repro)."""
    names = _target_names(only)
    failures = []
    i = start
    end = start + calls
    while i < end and len(failures) < max_failures:
        n = min(batch, end - i)
        out, err, rc, hung, dt = _child(seed, i, n, only, low_thresholds,
                                        timeout=60 + n * per_call_timeout)
        started = [int(l.split()[1]) for l in out.splitlines() if l.startswith("S ")]
        last = started[-1] if started else i
        if rc == 0 and not hung:
            i += n
            if log:
                log("calls %d..%d: ok (%.1f s)" % (i - n, i - 1, dt))
            continue
        fail = None
        for line in out.splitlines():
            if line.startswith("F "):
                fail = json.loads(line[2:])
        if fail is None:
            fail = {"index": last, "target": "?",
                    "error": ("hung (no progress for %.0f s)" % dt if hung else
                              "child died with exit status %s (a negative status is the signal "
                              "number: a crash)" % rc) + "\n--- stderr (tail)\n" + err[-4000:]}
        fail["repro"] = ("python -m tests.fuzz --seed %d --start %d --calls 1%s"
                         % (seed, fail["index"], " --only " + ",".join(only) if only else ""))
        failures.append(fail)
        if log:
            log("FAIL at call %d (%s): %s" % (fail["index"], fail["target"],
                                              fail["error"].splitlines()[0]))
        i = fail["index"] + 1
    return failures


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=100_000, help="number of calls (default 100000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=int, default=0, help="index of the first call")
    ap.add_argument("--batch", type=int, default=5000, help="calls per child process")
    ap.add_argument("--only", default="", help="comma-separated target names")
    ap.add_argument("--default-thresholds", action="store_true",
                    help="keep normcy's serial/parallel switch-over (default: parallel paths "
                         "on small inputs too)")
    ap.add_argument("--max-failures", type=int, default=5)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--list", action="store_true", help="list the targets and exit")
    a = ap.parse_args(argv)
    sys.path.insert(0, HERE)
    only = [s for s in a.only.split(",") if s]
    if a.list:
        print("\n".join(_target_names()))
        return 0
    if a.worker:
        return worker(a.seed, a.start, a.calls, _target_names(only), not a.default_thresholds)
    t0 = time.monotonic()
    fails = fuzz(a.calls, a.seed, a.start, a.batch, only, not a.default_thresholds,
                 a.max_failures, log=lambda s: print(s, flush=True))
    print("%d calls, seed %d, %.1f s: %s" % (a.calls, a.seed, time.monotonic() - t0,
                                             "%d FAILURES" % len(fails) if fails else "ok"))
    for f in fails:
        print("\n== call %d (%s)\n%s\nreplay: %s" % (f["index"], f["target"], f["error"],
                                                      f["repro"]))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
