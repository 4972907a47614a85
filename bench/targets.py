"""The speed targets of several bench runs side by side: their range and how often each held.

    python bench/targets.py RUN.json [RUN.json ...]

Each RUN.json is written by ``bench/run.py --json`` (any suites; a target counts in the runs
that evaluated it).  One target varies between runs on a shared machine, so a target is
reported as the range of its values and the number of runs that met it, never by one run:

    for i in 1 2 3; do
        env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/run.py --quick --realtime \\
            --only 'ceiling,layer_norm,add_layer_norm,rms_norm,add_rms_norm,batch_norm,ops,gemm' \\
            --threads 1,2 --json bench/results/kernels-$i.json
        env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/run.py --only minilm,encoder \\
            --threads 1,2 --json bench/results/model-$i.json
    done
    python bench/targets.py bench/results/kernels-*.json bench/results/model-*.json

Prints the CPU and kernel variant of the runs (they must agree: figures of different machines
are not combined), then one markdown row per target: goal, the values in run order, the
range, and "met in k of n".
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import fmt_target_value, md_table  # noqa: E402


def load(path):
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    if "targets" not in doc:
        raise SystemExit("%s: not a bench/run.py --json file (no 'targets')" % path)
    env = doc.get("environment", {})
    cpu = env.get("cpu") or {}
    # the model string alone is not enough ("AMD EPYC" names every Zen generation on some
    # hypervisors): family, model number and cache sizes too
    caches = ",".join("%s %s" % kv for kv in sorted((cpu.get("caches") or {}).items()))
    machine = (cpu.get("model"), cpu.get("vendor"), cpu.get("family"), cpu.get("model_number"),
               caches or None, doc.get("cpu_isa"), doc.get("all_cores"), doc.get("kernel_variant"))
    return machine, doc["targets"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", metavar="RUN.json")
    a = ap.parse_args(argv)
    runs = [(p,) + load(p) for p in a.runs]
    machines = {m for _, m, _ in runs}
    if len(machines) > 1:
        raise SystemExit("runs of different machines or kernel variants: %s (summarize each "
                         "machine's runs on their own)" % sorted(map(str, machines)))
    model, vendor, family, model_no, caches, isa, cores, variant = next(iter(machines))
    print("_CPU: %s (%s family %s model %s; %s; %s, %s cores); normcy kernel variant: %s; "
          "%d runs: %s._\n"
          % (model, vendor, family, model_no, caches, isa, cores, variant, len(runs),
             ", ".join(os.path.basename(p) for p, _, _ in runs)))
    order, seen = [], {}
    for _, _, targets in runs:
        for t in targets:
            if t["target"] not in seen:
                seen[t["target"]] = t
                order.append(t["target"])
    body = []
    for name in order:
        t0 = seen[name]
        vals, met, n = [], 0, 0
        for _, _, targets in runs:
            t = next((t for t in targets if t["target"] == name), None)
            if t is None:
                vals.append("–")
                continue
            n += 1
            met += t["met"] is True
            # † = measured while this process's threads waited for a CPU (files written before
            # the flag existed: any note)
            flag = t["contended"] if "contended" in t else bool(t.get("note"))
            vals.append(fmt_target_value(t["kind"], t["value"]) + ("†" if flag else ""))
        got = [t["value"] for _, _, ts in runs for t in ts
               if t["target"] == name and t["value"] is not None]
        rng = ("%s-%s" % (fmt_target_value(t0["kind"], min(got)),
                          fmt_target_value(t0["kind"], max(got))) if got else "n/a")
        goal = fmt_target_value(t0["kind"], t0["goal"])
        body.append([name, goal, ", ".join(vals), rng,
                     ("%d of %d" % (met, n)) if met == n else "**%d of %d**" % (met, n)])
    print(md_table(["target", "goal", "runs", "range", "met"], body))
    print("\n_† a figure taken while this process's threads waited for a CPU._")


if __name__ == "__main__":
    main()
