#!/usr/bin/env python
"""Corpus embedding throughput and memory: ``normcy embed`` vs in-process ``encode``, and
Ray Data.

    python bench/corpus.py                        # 20,000 lines; RSS at 8,000 and 20,000
    python bench/corpus.py --lines 20000 --rss-lines 8000,20000 --ray-lines 4000
    python bench/corpus.py --skip-ray --json bench/results/corpus.json

Measured, in one run on the same generated corpus (mixed-length English-like lines, 2 to
~120 words, deterministic):

1. in-process ``SentenceEncoder.encode(texts, batch_size=32)`` (all lines in memory,
   tokenized and sorted by length as a whole), sentences/s, model already loaded;
2. ``normcy embed -i corpus.txt -o out.parquet`` in a subprocess, sentences/s over the whole
   command (start-up, model load, reading, Parquet writing included) and its peak RSS.
   Both are also given per CPU-second (user + system time), which is steadier than wall
   time on a shared machine;
3. the command's peak RSS at each ``--rss-lines`` size (memory must not grow with the corpus;
   use sizes above the command's window of 4,096 records, which bounds what it holds);
4. Ray Data: ``map_batches(Embedder, compute=ActorPoolStrategy(size=2), num_cpus=1)``
   (2 workers x 1 thread) vs one process with 2 threads (``encode`` on the same lines),
   from the first measured batch's start to the last one's end (``ray.init``, worker
   start-up and model loads happen during 256 warm-up rows); the single-process figure is
   the mean of one measurement before and one after the Ray run.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

WORDS = ("the of and to in is was for on that with as by at from his an were are which "
         "this be have or had not but all they one their there been has when who will more "
         "no if out so said what up its about into than them can only other new some time "
         "could these two may then do first any my now such like our over man me even most "
         "made after also did many before must through back years where much your way well "
         "down should because each just those people how too little state good very make "
         "world still own see men work long get here between both life being under never "
         "search index vector embedding corpus naïve café résumé Zürich").split()


def make_corpus(path, n, seed=0):
    rng = np.random.default_rng(seed)
    lens = np.clip(rng.lognormal(2.6, 0.8, size=n).astype(int), 2, 120)
    with open(path, "w", encoding="utf-8") as f:
        for k in lens:
            f.write(" ".join(rng.choice(WORDS, size=int(k))) + ".\n")


def run_cli(args, env=None):
    """Run ``python -m normcy`` args; return (seconds, CPU seconds, peak RSS MiB)."""
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "normcy"] + args, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, env=env)
    err = p.stderr.read().decode()
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = 0
    dt = time.perf_counter() - t0
    p.stderr.close()
    if status != 0:
        raise SystemExit("normcy embed failed:\n" + err)
    return dt, ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024.0


def _cpu():
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def bench_ray(texts, model, warm):
    import ray

    from normcy.integrations.ray import Embedder
    from normcy.sentence import SentenceEncoder
    import normcy

    # single process, 2 threads (kernels and BLAS), model loaded, same lines
    normcy.set_num_threads(2)
    enc = SentenceEncoder.from_pretrained(model, num_threads=2)
    enc.encode(texts[:64])
    t0 = time.perf_counter()
    enc.encode(texts, batch_size=32)
    single = len(texts) / (time.perf_counter() - t0)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        pool = ray.data.ActorPoolStrategy(size=2)

        class Timed(Embedder):
            """Embedder that stamps each batch with its start and end times."""

            def __call__(self, batch):
                t0 = time.time()
                out = super().__call__(batch)
                n = len(out["text"])
                out["t0"], out["t1"] = np.full(n, t0), np.full(n, time.time())
                return out

        rows = [{"text": t, "warm": i < warm} for i, t in enumerate(texts[:warm] + texts)]
        ds = ray.data.from_items(rows, override_num_blocks=16)
        w0 = time.perf_counter()
        out = ds.map_batches(Timed, fn_constructor_kwargs={"model": model}, compute=pool,
                             num_cpus=1, batch_size=128).select_columns(
                                 ["warm", "t0", "t1"]).to_pandas()
        wall = time.perf_counter() - w0
    finally:
        ray.shutdown()
    # from the first measured batch's start to the last batch's end (workers started and
    # models loaded during the warm-up rows): the engine's overhead between batches counts
    m = out[~out["warm"]]
    assert len(m) == len(texts)
    # the single-process figure again, after Ray (the neighbours' load changes): the mean
    t0 = time.perf_counter()
    enc.encode(texts, batch_size=32)
    single = (single + len(texts) / (time.perf_counter() - t0)) / 2
    return single, len(texts) / (m["t1"].max() - m["t0"].min()), len(out) / wall


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lines", type=int, default=20000)
    ap.add_argument("--rss-lines", default="8000,20000")
    ap.add_argument("--ray-lines", type=int, default=4000)
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    import normcy
    from normcy.sentence import default_model_path

    model = a.model or default_model_path()
    res = {"lines": a.lines, "model": model, "threads": a.threads or normcy.get_num_threads()}
    tmp = tempfile.mkdtemp(prefix="normcy-bench-corpus.")
    try:
        _measure(a, model, res, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)   # corpora and outputs: GBs at 200k lines
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


def _measure(a, model, res, tmp):
    from normcy.sentence import SentenceEncoder

    corpus = os.path.join(tmp, "corpus.txt")
    make_corpus(corpus, a.lines)
    with open(corpus, encoding="utf-8") as f:
        texts = f.read().splitlines()

    enc = SentenceEncoder.from_pretrained(model, num_threads=a.threads)
    enc.encode(texts[:64])
    t0, c0 = time.perf_counter(), _cpu()
    enc.encode(texts, batch_size=32)
    dt, dc = time.perf_counter() - t0, _cpu() - c0
    res["encode_sps"], res["encode_sps_cpu"] = a.lines / dt, a.lines / dc
    print("encode(batch_size=32), in process: %.1f sentences/s, %.1f per CPU-second"
          % (res["encode_sps"], res["encode_sps_cpu"]), flush=True)

    th = ["--threads", str(a.threads)] if a.threads else []
    dt, dc, rss = run_cli(["embed", "-m", model, "-i", corpus, "-o",
                           os.path.join(tmp, "out.parquet"), "--no-progress"] + th)
    res["cli_sps"], res["cli_sps_cpu"], res["cli_rss_mib"] = a.lines / dt, a.lines / dc, rss
    res["cli_ratio"] = res["cli_sps"] / res["encode_sps"]
    res["cli_ratio_cpu"] = res["cli_sps_cpu"] / res["encode_sps_cpu"]
    # On a shared machine the wall-clock ratio mostly measures what the neighbours did in
    # each phase; sentences per CPU-second (start-up and model load included for the
    # command) is the steadier comparison of the work done.
    print("normcy embed -> Parquet:     %.1f sentences/s (%.1f%% of encode), %.1f per "
          "CPU-second (%.1f%% of encode), peak RSS %.0f MiB"
          % (res["cli_sps"], 100 * res["cli_ratio"], res["cli_sps_cpu"],
             100 * res["cli_ratio_cpu"], rss), flush=True)

    res["rss"] = {}
    for n in [int(x) for x in a.rss_lines.split(",") if x]:
        if n == a.lines:
            res["rss"][n] = rss
            continue
        c = os.path.join(tmp, "c%d.txt" % n)
        make_corpus(c, n, seed=1)
        _, _, r = run_cli(["embed", "-m", model, "-i", c, "-o",
                           os.path.join(tmp, "o%d.parquet" % n), "--no-progress"] + th)
        res["rss"][n] = r
    print("peak RSS by corpus size:    " + ", ".join("%d lines: %.0f MiB" % kv
                                                   for kv in sorted(res["rss"].items())))

    if not a.skip_ray:
        single, ray_sps, ray_wall = bench_ray(texts[:a.ray_lines], model, warm=256)
        res["ray"] = {"lines": a.ray_lines, "single_2threads_sps": single,
                      "ray_2x1_sps": ray_sps, "ratio": ray_sps / single,
                      "ray_2x1_sps_with_startup": ray_wall}
        print("Ray Data 2 workers x 1 thread: %.1f sentences/s vs one process x 2 threads "
              "%.1f (%.0f%%); %.1f sentences/s counting worker start-up and model loads"
              % (ray_sps, single, 100 * ray_sps / single, ray_wall))


if __name__ == "__main__":
    main()
