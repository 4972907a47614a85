#!/usr/bin/env python
"""normcy benchmark harness: normcy vs NumPy, PyTorch and ONNX Runtime, side by side.

Run from the repository root (after ``pip install .``, or with an in-place build)::

    python bench/run.py --quick                  # < 1 minute, the README table
    python bench/run.py                          # full mode
    python bench/run.py --json bench/results/full.json --plot bench/results/full.png
    python bench/run.py --only 'add_layer_norm*,batch_norm' --threads 1,2

Suites: ceiling, layer_norm, layer_norm_t, add_layer_norm, add_layer_norm_sum, rms_norm,
add_rms_norm, batch_norm, ops, gemm, encoder, minilm (``--only`` takes comma-separated shell patterns).
See bench/README.md for what is measured and the formulas.
"""
import argparse
import fnmatch
import glob
import json
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import numpy as np  # noqa: E402

from _common import (Config, Progress, Targets, environment, fmt_gbs, fmt_us, fmt_x,  # noqa: E402
                     md_table, targets_table)
from _norm_suites import copy_gbs_of  # noqa: E402

ALL_SUITES = ["ceiling", "layer_norm", "layer_norm_t", "add_layer_norm", "add_layer_norm_sum",
              "rms_norm", "add_rms_norm", "batch_norm", "ops", "gemm", "encoder", "minilm"]
NORM_SUITES = ALL_SUITES[1:8]
QUICK_DEFAULT = ["ceiling", "layer_norm", "add_layer_norm", "rms_norm", "add_rms_norm",
                 "batch_norm", "ops", "gemm", "encoder"]
LARGE_COPY_BYTES = 256 << 20
OUT_OF_CACHE_BYTES = 48 << 20      # fallback per-array size from which a case is "not in cache"
SMALL_INPUT_BYTES = 4 << 20        # bytes moved per call up to which an input counts as small


def _import_normcy():
    """Prefer an in-place build in this checkout, else the installed package."""
    built = glob.glob(os.path.join(ROOT, "normcy", "_norms*.so")) + \
        glob.glob(os.path.join(ROOT, "normcy", "_norms*.pyd"))
    if built and ROOT not in sys.path:
        sys.path.insert(1, ROOT)
    try:
        import normcy
        return normcy, None
    except Exception as exc:
        return None, "%s: %s" % (type(exc).__name__, exc)


def _import_torch():
    try:
        import torch
    except Exception as exc:
        return None, "%s: %s" % (type(exc).__name__, exc)
    # Inference mode for the whole (main) thread: no autograd bookkeeping on any torch call.
    guard = torch.inference_mode()
    guard.__enter__()
    torch._normcy_bench_guard = guard
    return torch, None


def _import_ort():
    try:
        import onnxruntime as ort
        import onnx  # noqa: F401  (models are built with the onnx helper API)
    except Exception as exc:
        return None, "%s: %s" % (type(exc).__name__, exc)
    try:
        ort.set_default_logger_severity(3)
    except Exception:
        pass
    return ort, None


class Ctx:
    pass


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="normcy benchmark: normcy vs NumPy / PyTorch / ONNX Runtime, side by side.")
    p.add_argument("--quick", action="store_true",
                   help="fewer shapes and repeats, all cores only (< 1 minute)")
    p.add_argument("--json", metavar="PATH", help="write every figure and the environment")
    p.add_argument("--plot", metavar="PATH", help="write a PNG: GB/s vs bytes moved, per kernel")
    p.add_argument("--md", metavar="PATH", help="also write the markdown tables to PATH")
    p.add_argument("--only", metavar="PATTERN",
                   help="comma-separated suite patterns (fnmatch), e.g. 'add_*,batch_norm'; "
                        "suites: " + ", ".join(ALL_SUITES))
    p.add_argument("--threads", metavar="LIST",
                   help="comma-separated thread counts ('all' = all cores); "
                        "default: 1,all (full), all (--quick)")
    p.add_argument("--shapes", metavar="LIST",
                   help="restrict the norm suites to these cases: NxH shapes and/or BatchNorm "
                        "layouts, e.g. '32x384,4096x768,NCHW'")
    p.add_argument("--no-torch", action="store_true", help="leave PyTorch out")
    p.add_argument("--default-malloc", action="store_true",
                   help="keep glibc's default allocator settings (by default freed memory is "
                        "kept in the process, so that implementations that allocate per call "
                        "do not pay page faults that depend on the allocation history)")
    p.add_argument("--no-ort", action="store_true", help="leave ONNX Runtime out")
    p.add_argument("--no-progress", action="store_true", help="no progress display on stderr")
    p.add_argument("--realtime", action="store_true",
                   help="run under SCHED_FIFO (needs root/CAP_SYS_NICE): on a machine shared with "
                        "other busy processes, the measured threads are then not preempted by "
                        "them (the others starve meanwhile)")
    p.add_argument("--quiet-wait", type=float, default=0.0, metavar="SECONDS",
                   help="before each row, wait up to SECONDS for other processes to use less "
                        "than 15%% of the CPUs (for shared machines; default 0: do not wait)")
    return p.parse_args(argv)


def select_suites(args):
    if args.only:
        pats = [s.strip() for s in args.only.split(",") if s.strip()]
        sel = [s for s in ALL_SUITES if any(fnmatch.fnmatchcase(s, p) for p in pats)]
        if not sel:
            sys.exit("bench: --only %r matches no suite (suites: %s)"
                     % (args.only, ", ".join(ALL_SUITES)))
        return sel
    return list(QUICK_DEFAULT) if args.quick else list(ALL_SUITES)


def parse_threads(args, all_cores):
    if args.threads:
        out = []
        for t in args.threads.split(","):
            t = t.strip().lower()
            if not t:
                continue
            n = all_cores if t in ("all", "max") else int(t)
            if n < 1:
                sys.exit("bench: thread counts must be >= 1")
            if n not in out:
                out.append(n)
        return out
    return [all_cores] if args.quick else sorted({1, all_cores})


# --------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------
def _pct(gbs, ref):
    return "–" if gbs is None or not ref else "%.0f%%" % (100.0 * gbs / ref)


def norm_table(rows, suite, copy_gbs):
    from _norm_suites import SUITES
    spec = SUITES[suite]
    lines = ["### %s" % spec["title"], "",
             "%s; GB/s = bytes / median time; %% copy = GB/s / large np.copyto GB/s (%s GB/s); "
             "normcy × = median time of that implementation / normcy's (>1: normcy faster). "
             "torch: `%s`; NumPy: `%s`; ORT: %s."
             % (spec["formula"], fmt_gbs(copy_gbs), spec["torch"], spec["numpy"], spec["ort_op"]),
             ""]
    first = "shape" if suite == "batch_norm" else "N×H"
    body = []
    for row in rows:
        ref = row["impls"].get(row["ref"]) if row["ref"] else None
        for name, r in row["impls"].items():
            if "error" in r:
                body.append([row["case"], row["threads"], name, "error: " + r["error"][:80],
                             "", "", "", ""])
                continue
            x = None
            if ref is not None and name != row["ref"]:
                x = r["median_s"] / ref["median_s"]
            flag = "" if r.get("check_ok", True) else "  ⚠ max err %.1e" % r["max_abs_err"]
            body.append([row["case"].replace("x", "×"), row["threads"], name,
                         fmt_us(r["median_s"]) + (" †" if r.get("contended") else ""), fmt_gbs(r.get("gbs")), _pct(r.get("gbs"), copy_gbs),
                         "—" if name == row["ref"] else fmt_x(x), flag])
    hdr = [first, "T", "implementation", "median µs", "GB/s", "% copy", "normcy ×", "check"]
    if not any(b[-1] for b in body):
        hdr = hdr[:-1]
        body = [b[:-1] for b in body]
    lines.append(md_table(hdr, body))
    if any(r.get("contended") for row in rows for r in row["impls"].values()):
        lines.append("")
        lines.append("_† most samples of this figure were taken while this process's threads "
                     "waited for a CPU (run-queue delay, schedstat); it is the median of all "
                     "samples and less reliable._")
    noisy = [r for r in rows if (r.get("noise_other_cpu_share") or 0) > 0.1]
    if noisy:
        lines.append("")
        lines.append("_other processes used >10%% of the CPUs during %d of %d rows (max %.0f%%)%s._"
                     % (len(noisy), len(rows),
                        100 * max(r["noise_other_cpu_share"] for r in noisy),
                        "; under --realtime they ran only when a core was free"
                        if all(r.get("sched_fifo") for r in rows) else
                        "; samples in which this process's threads waited for a CPU are "
                        "left out of the medians"))
    return "\n".join(lines)


def ceiling_table(rows):
    names = []
    for row in rows:
        for n in row["impls"]:
            if n not in names:
                names.append(n)
    lines = ["### Memory-bandwidth ceiling (same run)", "",
             "float32 arrays; np.copyto moves 2× the array bytes, np.add 3× (read a, b, write c); "
             "GB/s = bytes moved / median time. The large-array np.copyto figure is the "
             "reference for every '% copy' column.", ""]
    body = []
    for row in rows:
        cells = [row["case"] + (" (end of run)" if row.get("end") else "")]
        for n in names:
            r = row["impls"].get(n)
            if r is None or "error" in r:
                cells.append("–")
            else:
                cells.append("%s µs · %s GB/s" % (fmt_us(r["median_s"]), fmt_gbs(r["gbs"])))
        body.append(cells)
    lines.append(md_table(["array size"] + names, body))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# targets (issue 3)
# --------------------------------------------------------------------------------------
def evaluate_targets(rows, copy_gbs, all_cores):
    idx = {(r["suite"], r["case"], r["threads"]): r for r in rows if r["suite"] in NORM_SUITES}
    tg = Targets("† threads waited for a CPU")
    med, fastest, add, forget = tg.med, tg.fastest, tg.add, tg.forget

    def ref_t(row):
        return med(row, row["ref"]) if row and row["ref"] else None

    T = all_cores

    def rival(suite, case, fam):
        """A competitor's best time: the fastest of its implementations at all cores and, when
        the run measured one thread too, at one thread (normcy's figure is its own automatic
        choice, which may be one thread: the competitors get the same choice)."""
        ts = [fastest(r, fam) for r in (idx.get((suite, case, T)), idx.get((suite, case, 1)))
              if r is not None]
        ts = [t for t in ts if t]
        return min(ts) if ts else None

    row = idx.get(("add_layer_norm", "1x384", T))
    if row:
        t_ref, t_t = ref_t(row), rival("add_layer_norm", "1x384", "torch")
        add("add_layer_norm 1×384: ≥ 2.5× torch (x + r then layer_norm)",
            t_t / t_ref if t_ref and t_t else None, 2.5)
    goals = {"32x384": (("torch", 1.8, "torch"),
                        ("ort", 8.0, "ORT SkipLayerNormalization (faster of iobind/run)"),
                        ("numpy", 15.0, "NumPy")),
             "4096x768": (("torch", 1.6, "torch"),
                          ("numpy", 15.0, "NumPy"))}
    for case in ("32x384", "4096x768"):
        row = idx.get(("add_layer_norm", case, T))
        if not row:
            continue
        for fam, goal, what in goals[case]:
            t_ref = ref_t(row)
            t_o = rival("add_layer_norm", case, fam)
            add("add_layer_norm %s: ≥ %g× %s" % (case.replace("x", "×"), goal, what),
                t_o / t_ref if t_o and t_ref else None, goal)
    row = idx.get(("add_layer_norm", "16384x1024", T))
    if row and row["ref"] and copy_gbs:
        med(row, row["ref"])
        g = row["impls"][row["ref"]].get("gbs")
        # the copies timed in the same row, side by side (else the run's ceiling)
        in_row = copy_gbs_of(row)
        ceil = in_row or copy_gbs
        add("add_layer_norm 16384×1024: ≥ 80% of copy bandwidth", g / ceil if g else None,
            0.8, kind="fraction",
            note="copy %.1f GB/s %s" % (ceil, "in the same row" if in_row else "(run ceiling)"))
    for suite in ("layer_norm", "rms_norm", "batch_norm"):
        for (s, case, t), row in idx.items():
            if s != suite or t != T:
                continue
            t_ref = ref_t(row)
            others = [x for x in (rival(s, case, "torch"), rival(s, case, "ort")) if x]
            if others and t_ref:
                add("%s %s: at least as fast as the fastest of torch/ORT" % (suite, case.replace("x", "×")),
                    min(others) / t_ref, 1.0)
            forget()
            per_array = 4 * int(np.prod(row["shape"]))
            if out_of_cache(per_array, rows, copy_gbs) and copy_gbs and row["ref"]:
                med(row, row["ref"])
                g = row["impls"][row["ref"]].get("gbs")
                add("%s %s (out of cache): ≥ 80%% of copy bandwidth" % (suite, case.replace("x", "×")),
                    g / copy_gbs if g else None, 0.8, kind="fraction")
    row = idx.get(("layer_norm", "32x384", 1))
    if row and "normcy nt=1" in row["impls"]:
        t1 = med(row, "normcy nt=1")
        if t1:
            ns = t1 * 1e9 / (32 * 384)
            add("layer_norm 32×384 single-threaded, in cache: ≤ 0.25 ns per element",
                0.25 / ns, 1.0, note="%.3f ns/element" % ns)
    # "where one thread beats all cores on a small input, normcy picks that itself"
    # (small: at most SMALL_INPUT_BYTES moved per call)
    if T != 1:
        for (s, case, t), row in idx.items():
            if t != T or "normcy" not in row["impls"] or row["bytes"] > SMALL_INPUT_BYTES:
                continue
            # one thread measured in the same row (same competitors' thread pools) when the
            # row has it, else the 1-thread row's
            r1 = row if "normcy nt=1" in row["impls"] else idx.get((s, case, 1))
            if not r1:
                continue
            forget()
            t1 = med(r1, "normcy nt=1")
            tn = med(row, "normcy nt=%d" % T)
            ta = med(row, "normcy")
            if not (t1 and tn and ta and t1 < 0.9 * tn):
                forget()
            else:
                add("%s %s: auto thread choice ≈ the faster of 1T / %dT" % (s, case.replace("x", "×"), T),
                    min(t1, tn) / ta, 0.9, note="1T %.2f µs, %dT %.2f µs, auto %.2f µs"
                    % (t1 * 1e6, T, tn * 1e6, ta * 1e6))
    return tg.out


def out_of_cache(per_array, rows, copy_gbs):
    """Does an array of this size stream from memory? Yes when np.copyto of the same size,
    measured in this run, is not more than 10% faster than the 256 MB copy; without such a
    measurement, when the array is at least OUT_OF_CACHE_BYTES. Arrays under 16 MiB always
    count as cached (small copies are bound by call overhead, not bandwidth)."""
    if per_array < (16 << 20):
        return False
    for r in rows:
        if r["suite"] == "ceiling" and r.get("array_bytes") == per_array and not r.get("end"):
            g = r["impls"].get("numpy copyto", {}).get("gbs")
            if g and copy_gbs:
                return g <= 1.1 * copy_gbs
    return per_array >= OUT_OF_CACHE_BYTES


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    if args.realtime and argv is None and os.sched_getscheduler(0) not in (os.SCHED_FIFO, os.SCHED_RR):
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        except (OSError, AttributeError) as exc:
            sys.exit("bench: --realtime: cannot switch to SCHED_FIFO (%s)" % exc)
        # Re-execute so that every thread (OpenBLAS's start at import) inherits the policy.
        os.execv(sys.executable, [sys.executable] + sys.argv)
    t_start = time.perf_counter()
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if os.environ.get(var):
            sys.stderr.write("bench: warning: %s=%s is set; it changes OpenBLAS's kernels and "
                             "cache blocking (run with `env -u %s ...`)\n"
                             % (var, os.environ[var], var))
    suites = select_suites(args)
    cfg = Config(args.quick)
    if not args.default_malloc:
        from _common import steady_allocator
        steady_allocator()

    nc, nc_err = _import_normcy()
    if nc is None:
        sys.stderr.write("bench: warning: normcy cannot be imported (%s); measuring the other "
                         "implementations only\n" % nc_err)
    torch, torch_err = (None, "disabled by --no-torch") if args.no_torch else _import_torch()
    ort, ort_err = (None, "disabled by --no-ort") if args.no_ort else _import_ort()
    for name, err in (("PyTorch", torch_err), ("ONNX Runtime", ort_err)):
        if err:
            sys.stderr.write("bench: %s not used (%s)\n" % (name, err))

    try:
        all_cores = len(os.sched_getaffinity(0))
    except AttributeError:
        all_cores = os.cpu_count() or 1
    ctx = Ctx()
    ctx.nc, ctx.torch, ctx.ort, ctx.cfg, ctx.args = nc, torch, ort, cfg, args
    ctx.all_cores = all_cores
    ctx.threads = parse_threads(args, all_cores)
    ctx.normcy_default_threads = nc.get_num_threads() if nc is not None else None
    ctx.root = ROOT
    if torch is not None:
        torch.set_num_threads(max(ctx.threads))

    env = environment(nc, torch, ort, ROOT)
    sys.stderr.write("bench: %s, %d cores; normcy %s (%s); numpy %s; torch %s; onnxruntime %s; "
                     "threads %s; suites %s\n"
                     % (env["cpu"].get("model"), all_cores,
                        env["versions"]["normcy"],
                        os.path.dirname(getattr(nc, "__file__", "") or "") or "-",
                        np.__version__, env["versions"]["torch"], env["versions"]["onnxruntime"],
                        ",".join(map(str, ctx.threads)), ",".join(suites)))

    from _norm_suites import (BN_CASES, LN_SHAPES_FULL, LN_SHAPES_QUICK, NormBench, ceiling_row)
    import _model_suites

    # ---------------- plan ------------------------------------------------------------
    tasks = []          # (label, callable -> row dict | list | None)
    norm_sel = [s for s in NORM_SUITES if s in suites]
    ln_sel = [s for s in norm_sel if s != "batch_norm"]
    want = None
    if args.shapes:
        want = {w.strip().lower().replace("×", "x") for w in args.shapes.split(",") if w.strip()}

    def shapes_for(suite):
        if want is not None:
            return [sh for sh in LN_SHAPES_FULL if "%dx%d" % sh in want]
        if not args.quick:
            return LN_SHAPES_FULL
        return LN_SHAPES_QUICK.get(suite, LN_SHAPES_QUICK["*"])
    shapes = sorted({sh for s in ln_sel for sh in shapes_for(s)}, key=lambda t: t[0] * t[1])
    nb = NormBench(ctx)

    ceiling_sizes = []
    if "ceiling" in suites:
        per_array = {4 * N * H for N, H in shapes}
        if "batch_norm" in suites:
            per_array |= {4 * int(np.prod(s)) for _, s, _ in BN_CASES}
        if args.quick:
            per_array = {n for n in per_array if n >= 16 << 10}
        ceiling_sizes = sorted(per_array)
    if norm_sel or "ceiling" in suites:
        tasks.append(("ceiling %d MB (copy reference)" % (LARGE_COPY_BYTES >> 20),
                      lambda: ceiling_row(ctx, LARGE_COPY_BYTES, ctx.threads)))
    for nbytes in ceiling_sizes:
        if nbytes != LARGE_COPY_BYTES:
            tasks.append(("ceiling %d B" % nbytes,
                          lambda nbytes=nbytes: ceiling_row(ctx, nbytes, ctx.threads)))
    for (N, H) in shapes:
        for suite in ln_sel:
            if (N, H) not in shapes_for(suite):
                continue
            for T in ctx.threads:
                tasks.append(("%s %dx%d T=%d" % (suite, N, H, T),
                              lambda suite=suite, N=N, H=H, T=T: nb.ln_row(suite, N, H, T)))
    if "batch_norm" in suites:
        for label, shape, axis in BN_CASES:
            if want is not None and label.split()[0].lower() not in want:
                continue
            for T in ctx.threads:
                tasks.append(("batch_norm %s T=%d" % (label, T),
                              lambda label=label, shape=shape, axis=axis, T=T: nb.bn_row(label, shape, axis, T)))
    tasks.append(("release", lambda: nb.release()))
    skipped = {}
    model_suites = [s for s in ("ops", "gemm", "encoder", "minilm") if s in suites]
    if model_suites and os.sched_getscheduler(0) in (os.SCHED_FIFO, os.SCHED_RR):
        # Two spin-waiting pools in one process (OpenBLAS + OpenMP) would starve each other
        # under SCHED_FIFO: the model suites run at normal priority.
        tasks.append(("release", _drop_realtime))
    for suite, planner in (("ops", _model_suites.plan_ops),
                           ("gemm", _model_suites.plan_gemm),
                           ("encoder", _model_suites.plan_encoder),
                           ("minilm", _model_suites.plan_minilm)):
        if suite not in suites:
            continue
        planned, why = planner(ctx)
        if why:
            skipped[suite] = why
            sys.stderr.write("bench: skipping suite %s: %s\n" % (suite, why))
        else:
            tasks += planned
    if norm_sel or "ceiling" in suites:
        tasks.append(("ceiling %d MB (end of run)" % (LARGE_COPY_BYTES >> 20),
                      lambda: dict(ceiling_row(ctx, LARGE_COPY_BYTES, ctx.threads), end=True)))

    # ---------------- run -------------------------------------------------------------
    prog = Progress(sum(1 for t in tasks if t[0] != "release"), enabled=not args.no_progress)
    rows = []
    failures = []
    for label, fn in tasks:
        if label == "release":
            fn()
            continue
        prog.start(label)
        if args.quiet_wait > 0:
            waited, share = wait_quiet(args.quiet_wait)
            if share is not None and share > 0.15:
                prog.note("bench: machine still busy (others use %.0f%% of the CPUs) after "
                          "%.0f s; measuring %s anyway" % (100 * share, waited, label))
        try:
            res = fn()
        except Exception as exc:
            failures.append({"task": label, "error": "%s: %s" % (type(exc).__name__, exc),
                             "traceback": traceback.format_exc()})
            prog.note("bench: %s failed: %s: %s" % (label, type(exc).__name__, exc))
            res = None
        pol = os.sched_getscheduler(0)
        for r in ([res] if isinstance(res, dict) else res if isinstance(res, list) else []):
            r["sched_fifo"] = pol in (os.SCHED_FIFO, os.SCHED_RR)
            rows.append(r)
        prog.step()
    prog.finish()

    # ---------------- report ----------------------------------------------------------
    ceil_rows = [r for r in rows if r["suite"] == "ceiling"]
    big = [r for r in ceil_rows if r.get("array_bytes") == LARGE_COPY_BYTES
           and "gbs" in r["impls"].get("numpy copyto", {})]
    # the copy ceiling: the faster of NumPy's one-thread copy and PyTorch's copy_ at each
    # measured thread count (a normcy figure at T threads is compared with a copy that
    # could use T threads too)
    copy_gbs = max((g for g in map(copy_gbs_of, big) if g), default=None)

    out = []
    out.append("## normcy benchmark (%s)\n" % ("--quick" if args.quick else "full"))
    out.append("%s, %d cores; normcy %s, NumPy %s, PyTorch %s, ONNX Runtime %s; median of many "
               "repeats per row, implementations interleaved in one process; T = threads "
               "(normcy = its default/auto choice, normcy nt=N = num_threads=N per call).\n"
               % (env["cpu"].get("model"), all_cores, env["versions"]["normcy"], np.__version__,
                  env["versions"]["torch"] or "absent", env["versions"]["onnxruntime"] or "absent"))
    if env.get("sched_policy", {}) and env["sched_policy"].get("policy") in ("SCHED_FIFO", "SCHED_RR"):
        out.append("Run with `--realtime` (SCHED_FIFO) so that other processes on this shared "
                   "machine could not preempt the measured threads; the encoder and minilm "
                   "suites ran at normal priority.\n")
    if copy_gbs:
        out.append("Copy ceiling: the fastest copy of %d MB float32 arrays (np.copyto, or "
                   "PyTorch's copy_ at any measured thread count; at the start or the end of the "
                   "run) = **%s GB/s**.\n" % (LARGE_COPY_BYTES >> 20, fmt_gbs(copy_gbs)))
    out.append("Allocator: %s.\n" % (env.get("allocator") or "defaults (--default-malloc)"))
    if "ceiling" in suites and ceil_rows:
        out.append(ceiling_table(sorted(ceil_rows, key=lambda r: (r.get("end", False), r["array_bytes"]))) + "\n")
    from _norm_suites import BN_CASES as _BN, LN_SHAPES_FULL as _LN
    order = ["%dx%d" % sh for sh in _LN] + [c[0] for c in _BN]
    for suite in NORM_SUITES:
        srows = sorted((r for r in rows if r["suite"] == suite),
                       key=lambda r: (order.index(r["case"]) if r["case"] in order else 99, r["threads"]))
        if srows:
            out.append(norm_table(srows, suite, copy_gbs) + "\n")
    for suite in ("ops", "gemm", "encoder", "minilm"):
        srows = [r for r in rows if r["suite"] == suite]
        if srows:
            out.append(_model_suites.table(suite, srows) + "\n")
        elif suite in skipped:
            out.append("### %s\n\nskipped: %s\n" % (suite, skipped[suite]))
    targets = evaluate_targets(rows, copy_gbs, all_cores) if norm_sel else []
    if targets:
        out.append(targets_table(targets, "Norm and BatchNorm kernel targets (all cores, "
                                          "this run)") + "\n")
    extra = _model_suites.targets(rows, all_cores)
    if extra:
        out.append(targets_table(extra, "GEMM / encoder / MiniLM speed targets (this run)")
                   + "\n")
    if failures:
        out.append("### Failures\n\n" + "\n".join("- %s: %s" % (f["task"], f["error"]) for f in failures) + "\n")
    elapsed = time.perf_counter() - t_start
    out.append("_%s; total %.0f s._\n" % ("python bench/run.py " + " ".join(sys.argv[1:]), elapsed))
    # every table names the CPU, its widest SIMD extension and the kernel variant measured
    flags = set(env["cpu"].get("flags") or [])
    isa_cpu = ("AVX-512" if "avx512f" in flags else "AVX2+FMA" if "avx2" in flags and "fma" in flags
               else "SSE2/other")
    try:
        variant = nc._norms.kernel_isa() if nc is not None else "-"
    except Exception:  # pragma: no cover - very old build
        variant = "?"
    stamp = "_CPU: %s (%s, %d cores); normcy kernel variant: %s._" % (
        env["cpu"].get("model"), isa_cpu, all_cores, variant)
    out = [(o.split("\n", 1)[0] + "\n\n" + stamp + "\n" + (o.split("\n", 1)[1] if "\n" in o else ""))
           if o.startswith("### ") else o for o in out]
    text = "\n".join(out)
    sys.stdout.write(text)
    sys.stdout.flush()

    if args.md:
        _ensure_dir(args.md)
        with open(args.md, "w") as f:
            f.write(text)
    if args.json:
        env["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
        doc = {
            "mode": "quick" if args.quick else "full",
            "suites": suites,
            "skipped": skipped,
            "threads": ctx.threads,
            "all_cores": all_cores,
            "timing": {"sample_s": cfg.sample_s, "budget_s": cfg.budget_s,
                       "min_samples": cfg.min_samples, "max_samples": cfg.max_samples,
                       "rounds": cfg.rounds, "statistic": "median of samples; a sample = mean of "
                       "calls_per_sample back-to-back calls timed with perf_counter_ns"},
            "copy_ceiling_gbs": copy_gbs,
            "out_of_cache_bytes_per_array": OUT_OF_CACHE_BYTES,
            "environment": env,
            "rows": rows,
            "targets": targets + extra,
            "cpu_isa": isa_cpu,
            "kernel_variant": variant,
            "failures": failures,
            "elapsed_s": elapsed,
            "markdown": text,
        }
        _ensure_dir(args.json)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1, default=_json_default)
        sys.stderr.write("bench: wrote %s\n" % args.json)
    if args.plot:
        try:
            import _plot
            _ensure_dir(args.plot)
            _plot.plot(rows, copy_gbs, args.plot, title="normcy bench (%s), %s, %d cores"
                       % ("quick" if args.quick else "full", env["cpu"].get("model"), all_cores))
            sys.stderr.write("bench: wrote %s\n" % args.plot)
        except ImportError as exc:
            sys.stderr.write("bench: --plot needs matplotlib (%s)\n" % exc)
    return 1 if failures else 0


def _drop_realtime():
    """Switch every thread of this process back to SCHED_OTHER."""
    for t in os.listdir("/proc/self/task"):
        try:
            os.sched_setscheduler(int(t), os.SCHED_OTHER, os.sched_param(0))
        except OSError:
            pass


def wait_quiet(max_s, threshold=0.15, window=0.3):
    """Wait (up to max_s) until other processes use less than ``threshold`` of the CPUs."""
    from _common import NoiseMeter
    t0 = time.perf_counter()
    share = None
    while True:
        m = NoiseMeter()
        time.sleep(window)
        share = m.share()
        if share is None or share < threshold or time.perf_counter() - t0 > max_s:
            return time.perf_counter() - t0, share


def _ensure_dir(path):
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return repr(o)


if __name__ == "__main__":
    sys.exit(main())
