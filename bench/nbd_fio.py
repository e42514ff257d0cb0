#!/usr/bin/env python3
"""NBD data plane: fio over blockmirrord's NBD export vs qemu-nbd.

fio (`--ioengine=nbd`, one connection) drives, in one run and one work
directory:

  bm            blockmirrord (fresh --state-dir WORK/state), `mirrorctl volume
                attach disk --path WORK/bm.raw`, `mirrorctl export add disk`;
                URI nbd+unix:///disk?socket=WORK/state/nbd.sock.
                blockmirror's file backend uses buffered pread/pwrite
                (no O_DIRECT) on tokio's blocking pool.
  qemu-nbd      qemu-nbd --persistent --shared=8 -f raw -x disk
                --cache=writeback --aio=threads: buffered I/O on a thread
                pool, no flush per write, i.e. the same I/O path as
                blockmirrord. This is the like-for-like peer.
  qemu-nbd-direct
                the same with --cache=none --aio=native (O_DIRECT), the
                set-up of shared/bench/qemu_mirror_peer.py scenario f. A
                second reference, not like-for-like: it never uses the page
                cache.

Each server exports its own raw file of --size bytes; all files hold the
same random bytes (written, not sparse), so reads hit real data. Workloads
(scenario f of shared/bench): 4 KiB random write and read at queue depth 1
and 32 (IOPS, p99 completion latency) and 1 MiB sequential write and read at
depth 4 (MB/s). Every workload runs --runtime s after a --ramp s ramp.
Servers are interleaved per workload (all servers run workload 1, then all
run workload 2, ...), and the order of the servers rotates, so they share
the machine's noise.

For every fio run it records fio's JSON (IOPS, bandwidth, clat_ns
percentiles) and the server's CPU time (utime+stime from /proc/PID/stat,
all threads) over fio's measurement window, divided by the I/Os fio
completed in that window: CPU µs per I/O. /proc/PID/stat is sampled every
50 ms by a thread and interpolated at the window's ends (fio's JSON
timestamp_ms marks the end of the window; job_runtime its length), so the
ramp is excluded on both sides.

Python 3 standard library only. Needs release binaries (it builds nothing):
    cargo build --release --bins
Run:
    python3 bench/nbd_fio.py [--repeat 2] [--size 1G] [--md FILE] [--json FILE]

See bench/README.md for what the numbers mean.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.dont_write_bytecode = True  # no __pycache__ next to the scripts
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mirror_idle as mi  # noqa: E402  (helpers: /proc, versions, logging)

from mirror_idle import (BenchError, Disk, GiB, MiB, io_between,  # noqa: E402
                         loadavg, log, parse_size, proc_status, proc_threads,
                         rm)

ROOT = mi.ROOT
SERVERS = ("bm", "qemu-nbd", "qemu-nbd-direct")
LABELS = {
    "bm": "blockmirrord",
    "qemu-nbd": "qemu-nbd --cache=writeback --aio=threads",
    "qemu-nbd-direct": "qemu-nbd --cache=none --aio=native",
}
SHORT = {"bm": "blockmirror", "qemu-nbd": "qemu-nbd",
         "qemu-nbd-direct": "qemu-nbd O_DIRECT"}
# (key, fio rw, bs, iodepth); the order of scenario f
WORKLOADS = [
    ("randwrite 4k qd1", "randwrite", "4k", 1),
    ("randwrite 4k qd32", "randwrite", "4k", 32),
    ("randread 4k qd1", "randread", "4k", 1),
    ("randread 4k qd32", "randread", "4k", 32),
    ("write 1M qd4", "write", "1M", 4),
    ("read 1M qd4", "read", "1M", 4),
]
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def cpu_ticks(pid):
    """utime+stime of a process (all its threads, live and exited), ticks."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return None


class CpuSampler:
    """Samples a process's CPU ticks every `period` s in a thread, so the
    CPU used in any sub-window of the sampling can be interpolated."""

    def __init__(self, pid, period=0.05):
        self.pid, self.period = pid, period
        self.samples = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while True:
            c = cpu_ticks(self.pid)
            if c is not None:
                self.samples.append((time.time(), c))
            if self._stop.wait(self.period):
                break

    def start(self):
        self._t.start()
        return self

    def stop(self):
        self._stop.set()
        self._t.join()
        c = cpu_ticks(self.pid)
        if c is not None:
            self.samples.append((time.time(), c))
        return self.samples

    def at(self, t):
        """CPU seconds at wall time t (linear between samples)."""
        s = self.samples
        if not s:
            return None
        if t <= s[0][0]:
            return s[0][1] / CLK_TCK
        for (t0, c0), (t1, c1) in zip(s, s[1:]):
            if t0 <= t <= t1:
                f = (t - t0) / (t1 - t0) if t1 > t0 else 1.0
                return (c0 + f * (c1 - c0)) / CLK_TCK
        return s[-1][1] / CLK_TCK

    def between(self, a, b):
        x, y = self.at(a), self.at(b)
        return None if x is None or y is None else y - x


def wait_socket(path, proc, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return
        except OSError:
            if proc.poll() is not None:
                raise BenchError(f"{what} exited with {proc.returncode} "
                                 "before listening (see its log)")
            if time.monotonic() > deadline:
                raise BenchError(f"{what}: no {path} after {timeout}s")
            time.sleep(0.05)
        finally:
            s.close()


def make_images(paths, size):
    """The same random bytes into every path; written, so not sparse."""
    t0 = time.monotonic()
    files = [open(p, "wb") for p in paths]
    try:
        left = size
        while left:
            n = min(4 * MiB, left)
            buf = os.urandom(n)
            for f in files:
                f.write(buf)
            left -= n
        for f in files:
            f.flush()
            os.fsync(f.fileno())
    finally:
        for f in files:
            f.close()
    for p in paths:
        if os.stat(p).st_blocks * 512 < size:
            raise BenchError(f"{p} is sparse")
    log(f"{len(paths)} random images of {size // MiB} MiB in "
        f"{time.monotonic() - t0:.1f}s")


# --------------------------------------------------------------------------
# servers
# --------------------------------------------------------------------------

class BmServer:
    key = "bm"

    def __init__(self, workdir, img, bin_dir):
        self.workdir, self.img = workdir, img
        self.bmd = os.path.join(bin_dir, "blockmirrord")
        self.ctl = os.path.join(bin_dir, "mirrorctl")
        self.state = os.path.join(workdir, "state")
        self.proc = None

    def mirrorctl(self, *args):
        cp = subprocess.run([self.ctl, "--socket", self.api, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
        if cp.returncode:
            raise BenchError(f"mirrorctl {' '.join(args)}: "
                             f"{cp.stderr.strip()}")
        return cp.stdout

    def start(self):
        shutil.rmtree(self.state, ignore_errors=True)
        self.api = os.path.join(self.state, "blockmirror.sock")
        self.nbd = os.path.join(self.state, "nbd.sock")
        self.logf = open(os.path.join(self.workdir, "blockmirrord.log"), "ab")
        self.argv = [self.bmd, "--state-dir", self.state]
        self.proc = subprocess.Popen(self.argv, stdout=self.logf,
                                     stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_socket(self.api, self.proc, 20, "blockmirrord")
        self.mirrorctl("volume", "attach", "disk", "--path", self.img)
        self.mirrorctl("export", "add", "disk")
        wait_socket(self.nbd, self.proc, 10, "blockmirrord NBD")
        self.uri = f"nbd+unix:///disk?socket={self.nbd}"
        self.desc = {"argv": " ".join(self.argv),
                     "setup": f"mirrorctl volume attach disk --path "
                              f"{self.img}; mirrorctl export add disk",
                     "uri": self.uri, "version": mi.version(self.bmd)}
        return self.uri

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        if self.proc:
            mi.stop_proc(self.proc)
            self.proc = None
            self.logf.close()


class QemuNbdServer:
    def __init__(self, workdir, img, direct):
        self.key = "qemu-nbd-direct" if direct else "qemu-nbd"
        self.workdir, self.img, self.direct = workdir, img, direct
        self.proc = None

    def start(self):
        self.sock = os.path.join(self.workdir, f"{self.key}.sock")
        rm(self.sock)
        cache = ["--cache=none", "--aio=native"] if self.direct else \
            ["--cache=writeback", "--aio=threads"]
        self.argv = ["qemu-nbd", "--persistent", "--shared=8", "-f", "raw",
                     "-x", "disk", f"--socket={self.sock}", *cache, self.img]
        self.logf = open(os.path.join(self.workdir, f"{self.key}.log"), "ab")
        self.proc = subprocess.Popen(self.argv, stdout=self.logf,
                                     stderr=subprocess.STDOUT,
                                     start_new_session=True)
        wait_socket(self.sock, self.proc, 10, self.key)
        self.uri = f"nbd+unix:///disk?socket={self.sock}"
        cp = subprocess.run(["qemu-nbd", "--version"], stdout=subprocess.PIPE,
                            text=True)
        self.desc = {"argv": " ".join(self.argv), "uri": self.uri,
                     "version": cp.stdout.splitlines()[0]}
        return self.uri

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self):
        if self.proc:
            mi.stop_proc(self.proc)
            self.proc = None
            self.logf.close()


# --------------------------------------------------------------------------
# one fio run
# --------------------------------------------------------------------------

def pct(st, kind, p):
    v = st.get(kind, {}).get("percentile", {}).get(p)
    return None if v is None else round(v / 1000, 1)


def run_fio(srv, workdir, tag, rw, bs, qd, runtime, ramp, disk):
    jpath = os.path.join(workdir, f"fio-{tag}.json")
    argv = ["fio", "--name=nbd", "--ioengine=nbd", f"--uri={srv.uri}",
            f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}", "--numjobs=1",
            "--time_based", f"--runtime={runtime}", f"--ramp_time={ramp}",
            "--randrepeat=0", "--lat_percentiles=1",
            "--percentile_list=50:99:99.9", "--output-format=json",
            f"--output={jpath}"]
    t_sync = time.monotonic()
    os.sync()  # write back the previous run's dirty pages first
    t_sync = time.monotonic() - t_sync
    time.sleep(0.3)
    la = loadavg()
    samp = CpuSampler(srv.pid).start()
    d0 = disk.snap()
    t0 = time.time()
    cp = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True)
    t1 = time.time()
    d1 = disk.snap()
    samp.stop()
    if not srv.alive():
        raise BenchError(f"{srv.key} died during {tag}")
    try:
        with open(jpath) as f:
            d = json.load(f)
        j = d["jobs"][0]
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise BenchError(f"fio {tag}: rc {cp.returncode}, no JSON ({e!r}): "
                         f"{cp.stderr.strip()[-500:]}")
    if cp.returncode or j.get("error"):
        raise BenchError(f"fio {tag}: rc {cp.returncode}, error "
                         f"{j.get('error')}: {cp.stderr.strip()[-500:]}")
    st = j["read" if "read" in rw else "write"]
    ios = st["total_ios"]
    if not ios:
        raise BenchError(f"fio {tag}: no I/O completed")
    # fio's measurement window: it ends when fio writes its report
    # (timestamp_ms) and lasts job_runtime ms
    w_end = d["timestamp_ms"] / 1000
    w_len = j["job_runtime"] / 1000
    w_start = w_end - w_len
    cpu = samp.between(w_start, w_end)
    cpu_all = samp.between(t0, t1)
    mem = proc_status(srv.pid)
    r = {
        "rw": rw, "bs": bs, "iodepth": qd,
        "iops": round(st["iops"], 1),
        "MBps": round(st["bw_bytes"] / 1e6, 1),
        "ios": ios,
        "clat_mean_us": round(st["clat_ns"]["mean"] / 1000, 1),
        "clat_p50_us": pct(st, "clat_ns", "50.000000"),
        "clat_p99_us": pct(st, "clat_ns", "99.000000"),
        "clat_p99_9_us": pct(st, "clat_ns", "99.900000"),
        "clat_max_us": round(st["clat_ns"]["max"] / 1000, 1),
        "lat_p99_us": pct(st, "lat_ns", "99.000000"),
        "window_s": round(w_len, 3),
        "window_vs_fio_exit_s": round(t1 - w_end, 3),
        "server_cpu_s": None if cpu is None else round(cpu, 3),
        "server_cpu_us_per_io": None if cpu is None else
        round(cpu * 1e6 / ios, 2),
        "server_cpu_pct": None if cpu is None else
        round(100 * cpu / w_len, 1),
        "server_cpu_whole_fio_s": None if cpu_all is None else
        round(cpu_all, 3),
        "fio_usr_pct": round(j["usr_cpu"], 1),
        "fio_sys_pct": round(j["sys_cpu"], 1),
        "fio_wall_s": round(t1 - t0, 2),
        "server_threads": proc_threads(srv.pid),
        "server_rss": mem.get("VmRSS"),
        "server_hwm": mem.get("VmHWM"),
        "sync_before_s": round(t_sync, 2),
        "loadavg": la,
        "io": io_between(d0, d1),
    }
    return r


# --------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(runs, servers):
    out = {}
    for w, rw, bs, qd in WORKLOADS:
        out[w] = {}
        for s in servers:
            rs = [r for r in runs if r["workload"] == w and r["server"] == s]
            if not rs:
                continue
            out[w][s] = {k: med([r[k] for r in rs]) for k in (
                "iops", "MBps", "clat_p50_us", "clat_p99_us",
                "clat_p99_9_us", "server_cpu_us_per_io", "server_cpu_pct",
                "server_threads")}
            out[w][s]["runs"] = len(rs)
    return out


def is_bw(w):
    return " 1M " in f" {w} "


def thr(x, w):
    if x is None:
        return "-"
    return f"{x['MBps']:.0f} MB/s" if is_bw(w) else f"{x['iops']:.0f} IOPS"


def thr_val(x, w):
    return x["MBps"] if is_bw(w) else x["iops"]


def ratio(a, b):
    if a is None or b is None or not b:
        return "-"
    return f"{a / b:.2f}×"


def human(n):
    return f"{n / GiB:g} GiB" if n >= GiB else f"{n / MiB:g} MiB"


def f0(v, nd=0):
    return "-" if v is None else f"{v:.{nd}f}"


def table_vs(summary, peer):
    lines = [
        f"| workload | blockmirror | {SHORT[peer]} | ratio | p99 blockmirror "
        f"(µs) | p99 {SHORT[peer]} (µs) | ratio | CPU µs/IO blockmirror | "
        f"CPU µs/IO {SHORT[peer]} | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for w, *_ in WORKLOADS:
        b, q = summary[w].get("bm"), summary[w].get(peer)
        if not b or not q:
            continue
        lines.append(
            f"| {w} | {thr(b, w)} | {thr(q, w)} | "
            f"**{ratio(thr_val(b, w), thr_val(q, w))}** | "
            f"{f0(b['clat_p99_us'])} | {f0(q['clat_p99_us'])} | "
            f"{ratio(b['clat_p99_us'], q['clat_p99_us'])} | "
            f"{f0(b['server_cpu_us_per_io'], 1)} | "
            f"{f0(q['server_cpu_us_per_io'], 1)} | "
            f"{ratio(b['server_cpu_us_per_io'], q['server_cpu_us_per_io'])} |")
    return lines


def markdown(res):
    cfg, s = res["config"], res["summary"]
    servers = cfg["servers"]
    lines = [
        f"### fio over NBD, {human(cfg['size'])} raw image of random "
        f"data: medians of {cfg['repeat']} runs",
        "",
        f"fio {res['versions'].get('fio')} `--ioengine=nbd`, one connection, "
        f"`--runtime={cfg['runtime']} --ramp_time={cfg['ramp']}` per "
        "workload; servers interleaved per workload. Throughput: IOPS for "
        "4k, MB/s (10^6 B/s) for 1M. p99: fio's completion latency "
        "(clat). CPU µs/IO: the server's utime+stime over fio's "
        "measurement window ÷ I/Os completed in it. Ratios are "
        "blockmirror ÷ peer: above 1 is better for throughput, worse for "
        "p99 and CPU.",
        ""]
    if "bm" in servers and "qemu-nbd" in servers:
        lines += ["**blockmirrord vs qemu-nbd `--cache=writeback "
                  "--aio=threads`** (both buffered: the like-for-like "
                  "peer)", ""] + table_vs(s, "qemu-nbd") + [""]
    if "bm" in servers and "qemu-nbd-direct" in servers:
        lines += ["**blockmirrord vs qemu-nbd `--cache=none --aio=native`** "
                  "(O_DIRECT, the set-up of shared/bench scenario f)", ""] + \
            table_vs(s, "qemu-nbd-direct") + [""]
    lines += ["Every run (throughput / p50 / p99 µs / CPU µs per IO / "
              "server CPU % of one core / load average 1 min at start):", "",
              "| workload | rep | " + " | ".join(SHORT[x] for x in servers)
              + " |", "|---|---" + "|---" * len(servers) + "|"]
    for w in cfg["workloads"]:
        for rep in range(1, cfg["repeat"] + 1):
            cells = []
            for sv in servers:
                r = [x for x in res["runs"] if x["workload"] == w and
                     x["rep"] == rep and x["server"] == sv]
                if not r:
                    cells.append("-")
                    continue
                r = r[0]
                cells.append(
                    f"{thr(r, w)} / {f0(r['clat_p50_us'])} / "
                    f"{f0(r['clat_p99_us'])} / "
                    f"{f0(r['server_cpu_us_per_io'], 1)} / "
                    f"{f0(r['server_cpu_pct'])} % / "
                    f"{(r['loadavg'] or '-').split()[0]}")
            lines.append(f"| {w} | {rep} | " + " | ".join(cells) + " |")
    lines += ["", f"{res['host']['cpus']} CPUs; load average (1/5/15 min) "
              f"{res.get('loadavg_start')} at start, "
              f"{res.get('loadavg_end')} at end; "
              f"{res['versions'].get('blockmirrord')} built "
              f"{res['versions'].get('binaries_built')} (git "
              f"{res['versions'].get('git_head_at_bench')}); "
              f"{res['versions'].get('qemu-nbd')}; {res['date']}."]
    return "\n".join(lines)


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G",
                    help="image size, a multiple of 1M (default 1G)")
    ap.add_argument("--runtime", type=int, default=8,
                    help="fio measurement time per workload, s (default 8)")
    ap.add_argument("--ramp", type=int, default=1,
                    help="fio ramp time before it, s (default 1)")
    ap.add_argument("--repeat", type=int, default=2,
                    help="repetitions; medians are reported (default 2)")
    ap.add_argument("--servers", default=",".join(SERVERS),
                    help=f"comma list from {','.join(SERVERS)} (default: "
                         "all)")
    ap.add_argument("--workloads", default=None,
                    help="comma list of workload numbers 1-6 (default all: "
                         + "; ".join(f"{i + 1} {w[0]}"
                                     for i, w in enumerate(WORKLOADS)) + ")")
    ap.add_argument("--bin-dir", default=os.path.join(ROOT, "target",
                                                      "release"),
                    help="where blockmirrord and mirrorctl are "
                         "(default target/release)")
    ap.add_argument("--workdir", default=None,
                    help="parent of the run's temp dir (default "
                         "target/bench-work)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the run's temp dir (images, logs, fio JSON)")
    ap.add_argument("--md", default=None, help="also write markdown here")
    ap.add_argument("--json", default=None, help="write all data here")
    args = ap.parse_args()
    size = parse_size(args.size)
    if size <= 0 or size % MiB:
        ap.error("--size must be a positive multiple of 1M")
    servers = [x.strip() for x in args.servers.split(",") if x.strip()]
    for x in servers:
        if x not in SERVERS:
            ap.error(f"unknown server {x}")
    workloads = WORKLOADS
    if args.workloads:
        try:
            workloads = [WORKLOADS[int(i) - 1]
                         for i in args.workloads.split(",")]
        except (ValueError, IndexError):
            ap.error("--workloads: numbers 1-6")

    bins = [os.path.join(args.bin_dir, b) for b in ("blockmirrord",
                                                      "mirrorctl")]
    if "bm" in servers:
        missing = [b for b in bins if not os.access(b, os.X_OK)]
        if missing:
            print(f"missing release binaries: {', '.join(missing)}\nbuild "
                  f"them first:\n  (cd {ROOT} && cargo build --release "
                  "--bins)", file=sys.stderr)
            return 2
    tools = ["fio"] + (["qemu-nbd"] if any(x.startswith("qemu")
                                           for x in servers) else [])
    absent = [t for t in tools if not shutil.which(t)]
    if absent:
        print(f"missing tools: {', '.join(absent)}", file=sys.stderr)
        return 2
    cp = subprocess.run(["fio", "--enghelp"], stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True)
    if "nbd" not in [x.strip() for x in cp.stdout.splitlines()]:
        print("this fio has no nbd ioengine (Debian's fio 3.33 has it)",
              file=sys.stderr)
        return 2

    base = os.path.abspath(args.workdir or
                           os.path.join(ROOT, "target", "bench-work"))
    os.makedirs(base, exist_ok=True)
    rundir = tempfile.mkdtemp(prefix="nbd-fio-", dir=base)
    disk = Disk(rundir)
    results = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": {"cpus": os.cpu_count(), "uname": " ".join(
            platform.uname()[i] for i in (0, 2, 4)),
            "mem_total": mi.proc_meminfo("MemTotal")},
        "config": {"size": size, "repeat": args.repeat,
                   "runtime": args.runtime, "ramp": args.ramp,
                   "servers": servers,
                   "workloads": [w[0] for w in workloads],
                   "workdir": rundir},
        "runs": []}
    results["loadavg_start"] = loadavg()
    git = mi.git_state()  # now: others may commit while it runs
    built = datetime.datetime.fromtimestamp(os.path.getmtime(
        bins[0])).isoformat(timespec="seconds") \
        if os.path.exists(bins[0]) else None
    if "bm" in servers and args.bin_dir == os.path.dirname(mi.BMD):
        stale = mi.binaries_stale()
        if stale:
            log(f"warning: {stale} is newer than the release binaries")
    log(f"work dir {rundir}; load average {results['loadavg_start']}")
    srv = {}
    ok = False
    try:
        imgs = {x: os.path.join(rundir, f"{x}.raw") for x in servers}
        make_images(list(imgs.values()), size)
        for x in servers:
            if x == "bm":
                srv[x] = BmServer(rundir, imgs[x], args.bin_dir)
            else:
                srv[x] = QemuNbdServer(rundir, imgs[x],
                                       x == "qemu-nbd-direct")
            srv[x].start()
            log(f"{x}: {srv[x].desc['argv']} (pid {srv[x].pid})")
        results["servers"] = {x: srv[x].desc for x in servers}
        for rep in range(1, args.repeat + 1):
            for wi, (w, rw, bs, qd) in enumerate(workloads):
                # who goes first rotates from workload to workload and
                # from repetition to repetition
                k = (rep - 1 + wi) % len(servers)
                for x in servers[k:] + servers[:k]:
                    tag = f"{x}-{rw}-{bs}-qd{qd}-r{rep}"
                    r = run_fio(srv[x], rundir, tag, rw, bs, qd,
                                args.runtime, args.ramp, disk)
                    r.update(server=x, workload=w, rep=rep)
                    results["runs"].append(r)
                    log(f"rep {rep} {w:18s} {x:16s} "
                        f"{r['iops']:8.0f} IOPS {r['MBps']:7.1f} MB/s  "
                        f"p50 {f0(r['clat_p50_us']):>5} p99 "
                        f"{f0(r['clat_p99_us']):>6} us  cpu "
                        f"{f0(r['server_cpu_us_per_io'], 1)} us/IO "
                        f"({f0(r['server_cpu_pct'])} %)  threads "
                        f"{r['server_threads']}  load {r['loadavg']}")
        ok = True
    except BenchError as e:
        log(f"FAILED: {e}")
        log(f"work dir kept for inspection: {rundir}")
        if args.json:
            results["error"] = str(e)
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        return 1
    finally:
        for x in srv.values():
            x.stop()
        if ok and not args.keep:
            shutil.rmtree(rundir, ignore_errors=True)
    results["loadavg_end"] = loadavg()
    fio_v = subprocess.run(["fio", "--version"], stdout=subprocess.PIPE,
                           text=True).stdout.strip()
    qv = results["servers"].get("qemu-nbd", results["servers"].get(
        "qemu-nbd-direct", {})).get("version")
    results["versions"] = {
        "fio": fio_v, "qemu-nbd": qv,
        "blockmirrord": results["servers"].get("bm", {}).get("version"),
        "git_head_at_bench": git,
        "binaries_built": built}
    results["config"]["workloads_run"] = [w[0] for w in workloads]
    results["summary"] = summarize(results["runs"], servers)
    md = markdown(results)
    results["markdown"] = md
    print(md)
    if args.md:
        with open(args.md, "w") as f:
            f.write(md + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))
    sys.exit(main())
