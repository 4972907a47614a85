"""Build script for normcy: Cython extensions with an OpenMP probe.

Environment switches
--------------------
NORMCY_NATIVE=1          compile for this CPU only (``-march=native``); the default build
                         is portable and picks the widest SIMD kernels at run time.
NORMCY_REQUIRE_OPENMP=1  fail the build if OpenMP cannot be compiled, linked and run.
NORMCY_DISABLE_OPENMP=1  build serial kernels on purpose.
CFLAGS=-march=...       a target with AVX or more: one kernel variant for that target (no
                         runtime dispatch), as NORMCY_NATIVE=1; show_config() says so.
NORMCY_SANITIZE=address,undefined
                         instrument the extensions with these sanitizers (gcc/clang
                         ``-fsanitize=...``, frame pointers, debug info, -O1, any UBSan
                         finding fatal).  Testing only: run Python with the ASan runtime
                         preloaded, e.g. ``LD_PRELOAD=$(gcc -print-file-name=libasan.so)
                         ASAN_OPTIONS=detect_leaks=0 pytest ...`` (.ci/run, stage 3).
"""
import glob
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext as _build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _compiler():
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    return cc.split()


def _probe_openmp():
    """Compile, link and run a tiny OpenMP program. Returns (ok, runtime, flags, detail)."""
    if sys.platform == "darwin":
        cflags, ldflags = ["-Xpreprocessor", "-fopenmp"], ["-lomp"]
    elif sys.platform == "win32":
        return False, None, [], "MSVC OpenMP probe not implemented"
    else:
        cflags, ldflags = ["-fopenmp"], ["-fopenmp"]
    src = r"""
#include <omp.h>
#include <stdio.h>
int main(void) {
    int n = 0;
    #pragma omp parallel reduction(+:n)
    n += 1;
    printf("%d %d\n", n, omp_get_max_threads());
    return n >= 1 ? 0 : 1;
}
"""
    tmp = tempfile.mkdtemp(prefix="normcy-omp-")
    try:
        c = os.path.join(tmp, "probe.c")
        exe = os.path.join(tmp, "probe")
        with open(c, "w") as f:
            f.write(src)
        cmd = _compiler() + cflags + [c, "-o", exe] + ldflags
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            return False, None, [], "compile/link failed: " + (r.stderr.strip()[-400:] or "?")
        r = subprocess.run([exe], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            return False, None, [], "probe program failed to run"
        # Which runtime got linked?
        runtime = "unknown"
        ldd = shutil.which("ldd")
        if ldd:
            out = subprocess.run([ldd, exe], capture_output=True, text=True).stdout
            for name in ("libgomp", "libomp", "libiomp5"):
                if name in out:
                    runtime = name
                    break
        return True, runtime, (cflags, ldflags), "ok"
    except Exception as exc:  # pragma: no cover - depends on toolchain
        return False, None, [], "probe error: %r" % (exc,)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _supports_flag(flag):
    tmp = tempfile.mkdtemp(prefix="normcy-flag-")
    try:
        c = os.path.join(tmp, "f.c")
        with open(c, "w") as f:
            f.write("int main(void){return 0;}\n")
        r = subprocess.run(_compiler() + [flag, "-Werror", c, "-o", os.path.join(tmp, "f")],
                           capture_output=True, text=True)
        return r.returncode == 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _compiler_version():
    try:
        r = subprocess.run(_compiler() + ["--version"], capture_output=True, text=True,
                           timeout=60)
        return r.stdout.splitlines()[0].strip() if r.returncode == 0 and r.stdout else None
    except Exception:  # pragma: no cover - depends on toolchain
        return None


if sys.platform == "win32" and "gcc" not in " ".join(_compiler()) \
        and "clang" not in " ".join(_compiler()):
    raise SystemExit("normcy: the C kernels use GCC/Clang vector extensions; MSVC cannot "
                     "build them.  Use GCC or Clang (e.g. MinGW-w64, clang-cl is not enough).")

native = _env_flag("NORMCY_NATIVE")
sanitize = [v.strip() for v in os.environ.get("NORMCY_SANITIZE", "").split(",") if v.strip()]
require_omp = _env_flag("NORMCY_REQUIRE_OPENMP")
disable_omp = _env_flag("NORMCY_DISABLE_OPENMP")

if disable_omp:
    omp_ok, omp_runtime, omp_flags, omp_detail = False, None, [], "disabled by NORMCY_DISABLE_OPENMP"
else:
    omp_ok, omp_runtime, omp_flags, omp_detail = _probe_openmp()

if not omp_ok and disable_omp:
    if require_omp:
        raise SystemExit("normcy: NORMCY_REQUIRE_OPENMP=1 and NORMCY_DISABLE_OPENMP=1 "
                         "contradict each other; unset one")
    sys.stderr.write("normcy: serial kernels (NORMCY_DISABLE_OPENMP=1)\n")
elif not omp_ok:
    msg = ("\n" + "!" * 78 + "\n"
           "normcy: OpenMP is NOT available (%s).\n"
           "normcy: building SERIAL kernels; every call will use one core.\n"
           "normcy: install an OpenMP-capable compiler (gcc, or clang + libomp) and rebuild,\n"
           "normcy: or set NORMCY_REQUIRE_OPENMP=1 to make this a hard error.\n" % omp_detail
           + "!" * 78 + "\n")
    sys.stderr.write(msg)
    if require_omp:
        raise SystemExit("normcy: NORMCY_REQUIRE_OPENMP=1 but OpenMP is unavailable: " + omp_detail)

compile_args = []
link_args = []
if sys.platform != "win32":
    # -ffp-contract=off: the kernels write every fused multiply-add explicitly (nc_simd.h,
    # ncv_fma); GCC's default, fusing a * b + c where it sees fit, made results depend on
    # the compiler version and on the inlined copy of a function that computed them.
    compile_args += ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
    if _supports_flag("-fno-semantic-interposition"):
        compile_args.append("-fno-semantic-interposition")
    if native:
        compile_args.append("-march=native")
    if not sanitize:
        # no debug info in the shipped extensions (Python's own CFLAGS carry -g: 10.5 MB
        # of .so files instead of 1.4 MB)
        compile_args.append("-g0")
    # Never -ffast-math: it breaks NaN/Inf handling and can set FTZ/DAZ for the whole process.
if omp_ok:
    compile_args += omp_flags[0]
    link_args += omp_flags[1]
if sanitize:
    if sys.platform == "win32":
        raise SystemExit("normcy: NORMCY_SANITIZE is supported with gcc/clang only")
    san = "-fsanitize=" + ",".join(sanitize)
    # -O1: the sanitizers' usual level (fast enough, accurate stacks); the later -O1
    # overrides the -O3 above
    compile_args += [san, "-fno-omit-frame-pointer", "-g", "-O1"]
    if "undefined" in sanitize:
        compile_args.append("-fno-sanitize-recover=undefined")
    link_args += [san]

macros = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
if native:
    macros.append(("NC_NATIVE_BUILD", "1"))


def _build_info_text():
    """normcy/_build_info.py: what the build did, for normcy.show_config()."""
    rows = [("openmp", bool(omp_ok)), ("openmp_runtime", omp_runtime if omp_ok else None),
            ("openmp_detail", omp_detail), ("openmp_disabled", bool(disable_omp)),
            ("native", bool(native)), ("sanitize", sanitize), ("compile_args", compile_args),
            ("link_args", link_args), ("compiler", " ".join(_compiler())),
            ("compiler_version", _compiler_version()),
            ("user_cflags", " ".join(os.environ.get(k, "") for k in ("CFLAGS", "CPPFLAGS")
                                     if os.environ.get(k)).strip()),
            ("platform", platform.platform()), ("build_numpy", np.__version__)]
    return ("# Generated by setup.py's build_ext. Do not edit.\n"
            + "".join("%s = %r\n" % kv for kv in rows))


class build_ext(_build_ext):
    """build_ext that also writes normcy/_build_info.py beside the extensions it built
    (into the build directory, or the source tree for --inplace): written by the build
    that made the extensions, not by every setup.py run (sdist, egg_info, --version)."""

    def run(self):
        super().run()
        root = HERE if self.inplace else self.build_lib
        path = os.path.join(root, "normcy", "_build_info.py")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(_build_info_text())

directives = {
    "language_level": 3,
    "boundscheck": False,
    "wraparound": False,
    "initializedcheck": False,
    "cdivision": True,
    "nonecheck": False,
    "embedsignature": True,
}

extensions = []
for pyx in sorted(glob.glob(os.path.join("normcy", "_*.pyx"))):
    modname = "normcy." + os.path.splitext(os.path.basename(pyx))[0]
    extensions.append(Extension(
        modname,
        [pyx],
        include_dirs=[np.get_include(), os.path.join("normcy", "src")],
        define_macros=macros,
        depends=sorted(glob.glob(os.path.join("normcy", "src", "*.h"))
                       + glob.glob(os.path.join("normcy", "*.pxd"))),
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    ))

setup(
    cmdclass={"build_ext": build_ext},
    ext_modules=cythonize(
        extensions,
        compiler_directives=directives,
        annotate=_env_flag("NORMCY_ANNOTATE"),
    ),
)
