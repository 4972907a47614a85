"""Timing, noise metering, environment capture and formatting shared by the bench suites.

Timing model
------------
Every table row compares several implementations of the same operation on the same data.
They are measured in the same process, interleaved: ``rounds`` passes over the
implementations (the order rotates each pass), each pass taking a share of every
implementation's samples. One sample times ``k`` back-to-back calls with
``time.perf_counter_ns`` and records the mean per call; ``k`` is chosen so that a sample
lasts about ``sample_s`` (so timer resolution and loop overhead do not matter), the number
of samples so that an implementation costs about ``budget_s`` per row (with a minimum).
The figure reported is the median over the samples.

Before each block of samples the harness waits until the process is quiet: OpenMP
runtimes (normcy's libgomp, PyTorch's bundled libgomp) and ONNX Runtime's thread pool keep
spinning for milliseconds (ORT: tens of ms) after a call, and on a 2-core machine a
spinning pool of one library would steal a core from the next library measured. Then one
untimed call warms caches and wakes the thread pool of the implementation about to run.

The machine is shared: each sample also records how long this process's threads were
runnable but waiting for a CPU (run-queue delay, /proc/self/task/*/schedstat). Samples in
which that exceeded ``stall_max`` of their duration are "contended" (another process held
a core, and e.g. a parallel region waited for its descheduled thread); the median is taken
over the uncontended samples, and extra rounds run while too few are clean. When even then
fewer than half are clean the median of all samples is reported and the result is flagged
``contended``.
"""
import contextlib
import gc
import io
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time

__all__ = [
    "Impl", "Config", "measure", "NoiseMeter", "environment", "Progress",
    "fmt_us", "fmt_gbs", "fmt_x", "md_table", "settle", "ncpu_stat", "targets_table",
    "fmt_target_value",
]


# --------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------
class Config:
    """Per-mode timing parameters."""

    def __init__(self, quick):
        self.quick = quick
        self.sample_s = 0.002          # target duration of one sample (k calls)
        self.budget_s = 0.10 if quick else 0.35   # per implementation per row
        self.min_samples = 5 if quick else 9
        self.min_samples_slow = 3 if quick else 7   # for samples longer than slow_s
        self.slow_s = 0.04
        self.max_samples = 25 if quick else 75
        self.rounds = 2 if quick else 3
        self.warm_calls = 2
        # A sample during which this process's threads waited on a run queue for more than
        # stall_max of its duration is "contended" and left out of the median; extra rounds
        # run while an implementation has fewer than 60% clean samples.
        self.stall_max = 0.03
        self.extra_rounds = 2 if quick else 4


# --------------------------------------------------------------------------------------
# CPU accounting
# --------------------------------------------------------------------------------------
def _proc_stat():
    """(busy seconds over all CPUs, number of CPUs) from /proc/stat, or (None, n)."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None, os.cpu_count() or 1
    vals = [int(v) for v in lines[0].split()[1:]]
    vals += [0] * (8 - len(vals))
    user, nice, system, idle, iowait, irq, softirq, steal = vals[:8]
    n = sum(1 for ln in lines if ln.startswith("cpu") and ln[3:4].isdigit())
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), max(1, n)


def ncpu_stat():
    return _proc_stat()[1]


class NoiseMeter:
    """CPU share (0..1 of all CPUs) used by *other* processes since the last reset."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.t0 = time.perf_counter()
        self.b0, self.n = _proc_stat()
        self.c0 = time.process_time()

    def share(self):
        wall = time.perf_counter() - self.t0
        b1, _ = _proc_stat()
        if self.b0 is None or b1 is None or wall <= 0:
            return None
        other = (b1 - self.b0) - (time.process_time() - self.c0)
        return max(0.0, other / (wall * self.n))


def _other_running_threads():
    """Number of this process's other threads in state R (running/runnable), or None."""
    me = str(threading.get_native_id())
    n = 0
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    for t in tids:
        if t == me:
            continue
        try:
            with open("/proc/self/task/%s/stat" % t, "rb") as f:
                st = f.read()
        except OSError:
            continue
        if st.rsplit(b")", 1)[1].split()[0] == b"R":
            n += 1
    return n


def settle(max_wait=0.15):
    """Wait until this process's helper threads (spinning thread pools) go idle.

    A spinning OpenMP or ONNX Runtime worker is in state R; we poll the states of this
    process's threads until none but the caller has been running for three polls in a
    row (or ``max_wait`` seconds passed). (The process CPU clock is no use here: it only
    advances at scheduler ticks for threads running on other CPUs.) Returns the wait.
    """
    t_start = time.perf_counter()
    quiet = 0
    while True:
        n = _other_running_threads()
        if n is None:                       # no /proc: fall back to a fixed pause
            time.sleep(0.02)
            return time.perf_counter() - t_start
        quiet = quiet + 1 if n == 0 else 0
        if quiet >= 3 or time.perf_counter() - t_start > max_wait:
            return time.perf_counter() - t_start
        time.sleep(0.0005)


# --------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------
class Impl:
    """One implementation in a row.

    call:  the no-argument callable that is timed.
    get:   callable returning the output(s) as NumPy arrays (for the correctness check);
           defaults to ``call``.
    pre:   untimed callable run before each block of samples (thread settings).
    nbytes / flops: work per call, for GB/s or GFLOP/s.
    """

    def __init__(self, name, call, get=None, pre=None, nbytes=None, flops=None,
                 family=None, threads=None, note=None, checked=True):
        self.checked = checked        # False: a reference (a copy), not this row's function
        self.name = name
        self.call = call
        self.get = get if get is not None else call
        self.pre = pre
        self.nbytes = nbytes
        self.flops = flops
        self.family = family or name.split()[0]
        self.threads = threads
        self.note = note
        self.error = None


def _time_calls(fn, n):
    rng = range(n)
    t0 = time.perf_counter_ns()
    for _ in rng:
        fn()
    return (time.perf_counter_ns() - t0) * 1e-9 / n


def _minflt():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class _OwnWait:
    """Run-queue wait of this process's threads (ns), from /proc/self/task/*/schedstat
    (second field: time runnable but not running). Opened once per block of samples."""

    def __init__(self):
        self.fds = []

    def open(self):
        self.fds = []
        try:
            tids = os.listdir("/proc/self/task")
        except OSError:
            return
        for t in tids:
            try:
                self.fds.append(os.open("/proc/self/task/%s/schedstat" % t, os.O_RDONLY))
            except OSError:
                pass

    def read(self):
        tot = 0
        for fd in self.fds:
            try:
                tot += int(os.pread(fd, 96, 0).split()[1])
            except (OSError, IndexError, ValueError):
                pass
        return tot

    def close(self):
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []


def _run_block(im, m, prev_family=None):
    if prev_family != im.family:         # the same library's pool may keep spinning
        settle()
    if im.pre is not None:
        im.pre()
    if im._t_est < 0.02:
        im.call()              # untimed: wakes the pool, warms the caches
    call = im.call
    rng = range(im._k)
    pc = time.perf_counter_ns
    ow = _OwnWait()
    ow.open()
    wait = ow.read
    try:
        for _ in range(m):
            f0 = _minflt()
            w0 = wait()
            t0 = pc()
            for _ in rng:
                call()
            t1 = pc()
            w1 = wait()
            im._faults += _minflt() - f0
            im._calls += im._k
            dt = t1 - t0
            im._samples.append((dt * 1e-9 / im._k, (w1 - w0) / dt if dt > 0 else 0.0))
    finally:
        ow.close()


def _measure_once(live, cfg):
    for im in live:
        im._samples = []
        im._faults = 0
        im._calls = 0
    nl = len(live)
    R = cfg.rounds
    prev = None
    for rnd in range(R):
        order = live[rnd % nl:] + live[:rnd % nl]
        for im in order:
            m = math.ceil(im._n * (rnd + 1) / R) - math.ceil(im._n * rnd / R)
            if m > 0:
                _run_block(im, m, prev)
                prev = im.family
    # Extra rounds while an implementation has too few uncontended samples.
    for extra in range(cfg.extra_rounds):
        need = [im for im in live
                if sum(1 for _, st in im._samples if st <= cfg.stall_max) < math.ceil(0.6 * im._n)]
        if not need:
            break
        for im in need[extra % len(need):] + need[:extra % len(need)]:
            _run_block(im, max(1, math.ceil(im._n / R)), prev)
            prev = im.family


def measure(impls, cfg, check=None):
    """Measure a row of implementations; returns {name: result dict}.

    check(name, output) -> dict of extra fields (e.g. max abs error); run once per impl
    after warm-up, untimed.
    """
    results = {}
    live = []
    gc.collect()
    for im in impls:
        try:
            if im.pre is not None:
                im.pre()
            extra = {}
            t0 = time.perf_counter()
            if check is not None and im.checked:
                extra = check(im.name, im.get()) or {}
            else:
                im.call()
            t_first = time.perf_counter() - t0
            if t_first < 0.02:           # slow calls are warm after the first one
                for _ in range(cfg.warm_calls):
                    im.call()
            t = _time_calls(im.call, 1)
            if t < 1e-3:
                t = _time_calls(im.call, max(1, min(10000, int(2e-3 / max(t, 1e-8)))))
            im._t_est = t
            im._k = max(1, int(round(cfg.sample_s / t)))
            per_sample = im._k * t
            lo = cfg.min_samples_slow if per_sample > cfg.slow_s else cfg.min_samples
            im._n = int(min(cfg.max_samples, max(lo, cfg.budget_s / per_sample)))
            im._extra = extra
            live.append(im)
        except Exception as exc:  # an implementation that cannot run this case
            msg = str(exc).strip()
            im.error = "%s: %s" % (type(exc).__name__, msg.splitlines()[0][:200] if msg else "")
            results[im.name] = {"name": im.name, "error": im.error, "family": im.family,
                                "threads": im.threads}
    if not live:
        return results, None
    meter = NoiseMeter()
    gc_was = gc.isenabled()
    gc.disable()
    try:
        _measure_once(live, cfg)
    finally:
        if gc_was:
            gc.enable()
    noise = meter.share()
    snap = {im.name: (list(im._samples), im._faults, im._calls) for im in live}
    for im in live:
        samples, faults, calls = snap[im.name]
        clean = [t for t, st in samples if st <= cfg.stall_max]
        use_all = len(clean) < max(3, math.ceil(0.5 * im._n))
        s = sorted(t for t, _ in samples) if use_all else sorted(clean)
        med = statistics.median(s)
        r = {
            "name": im.name,
            "family": im.family,
            "threads": im.threads,
            "median_s": med,
            "min_s": s[0],
            "p25_s": s[len(s) // 4],
            "p75_s": s[(3 * len(s)) // 4],
            "samples": len(s),
            "samples_taken": len(samples),
            "samples_contended": len(samples) - len(clean),
            "contended": bool(use_all),
            "calls_per_sample": im._k,
            "minor_faults_per_call": faults / calls if calls else None,
            "noise_other_cpu_share": noise,
        }
        if im.nbytes:
            r["bytes"] = im.nbytes
            r["gbs"] = im.nbytes / med / 1e9
        if im.flops:
            r["flops"] = im.flops
            r["gflops"] = im.flops / med / 1e9
        if im.note:
            r["note"] = im.note
        r.update(im._extra)
        results[im.name] = r
    return results, noise


# --------------------------------------------------------------------------------------
# environment
# --------------------------------------------------------------------------------------
def _cpuinfo():
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            txt = f.read()
    except OSError:
        return {"model": platform.processor() or platform.machine()}
    first = txt.split("\n\n")[0]
    for ln in first.splitlines():
        if ":" in ln:
            k, v = ln.split(":", 1)
            info[k.strip()] = v.strip()
    flags = info.get("flags", "").split()
    caches = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for d in sorted(os.listdir(base)):
            if d.startswith("index"):
                p = os.path.join(base, d)
                rd = lambda n: open(os.path.join(p, n)).read().strip()
                caches["L%s%s" % (rd("level"), {"Data": "d", "Instruction": "i"}.get(rd("type"), ""))] = rd("size")
    except OSError:
        pass
    simd = [f for f in flags if f.startswith(("avx", "sse", "fma", "amx"))]
    return {
        "model": info.get("model name"),
        "vendor": info.get("vendor_id"),
        "family": info.get("cpu family"),
        "model_number": info.get("model"),
        "mhz": info.get("cpu MHz"),
        "simd_flags": simd,
        "flags": flags,
        "caches": caches,
    }


def _version(modname):
    try:
        mod = __import__(modname)
        return getattr(mod, "__version__", "unknown")
    except Exception:
        return None


def _normcy_env(nc):
    if nc is None:
        return {"available": False}
    out = {"available": True, "version": getattr(nc, "__version__", None),
           "file": getattr(nc, "__file__", None)}
    try:
        out["num_threads_default"] = nc.get_num_threads()
    except Exception as exc:
        out["num_threads_default"] = repr(exc)
    try:
        from normcy import _build_info as bi
        out["build_info"] = {k: getattr(bi, k) for k in dir(bi)
                             if not k.startswith("_") and isinstance(getattr(bi, k), (str, int, float, bool, list, tuple, dict, type(None)))}
    except Exception as exc:
        out["build_info"] = "unavailable (%s)" % type(exc).__name__
    try:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            ret = nc.show_config()
        text = buf.getvalue()
        if ret is not None and not isinstance(ret, (str, bytes)):
            try:
                json.dumps(ret)
                out["show_config"] = ret
            except TypeError:
                out["show_config"] = repr(ret)
        else:
            out["show_config"] = (ret if isinstance(ret, str) else "") + text
    except Exception as exc:
        out["show_config"] = "unavailable (%s: %s)" % (type(exc).__name__, exc)
    try:
        from normcy import _parallel
        out["available_cpus"] = _parallel.available_cpus()
    except Exception:
        pass
    return out


def _sched_policy():
    try:
        pol = os.sched_getscheduler(0)
    except (OSError, AttributeError):
        return None
    names = {getattr(os, n): n for n in ("SCHED_OTHER", "SCHED_FIFO", "SCHED_RR", "SCHED_BATCH",
                                          "SCHED_IDLE") if hasattr(os, n)}
    return {"policy": names.get(pol, pol), "nice": os.getpriority(os.PRIO_PROCESS, 0)}


def _git_rev(root):
    try:
        r = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True,
                           text=True, timeout=10)
        rev = r.stdout.strip() if r.returncode == 0 else None
        r = subprocess.run(["git", "-C", root, "status", "--porcelain"], capture_output=True,
                           text=True, timeout=10)
        dirty = bool(r.stdout.strip()) if r.returncode == 0 else None
        return {"commit": rev, "dirty": dirty}
    except Exception:
        return {"commit": None}


_ALLOCATOR_NOTE = None      # what steady_allocator() did in this process


def steady_allocator():
    """Keep freed memory in the process (glibc): no allocation is served by a fresh mmap and
    the heap top is never trimmed, so that a library that allocates its outputs per call
    (PyTorch, NumPy) reuses pages instead of faulting them in again on every call.  With
    glibc's defaults whether it faults depends on the allocation history of the process
    (the same PyTorch row measured 0.77 ms and 7.4 ms in two processes, 4096x768; 40 ms
    against 6.9 ms at 16384x1024): the competitors are measured in their best state.
    Returns a description for the report, or None where it does not apply."""
    import ctypes
    global _ALLOCATOR_NOTE
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        # (mallopt's value is a C int: 2^31 - 1, the largest, is 2 GiB of free heap top)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        ok = (libc.mallopt(m_mmap_max, 0) == 1
              and libc.mallopt(m_trim_threshold, 2 ** 31 - 1) == 1)
    except (OSError, AttributeError):
        return None
    _ALLOCATOR_NOTE = "glibc mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=2^31-1)" if ok else None
    return _ALLOCATOR_NOTE


THREAD_ENV = ("OMP_NUM_THREADS", "NORMCY_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
              "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_PROC_BIND", "OMP_PLACES", "KMP_AFFINITY",
              "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "NORMCY_NATIVE")


def environment(nc, torch, ort, root):
    import numpy as np
    env = {
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "argv": sys.argv,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": _cpuinfo(),
        "cores": {
            "os_cpu_count": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "proc_stat_cpus": ncpu_stat(),
        },
        "loadavg_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "sched_policy": _sched_policy(),
        "thread_env": {k: os.environ.get(k) for k in THREAD_ENV},
        "allocator": _ALLOCATOR_NOTE,
        "versions": {
            "normcy": getattr(nc, "__version__", None) if nc is not None else None,
            "numpy": np.__version__,
            "torch": getattr(torch, "__version__", None) if torch is not None else None,
            "onnxruntime": getattr(ort, "__version__", None) if ort is not None else None,
            "onnx": _version("onnx"),
            "matplotlib": _version("matplotlib"),
            "threadpoolctl": _version("threadpoolctl"),
            "sentence_transformers": _version("sentence_transformers"),
            "transformers": _version("transformers"),
            "tokenizers": _version("tokenizers"),
        },
        "normcy": _normcy_env(nc),
        "git": _git_rev(root),
    }
    try:
        cfg = np.show_config(mode="dicts")
        env["numpy_config"] = {"blas": cfg.get("Build Dependencies", {}).get("blas"),
                               "simd": cfg.get("SIMD Extensions")}
    except Exception:
        pass
    if torch is not None:
        env["torch_threads"] = {"num_threads": torch.get_num_threads(),
                                "num_interop_threads": torch.get_num_interop_threads()}
        try:
            env["torch_parallel_info"] = torch.__config__.parallel_info()
        except Exception:
            pass
    try:
        import threadpoolctl
        env["threadpools"] = [{k: d.get(k) for k in ("user_api", "internal_api", "version",
                                                      "num_threads", "filepath")}
                              for d in threadpoolctl.threadpool_info()]
    except Exception:
        pass
    return env


# --------------------------------------------------------------------------------------
# progress and formatting
# --------------------------------------------------------------------------------------
class Progress:
    """One status line on stderr (rewritten in place on a terminal)."""

    def __init__(self, total, enabled=True):
        self.total = total
        self.done = 0
        self.t0 = time.perf_counter()
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self._last_len = 0

    def start(self, label):
        if not self.enabled:
            return
        el = time.perf_counter() - self.t0
        msg = "[%3d/%d %5.0fs] %s" % (self.done + 1, self.total, el, label)
        if self.tty:
            pad = max(0, self._last_len - len(msg))
            sys.stderr.write("\r" + msg + " " * pad)
            self._last_len = len(msg)
        else:
            sys.stderr.write(msg + "\n")
        sys.stderr.flush()

    def step(self):
        self.done += 1

    def note(self, text):
        if not self.enabled:
            return
        if self.tty:
            sys.stderr.write("\r" + " " * self._last_len + "\r")
            self._last_len = 0
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def finish(self):
        if self.enabled and self.tty:
            sys.stderr.write("\r" + " " * self._last_len + "\r")
        if self.enabled:
            sys.stderr.write("done: %d rows in %.0f s\n" % (self.done, time.perf_counter() - self.t0))
            sys.stderr.flush()


def fmt_us(s):
    if s is None:
        return "–"
    us = s * 1e6
    if us >= 1000:
        return "%.0f" % us
    if us >= 100:
        return "%.1f" % us
    if us >= 10:
        return "%.2f" % us
    return "%.3f" % us


def fmt_ms(s):
    if s is None:
        return "–"
    ms = s * 1e3
    return "%.1f" % ms if ms >= 100 else ("%.2f" % ms if ms >= 1 else "%.3f" % ms)


def fmt_gbs(g):
    return "–" if g is None else ("%.1f" % g if g >= 1 else "%.2f" % g)


def fmt_x(x):
    if x is None:
        return "–"
    return "%.2f×" % x if x < 10 else "%.1f×" % x


def md_table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(out)


def fmt_target_value(kind, v):
    """A target's measured value or goal as printed: a percentage or a ratio."""
    if v is None:
        return "n/a"
    return "%.0f%%" % (100 * v) if kind == "fraction" else "%.2f×" % v


def targets_table(targets, title):
    """The markdown table of evaluated targets (dicts with target, value, goal, kind, met,
    note), under a ``### title`` heading."""
    body = []
    for t in targets:
        goal = "%.0f%%" % (100 * t["goal"]) if t["kind"] == "fraction" else "%.3g×" % t["goal"]
        met = {True: "yes", False: "**NO**", None: "n/a"}[t["met"]]
        body.append([t["target"], fmt_target_value(t["kind"], t["value"]), goal,
                     met + (" (%s)" % t["note"] if t.get("note") else "")])
    return "### %s\n\n" % title + md_table(["target", "measured", "goal", "met"], body)


class Targets:
    """Speed targets evaluated from result rows.

    ``med(row, name)`` / ``fastest(row, family)`` return a median time and remember the
    result; ``add`` records a target from the figures fetched since the previous ``add``
    and marks it with ``contended_note`` if any of them was measured while this process's
    threads waited for a CPU.
    """

    def __init__(self, contended_note):
        self.out = []
        self._used = []
        self._contended_note = contended_note

    def med(self, row, name):
        r = row["impls"].get(name)
        if r is None or "error" in r:
            return None
        self._used.append(r)
        return r["median_s"]

    def fastest(self, row, family):
        rs = [r for r in row["impls"].values() if r.get("family") == family and "error" not in r]
        if not rs:
            return None
        best = min(rs, key=lambda r: r["median_s"])
        self._used.append(best)
        return best["median_s"]

    def forget(self):
        """Drop the figures fetched since the previous ``add`` (they enter no target)."""
        del self._used[:]

    def add(self, target, value, goal, kind="ratio", note=""):
        contended = any(r.get("contended") for r in self._used)
        if contended:
            note = (note + "; " if note else "") + self._contended_note
        failed = any(r.get("check_ok") is False for r in self._used)
        if failed:
            # a figure of an implementation whose output was wrong counts for nothing
            note = (note + "; " if note else "") + "an output check failed: not counted"
        del self._used[:]
        self.out.append({"target": target, "value": value, "goal": goal, "kind": kind,
                         "met": None if value is None or failed else value >= goal,
                         "note": note, "contended": contended})
