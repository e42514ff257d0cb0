#!/usr/bin/env python3
"""Convergence under guest load: blockmirror vs QEMU's mirror job (issue 4).

One run, one machine, one work directory, the same guest workloads over NBD
for every contender:

  qemu-bg    qemu-storage-daemon, blockdev-mirror sync=full
             copy-mode=background (the set-up of
             shared/bench/qemu_mirror_peer.py: raw over file, O_DIRECT +
             aio=native unless --qemu-cache buffered; slow target = a
             throttle filter node, limits.bps-write)
  qemu-wb    the same, copy-mode=write-blocking
  bm-bg      blockmirrord (fresh --state-dir), `volume attach src`, `volume
             attach dst` (a fresh sparse file), `volume set-limits dst
             --write-bps N` for the slow target, `export add src`, `mirror
             start src --target volume:dst --mode background`
  bm-wb      the same, --mode write-blocking
  bm-auto    the same, --mode auto

Guest workloads (fio --ioengine=nbd on the engine's NBD export; the writer
classes of shared/bench/qemu_mirror_peer.py):

  seed       the seed's `dd bs=1k` loop at block level (scenario g): 1 KiB
             random writes at QD1 in a 16 MiB hot region in the middle of
             the disk, an NBD flush after every 4 writes
  4k-qd4     random 4 KiB writes over the whole disk, queue depth 4
  4k-qd16    the same at queue depth 16

Parts (--parts, default all):

  slow   (a)+(b)+(c) every workload x contender onto a target limited to
         --throttle-mbps (20 MB/s), --slow-size disk: time to READY, to
         COMPLETED, guest IOPS / latency before and after READY, copy
         amplification. `complete` is sent --after-ready s after READY
         while the writer still runs; the writer is stopped --tail s after
         COMPLETED. A job not READY when the writer's time is up gets
         --drain-timeout s with the writer stopped ("not converged").
  fast   (b)+(c)+(e) the same onto an unlimited target, --fast-size disk.
         The pivot (e, scenario i) is read from the fast runs of
         --pivot-workload (4k-qd4): the longest gap between guest write
         completions in [complete request - 1 s, COMPLETED + 1 s].
  mem    (d) scenario h: write-blocking onto a --mem-throttle-mbps (5 MB/s)
         target while BS:QD writers (--mem-variants 1M:64,4k:64,32M:4) run;
         peak RSS (VmRSS sampled every 0.1 s, and VmHWM reset just before
         the job) over the daemon's idle RSS.

Yardsticks of the guest-IOPS targets: the mirror run's own writer with no
job, in the seconds before the job and after the pivot (`bracket`; the
writer runs --tail s after COMPLETED). Shown beside them, the "no mirror"
baselines: the same writer on the same engine set-up, no job, in a run of
its own (one per engine family, workload, disk size and repetition; in
the fast part it runs as long as the mirror run, and a phase is compared
with its IOPS over the same seconds of the writer's life and over its
first --baseline-runtime s). The slow part also measures the physical
limit of the seed's flushes made durable on both sides
(bench/flush_ceiling.py).

Python 3 standard library (+ matplotlib for the plots, if importable).
Needs release binaries (it builds nothing), qemu-storage-daemon, fio with
the nbd engine (else the harness's Python NBD writer), and
/work/shared/bench/qemu_mirror_peer.py (--shared-bench).

    cargo build --release --bins
    python3 bench/convergence.py --quick          # ~4 min
    python3 bench/convergence.py                  # full, ~25 min

See bench/README.md for what the numbers mean.
"""

import argparse
import bisect
import datetime
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import mirror_idle as mi  # noqa: E402  (paths, versions, process helpers)
import flush_ceiling  # noqa: E402  (the seed's physical limit)

ROOT = mi.ROOT
MiB = 1 << 20
SHARED_BENCH_DEFAULT = "/work/shared/bench"

CONTENDERS = {
    "qemu-bg": ("qemu", "background"),
    "qemu-wb": ("qemu", "write-blocking"),
    "bm-bg": ("bm", "background"),
    "bm-wb": ("bm", "write-blocking"),
    "bm-auto": ("bm", "auto"),
}
ORDER = list(CONTENDERS)
# the QEMU contender each blockmirror mode is set beside (QEMU has no auto:
# its converging mode is write-blocking)
PEER = {"bm-bg": "qemu-bg", "bm-wb": "qemu-wb", "bm-auto": "qemu-wb"}
LABEL = {
    "qemu-bg": "QEMU background",
    "qemu-wb": "QEMU write-blocking",
    "bm-bg": "blockmirror background",
    "bm-wb": "blockmirror write-blocking",
    "bm-auto": "blockmirror auto",
}
WORKLOADS = ("seed", "4k-qd4", "4k-qd16")
# Extra `mirrorctl mirror start` options (--mirror-args).
EXTRA_MIRROR_ARGS = []
WL_LABEL = {"seed": "seed: 1 KiB QD1 + flush/4, 16 MiB hot",
            "4k-qd4": "random 4 KiB QD4", "4k-qd16": "random 4 KiB QD16"}

# targets of the issue
T_READY_FACTOR = 1.3
T_P99_MS = 50.0
T_SEED_WINDOW = 0.5
T_SEED_MAX_MS = 50.0
T_FIRST_PASS = 0.5
T_AFTER_READY = 0.8
T_AMP_AUTO = 2.0
T_RSS_SLACK = 8 * MiB
T_PIVOT_MS = 3.0
# The tight pivot window ends this long after COMPLETED.
PIVOT_TAIL_S = 0.25
# The no-job stretch after the pivot must be this long to serve as a
# yardstick (`bracket`); --tail sets it (the writer runs --tail s after
# COMPLETED, the first of them left out).
BRACKET_MIN_AFTER_S = 3.0

q = None  # qemu_mirror_peer, imported in main()
log = mi.log


def parse_size(s):
    return mi.parse_size(s)


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(v, nd=0, none="-"):
    if v is None:
        return none
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        return f"{v:.{nd}f}"
    return str(v)


# --------------------------------------------------------------------------
# blockmirror engine (the MirrorEngine contract of qemu_mirror_peer.py)
# --------------------------------------------------------------------------

class BmEngine:
    """blockmirrord + mirrorctl. Event times are the server's own (`time`
    of `mirrorctl -o json watch` lines, RFC 3339, same host clock as fio's
    log); the job's start is its `created_at`."""

    name = "blockmirror"
    family = "bm"
    JOB = "cv"

    def __init__(self, bin_dir, granularity=None, buf_size=None,
                 direct=False):
        self.direct = direct
        self.bmd = os.path.join(bin_dir, "blockmirrord")
        self.ctlbin = os.path.join(bin_dir, "mirrorctl")
        self.granularity, self.buf_size = granularity, buf_size
        self.proc = self.watcher = self.logf = None
        self.cond = threading.Condition()
        self.ev = []
        self.ev_start = 0
        self.at_ready = None

    def ctl(self, *args, timeout=60, check=True):
        cp = subprocess.run([self.ctlbin, "--socket", self.sock] +
                            [str(a) for a in args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, timeout=timeout)
        if check and cp.returncode:
            raise RuntimeError(f"mirrorctl {' '.join(map(str, args))}: "
                               f"{(cp.stderr or cp.stdout).strip()[:300]}")
        return cp

    def job(self, timeout=10):
        cp = self.ctl("-o", "json", "job", "show", self.JOB, timeout=timeout,
                      check=False)
        if cp.returncode:
            return {}
        return json.loads(cp.stdout)

    def start(self, src_path, tgt_path, size, workdir, slow_target_bps):
        self.state = tempfile.mkdtemp(prefix="bm-state-", dir=workdir)
        self.sock = os.path.join(self.state, "blockmirror.sock")
        self.nbd_path = os.path.join(self.state, "nbd.sock")
        self.logf = open(os.path.join(workdir, "blockmirrord.log"), "ab")
        self.proc = subprocess.Popen([self.bmd, "--state-dir", self.state],
                                     stdout=self.logf,
                                     stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + 20
        while not (os.path.exists(self.sock) and self.ctl(
                "volume", "list", check=False).returncode == 0):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("blockmirrord did not start (see "
                                   "blockmirrord.log in the work dir)")
            time.sleep(0.03)
        direct = ["--direct"] if self.direct else []
        self.ctl("volume", "attach", "src", "--path", src_path, *direct)
        self.ctl("volume", "attach", "dst", "--path", tgt_path, *direct)
        self.slow_bps = slow_target_bps
        if slow_target_bps:
            # a plain number is bytes/s (20M would be 20 MiB/s)
            self.ctl("volume", "set-limits", "dst", "--write-bps",
                     int(slow_target_bps))
        self.watcher = subprocess.Popen(
            [self.ctlbin, "--socket", self.sock, "-o", "json", "watch"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            bufsize=1)
        threading.Thread(target=self._watch, args=(self.watcher,),
                         daemon=True).start()

    def _watch(self, proc):
        for line in proc.stdout:
            arr = time.time()
            try:
                o = json.loads(line)
            except ValueError:
                continue
            if not isinstance(o, dict):
                continue
            o["_t"] = mi.parse_rfc3339(o.get("time")) or arr
            o["_arrival"] = arr
            with self.cond:
                self.ev.append(o)
                self.cond.notify_all()

    def _find(self, types, timeout):
        deadline = time.monotonic() + timeout
        with self.cond:
            i = self.ev_start
            while True:
                while i < len(self.ev):
                    o = self.ev[i]
                    if o.get("job_id") == self.JOB and \
                            str(o.get("type", "")).upper() in types:
                        return o
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(min(left, 0.5))

    def export_source(self):
        self.ctl("export", "add", "src")
        return f"nbd+unix:///src?socket={self.nbd_path}"

    def start_mirror(self, mode):
        args = ["-o", "json", "mirror", "start", "src", "--target",
                "volume:dst", "--job", self.JOB, "--mode", mode,
                "--no-auto-dismiss"]
        if self.granularity:
            args += ["--granularity", self.granularity]
        if self.buf_size:
            args += ["--buf-size", self.buf_size]
        args += EXTRA_MIRROR_ARGS
        with self.cond:
            self.ev_start = len(self.ev)
        self.at_ready = None
        t_call = time.time()
        out = self.ctl(*args)
        try:
            t = mi.parse_rfc3339(json.loads(out.stdout).get("created_at"))
        except ValueError:
            t = None
        self.spec = None
        try:
            self.spec = json.loads(out.stdout).get("spec")
        except ValueError:
            pass
        return t if t and abs(t - t_call) < 5 else t_call

    def wait_ready(self, timeout):
        deadline = time.monotonic() + timeout
        ends = ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED",
                "BLOCK_JOB_ERROR")
        while True:
            o = self._find(("BLOCK_JOB_READY",) + ends,
                           min(2.0, max(0.0, deadline - time.monotonic())))
            if o is not None:
                if o["type"].upper() != "BLOCK_JOB_READY":
                    return None
                j = self.job()
                self.at_ready = {"copied_bytes": j.get("copied_bytes"),
                                 "synced_guest_bytes": j.get(
                                     "synced_guest_bytes"),
                                 "current_progress": o.get(
                                     "current_progress"),
                                 "t_poll": time.time()}
                return o["_t"]
            # fallback if the watch stream died
            if self.watcher.poll() is not None:
                j = self.job()
                if j.get("state") in ("ready", "standby"):
                    self.at_ready = {"copied_bytes": j.get("copied_bytes"),
                                     "synced_guest_bytes": j.get(
                                         "synced_guest_bytes"),
                                     "t_poll": time.time()}
                    return time.time()
            if time.monotonic() >= deadline:
                return None

    def progress(self):
        j = self.job()
        if not j:
            return {}
        return {"offset": j.get("current_progress"),
                "len": j.get("total_progress"),
                "ready": j.get("state") in ("ready", "standby"),
                "status": j.get("state"),
                "dirty": j.get("dirty_bytes"),
                "copied": j.get("copied_bytes"),
                "copy_mode": j.get("copy_mode"),
                "actively_synced": j.get("actively_synced"),
                "in_flight": j.get("in_flight_bytes"),
                "peak_in_flight": j.get("peak_in_flight_bytes")}

    def complete(self, timeout):
        t_req = time.time()
        res = {"t_request": t_req, "t_completed": None,
               "bytes_copied": None, "error": None}
        try:
            cp = self.ctl("job", "complete", self.JOB, "--wait",
                          timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            res["error"] = "timeout"
            return res
        if cp.returncode:
            res["error"] = (cp.stderr or cp.stdout).strip()[:300]
        o = self._find(("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"), 2.0)
        if o is not None:
            res["t_completed"] = o["_t"]
            res["pause_us"] = o.get("pause_us")
            res["pivoted"] = o.get("pivoted")
            if o["type"].upper() == "BLOCK_JOB_CANCELLED":
                res["error"] = res["error"] or "cancelled"
            res["error"] = res["error"] or o.get("error")
        j = self.job()
        res["bytes_copied"] = j.get("copied_bytes")
        res["synced_guest_bytes"] = j.get("synced_guest_bytes")
        res["peak_in_flight"] = j.get("peak_in_flight_bytes")
        self.ctl("job", "dismiss", self.JOB, check=False)
        return res

    def lift_limits(self):
        self.ctl("volume", "set-limits", "dst", "--write-bps", 0,
                 check=False)

    def cancel(self, timeout):
        if self.ctl("job", "cancel", self.JOB, "--force",
                    check=False).returncode:
            return
        try:
            self.ctl("job", "wait", self.JOB, "--until", "concluded,null",
                     "--timeout", timeout, timeout=timeout + 10,
                     check=False)
        except subprocess.TimeoutExpired:
            pass
        self.ctl("job", "dismiss", self.JOB, check=False)

    def events(self):
        with self.cond:
            evs = self.ev[self.ev_start:]
        out = []
        for o in evs:
            if o.get("job_id") != self.JOB:
                continue
            d = {k: v for k, v in o.items() if not k.startswith("_")}
            out.append({"t": o["_t"], "event": o.get("type"), "data": d})
        return out

    def stop(self):
        if self.watcher:
            self.watcher.terminate()
            try:
                self.watcher.wait(5)
            except subprocess.TimeoutExpired:
                self.watcher.kill()
                self.watcher.wait()
            self.watcher = None
        if self.proc:
            mi.stop_proc(self.proc, timeout=30)
            self.proc = None
        if self.logf:
            self.logf.close()
            self.logf = None
        shutil.rmtree(getattr(self, "state", ""), ignore_errors=True)

    def pids(self):
        return [self.proc.pid] if self.proc else []

    def info(self):
        return {"engine": "blockmirror", "version": mi.version(self.bmd),
                "spec": getattr(self, "spec", None),
                "slow_target": "volume set-limits dst --write-bps"}


def make_qemu_engine(direct, granularity, buf_size):
    class QemuPeer(q.QemuEngine):
        """qemu_mirror_peer.QemuEngine plus what this benchmark reads:
        the job's offset at READY (from BLOCK_JOB_READY) and a way to lift
        the throttle before cancelling (scenario h)."""
        family = "qemu"

        def wait_ready(self, timeout):
            self.at_ready = None
            t = super().wait_ready(timeout)
            if t is not None:
                for e in self.qmp.events[self.ev_start:]:
                    if e["event"] == "BLOCK_JOB_READY":
                        self.at_ready = {"copied_bytes":
                                         e.get("data", {}).get("offset")}
                        break
            return t

        def progress(self):
            p = super().progress()
            if p and p.get("len") is not None:
                # QEMU has no dirty count: len - offset is the work left
                # (dirty + in flight), as in the shared harness
                p["dirty"] = p["len"] - (p.get("offset") or 0)
                p["copied"] = p.get("offset")
            return p

        def lift_limits(self):
            if self.slow_bps:
                try:
                    self.qmp.cmd("qom-set", {"path": "tg0",
                                             "property": "limits",
                                             "value": {"bps-write": 0}})
                except q.QMPError as e:
                    log(f"  qom-set limits: {e}")

    return QemuPeer(direct_io=direct, granularity=granularity,
                    buf_size=buf_size)


# --------------------------------------------------------------------------
# measurement helpers
# --------------------------------------------------------------------------

def worst_window(times, a, b, width=1.0, step=0.05):
    """Fewest completions in any [t, t+width) inside [a, b): (IOPS, t)."""
    if a is None or b is None or b - a < width:
        return None
    best = None
    t = a
    while t + width <= b + 1e-9:
        n = bisect.bisect_left(times, t + width) - bisect.bisect_left(times, t)
        if best is None or n < best[0]:
            best = (n, t)
        t += step
    return best[0] / width, best[1]


def longest_gap(times, a, b):
    """Longest time between consecutive completions inside [a, b)."""
    i, j = bisect.bisect_left(times, a), bisect.bisect_left(times, b)
    ts = times[i:j]
    if len(ts) < 2:
        return None, None
    gap, at = max((y - x, x) for x, y in zip(ts, ts[1:]))
    # fio's times are whole milliseconds moved onto the wall clock by a
    # float offset: round away the float error (3.00009 ms is 3 ms).
    return round(gap, 6), at


def phase(samples, times, a, b):
    """q.window_stats plus the worst one-second window."""
    st = q.window_stats(samples, a, b)
    if not st:
        return None
    ww = worst_window(times, a, b)
    st["worst1s_iops"] = ww[0] if ww else None
    st["worst1s_at"] = ww[1] if ww else None
    return st


def bracket(pre, after_pivot):
    """No-job IOPS of a mirror run's own writer: the seconds before the
    job and those after the pivot, pooled (completions ÷ seconds).

    On a shared machine a writer's rate moves 2-4x within a minute, so a
    no-mirror run taken a minute away can be far off the rate the machine
    gave this run; the stretches on both sides of the job are the same
    writer, connection and queue depth, seconds away. None without at
    least BRACKET_MIN_AFTER_S after the pivot (the pre-job stretch alone
    is short, and starts on a cold page cache)."""
    if not pre or not after_pivot or \
            after_pivot.get("seconds", 0) < BRACKET_MIN_AFTER_S:
        return None
    secs = pre["seconds"] + after_pivot["seconds"]
    return (pre["ios"] + after_pivot["ios"]) / secs


def per_second(samples, t0, t_from, t_to):
    """[[t_rel, ios, p50_us, max_us]] for 1 s buckets from t_from."""
    tl = q.timeline(samples, t_from, t_to)
    off = t_from - t0
    return [[round(r[0] + off, 1)] + r[1:] for r in tl]


# --------------------------------------------------------------------------
# the benchmark
# --------------------------------------------------------------------------

class Bench:
    def __init__(self, a, workdir):
        self.a = a
        self.workdir = workdir
        self.writer_cls = q.FioWriter if (a.writer == "fio" or (
            a.writer == "auto" and q.fio_has_nbd())) else q.PyNbdWriter
        self.sources = {}
        self.baselines = {}
        self.baseline_samples = {}
        self.results = []
        self.mem_results = []
        self.baseline_runs = []
        self.ceilings = []

    # -- set-up
    def engine(self, family):
        if family == "qemu":
            return make_qemu_engine(self.a.qemu_cache == "direct",
                                    self.a.granularity, self.a.buf_size)
        return BmEngine(self.a.bin_dir, self.a.granularity, self.a.buf_size,
                        self.a.bm_cache == "direct")

    def source(self, size):
        if size not in self.sources:
            p = os.path.join(self.workdir, f"src-{size // MiB}M.raw")
            t0 = time.monotonic()
            q.make_source_image(p, size)
            log(f"random source {p} ({size // MiB} MiB) in "
                f"{time.monotonic() - t0:.1f}s")
            self.sources[size] = p
        return self.sources[size]

    def prep(self, size):
        src = self.source(size)
        tgt = os.path.join(self.workdir, "tgt.raw")
        q.make_empty_target(tgt, size)
        os.sync()  # no writeback of an earlier run during this one
        mi.evict(src)
        return src, tgt

    def spec(self, wl, size, runtime):
        if wl == "seed":
            hot = parse_size(self.a.hot_size)
            return {"rw": "randwrite", "bs": "1k", "iodepth": 1,
                    "rate_iops": None,
                    "offset": (size // 2) // MiB * MiB if size > 2 * hot
                    else 0, "span": min(hot, size),
                    "fsync_every": self.a.seed_fsync_every,
                    "runtime": runtime}
        qd = int(wl.split("qd")[1])
        return {"rw": "randwrite", "bs": "4k", "iodepth": qd,
                "rate_iops": None, "runtime": runtime}

    def writer(self, uri, tag, sp):
        extra = {k: sp[k] for k in ("rw", "offset", "span", "fsync_every")
                 if sp.get(k) is not None}
        return self.writer_cls(uri, self.workdir, tag,
                               int(math.ceil(sp["runtime"])), sp["iodepth"],
                               sp["bs"], sp["rate_iops"], **extra)

    # -- no-mirror baseline
    def baseline(self, family, wl, size, rep, span):
        """The writer with no job, for `span` s (as long as the mirror runs
        it is compared with): stats over its first --baseline-runtime s,
        and its samples, for comparing a mirror phase with the same
        seconds of the writer's life (see `aligned`)."""
        key = (family, wl, size, rep)
        if key in self.baselines:
            return self.baselines[key]
        src, tgt = self.prep(size)
        eng = self.engine(family)
        sp = self.spec(wl, size, max(span, self.a.warmup +
                                     self.a.baseline_runtime))
        r = {"family": family, "workload": wl, "size": size, "rep": rep,
             "runtime": sp["runtime"]}
        try:
            eng.start(src, tgt, size, self.workdir, None)
            uri = eng.export_source()
            w = self.writer(uri, f"base-{family}-{wl}-{size // MiB}M-r{rep}",
                            sp)
            w.start()
            r["writer_rc"] = w.wait(sp["runtime"] + 30)
            samples = w.samples()
            times = [s[0] for s in samples]
            a = w.t_launch + self.a.warmup
            b = min(w.t_end, a + self.a.baseline_runtime) - 0.2
            r["stats"] = phase(samples, times, a, b)
            r["writer"] = w.summary()
            end = min(w.t_end, w.t_launch + sp["runtime"])
            r["per_second"] = per_second(samples, w.t_launch, w.t_launch, end)
            # for `aligned` (too many to keep in the JSON)
            self.baseline_samples[key] = (samples, w.t_launch, end - 0.2)
        finally:
            eng.stop()
        self.baselines[key] = r
        self.baseline_runs.append(r)
        st = r.get("stats") or {}
        log(f"  no mirror {family} {wl} {size // MiB}M: "
            f"{st.get('iops')} IOPS p50 {st.get('lat_p50_us')} p99 "
            f"{st.get('lat_p99_us')} max {st.get('lat_max_us')} us, worst "
            f"1 s {st.get('worst1s_iops')}")
        return r

    def aligned(self, r, a_age, b_age):
        """No-mirror IOPS over [a_age, b_age) s of the writer's life: the
        same seconds a mirror phase covers. A writer's rate changes as it
        ages (the page cache fills, writeback starts), so a phase late in
        a mirror run is compared with the same stretch of the no-mirror
        run, not with its first seconds."""
        key = (r["family"], r["workload"], r["size"], r["rep"])
        got = self.baseline_samples.get(key)
        if not got:
            return None
        samples, launch, end = got
        a, b = launch + a_age, min(launch + b_age, end)
        # a baseline cut short by more than a tenth does not cover the phase
        if b - a < 0.9 * (b_age - a_age):
            return None
        st = q.window_stats(samples, a, b)
        return st.get("iops") if st else None

    # -- one convergence run (parts slow and fast)
    def conv(self, tkind, wl, cname, rep):
        a = self.a
        family, mode = CONTENDERS[cname]
        slow = tkind == "slow"
        size = a.slow_size if slow else a.fast_size
        bps = int(a.throttle_mbps * 1e6) if slow else None
        ideal = size / bps if bps else None
        if slow:
            ready_cap = a.slow_ready_cap or T_READY_FACTOR * ideal + (
                1 if a.quick else 2)
        else:
            ready_cap = a.fast_ready_cap
        runtime = a.warmup + ready_cap + a.after_ready + a.tail + 1
        # only the fast part's targets use the same-seconds comparison
        bl = self.baseline(family, wl, size, rep, 0 if slow else runtime)
        src, tgt = self.prep(size)
        eng = self.engine(family)
        sp = self.spec(wl, size, runtime)
        r = {"part": tkind, "workload": wl, "contender": cname,
             "family": family, "mode": mode, "rep": rep, "size": size,
             "slow_target_bps": bps, "ideal_s": ideal,
             "writer_spec": sp}
        writer = poller = None
        try:
            eng.start(src, tgt, size, self.workdir, bps)
            uri = eng.export_source()
            r["engine"] = eng.info()
            writer = self.writer(uri, f"{tkind}-{wl}-{cname}-r{rep}", sp)
            writer.start()
            time.sleep(a.warmup)
            if not writer.running():
                raise RuntimeError("writer died before the mirror started "
                                   "(see fio-*.stderr in the work dir)")
            t_start = eng.start_mirror(mode)
            poller = q.ProgressPoller(eng, t_start, a.poll_interval).start()
            w_end = writer.t_launch + sp["runtime"]
            t_ready = eng.wait_ready(max(0.1, w_end - 1.0 - time.time()))
            at_ready = getattr(eng, "at_ready", None)
            c = None
            t_wend = None
            if t_ready is not None:
                r["ready_under_load"] = True
                t_c = min(t_ready + a.after_ready, w_end - a.tail)
                time.sleep(max(0.0, t_c - time.time()))
                if writer.running():
                    c = eng.complete(a.complete_timeout)
                    c["under_load"] = writer.running()
                    t_done = c["t_completed"] or time.time()
                    time.sleep(max(0.0, t_done + a.tail - time.time()))
                writer.stop()
                t_wend = writer.t_end
            else:
                r["ready_under_load"] = False
                writer.wait(sp["runtime"] + 60)
                t_wend = writer.t_end
                snap = eng.progress()
                r["at_writer_stop"] = snap
                t_ready = eng.wait_ready(a.drain_timeout)
                at_ready = getattr(eng, "at_ready", None)
                # READY in the writer's last second counts as at the stop
                r["ready_after_stop_s"] = max(0.0, t_ready - t_wend) \
                    if t_ready else None
            if c is None and t_ready is not None:
                c = eng.complete(a.complete_timeout)
                c["under_load"] = False
            if t_ready is None:
                r["at_give_up"] = eng.progress()
                eng.cancel(30)
            r["progress"] = poller.stop()
            poller = None
            evs = eng.events() if hasattr(eng, "events") else []
            r["events"] = [dict(e, t=round(e["t"] - t_start, 4))
                           for e in evs]
            samples = writer.samples()
            r["writer_summary"] = writer.summary()
            r["writer_kind"] = writer.kind
        finally:
            if poller:
                poller.stop()
            if writer and writer.running():
                writer.wait(0)
            eng.stop()
        self.measure(r, samples, t_start, t_ready, t_wend, c, at_ready, bl,
                     writer)
        m = r["m"]
        log(f"  {tkind} {wl} {cname}: READY {fmt(m.get('ready_s'), 2)} s"
            f"{'' if r['ready_under_load'] else ' (after writer stop: ' + fmt(m.get('ready_after_stop_s'), 2) + ' s)'}"
            f", complete {fmt(m.get('complete_ms'), 1)} ms, amp@READY "
            f"{fmt(m.get('amp_ready'), 2)}, before READY "
            f"{fmt(m.get('before.iops'), 0)} IOPS p99 "
            f"{fmt(m.get('before.p99_ms'), 1)} ms max "
            f"{fmt(m.get('before.max_ms'), 1)} ms, after READY "
            f"{fmt(m.get('after.iops'), 0)} IOPS, gap "
            f"{fmt(m.get('pivot.tight_gap_ms'), 1)} ms (± 1 s: "
            f"{fmt(m.get('pivot.gap_ms'), 1)} ms)")
        self.results.append(r)
        return r

    def measure(self, r, samples, t_start, t_ready, t_wend, c, at_ready, bl,
                writer):
        times = [s[0] for s in samples]
        size = r["size"]
        m = {}
        ready_under = r.get("ready_under_load")
        m["converged"] = t_ready is not None
        m["ready_s"] = (t_ready - t_start) if ready_under else None
        m["ready_after_stop_s"] = r.get("ready_after_stop_s")
        m["load_s"] = t_wend - t_start
        if r["ideal_s"] and m["ready_s"] is not None:
            m["ready_vs_ideal"] = m["ready_s"] / r["ideal_s"]
        snap = r.get("at_writer_stop")
        if snap and snap.get("dirty") is not None:
            m["dirty_at_writer_stop"] = snap["dirty"]
        t_req = t_done = None
        if c:
            t_req = c["t_request"]
            t_done = c.get("t_completed")
            m["complete_under_load"] = bool(c.get("under_load"))
            m["complete_error"] = c.get("error")
            if t_done:
                m["complete_ms"] = 1000 * (t_done - t_req)
                m["to_completed_s"] = t_done - t_start
            m["pause_us"] = c.get("pause_us")
            m["copied_final"] = c.get("bytes_copied")
            if m["copied_final"] is not None:
                m["amp_final"] = m["copied_final"] / size
                # everything the target was sent (QEMU's offset counts
                # the same); QEMU has no separate figure
                if c.get("synced_guest_bytes") is not None:
                    m["sent_final"] = (m["copied_final"] +
                                       c["synced_guest_bytes"]) / size
        if at_ready and at_ready.get("copied_bytes") is not None:
            m["copied_ready"] = at_ready["copied_bytes"]
            m["amp_ready"] = m["copied_ready"] / size
            if at_ready.get("synced_guest_bytes") is not None:
                m["sent_ready"] = (m["copied_ready"] +
                                   at_ready["synced_guest_bytes"]) / size
        switches = [e for e in r.get("events", [])
                    if str(e.get("event")).upper() == "COPY_MODE_CHANGED"]
        r["mode_switches"] = [{"t": e["t"], **{k: e["data"].get(k) for k in
                                               ("from_mode", "to_mode",
                                                "reason")}}
                              for e in switches]
        # switches the policy made (not the one `complete` makes)
        t_req_rel = (t_req - t_start) if t_req else None
        to_wb = [s["t"] for s in r["mode_switches"]
                 if s.get("to_mode") == "write-blocking" and
                 s.get("reason") != "complete" and
                 (t_req_rel is None or s["t"] < t_req_rel)]
        m["switch_to_wb_s"] = to_wb[0] if to_wb else None
        # guest phases; the writer's last partial second is left out
        w_stop = min(t_wend, writer.t_launch + r["writer_spec"]["runtime"])
        end_load = w_stop - 0.2
        ph = {}
        ph["pre"] = phase(samples, times, writer.t_launch + 0.5, t_start)
        ready_cut = t_ready if (ready_under and t_ready) else None
        # [from, to) of each phase in seconds of the writer's life
        ph_span = {}
        before_end = min(ready_cut, end_load) if ready_cut else end_load
        ph["before"] = phase(samples, times, t_start, before_end)
        ph_span["before"] = (t_start - writer.t_launch,
                             before_end - writer.t_launch)
        if ready_cut:
            after_end = min(t_req, end_load) if (t_req and c.get(
                "under_load")) else end_load
            ph["after"] = phase(samples, times, ready_cut, after_end)
            ph_span["after"] = (ready_cut - writer.t_launch,
                                after_end - writer.t_launch)
        mirror_end = min(t_req, end_load) if (t_req and c and c.get(
            "under_load")) else end_load
        ph["mirror"] = phase(samples, times, t_start, mirror_end)
        if c and c.get("under_load") and t_done:
            w_a, w_b = t_req - 1.0, min(t_done + 1.0, end_load)
            pw = phase(samples, times, w_a, w_b) or {}
            gap, at = longest_gap(times, w_a, w_b)
            pw["gap_ms"] = gap * 1000 if gap is not None else None
            pw["gap_at_s"] = (at - t_req) if at is not None else None
            ph["pivot"] = pw
            # the same length of steady state just before (after READY)
            s_b = w_a
            s_a = max(ready_cut + 0.3 if ready_cut else w_a, s_b -
                      (w_b - w_a))
            if s_b - s_a >= 0.5:
                sg, _ = longest_gap(times, s_a, s_b)
                ph["steady_gap_ms"] = sg * 1000 if sg is not None else None
            ph["after_pivot"] = phase(samples, times, t_done + 1.0,
                                      end_load)
            # Tight: only what the pivot can touch, from the complete
            # request to just after COMPLETED (the ±1 s window above also
            # holds whatever the machine did before the request was sent),
            # against an equally long stretch just before the request.
            t_a, t_b = t_req, min(t_done + PIVOT_TAIL_S, end_load)
            tg, tat = longest_gap(times, t_a, t_b)
            ph["pivot_tight"] = {
                "gap_ms": tg * 1000 if tg is not None else None,
                "gap_at_s": (tat - t_req) if tat is not None else None}
            s_a = max(ready_cut + 0.3 if ready_cut else t_a,
                      t_a - (t_b - t_a))
            if t_a - s_a >= 0.1:
                sg, _ = longest_gap(times, s_a, t_a)
                ph["steady_tight_gap_ms"] = sg * 1000 if sg is not None \
                    else None
        r["guest"] = ph
        base = (bl or {}).get("stats") or {}
        m["base.iops"] = base.get("iops")
        m["base.p99_ms"] = base.get("lat_p99_us") / 1000 \
            if base.get("lat_p99_us") is not None else None
        m["base.worst1s"] = base.get("worst1s_iops")
        for k in ("pre", "before", "after", "mirror", "pivot",
                  "after_pivot"):
            st = ph.get(k)
            if not st:
                continue
            m[f"{k}.iops"] = st.get("iops")
            m[f"{k}.s"] = st.get("seconds")
            for p in ("p50", "p99", "max"):
                v = st.get(f"lat_{p}_us")
                m[f"{k}.{p}_ms"] = v / 1000 if v is not None else None
            m[f"{k}.worst1s"] = st.get("worst1s_iops")
            lo = ph_span.get(k)
            al = self.aligned(r, *lo) if lo else None
            m[f"{k}.base_aligned_iops"] = al
            if al:
                m[f"{k}.iops_pct_aligned"] = 100 * st["iops"] / al
            if m["base.iops"]:
                m[f"{k}.iops_pct"] = 100 * st["iops"] / m["base.iops"]
                if st.get("worst1s_iops") is not None:
                    m[f"{k}.worst1s_pct"] = 100 * st["worst1s_iops"] / \
                        m["base.iops"]
        # The same writer with no job, right before the job and after the
        # pivot: a yardstick next to the phases it judges (see `bracket`).
        adj = bracket(ph.get("pre"), ph.get("after_pivot"))
        m["adjacent.iops"] = adj
        for k in ("before", "after", "mirror"):
            st = ph.get(k)
            if adj and st:
                m[f"{k}.iops_pct_adjacent"] = 100 * st["iops"] / adj
                if st.get("worst1s_iops") is not None:
                    m[f"{k}.worst1s_pct_adjacent"] = \
                        100 * st["worst1s_iops"] / adj
        if ph.get("pivot"):
            m["pivot.gap_ms"] = ph["pivot"].get("gap_ms")
        m["steady.gap_ms"] = ph.get("steady_gap_ms")
        if ph.get("pivot_tight"):
            m["pivot.tight_gap_ms"] = ph["pivot_tight"].get("gap_ms")
        m["steady.tight_gap_ms"] = ph.get("steady_tight_gap_ms")
        r["m"] = m
        # time lines for the plots (t relative to job start)
        # 1 s buckets aligned on the job's start
        t_from = t_start - math.floor(t_start - writer.t_launch)
        r["per_second"] = per_second(samples, t_start, t_from, w_stop)
        # finer buckets for the plots: [t_rel, IOPS]
        r["iops_250ms"] = [[round(t_from - t_start + row[0], 2), row[1] * 4]
                           for row in q.timeline(samples, t_from, w_stop,
                                                 0.25)]
        r["t"] = {"writer_launch": writer.t_launch - t_start,
                  "writer_stop": t_wend - t_start,
                  "ready": (t_ready - t_start) if t_ready else None,
                  "complete_request": (t_req - t_start) if t_req else None,
                  "completed": (t_done - t_start) if t_done else None}

    # -- d: memory (scenario h)
    def mem(self, bs, qd, cname, rep):
        a = self.a
        family, mode = CONTENDERS[cname]
        size = a.slow_size
        bps = int(a.mem_throttle_mbps * 1e6)
        src, tgt = self.prep(size)
        eng = self.engine(family)
        r = {"part": "mem", "contender": cname, "family": family,
             "mode": mode, "rep": rep, "size": size, "bs": bs,
             "iodepth": qd, "slow_target_bps": bps}
        writer = poller = sampler = None
        try:
            eng.start(src, tgt, size, self.workdir, bps)
            uri = eng.export_source()
            r["engine"] = eng.info()
            pids = eng.pids()
            time.sleep(1.0)
            r["idle"] = q.proc_mem_sum(pids)
            sampler = q.MemSampler(pids).start()
            sp = {"rw": "randwrite", "bs": bs, "iodepth": qd,
                  "rate_iops": None, "runtime": a.mem_runtime}
            writer = self.writer(uri, f"mem-{bs}-qd{qd}-{cname}-r{rep}", sp)
            writer.start()
            time.sleep(a.warmup)
            r["prejob_rss_max"] = sampler.max_between(writer.t_launch,
                                                      time.time())
            r["hwm_reset"] = q.reset_hwm(pids)
            t_start = eng.start_mirror(mode)
            poller = q.ProgressPoller(eng, t_start, a.poll_interval).start()
            t_plan = writer.t_launch + a.mem_runtime
            t_ready = eng.wait_ready(max(0.1, t_plan - time.time()))
            r["ready_s"] = (t_ready - t_start) if t_ready else None
            time.sleep(max(0.0, t_plan - time.time()))
            mm = q.proc_mem_sum(pids)
            r["job_hwm"] = mm.get("VmHWM") if r["hwm_reset"] else None
            r["job_rss_max"] = sampler.max_between(t_start, time.time())
            prog = eng.progress() or {}
            r["at_end"] = prog
            # free the guest's queue quickly: lift the limit, cancel
            try:
                eng.lift_limits()
                eng.cancel(60)
            except Exception as e:  # noqa: BLE001 - the daemon may be gone
                r["teardown_error"] = repr(e)
            proc = getattr(eng, "proc", None)
            if proc is not None and proc.poll() is not None:
                r["daemon_died"] = proc.returncode
                log(f"  {cname}: the daemon died during the teardown "
                    f"(exit status {proc.returncode}; dmesg?)")
            writer.wait(60)
            r["rss_after_cancel"] = q.proc_mem_sum(pids).get("VmRSS")
            r["progress"] = poller.stop()
            poller = None
            rss = sampler.stop()
            sampler = None
            r["rss_timeline"] = [(round(t - t_start, 2), v // 1024)
                                 for t, v in rss]
            samples = writer.samples()
            st = q.window_stats(samples, t_start, t_plan)
            if st:
                st["MBps"] = round(st["iops"] * parse_size(bs) / 1e6, 2)
            r["guest"] = st
            r["writer_summary"] = writer.summary()
        finally:
            if poller:
                poller.stop()
            if sampler:
                sampler.stop()
            if writer and writer.running():
                writer.wait(0)
            eng.stop()
        peak = max(v for v in (r["job_hwm"], r["job_rss_max"]) if v)
        r["peak"] = peak
        r["growth"] = peak - r["idle"]["VmRSS"]
        buf = (r.get("engine", {}).get("spec") or {}).get("buf_size") or \
            (parse_size(a.buf_size) if a.buf_size else 16 * MiB)
        r["buf_size"] = buf
        log(f"  mem {bs} QD{qd} {cname}: idle "
            f"{r['idle']['VmRSS'] / MiB:.1f} MiB, peak {peak / MiB:.1f}, "
            f"growth {r['growth'] / MiB:.1f} MiB; guest "
            f"{(st or {}).get('MBps')} MB/s p99 "
            f"{(st or {}).get('lat_p99_us')} us; peak_in_flight "
            f"{prog.get('peak_in_flight')}")
        self.mem_results.append(r)
        return r


# --------------------------------------------------------------------------
# aggregation and targets
# --------------------------------------------------------------------------

def agg(runs, key):
    """Median of a metric over repetitions."""
    return med([r["m"].get(key) for r in runs])


def pct_aligned(runs, k):
    """(median % of the no-mirror IOPS over the same writer seconds, or of
    its first seconds where a run has no aligned figure; median % of its
    first seconds)."""
    return (med([r["m"].get(f"{k}.iops_pct_aligned",
                            r["m"].get(f"{k}.iops_pct")) for r in runs]),
            agg(runs, f"{k}.iops_pct"))


def bracketed(runs, key):
    """Median of the bracketed ratio `key` when every run has a bracket
    (see `bracket`), else None and the earlier yardstick judges: a verdict
    never rests on the subset of runs that happened to pivot."""
    vals = [r["m"].get(key) for r in runs]
    return med(vals) if vals and None not in vals else None


def groups(results):
    g = {}
    for r in results:
        g.setdefault((r["part"], r["workload"], r["contender"]), []).append(r)
    return g


def targets(results, mem_results, a, ceilings=None):
    """[(target text, scenario, contender, value text, PASS/FAIL)];
    `ceilings`: flush_ceiling.measure results of the run, if any."""
    ceiling = med([c["pct"] for c in ceilings or []])
    out = []
    g = groups(results)
    bm = [c for c in ORDER if c.startswith("bm")]

    def add(target, scen, c, val, ok):
        out.append({"target": target, "scenario": scen, "contender": c,
                    "value": val, "verdict": None if ok is None else
                    ("PASS" if ok else "FAIL")})

    for (part, wl, c), rs in sorted(g.items(), key=lambda x: (
            x[0][0], WORKLOADS.index(x[0][1]), ORDER.index(x[0][2]))):
        if c not in bm:
            continue
        scen = f"{part} {wl}"
        n = len(rs)
        conv = sum(1 for r in rs if r["m"].get("ready_s") is not None)
        ideal = rs[0]["ideal_s"]
        base = agg(rs, "base.iops")
        if part == "slow" and c in ("bm-wb", "bm-auto"):
            v = agg(rs, "ready_s")
            lim = T_READY_FACTOR * ideal
            add(f"READY ≤ {T_READY_FACTOR}× size÷bandwidth "
                f"({lim:.1f} s)", scen, c,
                f"{fmt(v, 2)} s ({conv}/{n} converged under load)",
                v is not None and v <= lim and conv == n)
            p99 = agg(rs, "before.p99_ms")
            add(f"guest p99 during slow-target convergence ≤ {T_P99_MS:.0f} "
                "ms", scen, c, f"{fmt(p99, 1)} ms", p99 is not None and
                p99 <= T_P99_MS)
            if wl == "seed":
                w = agg(rs, "mirror.worst1s")
                mx = agg(rs, "mirror.max_ms")
                v = bracketed(rs, "mirror.worst1s_pct_adjacent")
                # Shown beside it: the separate no-mirror run, and the
                # higher of it and the seconds before the job (the verdict
                # before the bracket; a maximum of noisy rates leans low).
                pre = agg(rs, "pre.iops")
                ref = max(x for x in (base, pre, 0) if x is not None)
                v_ref = 100 * w / ref if w is not None and ref else None
                limit = ("physical limit of flushes durable on both sides, "
                         f"system calls only: {fmt(ceiling, 0)} %")
                text = (f"worst 1 s {fmt(w, 0)} IOPS = {fmt(v, 0)} % of "
                        f"{fmt(agg(rs, 'adjacent.iops'), 0)} (separate "
                        "no-mirror run: "
                        f"{fmt(agg(rs, 'mirror.worst1s_pct'), 0)} %; the "
                        f"higher of it and before the job: {fmt(v_ref, 0)}"
                        f" %; {limit})")
                if v is None:
                    # no pivot to bracket with: the earlier verdict
                    v = v_ref
                    text = (f"worst 1 s {fmt(w, 0)} IOPS = {fmt(v_ref, 0)} % "
                            "of the higher of the separate no-mirror run and "
                            f"the seconds before the job, {fmt(ref, 0)}: no "
                            f"pivot to bracket with ({limit})")
                add("seed: no 1 s window < 50 % of no-mirror IOPS (the "
                    "same writer with no job: before the job and after "
                    "the pivot)", scen, c, text,
                    v is not None and v >= 100 * T_SEED_WINDOW)
                add(f"seed: no write over {T_SEED_MAX_MS:.0f} ms", scen, c,
                    f"max {fmt(mx, 1)} ms", mx is not None and
                    mx <= T_SEED_MAX_MS)
        if part == "fast":
            # Judged against the same writer with no job, before the job
            # and after the pivot (`bracket`); beside it, the separate
            # no-mirror run over the same seconds of the writer's life
            # (`Bench.aligned`) and over its first --baseline-runtime s.
            for k, what, lim in (("before", "in the first pass",
                                  T_FIRST_PASS),
                                 ("after", "after READY", T_AFTER_READY)):
                v = bracketed(rs, f"{k}.iops_pct_adjacent")
                va, v0 = pct_aligned(rs, k)
                text = (f"{fmt(v, 0)} % (separate no-mirror run, same "
                        f"seconds: {fmt(va, 0)} %, its first seconds: "
                        f"{fmt(v0, 0)} %)")
                if v is None:
                    # no pivot, so nothing after it to bracket the run
                    # with: the separate run judges
                    v = va
                    text = (f"{fmt(va, 0)} % of the separate no-mirror run "
                            f"(same seconds; its first seconds: "
                            f"{fmt(v0, 0)} %): no pivot to bracket with")
                # A background job under these loads never reaches READY
                # (the reason auto and write-blocking exist): there is no
                # "after".
                add(f"fast target: guest IOPS {what} ≥ {100 * lim:.0f} % of "
                    "no mirror (the same writer with no job: before the "
                    "job and after the pivot)", scen, c,
                    text + ("" if conv or k == "before" else
                            " (never READY under load)"),
                    None if k == "after" and c == "bm-bg" and not conv else
                    v is not None and v >= 100 * lim)
        if c == "bm-auto":
            v = agg(rs, "amp_ready")
            add(f"copy amplification in auto ≤ {T_AMP_AUTO:.0f}× (copied at "
                "READY ÷ size)", scen, c,
                f"{fmt(v, 2)}× (at completion {fmt(agg(rs, 'amp_final'), 2)}×)",
                v is not None and v <= T_AMP_AUTO)
        if part == "fast" and wl == a.pivot_workload:
            v = agg(rs, "pivot.tight_gap_ms")
            add(f"pivot pause ≤ {T_PIVOT_MS:.0f} ms (longest gap between "
                "guest completions from the complete request to "
                f"COMPLETED + {PIVOT_TAIL_S * 1000:.0f} ms)", scen, c,
                f"{fmt(v, 0)} ms (steady state without a pivot: "
                f"{fmt(agg(rs, 'steady.tight_gap_ms'), 0)} ms; over "
                f"complete ± 1 s: {fmt(agg(rs, 'pivot.gap_ms'), 0)} ms, "
                f"steady {fmt(agg(rs, 'steady.gap_ms'), 0)} ms; server "
                f"pause_us {fmt(agg(rs, 'pause_us'), 0)})"
                if v is not None else "not measured (no complete under "
                "load)", None if c == "bm-bg" and not conv else
                v is not None and v <= T_PIVOT_MS)
    mg = {}
    for r in mem_results:
        mg.setdefault((r["bs"], r["iodepth"], r["contender"]), []).append(r)
    for (bs, qd, c), rs in mg.items():
        if c not in bm:
            continue
        gr = med([r["growth"] for r in rs])
        lim = rs[0]["buf_size"] + T_RSS_SLACK
        add("RSS growth ≤ buf_size + 8 MiB "
            f"({lim / MiB:.0f} MiB)", f"mem {bs} QD{qd}", c,
            f"{gr / MiB:.1f} MiB", gr <= lim)
    return out


# --------------------------------------------------------------------------
# markdown
# --------------------------------------------------------------------------

def ratio(a, b, nd=2):
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.{nd}f}×"


def md_convergence(results, a):
    g = groups(results)
    lines = []
    slow = [(k, rs) for k, rs in g.items() if k[0] == "slow"]
    if slow:
        size = slow[0][1][0]["size"]
        bps = slow[0][1][0]["slow_target_bps"]
        ideal = size / bps
        lines += [
            f"### (a) Convergence onto a {bps / 1e6:.0f} MB/s target, "
            f"{size // MiB} MiB disk (size ÷ bandwidth = {ideal:.1f} s; "
            f"target for write-blocking and auto: READY ≤ "
            f"{T_READY_FACTOR * ideal:.1f} s)", "",
            f"`complete` is sent {a.after_ready:g} s after READY while the "
            "guest keeps writing; *to COMPLETED* counts from job start and "
            f"so includes those {a.after_ready:g} s. A job not READY when "
            f"the writer's time is up gets {a.drain_timeout:g} s with the "
            "writer stopped. Ratios: blockmirror ÷ its QEMU peer "
            "(auto is set beside QEMU write-blocking). Medians of "
            f"{a.repeat} run(s).", "",
            "| workload | contender | READY under load (s) | ÷ ideal | "
            "÷ QEMU | READY after writer stop (s) | dirty at writer stop "
            "(MiB) | switch to write-blocking (s) | complete→COMPLETED (ms) "
            "| to COMPLETED (s) | copied at READY ÷ size | copied at end "
            "÷ size |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for wl in WORKLOADS:
            for c in ORDER:
                rs = g.get(("slow", wl, c))
                if not rs:
                    continue
                n = len(rs)
                conv = sum(1 for r in rs if r["m"].get("ready_s")
                           is not None)
                rdy = agg(rs, "ready_s")
                rdy_s = fmt(rdy, 2) if conv == n else (
                    f"not converged ({fmt(agg(rs, 'load_s'), 0)} s of load)"
                    if conv == 0 else f"{fmt(rdy, 2)} ({conv}/{n})")
                peer = g.get(("slow", wl, PEER.get(c, "")))
                pr = agg(peer, "ready_s") if peer else None
                lines.append(
                    f"| {wl} | {c} | {rdy_s} | "
                    f"{fmt(agg(rs, 'ready_vs_ideal'), 2)} | "
                    f"{ratio(rdy, pr) if c in PEER else ''} | "
                    f"{fmt(agg(rs, 'ready_after_stop_s'), 2, none='-' if conv == n else 'never')} | "
                    f"{fmt((agg(rs, 'dirty_at_writer_stop') or 0) / MiB if agg(rs, 'dirty_at_writer_stop') is not None else None, 1)} | "
                    f"{fmt(agg(rs, 'switch_to_wb_s'), 2)} | "
                    f"{fmt(agg(rs, 'complete_ms'), 1)}"
                    f"{'' if all(r['m'].get('complete_under_load') for r in rs) else ' (idle)'} | "
                    f"{fmt(agg(rs, 'to_completed_s'), 2)} | "
                    f"{fmt(agg(rs, 'amp_ready'), 2)} | "
                    f"{fmt(agg(rs, 'amp_final'), 2)} |")
    return "\n".join(lines)


def md_guest(results, a):
    g = groups(results)
    lines = []
    for part, title in (("slow", "slow (throttled) target"),
                        ("fast", "fast (unlimited) target")):
        keys = [k for k in g if k[0] == part]
        if not keys:
            continue
        size = g[keys[0]][0]["size"]
        lines += [
            f"### (b) Guest writes, {title}, {size // MiB} MiB disk", "",
            "IOPS (% of the same engine's no-mirror IOPS) / p50 / p99 / max "
            "latency (ms) / worst one-second window (IOPS, % of no mirror). "
            "*same writer seconds*: % of the no-mirror writer's IOPS over "
            "the same seconds of its life as the phase (the no-mirror run "
            "lasts as long as the mirror run). *no job, same run*: % of the "
            "same writer's IOPS with no job, in the seconds before the job "
            "and after the pivot (the yardstick the targets use). "
            "*before READY* = job start → READY (or → writer stop when never "
            "READY); *after READY* = READY → complete request. *same run, "
            "before the job*: the writer's IOPS in the seconds before the "
            "job started (a noise check on the no-mirror baseline). Ratio: "
            "blockmirror IOPS ÷ its QEMU peer's.", "",
            "| workload | contender | no mirror IOPS | same run, before "
            "the job | same run, no job (before + after the pivot) | "
            "before READY | ÷ QEMU | after READY | ÷ QEMU |",
            "|---|---|---|---|---|---|---|---|---|"]

        def cell(rs, k):
            if agg(rs, f"{k}.iops") is None:
                return "-"
            return (f"{fmt(agg(rs, k + '.iops'), 0)} "
                    f"({fmt(agg(rs, k + '.iops_pct'), 0)} %; same writer "
                    f"seconds {fmt(agg(rs, k + '.iops_pct_aligned'), 0)} %;"
                    " no job, same run "
                    f"{fmt(agg(rs, k + '.iops_pct_adjacent'), 0)} %)"
                    " / "
                    f"{fmt(agg(rs, k + '.p50_ms'), 2)} / "
                    f"{fmt(agg(rs, k + '.p99_ms'), 1)} / "
                    f"{fmt(agg(rs, k + '.max_ms'), 0)} / "
                    f"{fmt(agg(rs, k + '.worst1s'), 0)} "
                    f"({fmt(agg(rs, k + '.worst1s_pct'), 0)} %; no job, "
                    f"same run {fmt(agg(rs, k + '.worst1s_pct_adjacent'), 0)}"
                    " %) "
                    f"[{fmt(agg(rs, k + '.s'), 1)} s]")
        for wl in WORKLOADS:
            for c in ORDER:
                rs = g.get((part, wl, c))
                if not rs:
                    continue
                peer = g.get((part, wl, PEER.get(c, "")))
                rb = ratio(agg(rs, "before.iops"),
                           agg(peer, "before.iops")) if peer else ""
                ra = ratio(agg(rs, "after.iops"),
                           agg(peer, "after.iops")) if peer else ""
                lines.append(f"| {wl} | {c} | {fmt(agg(rs, 'base.iops'), 0)}"
                             f" | {fmt(agg(rs, 'pre.iops'), 0)}"
                             f" | {fmt(agg(rs, 'adjacent.iops'), 0)}"
                             f" | {cell(rs, 'before')} | {rb} | "
                             f"{cell(rs, 'after')} | {ra} |")
        lines.append("")
    return "\n".join(lines)


def md_amp(results):
    g = groups(results)
    scen = sorted({(k[0], k[1]) for k in g},
                  key=lambda x: (x[0] != "slow", WORKLOADS.index(x[1])))
    if not scen:
        return ""
    lines = ["### (c) Copy amplification: bytes copied ÷ volume size, at "
             "READY / at COMPLETED", "",
             "| contender | " + " | ".join(f"{p} {w}" for p, w in scen) +
             " |", "|---|" + "---|" * len(scen)]
    for c in ORDER:
        cells = []
        for p, w in scen:
            rs = g.get((p, w, c))
            if not rs:
                cells.append("")
                continue
            cell = (f"{fmt(agg(rs, 'amp_ready'), 2)} / "
                    f"{fmt(agg(rs, 'amp_final'), 2)}")
            if agg(rs, "sent_ready") is not None:
                cell += (f" (sent {fmt(agg(rs, 'sent_ready'), 2)} / "
                         f"{fmt(agg(rs, 'sent_final'), 2)})")
            cells.append(cell)
        if any(cells):
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines += ["", "QEMU: the job's `offset` (BLOCK_JOB_READY / "
              "BLOCK_JOB_COMPLETED), which also counts the guest writes "
              "that write-blocking mode sent to the target. blockmirror: "
              "`copied_bytes` of `job show` right after READY and after "
              "COMPLETED: the copier's bytes alone, i.e. copying done (and "
              "redone); *sent* adds `synced_guest_bytes`, the guest writes "
              "write-blocking mode sent to the target, which is what QEMU's "
              "offset counts (like for like with the QEMU rows)."]
    return "\n".join(lines)


def md_mem(mem_results, a):
    if not mem_results:
        return ""
    r0 = mem_results[0]
    lines = [f"### (d) Daemon memory: {r0['slow_target_bps'] / 1e6:.0f} MB/s "
             f"target, {r0['size'] // MiB} MiB disk, random writes for "
             f"{a.mem_runtime:g} s (job starts after {a.warmup:g} s)", "",
             "RSS in MiB. Peak = max(VmHWM after a reset just before the "
             "job, VmRSS sampled every 0.1 s) up to the writer's planned "
             "end; growth = peak − idle RSS (daemon with volumes and export, "
             "no I/O). Guest: MB/s / p50 / p99 latency (ms) during the "
             "job.", "",
             "| writer | contender | idle | with writer, no job | peak | "
             "growth over idle | growth over writer-no-job | target "
             "(buf_size + 8 MiB) | job's peak in flight (MiB) | READY (s) "
             "| guest |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    mg = {}
    for r in mem_results:
        mg.setdefault((r["bs"], r["iodepth"], r["contender"]), []).append(r)
    for (bs, qd, c), rs in mg.items():
        gr = med([r["growth"] for r in rs])
        lim = rs[0]["buf_size"] + T_RSS_SLACK
        verdict = ""
        if c.startswith("bm"):
            verdict = f"{lim / MiB:.0f}: **{'PASS' if gr <= lim else 'FAIL'}**"
        pif = med([(r.get("at_end") or {}).get("peak_in_flight")
                   for r in rs])
        gm = med([(r.get("guest") or {}).get("MBps") for r in rs])
        p50 = med([(r.get("guest") or {}).get("lat_p50_us") for r in rs])
        p99 = med([(r.get("guest") or {}).get("lat_p99_us") for r in rs])
        lines.append(
            f"| {bs} QD{qd} | {c} | "
            f"{med([r['idle']['VmRSS'] for r in rs]) / MiB:.1f} | "
            f"{fmt((med([r['prejob_rss_max'] for r in rs]) or 0) / MiB, 1)} | "
            f"{med([r['peak'] for r in rs]) / MiB:.1f} | {gr / MiB:.1f} | "
            f"{med([r['peak'] - max(r['prejob_rss_max'] or 0, r['idle']['VmRSS']) for r in rs]) / MiB:.1f} | "
            f"{verdict} | {fmt(pif / MiB if pif is not None else None, 1)} | "
            f"{fmt(med([r.get('ready_s') for r in rs]), 1, none='not in window')} | "
            f"{fmt(gm, 2)} / {fmt(p50 / 1000 if p50 else None, 0)} / "
            f"{fmt(p99 / 1000 if p99 else None, 0)} |")
    died = [r for r in mem_results if r.get("daemon_died") is not None]
    if died:
        lines += ["", "The daemon died while the job was being cancelled "
                  "after the measurement window (the peak above was taken "
                  "before): " + ", ".join(
                      f"{r['contender']} {r['bs']} QD{r['iodepth']} rep "
                      f"{r['rep']} (exit status {r['daemon_died']})"
                      for r in died) + "."]
    return "\n".join(lines)


def md_pivot(results, a):
    g = groups(results)
    rows = [(k, rs) for k, rs in g.items() if k[0] == "fast" and
            k[1] == a.pivot_workload]
    if not rows:
        return ""
    size = rows[0][1][0]["size"]
    lines = [f"### (e) Pivot under load: `complete` while a "
             f"{WL_LABEL[a.pivot_workload]} writer runs, fast target, "
             f"{size // MiB} MiB", "",
             "Longest gap between guest write completions (fio's log has "
             "1 ms resolution): *tight* from the complete request to "
             f"COMPLETED + {PIVOT_TAIL_S * 1000:.0f} ms (all the pivot can "
             "touch; the target is judged on it), *± 1 s* in [complete "
             "request − 1 s, COMPLETED + 1 s]; *steady* = the same measure "
             "over an equally long stretch just before (after READY), i.e. "
             "the noise floor. Pivot window (± 1 s) cells: IOPS / p50 / p99 "
             "/ max (ms).", "",
             "| contender | READY (s) | complete→COMPLETED (ms) | longest "
             "gap, tight (steady) (ms) | longest gap, ± 1 s (steady) (ms) | "
             "server pause_us | pivot window | after pivot IOPS |",
             "|---|---|---|---|---|---|---|---|"]
    for c in ORDER:
        rs = g.get(("fast", a.pivot_workload, c))
        if not rs:
            continue
        under = all(r["m"].get("complete_under_load") for r in rs)
        pw = "-"
        if agg(rs, "pivot.iops") is not None:
            pw = (f"{fmt(agg(rs, 'pivot.iops'), 0)} / "
                  f"{fmt(agg(rs, 'pivot.p50_ms'), 2)} / "
                  f"{fmt(agg(rs, 'pivot.p99_ms'), 1)} / "
                  f"{fmt(agg(rs, 'pivot.max_ms'), 1)}")
        lines.append(
            f"| {c} | {fmt(agg(rs, 'ready_s'), 2, none='never under load')}"
            f" | {fmt(agg(rs, 'complete_ms'), 1)}"
            f"{'' if under else ' (writer stopped)'} | "
            f"{fmt(agg(rs, 'pivot.tight_gap_ms'), 0)} "
            f"({fmt(agg(rs, 'steady.tight_gap_ms'), 0)}) | "
            f"{fmt(agg(rs, 'pivot.gap_ms'), 0)} "
            f"({fmt(agg(rs, 'steady.gap_ms'), 0)}) | "
            f"{fmt(agg(rs, 'pause_us'), 0)} | {pw} | "
            f"{fmt(agg(rs, 'after_pivot.iops'), 0)} |")
    return "\n".join(lines)


def md_targets(tg):
    if not tg:
        return ""
    lines = ["### Targets of the issue (medians; PASS/FAIL)", "",
             "| target | scenario | contender | measured | verdict |",
             "|---|---|---|---|---|"]
    for t in tg:
        lines.append(f"| {t['target']} | {t['scenario']} | {t['contender']}"
                     f" | {t['value']} | **{t['verdict'] or '-'}** |")
    npass = sum(1 for t in tg if t["verdict"] == "PASS")
    judged = sum(1 for t in tg if t["verdict"])
    lines += ["", f"{npass} of {judged} PASS."]
    if judged < len(tg):
        lines[-1] += (f" {len(tg) - judged} not judged (-): the after-READY "
                      "and pivot targets of a background job that never "
                      "reached READY under load.")
    return "\n".join(lines)


def md_ceiling(ceilings):
    if not ceilings:
        return ""
    one = med([c["one"] for c in ceilings])
    two = med([c["two"] for c in ceilings])
    pct = med([c["pct"] for c in ceilings])
    reps = ", ".join(f"{c['pct']:.0f}" for c in ceilings)
    return ("### Physical limit under the seed's flushes\n\n"
            "The seed's loop (1 KiB at QD1, a flush every "
            f"{ceilings[0]['flush_every']} writes) in plain system calls on "
            f"this run's disk (bench/flush_ceiling.py): {one:.0f} writes/s on "
            f"one file, {two:.0f} writes/s writing two files and flushing "
            "both in parallel, as a write-blocking mirror must for a flush "
            f"durable on both sides: **{pct:.0f} %** (repetitions: {reps} %). "
            "No mirror with these semantics keeps more of a flush-bound "
            "guest's rate on this disk; through NBD the round trips dilute "
            "the flush cost, so the guest-visible ratio sits above it.")


def md_traces(results):
    lines = ["### Per-second guest write IOPS after job start", "",
             "(worst latency in that second in ms when over 50 ms); R = "
             "READY, C = COMPLETED, S = switch to write-blocking, | = writer "
             "stopped. Every run, first repetition.", ""]
    for r in results:
        if r["rep"] != 1:
            continue
        t = r["t"]
        marks = {}
        for name, key in (("R", "ready"), ("C", "completed")):
            if t.get(key) is not None and t[key] >= 0:
                marks.setdefault(int(math.floor(t[key])), []).append(name)
        if r["m"].get("switch_to_wb_s") is not None:
            marks.setdefault(int(math.floor(r["m"]["switch_to_wb_s"])),
                             []).append("S")
        cells = []
        for sec, n, _p50, mx in r["per_second"]:
            if sec < -0.01:
                continue
            c = str(n)
            if mx is not None and mx > 50000:
                c += f" ({mx / 1000:.0f})"
            mk = marks.get(int(math.floor(sec + 1e-6)))
            if mk:
                c = "".join(mk) + " " + c
            cells.append(c)
        lines.append(f"* {r['part']} {r['workload']} {r['contender']}: "
                     + ", ".join(cells) + " |")
    return "\n".join(lines)


def md_baselines(baseline_runs):
    lines = ["### No-mirror baselines (same engine set-up, no job)", "",
             "| engine | workload | disk MiB | IOPS | p50 / p99 / max (ms) | "
             "worst 1 s IOPS |", "|---|---|---|---|---|---|"]
    for r in baseline_runs:
        st = r.get("stats") or {}
        lines.append(
            f"| {r['family']} | {r['workload']} | {r['size'] // MiB} | "
            f"{fmt(st.get('iops'), 0)} | "
            f"{fmt((st.get('lat_p50_us') or 0) / 1000, 2)} / "
            f"{fmt((st.get('lat_p99_us') or 0) / 1000, 2)} / "
            f"{fmt((st.get('lat_max_us') or 0) / 1000, 1)} | "
            f"{fmt(st.get('worst1s_iops'), 0)} |")
    return "\n".join(lines)


def markdown(res, a):
    parts = [md_targets(res["targets"]), md_ceiling(res.get("flush_ceiling")),
             md_convergence(res["runs"], a), md_guest(res["runs"], a),
             md_amp(res["runs"]), md_mem(res["mem_runs"], a),
             md_pivot(res["runs"], a), md_baselines(res["baselines"]),
             md_traces(res["runs"])]
    foot = (f"{res['host']['cpus']} CPUs; load average {res['loadavg_start']}"
            f" at start, {res['loadavg_end']} at end; blockmirrord "
            f"{res['versions'].get('blockmirrord')} (binaries built "
            f"{res['versions'].get('binaries_built')}, work tree at start "
            f"{res['versions'].get('git')}); {res['versions'].get('qemu')};"
            f" {res['versions'].get('fio')} writer {res['writer']}; QEMU "
            f"cache {a.qemu_cache}; blockmirror volumes "
            f"{getattr(a, 'bm_cache', 'buffered')}; {res['date']}; "
            f"{res['total_s']:.0f} s.")
    return "\n\n".join(p for p in parts if p) + "\n\n" + foot


# --------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------

def plots(res, out_prefix):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not importable (pip install matplotlib): no plots")
        return []
    files = []
    runs = [r for r in res["runs"] if r["rep"] == 1]
    for c in ORDER:
        rs = [r for r in runs if r["contender"] == c]
        if not rs:
            continue
        rs.sort(key=lambda r: (r["part"] != "slow",
                               WORKLOADS.index(r["workload"])))
        fig, axes = plt.subplots(len(rs), 1, figsize=(13, 2.7 * len(rs)),
                                 squeeze=False)
        for ax, r in zip(axes[:, 0], rs):
            ps = r.get("iops_250ms") or r["per_second"]
            step = 0.25 if r.get("iops_250ms") else 1.0
            xs = [p[0] + step / 2 for p in ps]
            ys = [p[1] for p in ps]
            ax2 = ax.twinx()
            ax2.step(xs, ys, where="mid", color="tab:blue", lw=1.2,
                     label="guest write IOPS (0.25 s)")
            base = r["m"].get("base.iops")
            if base:
                ax2.axhline(base, color="tab:blue", ls=":", lw=0.8,
                            label="no-mirror IOPS")
            ax2.set_ylabel("guest IOPS", color="tab:blue")
            ax2.set_ylim(bottom=0)
            pr = [p for p in r.get("progress", []) if p.get("dirty")
                  is not None]
            ax.plot([p["t"] for p in pr], [p["dirty"] / MiB for p in pr],
                    color="tab:red", lw=1.5,
                    label="dirty MiB" if r["family"] == "bm" else
                    "len − offset MiB")
            ax.set_ylabel("dirty MiB", color="tab:red")
            ax.set_ylim(bottom=0)
            t = r["t"]
            for key, col, lab in (("ready", "green", "READY"),
                                  ("complete_request", "orange",
                                   "complete"),
                                  ("completed", "black", "COMPLETED"),
                                  ("writer_stop", "grey", "writer stop")):
                if t.get(key) is not None:
                    ax.axvline(t[key], color=col, ls="--", lw=1, label=lab)
            for s in r.get("mode_switches", []):
                ax.axvline(s["t"], color="purple", ls="-.", lw=1,
                           label=f"→ {s.get('to_mode')} ({str(s.get('reason'))[:24]})")
            title = (f"{r['part']} target, {WL_LABEL[r['workload']]}, "
                     f"{r['size'] // MiB} MiB: READY "
                     f"{fmt(r['m'].get('ready_s'), 2, none='not under load')}"
                     )
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("s since job start")
            h1, l1 = ax.get_legend_handles_labels()
            h2, l2 = ax2.get_legend_handles_labels()
            ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left",
                      bbox_to_anchor=(1.08, 1.0), borderaxespad=0)
        fig.suptitle(f"{LABEL[c]}: dirty bytes and guest write IOPS",
                     fontsize=11)
        fig.tight_layout()
        path = f"{out_prefix}-{c}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        files.append(path)
    return files


# --------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------

def main():
    global q

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="small sizes, short runs, fewer workloads (~4 min)")
    ap.add_argument("--parts", default="slow,fast,mem",
                    help="comma list of slow, fast, mem")
    ap.add_argument("--contenders", default=",".join(ORDER))
    ap.add_argument("--slow-workloads", default=None,
                    help="default seed,4k-qd4,4k-qd16 (quick: seed,4k-qd16)")
    ap.add_argument("--fast-workloads", default=None,
                    help="default 4k-qd4,4k-qd16 (quick: 4k-qd4)")
    ap.add_argument("--pivot-workload", default="4k-qd4",
                    help="fast runs of this workload give (e)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--slow-size", default=None,
                    help="disk of the slow part and mem (256M; quick 64M)")
    ap.add_argument("--fast-size", default=None, help="1G (quick 256M)")
    ap.add_argument("--throttle-mbps", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=None,
                    help="writer runs this long before the job (2; quick "
                         "1.5)")
    ap.add_argument("--after-ready", type=float, default=None,
                    help="READY → complete, writer running (10: two periods "
                         "of the kernel's 5 s writeback; quick 2)")
    ap.add_argument("--tail", type=float, default=None,
                    help="writer keeps running after COMPLETED (2; quick 1)")
    ap.add_argument("--slow-ready-cap", type=float, default=None,
                    help="READY must come this long after job start on the "
                         "slow target (default 1.3 × size/bw + 2 s)")
    ap.add_argument("--fast-ready-cap", type=float, default=None,
                    help="same for the fast target (8; quick 5)")
    ap.add_argument("--drain-timeout", type=float, default=None,
                    help="wait for READY after the writer stops (16; quick "
                         "5)")
    ap.add_argument("--complete-timeout", type=float, default=60)
    ap.add_argument("--baseline-runtime", type=float, default=None,
                    help="no-mirror measurement (10; quick 3)")
    ap.add_argument("--poll-interval", type=float, default=0.5)
    ap.add_argument("--hot-size", default="16M")
    ap.add_argument("--seed-fsync-every", type=int, default=4)
    ap.add_argument("--ceiling-seconds", type=float, default=None,
                    help="the seed's physical limit, measured once per "
                    "repetition before the slow part (bench/flush_ceiling."
                    "py; 10, quick 4)")
    ap.add_argument("--mem-throttle-mbps", type=float, default=5.0)
    ap.add_argument("--mem-variants", default=None,
                    help="BS:QD list (1M:64,4k:64,32M:4; quick 1M:64,32M:4)")
    ap.add_argument("--mem-contenders", default=None,
                    help="qemu-wb,bm-wb,bm-auto (quick qemu-wb,bm-wb)")
    ap.add_argument("--mem-runtime", type=float, default=None,
                    help="writer time in the mem part (10; quick 6)")
    ap.add_argument("--writer", default="auto",
                    choices=["auto", "fio", "python"])
    ap.add_argument("--qemu-cache", default="direct",
                    choices=["direct", "buffered"],
                    help="QEMU images: cache.direct=on aio=native (the "
                         "shared harness's peer) or page cache")
    ap.add_argument("--bm-cache", default="buffered",
                    choices=["direct", "buffered"],
                    help="blockmirror volumes: page cache (default) or "
                         "`volume attach --direct` (O_DIRECT, like QEMU's "
                         "cache.direct=on)")
    ap.add_argument("--mirror-args", default="",
                    help="extra `mirrorctl mirror start` options for "
                    "blockmirror, e.g. '--copier-share 50'")
    ap.add_argument("--granularity", default=None)
    ap.add_argument("--buf-size", default=None)
    ap.add_argument("--bin-dir", default=os.path.join(ROOT, "target",
                                                      "release"))
    ap.add_argument("--shared-bench", default=SHARED_BENCH_DEFAULT,
                    help="directory of qemu_mirror_peer.py")
    ap.add_argument("--workdir", default=None,
                    help="parent of the run's temp dir (target/bench-work)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--name", default=None,
                    help="file stem (default convergence-DATE[-quick])")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--render", metavar="JSON", default=None,
                    help="run nothing: rewrite the tables (and plots) of an "
                         "earlier run from its JSON with this script's "
                         "current verdicts")
    a = ap.parse_args()
    if a.render:
        return render(a.render, a.no_plots)

    quick = a.quick

    def dflt(name, full, qv):
        if getattr(a, name) is None:
            setattr(a, name, qv if quick else full)
    dflt("slow_workloads", "seed,4k-qd4,4k-qd16", "seed,4k-qd16")
    dflt("fast_workloads", "4k-qd4,4k-qd16", "4k-qd4")
    dflt("slow_size", "256M", "64M")
    dflt("fast_size", "1G", "256M")
    dflt("warmup", 2.0, 1.5)
    dflt("after_ready", 10.0, 2.0)
    # long enough after the pivot to be a no-job yardstick (`bracket`)
    dflt("tail", 10.0, 4.5)
    dflt("fast_ready_cap", 8.0, 5.0)
    dflt("drain_timeout", 16.0, 5.0)
    dflt("baseline_runtime", 10.0, 3.0)
    dflt("mem_variants", "1M:64,4k:64,32M:4", "1M:64,32M:4")
    dflt("mem_contenders", "qemu-wb,bm-wb,bm-auto", "qemu-wb,bm-wb")
    dflt("mem_runtime", 10.0, 6.0)
    dflt("ceiling_seconds", 10.0, 4.0)
    a.slow_size = parse_size(a.slow_size)
    a.fast_size = parse_size(a.fast_size)
    if a.granularity:
        a.granularity = parse_size(a.granularity)
    if a.buf_size:
        a.buf_size = parse_size(a.buf_size)
    EXTRA_MIRROR_ARGS.extend(a.mirror_args.split())
    parts = [p.strip() for p in a.parts.split(",") if p.strip()]
    contenders = [c.strip() for c in a.contenders.split(",") if c.strip()]
    mem_contenders = [c.strip() for c in a.mem_contenders.split(",")
                      if c.strip()]
    for c in contenders + mem_contenders:
        if c not in CONTENDERS:
            ap.error(f"unknown contender {c}")
    wls = {"slow": [w.strip() for w in a.slow_workloads.split(",")
                    if w.strip()],
           "fast": [w.strip() for w in a.fast_workloads.split(",")
                    if w.strip()]}
    for w in wls["slow"] + wls["fast"] + [a.pivot_workload]:
        if w not in WORKLOADS:
            ap.error(f"unknown workload {w} ({', '.join(WORKLOADS)})")
    variants = []
    for v in a.mem_variants.split(","):
        bs, qd = v.strip().split(":")
        variants.append((bs, int(qd)))

    sys.path.insert(0, a.shared_bench)
    try:
        import qemu_mirror_peer  # noqa: E402
    except ImportError:
        print(f"cannot import qemu_mirror_peer from {a.shared_bench}",
              file=sys.stderr)
        return 2
    q = qemu_mirror_peer
    for b in ("blockmirrord", "mirrorctl"):
        if not os.access(os.path.join(a.bin_dir, b), os.X_OK):
            print(f"missing {a.bin_dir}/{b}: cargo build --release --bins",
                  file=sys.stderr)
            return 2
    if not shutil.which("qemu-storage-daemon") and any(
            c.startswith("qemu") for c in contenders + mem_contenders):
        print("qemu-storage-daemon missing", file=sys.stderr)
        return 2
    stale = mi.binaries_stale()
    if stale:
        log(f"warning: {stale} is newer than the release binaries")

    date = datetime.date.today().isoformat()
    name = a.name or f"convergence-{date}{'-quick' if quick else ''}"
    os.makedirs(a.out_dir, exist_ok=True)
    base = os.path.abspath(a.workdir or os.path.join(ROOT, "target",
                                                     "bench-work"))
    os.makedirs(base, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="convergence-", dir=base)
    bench = Bench(a, workdir)
    res = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
           "host": {"cpus": os.cpu_count(), "uname": " ".join(
               platform.uname()[i] for i in (0, 2, 4))},
           "config": {k: v for k, v in vars(a).items()},
           "writer": bench.writer_cls.kind, "loadavg_start": mi.loadavg(),
           "git_at_start": mi.git_state()}
    log(f"work dir {workdir}; writer {bench.writer_cls.kind}; load "
        f"{res['loadavg_start']}")
    t_all = time.monotonic()
    try:
        for rep in range(1, a.repeat + 1):
            k = (rep - 1) % len(contenders)
            order = contenders[k:] + contenders[:k]
            for part in ("slow", "fast"):
                if part not in parts:
                    continue
                if part == "slow" and "seed" in wls[part]:
                    fc = flush_ceiling.measure(
                        workdir, a.ceiling_seconds,
                        region=parse_size(a.hot_size),
                        every=a.seed_fsync_every)
                    fc["rep"] = rep
                    bench.ceilings.append(fc)
                    log(f"rep {rep}: flush ceiling (syscalls, no mirror vs "
                        f"durable on both): {fc['one']:.0f} vs "
                        f"{fc['two']:.0f} writes/s = {fc['pct']:.0f} %")
                for wl in wls[part]:
                    log(f"rep {rep}: {part} target, {wl}")
                    for c in order:
                        bench.conv(part, wl, c, rep)
            if "mem" in parts:
                for bs, qd in variants:
                    log(f"rep {rep}: memory, {bs} QD{qd}")
                    for c in mem_contenders:
                        bench.mem(bs, qd, c, rep)
    finally:
        res["total_s"] = time.monotonic() - t_all
        res["loadavg_end"] = mi.loadavg()
        res["runs"] = bench.results
        res["mem_runs"] = bench.mem_results
        res["baselines"] = bench.baseline_runs
        res["flush_ceiling"] = bench.ceilings
        res["versions"] = {
            "blockmirrord": mi.version(os.path.join(a.bin_dir,
                                                    "blockmirrord")),
            "binaries_built": datetime.datetime.fromtimestamp(
                os.path.getmtime(os.path.join(a.bin_dir, "blockmirrord"))
            ).isoformat(timespec="seconds"),
            "git": res["git_at_start"], "git_at_end": mi.git_state(),
            "source_newer_than_binaries": stale,
            "qemu": subprocess.run(["qemu-storage-daemon", "--version"],
                                   stdout=subprocess.PIPE, text=True
                                   ).stdout.splitlines()[0]
            if shutil.which("qemu-storage-daemon") else None,
            "fio": subprocess.run(["fio", "--version"],
                                  stdout=subprocess.PIPE, text=True
                                  ).stdout.strip()
            if shutil.which("fio") else None}
        res["targets"] = targets(bench.results, bench.mem_results, a,
                                 bench.ceilings)
        try:
            res["markdown"] = markdown(res, a)
        except Exception as e:  # noqa: BLE001 - keep the JSON anyway
            res["markdown"] = f"(markdown failed: {e!r})"
            log(res["markdown"])
        jpath = os.path.join(a.out_dir, name + ".json")
        with open(jpath, "w") as f:
            json.dump(res, f, indent=1, default=str)
        if not a.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"work dir kept: {workdir}")
    n_plots = write_report(res, os.path.join(a.out_dir, name), a.no_plots)
    log(f"wrote {jpath}, {name}.md, {n_plots} plots in {a.out_dir}")
    return 0


def write_report(res, stem, no_plots):
    """Draws the plots and writes STEM.md (tables + plot links); prints the
    tables; returns the number of plots."""
    pngs = [] if no_plots else plots(res, stem)
    md = res["markdown"]
    if pngs:
        md += "\n\nPlots: " + ", ".join(
            f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in pngs)
    with open(stem + ".md", "w") as f:
        f.write(md + "\n")
    print(md)
    return len(pngs)


def render(jpath, no_plots):
    """Rewrites NAME.md (and plots) next to an earlier run's NAME.json."""
    with open(jpath) as f:
        res = json.load(f)
    a = argparse.Namespace(**res["config"])
    res["targets"] = targets(res["runs"], res["mem_runs"], a,
                             res.get("flush_ceiling"))
    res["markdown"] = markdown(res, a)
    stem = os.path.splitext(jpath)[0]
    tmp = jpath + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1, default=str)
    os.replace(tmp, jpath)
    write_report(res, stem, no_plots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
