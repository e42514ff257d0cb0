#!/usr/bin/env python3
"""Telemetry overhead: 4 KiB random-write IOPS through blockmirrord's NBD
export with telemetry off, with the OTLP exporter on at the default
sampling, and at sampling 1.0.

Configurations (one blockmirrord each, all running for the whole session,
each exporting its own raw image of --size random bytes):

  off        no OTEL_* variable, no --metrics-listen: no observer on the
             engine, nothing exported (the per-job histograms of GetJob are
             only kept while a job runs, and no job runs here).
  default    OTEL_EXPORTER_OTLP_ENDPOINT pointing at an OTLP/gRPC sink
             (target/release/otlp-sink, from the tests crate, which counts
             spans): traces and metrics exported, default flags
             (--trace-write-sample-ratio 0.01, --trace-slow-write-ms 50).
  ratio1     the same with --trace-write-sample-ratio 1: a span per write.
  prometheus --metrics-listen only (metrics recorded, nothing exported);
             not run unless named in --configs.

Workloads: fio --ioengine=nbd, randwrite 4k at queue depth 1 and 32, one
connection, --runtime s after --ramp s. Configurations are interleaved per
workload and their order rotates, so they share the machine's noise.
Reported: median IOPS per configuration and its ratio to "off", p99
completion latency, server CPU µs per I/O, and spans the sink received.

Python 3 standard library only; reuses bench/nbd_fio.py's helpers. Needs
release binaries (it builds nothing):
    cargo build --release --bins
Run:
    python3 bench/telemetry.py [--repeat 3] [--size 256M] [--md F] [--json F]
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mirror_idle as mi  # noqa: E402
import nbd_fio as nf  # noqa: E402
from mirror_idle import BenchError, Disk, MiB, loadavg, log, parse_size  # noqa: E402

ROOT = mi.ROOT
CONFIGS = ("off", "default", "ratio1", "prometheus")
WORKLOADS = [
    ("randwrite 4k qd1", "randwrite", "4k", 1),
    ("randwrite 4k qd32", "randwrite", "4k", 32),
]


class Sink:
    """otlp-sink: an OTLP/gRPC receiver that counts spans."""

    def __init__(self, bin_dir, workdir):
        self.argv = [os.path.join(bin_dir, "otlp-sink"), "127.0.0.1:0"]
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=open(os.path.join(workdir, "otlp-sink.log"), "ab"),
            text=True, start_new_session=True)
        line = self.proc.stdout.readline().split()
        if len(line) != 2 or line[0] != "listening":
            raise BenchError(f"otlp-sink said {line!r}")
        self.endpoint = f"http://{line[1]}"

    def spans(self):
        self.proc.stdin.write("count\n")
        self.proc.stdin.flush()
        _, spans, _, requests = self.proc.stdout.readline().split()
        return int(spans), int(requests)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class TelemetryServer(nf.BmServer):
    """blockmirrord in one telemetry configuration."""

    def __init__(self, key, workdir, img, bin_dir, sink):
        sub = os.path.join(workdir, key)
        os.makedirs(sub, exist_ok=True)
        super().__init__(sub, img, bin_dir)
        self.key = key
        self.env = dict(os.environ)
        for k in list(self.env):
            if k.startswith("OTEL_"):
                del self.env[k]
        self.extra = []
        if key in ("default", "ratio1"):
            self.env["OTEL_EXPORTER_OTLP_ENDPOINT"] = sink.endpoint
            self.env["OTEL_SERVICE_NAME"] = f"blockmirrord-bench-{key}"
        if key == "ratio1":
            self.extra = ["--trace-write-sample-ratio", "1"]
        if key == "prometheus":
            self.extra = ["--metrics-listen", "127.0.0.1:0"]

    def start(self):
        shutil.rmtree(self.state, ignore_errors=True)
        self.api = os.path.join(self.state, "blockmirror.sock")
        self.nbd = os.path.join(self.state, "nbd.sock")
        self.logf = open(os.path.join(self.workdir, "blockmirrord.log"), "ab")
        self.argv = [self.bmd, "--state-dir", self.state, *self.extra]
        self.proc = subprocess.Popen(self.argv, stdout=self.logf,
                                     stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        nf.wait_socket(self.api, self.proc, 20, f"blockmirrord ({self.key})")
        self.mirrorctl("volume", "attach", "disk", "--path", self.img)
        self.mirrorctl("export", "add", "disk")
        nf.wait_socket(self.nbd, self.proc, 10, "blockmirrord NBD")
        self.uri = f"nbd+unix:///disk?socket={self.nbd}"
        otel = {k: v for k, v in self.env.items() if k.startswith("OTEL_")}
        self.desc = {"argv": " ".join(self.argv), "env": otel,
                     "version": mi.version(self.bmd)}
        return self.uri


def med(xs):
    return nf.med(xs)


def summarize(runs, configs):
    out = {}
    for w, *_ in WORKLOADS:
        out[w] = {}
        for c in configs:
            rs = [r for r in runs if r["workload"] == w and r["config"] == c]
            if rs:
                out[w][c] = {k: med([r[k] for r in rs]) for k in (
                    "iops", "clat_p50_us", "clat_p99_us",
                    "server_cpu_us_per_io", "spans_during")}
                out[w][c]["runs"] = len(rs)
                # On a shared machine the best run is the least disturbed
                # one: reported beside the median.
                out[w][c]["iops_best"] = max(r["iops"] for r in rs)
    return out


def markdown(res):
    cfg, s = res["config"], res["summary"]
    configs = cfg["configs"]
    f0 = nf.f0
    lines = [
        f"### Telemetry overhead: fio randwrite 4 KiB over NBD, "
        f"{nf.human(cfg['size'])} image, medians of {cfg['repeat']} runs",
        "",
        f"fio `--ioengine=nbd`, one connection, `--runtime={cfg['runtime']} "
        f"--ramp_time={cfg['ramp']}`; configurations interleaved per "
        "workload. Ratio = IOPS ÷ IOPS with telemetry off (1.00 = no cost); "
        "the best run of each is the least disturbed on a shared machine. "
        "Spans: what the sink received during the run (the batch exporter "
        "sends every 5 s and drops past its 2048-span queue).",
        "",
        "| workload | config | IOPS (median) | vs off | IOPS (best run) | "
        "vs off | p50 (µs) | p99 (µs) | CPU µs/IO | spans |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for w, *_ in WORKLOADS:
        off = s[w].get("off")
        for c in configs:
            x = s[w].get(c)
            if not x:
                continue
            r = nf.ratio(x["iops"], off["iops"]) if off else "-"
            rb = nf.ratio(x["iops_best"], off["iops_best"]) if off else "-"
            lines.append(
                f"| {w} | {c} | {x['iops']:.0f} | **{r}** | "
                f"{x['iops_best']:.0f} | {rb} | "
                f"{f0(x['clat_p50_us'])} | {f0(x['clat_p99_us'])} | "
                f"{f0(x['server_cpu_us_per_io'], 1)} | "
                f"{f0(x['spans_during'])} |")
    lines += ["", "Every run (IOPS / p99 µs / load average at start):", "",
              "| workload | rep | " + " | ".join(configs) + " |",
              "|---|---" + "|---" * len(configs) + "|"]
    for w, *_ in WORKLOADS:
        for rep in range(1, cfg["repeat"] + 1):
            cells = []
            for c in configs:
                r = [x for x in res["runs"] if x["workload"] == w and
                     x["rep"] == rep and x["config"] == c]
                cells.append("-" if not r else
                             f"{r[0]['iops']:.0f} / "
                             f"{f0(r[0]['clat_p99_us'])} / "
                             f"{(r[0]['loadavg'] or '-').split()[0]}")
            lines.append(f"| {w} | {rep} | " + " | ".join(cells) + " |")
    lines += ["", f"{res['host']['cpus']} CPUs; load average "
              f"{res.get('loadavg_start')} at start, "
              f"{res.get('loadavg_end')} at end; "
              f"{res['versions'].get('blockmirrord')} (git "
              f"{res['versions'].get('git_head_at_bench')}); {res['date']}."]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="256M",
                    help="image size, a multiple of 1M (default 256M)")
    ap.add_argument("--runtime", type=int, default=8,
                    help="fio measurement time per run, s (default 8)")
    ap.add_argument("--ramp", type=int, default=1,
                    help="fio ramp time, s (default 1)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="repetitions; medians are reported (default 3)")
    ap.add_argument("--configs", default="off,default,ratio1",
                    help=f"comma list from {','.join(CONFIGS)} "
                         "(default off,default,ratio1)")
    ap.add_argument("--bin-dir", default=os.path.join(ROOT, "target",
                                                      "release"))
    ap.add_argument("--workdir", default=None,
                    help="parent of the run's temp dir "
                         "(default target/bench-work)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--md", default=None, help="also write markdown here")
    ap.add_argument("--json", default=None, help="write all data here")
    args = ap.parse_args()
    size = parse_size(args.size)
    if size <= 0 or size % MiB:
        ap.error("--size must be a positive multiple of 1M")
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in configs:
        if c not in CONFIGS:
            ap.error(f"unknown config {c}")
    bins = [os.path.join(args.bin_dir, b)
            for b in ("blockmirrord", "mirrorctl", "otlp-sink")]
    missing = [b for b in bins if not os.access(b, os.X_OK)]
    if missing:
        print(f"missing release binaries: {', '.join(missing)}\nbuild them "
              f"first:\n  (cd {ROOT} && cargo build --release --bins)",
              file=sys.stderr)
        return 2
    if not shutil.which("fio"):
        print("missing tool: fio", file=sys.stderr)
        return 2

    base = os.path.abspath(args.workdir or
                           os.path.join(ROOT, "target", "bench-work"))
    os.makedirs(base, exist_ok=True)
    rundir = tempfile.mkdtemp(prefix="telemetry-", dir=base)
    disk = Disk(rundir)
    res = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": {"cpus": os.cpu_count(), "uname": " ".join(
            platform.uname()[i] for i in (0, 2, 4))},
        "config": {"size": size, "repeat": args.repeat,
                   "runtime": args.runtime, "ramp": args.ramp,
                   "configs": configs, "workdir": rundir},
        "runs": [], "loadavg_start": loadavg()}
    git = mi.git_state()
    log(f"work dir {rundir}; load average {res['loadavg_start']}")
    srv, sink, ok = {}, None, False
    try:
        sink = Sink(args.bin_dir, rundir)
        imgs = {c: os.path.join(rundir, f"{c}.raw") for c in configs}
        nf.make_images(list(imgs.values()), size)
        for c in configs:
            srv[c] = TelemetryServer(c, rundir, imgs[c], args.bin_dir, sink)
            srv[c].start()
            log(f"{c}: {srv[c].desc['argv']} {srv[c].desc['env']} "
                f"(pid {srv[c].pid})")
        res["servers"] = {c: srv[c].desc for c in configs}
        for rep in range(1, args.repeat + 1):
            for wi, (w, rw, bs, qd) in enumerate(WORKLOADS):
                k = (rep - 1 + wi) % len(configs)
                for c in configs[k:] + configs[:k]:
                    before, _ = sink.spans()
                    tag = f"{c}-{rw}-{bs}-qd{qd}-r{rep}"
                    r = nf.run_fio(srv[c], rundir, tag, rw, bs, qd,
                                   args.runtime, args.ramp, disk)
                    # the batch exporter sends every 5 s: wait for it
                    time.sleep(5.5 if c in ("default", "ratio1") else 0)
                    after, _ = sink.spans()
                    r.update(config=c, workload=w, rep=rep,
                             spans_during=after - before)
                    res["runs"].append(r)
                    log(f"rep {rep} {w:18s} {c:10s} {r['iops']:8.0f} IOPS "
                        f"p99 {nf.f0(r['clat_p99_us']):>6} us  cpu "
                        f"{nf.f0(r['server_cpu_us_per_io'], 1)} us/IO  "
                        f"spans {after - before}  load {r['loadavg']}")
        ok = True
    except BenchError as e:
        log(f"FAILED: {e}")
    finally:
        for c in srv:
            srv[c].stop()
        if sink:
            sink.stop()
        if not args.keep and ok:
            shutil.rmtree(rundir, ignore_errors=True)
    if not ok:
        return 1
    res["loadavg_end"] = loadavg()
    res["versions"] = {"blockmirrord": mi.version(bins[0]),
                       "git_head_at_bench": git}
    res["summary"] = summarize(res["runs"], configs)
    md = markdown(res)
    print(md)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
