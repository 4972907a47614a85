#!/usr/bin/env python
"""Load generator for ``normcy serve``: latency and throughput against offered load.

Starts ``normcy serve`` on a free loopback port (or targets ``--url``, which must be a
loopback address), measures in-process ``SentenceEncoder.encode`` on the same sentences as
the baseline, then drives the server with closed-loop clients at each concurrency: every
client keeps one request outstanding on its own keep-alive connection, for ``--duration``
seconds per cell (bounded also by ``--max-requests``). Two request kinds: one sentence per
request, and 32 sentences per request, drawn in turn from ``bench/sentences.txt``.

    python bench/serve.py                                   # ~2-3 minutes
    python bench/serve.py --quick --json out.json --plot out.png

Reported per cell: p50/p99 latency, requests/s, sentences/s, the server process's CPU
seconds per sentence (from /proc, own server only) and the load generator's own CPU use
(it shares the machine's cores with the server). The speed targets of the serve issue are
evaluated at the end against baselines taken at the same moment, so that a machine whose
load drifts (a shared one) compares like with like: at concurrency 1 each HTTP request
alternates with in-process ``encode([s])`` of the same sentence (its requests/s is then
1 / mean latency), and the concurrency-32 single-sentence cell is bracketed by in-process
``encode(batch_size=32)`` runs just before and after it. The client is a minimal HTTP/1.1
keep-alive client on asyncio streams: an HTTP library would spend more of the shared cores
than the server's own HTTP layer does, and that would be charged to the server's latency.
"""
import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from urllib.parse import urlsplit

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from _common import NoiseMeter, md_table, settle  # noqa: E402

_CL = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# ----------------------------------------------------------------------------- client
class Conn:
    """One keep-alive HTTP/1.1 connection that POSTs JSON bodies."""

    def __init__(self, host, port, path):
        self.host, self.port = host, port
        self.head = ("POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                     "Content-Length: " % (path, host, port)).encode()
        self.reader = self.writer = None

    async def open(self):
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def post(self, body):
        self.writer.write(self.head + b"%d\r\n\r\n" % len(body) + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        m = _CL.search(head)
        if m is None:
            raise RuntimeError("response without content-length: %r" % head[:200])
        data = await self.reader.readexactly(int(m.group(1)))
        return int(head[9:12]), data

    def close(self):
        if self.writer is not None:
            self.writer.close()


# ----------------------------------------------------------------------------- server
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_cpu(pid):
    """User + system CPU seconds of a process (Linux /proc), or None."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    except (OSError, IndexError, ValueError):
        return None


def start_server(extra, timeout=180):
    import urllib.request

    port = _free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + ([env["PYTHONPATH"]]
                                                  if env.get("PYTHONPATH") else []))
    log = open(os.path.join(os.environ.get("TMPDIR", "/tmp"), "normcy-bench-serve.log"), "wb")
    proc = subprocess.Popen([sys.executable, "-m", "normcy", "serve", "--host", "127.0.0.1",
                             "--port", str(port), "--no-access-log"] + extra,
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = "http://127.0.0.1:%d" % port
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("normcy serve exited with %s (log: %s)" % (proc.returncode,
                                                                          log.name))
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("normcy serve did not become ready in %d s" % timeout)


# --------------------------------------------------------------------------- measuring
def percentile(xs, q):
    xs = sorted(xs)
    if not xs:
        return None
    k = (len(xs) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


class InProcess:
    """The baseline: ``SentenceEncoder.encode`` in this process, on the same sentences."""

    def __init__(self, sentences):
        from normcy import SentenceEncoder

        self.sentences = sentences
        self.enc = SentenceEncoder.from_pretrained()
        self.enc.encode(sentences, batch_size=32)
        settle()

    def throughput(self, duration):
        """``encode(sentences, batch_size=32)`` repeated: sentences/s and CPU s/sentence."""
        settle()
        n = 0
        t0, c0 = time.perf_counter(), time.process_time()
        while time.perf_counter() - t0 < duration or n == 0:
            self.enc.encode(self.sentences, batch_size=32)
            n += len(self.sentences)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        settle()
        return {"sentences_per_s": n / wall, "cpu_s_per_sentence": cpu / n, "wall_s": wall}

    def one(self, s):
        """Latency of ``encode([s])`` (then waits for this process's threads to go quiet)."""
        t = time.perf_counter()
        self.enc.encode([s])
        dt = time.perf_counter() - t
        settle(0.05)
        return dt


async def run_paired(host, port, path, bodies, sentences, inproc, duration, max_requests):
    """Concurrency 1, one sentence per request, alternating with in-process ``encode([s])``
    of the same sentence, so that both see the same machine at the same moment."""
    conn = Conn(host, port, path)
    await conn.open()
    await conn.post(bodies[0])
    lat, ref, statuses = [], [], {}
    t_end = time.perf_counter() + duration
    while (time.perf_counter() < t_end or len(lat) < len(bodies)) and len(lat) < max_requests:
        i = len(lat) % len(bodies)
        ref.append(inproc.one(sentences[i]))
        t = time.perf_counter()
        st, _ = await conn.post(bodies[i])
        lat.append(time.perf_counter() - t)
        statuses[st] = statuses.get(st, 0) + 1
    conn.close()
    busy = sum(lat)
    return {"concurrency": 1, "per_request": 1, "requests": len(lat), "paired": True,
            "statuses": {str(k): v for k, v in statuses.items()}, "wall_s": busy,
            "requests_per_s": len(lat) / busy,
            "sentences_per_s": statuses.get(200, 0) / busy,
            "p50_s": percentile(lat, 0.5), "p99_s": percentile(lat, 0.99),
            "mean_s": statistics.fmean(lat),
            "inprocess_p50_s": percentile(ref, 0.5), "inprocess_p99_s": percentile(ref, 0.99)}


async def run_cell(host, port, path, bodies, warm, per_request, concurrency, duration,
                   max_requests, check):
    conns = [Conn(host, port, path) for _ in range(concurrency)]
    await asyncio.gather(*[c.open() for c in conns])
    # warm-up: one small request per connection
    for st, data in await asyncio.gather(*[c.post(warm) for c in conns]):
        if st != 200:
            raise RuntimeError("warm-up request failed: %d %s" % (st, data[:300]))
    lat, statuses = [], {}
    counter = [0]
    t_end = time.perf_counter() + duration

    async def worker(c):
        while time.perf_counter() < t_end and counter[0] < max_requests:
            i = counter[0]
            counter[0] += 1
            body = bodies[i % len(bodies)]
            t = time.perf_counter()
            st, data = await c.post(body)
            lat.append(time.perf_counter() - t)
            statuses[st] = statuses.get(st, 0) + 1
            if i < len(bodies) and st == 200:
                check(i % len(bodies), data)

    t0 = time.perf_counter()
    await asyncio.gather(*[worker(c) for c in conns])
    wall = time.perf_counter() - t0
    for c in conns:
        c.close()
    ok = statuses.get(200, 0)
    return {"concurrency": concurrency, "per_request": per_request, "requests": len(lat),
            "statuses": {str(k): v for k, v in statuses.items()}, "wall_s": wall,
            "requests_per_s": len(lat) / wall, "sentences_per_s": ok * per_request / wall,
            "p50_s": percentile(lat, 0.5), "p99_s": percentile(lat, 0.99),
            "mean_s": statistics.fmean(lat) if lat else None}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="a running server on 127.0.0.1 (default: start one)")
    ap.add_argument("--server-args", default="", help="extra normcy serve arguments")
    ap.add_argument("--route", default="/embed", choices=("/embed", "/v1/embeddings"))
    ap.add_argument("--concurrency", default="1,8,32,128")
    ap.add_argument("--batch", default="1,32", help="sentences per request (comma list)")
    ap.add_argument("--duration", type=float, default=6.0, help="seconds per cell")
    ap.add_argument("--max-requests", type=int, default=100000, help="per cell")
    ap.add_argument("--quick", action="store_true", help="3 s per cell")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--plot", help="write a latency-vs-load plot here (.png)")
    args = ap.parse_args(argv)
    if args.quick:
        args.duration = 3.0
    conc = [int(c) for c in args.concurrency.split(",")]
    kinds = [int(b) for b in args.batch.split(",")]
    with open(os.path.join(HERE, "sentences.txt"), encoding="utf-8") as f:
        sentences = [ln for ln in f.read().splitlines() if ln]

    def log(msg):
        sys.stderr.write(msg + "\n")
        sys.stderr.flush()

    log("baseline: in-process SentenceEncoder.encode (%d sentences)..." % len(sentences))
    inproc = InProcess(sentences)
    base = [inproc.throughput(args.duration)]
    proc = None
    if args.url:
        u = urlsplit(args.url)
        if u.hostname not in ("127.0.0.1", "localhost", "::1"):
            ap.error("--url must be a loopback address")
        url = args.url.rstrip("/")
    else:
        log("starting normcy serve...")
        proc, url = start_server(args.server_args.split())
    u = urlsplit(url)
    host, port = u.hostname, u.port
    key = "inputs" if args.route == "/embed" else "input"
    warm = json.dumps({key: sentences[0]}).encode()

    cells = []
    noise = NoiseMeter()
    try:
        for per in kinds:
            n = len(sentences)
            groups = sentences if per == 1 else [[sentences[(i + j) % n] for j in range(per)]
                                                 for i in range(n)]
            bodies = [json.dumps({key: g}).encode() for g in groups]

            def check(i, data, per=per):
                body = json.loads(data)
                rows = body if args.route == "/embed" else [d["embedding"] for d in body["data"]]
                if len(rows) != per or len(rows[0]) != 384:
                    raise RuntimeError("bad response shape for request %d" % i)

            for c in conc:
                log("  %2d sentence(s)/request, concurrency %3d: %.0f s..." % (per, c,
                                                                                 args.duration))
                settle()
                bracket = per == 1 and c == 32     # the throughput/CPU target's cell
                if bracket:
                    before = inproc.throughput(args.duration / 2)
                noise.reset()
                s0 = _proc_cpu(proc.pid) if proc else None
                g0 = time.process_time()
                if per == 1 and c == 1:
                    cell = asyncio.run(run_paired(host, port, args.route, bodies, sentences,
                                                  inproc, 2 * args.duration,
                                                  args.max_requests))
                else:
                    cell = asyncio.run(run_cell(host, port, args.route, bodies, warm, per, c,
                                                args.duration, args.max_requests, check))
                g1 = time.process_time()
                s1 = _proc_cpu(proc.pid) if proc else None
                sent = cell["statuses"].get("200", 0) * per
                cell["server_cpu_s_per_sentence"] = ((s1 - s0) / sent
                                                     if s0 is not None and sent else None)
                cell["server_cpu_share"] = ((s1 - s0) / cell["wall_s"]
                                            if s0 is not None else None)
                cell["generator_cpu_share"] = (g1 - g0) / cell["wall_s"]
                cell["other_cpu_share"] = noise.share()
                if cell.get("paired"):       # its generator CPU includes in-process encode
                    cell["generator_cpu_share"] = None
                if bracket:
                    after = inproc.throughput(args.duration / 2)
                    cell["inprocess_bracket"] = [before, after]
                cells.append(cell)
                log("    p50 %.2f ms  p99 %.2f ms  %.0f sentences/s  server CPU %s  "
                    "generator CPU %s" % (cell["p50_s"] * 1e3, cell["p99_s"] * 1e3,
                                          cell["sentences_per_s"],
                                          "%.2f ms/sentence" % (
                                              cell["server_cpu_s_per_sentence"] * 1e3)
                                          if cell["server_cpu_s_per_sentence"] else "n/a",
                                          _pct(cell["generator_cpu_share"])))
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    log("baseline again (after the load)...")
    base.append(inproc.throughput(args.duration))
    b_tput = statistics.fmean(b["sentences_per_s"] for b in base)
    rows = []
    for c in cells:
        rows.append([c["per_request"], c["concurrency"], "%.2f" % (c["p50_s"] * 1e3),
                     "%.2f" % (c["p99_s"] * 1e3), "%.0f" % c["requests_per_s"],
                     "%.0f" % c["sentences_per_s"],
                     "%.2f" % (c["server_cpu_s_per_sentence"] * 1e3)
                     if c["server_cpu_s_per_sentence"] else "–",
                     _pct(c["generator_cpu_share"]),
                     ",".join("%s:%d" % kv for kv in sorted(c["statuses"].items()))])
    print(md_table(["sentences/request", "concurrency", "p50 ms", "p99 ms", "requests/s",
                    "sentences/s", "server CPU ms/sentence", "generator CPU", "statuses"],
                   rows))
    print()
    print("in-process encode(batch_size=32): %s sentences/s (before and after the load)"
          % " / ".join("%.0f" % b["sentences_per_s"] for b in base))

    targets = []

    def cell(per, c):
        for x in cells:
            if x["per_request"] == per and x["concurrency"] == c:
                return x
        return None

    c32, c1 = cell(1, 32), cell(1, 1)
    if c32:
        br = c32["inprocess_bracket"]
        ref_tput = statistics.fmean(b["sentences_per_s"] for b in br)
        ref_cpu = statistics.fmean(b["cpu_s_per_sentence"] for b in br)
        print("c=32, 1 sentence/request: %.0f sentences/s, server %.2f ms CPU/sentence; "
              "in-process encode(batch_size=32) just before/after: %s sentences/s, %s ms "
              "CPU/sentence" % (c32["sentences_per_s"],
                                (c32["server_cpu_s_per_sentence"] or 0) * 1e3,
                                " / ".join("%.0f" % b["sentences_per_s"] for b in br),
                                " / ".join("%.2f" % (b["cpu_s_per_sentence"] * 1e3)
                                           for b in br)))
        r = c32["sentences_per_s"] / ref_tput
        targets.append(("c=32 single-sentence throughput >= 85% of encode(batch_size=32)",
                        "%.0f%%" % (100 * r), r >= 0.85))
        if c32["server_cpu_s_per_sentence"]:
            r = c32["server_cpu_s_per_sentence"] / ref_cpu
            targets.append(("c=32 server CPU/sentence within 15% of encode's",
                            "%+.0f%%" % (100 * (r - 1)), r <= 1.15))
    if c1:
        print("c=1, 1 sentence/request: p50 %.2f ms; in-process encode([s]) of the same "
              "sentences, interleaved: p50 %.2f ms" % (c1["p50_s"] * 1e3,
                                                       c1["inprocess_p50_s"] * 1e3))
        d = c1["p50_s"] - c1["inprocess_p50_s"]
        targets.append(("c=1 p50 at most 1.0 ms above encode of one sentence",
                        "%+.2f ms" % (d * 1e3), d <= 1e-3))
    print()
    print(md_table(["target", "measured", "met"],
                  [[t, m, "yes" if ok else "**no**"] for t, m, ok in targets]))

    if args.json:
        from _common import environment

        import normcy
        with open(args.json, "w") as f:
            json.dump({"environment": environment(normcy, None, None, ROOT),
                       "baseline": base, "cells": cells,
                       "targets": [{"target": t, "measured": m, "met": ok}
                                   for t, m, ok in targets]}, f, indent=1)
    if args.plot:
        plot(cells, b_tput, c1["inprocess_p50_s"] if c1 else None, args.plot)
    return 0


def _pct(x):
    return "–" if x is None else "%.0f%%" % (100 * x)


def plot(cells, b_tput, b_p50, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for per, color in zip(sorted({c["per_request"] for c in cells}), ("C0", "C1", "C2")):
        cs = sorted((c for c in cells if c["per_request"] == per),
                    key=lambda c: c["concurrency"])
        x = [c["concurrency"] for c in cs]
        lab = "%d sentence%s/request" % (per, "" if per == 1 else "s")
        ax1.plot(x, [c["p50_s"] * 1e3 for c in cs], "o-", color=color, label=lab + " p50")
        ax1.plot(x, [c["p99_s"] * 1e3 for c in cs], "s--", color=color, label=lab + " p99")
        ax2.plot(x, [c["sentences_per_s"] for c in cs], "o-", color=color, label=lab)
    if b_p50:
        ax1.axhline(b_p50 * 1e3, color="gray", lw=0.8, ls=":", label="encode one sentence p50")
    ax2.axhline(b_tput, color="gray", lw=0.8, ls=":", label="in-process encode(batch_size=32)")
    xs = sorted({c["concurrency"] for c in cells})
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
        ax.set_xlabel("offered load: concurrent clients")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax1.set_yscale("log")
    ax1.set_ylabel("latency (ms)")
    ax2.set_ylabel("sentences/s")
    fig.suptitle("normcy serve: latency and throughput against offered load (loopback)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
