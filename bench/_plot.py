"""PNG plot: achieved GB/s against bytes moved, one panel per kernel, copy ceiling as a line."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from _norm_suites import NORM_SUITES  # noqa: E402

COLORS = {"normcy": "#d62728", "normcy nt": "#ff7f0e", "numpy": "#7f7f7f", "torch": "#1f77b4",
          "ort-iobind": "#2ca02c", "ort-run": "#98df8a"}


def _color(name):
    if name.startswith("normcy nt"):
        return COLORS["normcy nt"]
    return COLORS.get(name, "#9467bd")


def _label(name, T):
    if name == "numpy":
        return "numpy (1 thread)"
    if name == "normcy":
        return "normcy auto (%dT)" % T
    return "%s %dT" % (name, T)


def _ceiling(ax, ceil_rows, copy_gbs):
    pts = sorted((2 * r["array_bytes"], r["impls"]["numpy copyto"]["gbs"]) for r in ceil_rows
                 if not r.get("end") and "gbs" in r["impls"].get("numpy copyto", {}))
    if len(pts) > 1:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color="black", lw=1.0, alpha=0.6,
                label="np.copyto at that size")
    if copy_gbs:
        ax.axhline(copy_gbs, color="black", ls="--", lw=1, label="copy ceiling %.1f GB/s" % copy_gbs)
        ax.axhline(0.8 * copy_gbs, color="black", ls=":", lw=0.8, label="80% of copy ceiling")


def plot(rows, copy_gbs, path, title=""):
    ceil_rows = [r for r in rows if r["suite"] == "ceiling"]
    suites = [s for s in NORM_SUITES if any(r["suite"] == s for r in rows)]
    if not suites:
        suites = []
    n = max(1, len(suites))
    ncols = 3 if n > 2 else n
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.2 * ncols, 4.6 * nrows), squeeze=False)
    for i, suite in enumerate(suites):
        ax = axes[i // ncols][i % ncols]
        srows = [r for r in rows if r["suite"] == suite]
        threads = sorted({r["threads"] for r in srows})
        if suite == "batch_norm":
            _bn_bars(ax, srows, threads, copy_gbs)
        else:
            series = {}
            for r in srows:
                for name, res in r["impls"].items():
                    if "gbs" not in res:
                        continue
                    series.setdefault((name, r["threads"]), []).append((r["bytes"], res["gbs"]))
            for (name, T), pts in sorted(series.items()):
                if name == "numpy" and T != max(threads):
                    continue                     # NumPy is single-threaded: one line
                pts.sort()
                ls = "-" if T == max(threads) else "--"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3.5, ls=ls,
                        color=_color(name), label=_label(name, T),
                        lw=2.2 if name == "normcy" else 1.3)
            _ceiling(ax, ceil_rows, copy_gbs)
            ax.set_xscale("log")
            ax.set_xlabel("bytes moved per call (read + written)")
        ax.set_ylabel("GB/s")
        ax.set_title(suite)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6.5, loc="best", ncol=2, framealpha=0.7)
    for j in range(len(suites), nrows * ncols):
        axes[j // ncols][j % ncols].axis("off")
    if title:
        fig.suptitle(title + ("" if suites else " (no norm suites run)"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bn_bars(ax, srows, threads, copy_gbs):
    cases = []
    for r in srows:
        if r["case"] not in cases:
            cases.append(r["case"])
    names = []
    for r in srows:
        for n, res in r["impls"].items():
            if (n, r["threads"]) not in names and "gbs" in res:
                names.append((n, r["threads"]))
    width = 0.8 / max(1, len(names))
    names = [(n, T) for n, T in names if n != "numpy" or T == max(threads)]
    width = 0.8 / max(1, len(names))
    for k, (n, T) in enumerate(names):
        xs, ys = [], []
        for ci, case in enumerate(cases):
            for r in srows:
                if r["case"] == case and r["threads"] == T and "gbs" in r["impls"].get(n, {}):
                    xs.append(ci + (k - len(names) / 2 + 0.5) * width)
                    ys.append(r["impls"][n]["gbs"])
        ax.bar(xs, ys, width=width, color=_color(n), label=_label(n, T),
               hatch="" if T == max(threads) else "//", edgecolor="white")
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, fontsize=8)
    if copy_gbs:
        ax.axhline(copy_gbs, color="black", ls="--", lw=1, label="copy ceiling %.1f GB/s" % copy_gbs)
        ax.axhline(0.8 * copy_gbs, color="black", ls=":", lw=0.8, label="80% of copy ceiling")
