"""Build and runtime configuration report (``normcy.show_config()``)."""
import sys

import numpy as np


def get_config():
    """Return the build and runtime configuration as a dict.

    Keys: version, openmp, openmp_runtime, default_threads, available_cpus, kernel_isa,
    kernel_variant, vector_bytes, isa_cap, isa_cap_ignored, isa_cap_ignored_reason,
    supported_variants, gemm_tile, gemm_k_block, l1d_bytes, streaming_min_bytes, llc_bytes,
    runtime_dispatch, native_build, compile_args, link_args, compiler, compiler_version,
    user_cflags, numpy, blas, python, fork_serial, omp_wait.
    """
    from normcy import _build_info as bi
    from normcy._version import __version__
    from normcy import _gemm, _norms, _parallel

    isa = _norms.isa_info()
    blocking = _gemm.kernel_blocking()
    blas = None
    try:
        cfg = np.show_config(mode="dicts")
        b = cfg.get("Build Dependencies", {}).get("blas", {})
        blas = ("%s %s" % (b.get("name", "?"), b.get("version", ""))).strip()
    except Exception:  # pragma: no cover - very old NumPy
        pass
    return {
        "version": __version__,
        "openmp": bi.openmp,
        "openmp_runtime": bi.openmp_runtime,
        "default_threads": _parallel.get_num_threads(),
        "available_cpus": _parallel.available_cpus(),
        "kernel_isa": _norms.kernel_isa(),
        "kernel_variant": isa["name"],
        "vector_bytes": isa["vector_bytes"],
        # an ignored (invalid) cap is not a cap
        "isa_cap": (isa["cap"] or None) if not isa["cap_invalid"] else None,
        "isa_cap_ignored": isa["cap"] if isa["cap_invalid"] else None,
        "isa_cap_ignored_reason": isa["cap_ignored_reason"] or None,
        "supported_variants": isa["supported"],
        "gemm_tile": "%dx%d" % _gemm.kernel_shape(),
        "gemm_k_block": blocking[1],
        "l1d_bytes": blocking[0],
        "streaming_min_bytes": _norms.streaming_info()["min_bytes"],
        "llc_bytes": _norms.streaming_info()["llc_bytes"],
        "runtime_dispatch": _norms.have_runtime_dispatch(),
        "native_build": bi.native,
        "compile_args": list(bi.compile_args),
        "link_args": list(bi.link_args),
        "compiler": bi.compiler,
        "compiler_version": getattr(bi, "compiler_version", None),
        "user_cflags": getattr(bi, "user_cflags", ""),
        "numpy": np.__version__,
        "blas": blas,
        "python": sys.version.split()[0],
        "fork_serial": _parallel.fork_serial(),
        "omp_wait": __import__("normcy")._omp_wait_note,
    }


def show_config(file=None):
    """Print how normcy was built and how it runs here.

    Shows the version, whether OpenMP is enabled and which runtime, the default thread
    count, how idle OpenMP threads wait (``GOMP_SPINCOUNT`` / ``OMP_WAIT_POLICY``), the
    SIMD kernel variant selected at run time (and the variants this CPU supports, with the
    ``NORMCY_MAX_ISA`` cap if one is set, or why it was ignored), the GEMM's K block and
    the L1 data cache it was sized for, the size from which calls stream their outputs
    (non-temporal stores) and the last-level cache it derives from, the compiler flags
    used, and the NumPy version with its BLAS.

    Parameters
    ----------
    file : file-like, optional
        Where to print (default ``sys.stdout``).
    """
    c = get_config()
    out = file if file is not None else sys.stdout
    omp = ("yes (%s)" % c["openmp_runtime"]) if c["openmp"] else "NO (serial kernels)"
    lines = [
        "normcy %s" % c["version"],
        "  OpenMP:           %s" % omp,
        "  default threads:  %d (CPUs available: %d)%s" % (
            c["default_threads"], c["available_cpus"],
            "  [serial: forked after OpenMP use]" if c["fork_serial"] else ""),
        "  OpenMP waiting:   %s" % c["omp_wait"],
        "  kernel variant:   %s%s, %d-byte vectors, GEMM tile %s" % (
            c["kernel_isa"], " (runtime dispatch)" if c["runtime_dispatch"] else "",
            c["vector_bytes"], c["gemm_tile"]),
        "  GEMM K block:     <= %d (L1 data cache %d KB)" % (c["gemm_k_block"],
                                                           c["l1d_bytes"] // 1024),
        "  streamed outputs: calls touching >= %.3g MB (last-level cache %.3g MB)" % (
            c["streaming_min_bytes"] / 2**20, c["llc_bytes"] / 2**20),
        "  variants on CPU:  %s%s" % (", ".join(c["supported_variants"]),
                                      "  [capped by NORMCY_MAX_ISA=%s]" % c["isa_cap"]
                                      if c["isa_cap"] else
                                      "  [NORMCY_MAX_ISA=%r ignored: %s]"
                                      % (c["isa_cap_ignored"], c["isa_cap_ignored_reason"])
                                      if c["isa_cap_ignored"] else ""),
        "  native build:     %s" % ("yes (-march=native)" if c["native_build"] else
                                    "no (portable, runtime dispatch)" if c["runtime_dispatch"]
                                    else "no; single variant: " + c["kernel_isa"]),
        "  user CFLAGS:      %s" % (c["user_cflags"] or "(none)"),
        "  compiler:         %s%s" % (c["compiler"], " (%s)" % c["compiler_version"]
                                       if c["compiler_version"] else ""),
        "  compile args:     %s" % " ".join(c["compile_args"]),
        "  link args:        %s" % " ".join(c["link_args"]),
        "  NumPy:            %s (BLAS: %s)" % (c["numpy"], c["blas"]),
        "  Python:           %s" % c["python"],
    ]
    print("\n".join(lines), file=out)
