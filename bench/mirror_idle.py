#!/usr/bin/env python3
"""Idle-mirror throughput: blockmirror vs QEMU's blockdev-mirror vs dd.

Mirrors an idle volume (default 1 GiB of random bytes, so nothing is sparse
or zero) to a fresh file, in one run and in one work directory (one
filesystem), with five contenders:

  dd           dd if=SRC of=DST bs=1M iflag=direct oflag=direct conv=fsync
               (the physical limit of a plain sequential copy)
  qemu         qemu-storage-daemon, blockdev-mirror sync=full
               copy-mode=background, both images raw over file with
               cache.direct=on and aio=native, QEMU's default granularity and
               buf-size (the set-up of shared/bench/qemu_mirror_peer.py)
  qemu-buf     the same with cache.direct=off and aio=threads: QEMU through
               the page cache, which is the I/O path blockmirror takes as
               long as its volumes are opened without O_DIRECT
  bm-bg        blockmirrord + `mirrorctl mirror start ... --mode background`
  bm-wb        the same with `--mode write-blocking`

For each run it records the time from the start of the job to READY and to
COMPLETED (block-job-complete / `job complete --wait` sent right after READY),
checks the copy byte for byte with `cmp`, and samples the daemon's peak RSS
(VmHWM) and CPU time. Page caches are dropped (sync; echo 3 >
/proc/sys/vm/drop_caches, when writable) before every run of every
contender, so each one starts from the same cold cache. The order of the
contenders rotates from one repetition to the next.

Python 3 standard library only. Needs release binaries (it builds nothing):
    cargo build --release --bins
Run from anywhere:
    python3 bench/mirror_idle.py [--repeat 3] [--size 1G] [--md FILE] [--json FILE]

See bench/README.md for what the numbers mean.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN_DIR = os.path.join(ROOT, "target", "release")
BMD = os.path.join(BIN_DIR, "blockmirrord")
CTL = os.path.join(BIN_DIR, "mirrorctl")
MiB = 1 << 20
GiB = 1 << 30
# qemu-buf: QEMU through the page cache (cache.direct=off, aio=threads),
# the same I/O path blockmirror takes while its volumes are buffered
CONTENDERS = ("dd", "qemu", "qemu-buf", "bm-bg", "bm-wb")
ALL_CONTENDERS = CONTENDERS
LABELS = {
    "dd": "dd bs=1M iflag=direct oflag=direct conv=fsync",
    "qemu": "QEMU blockdev-mirror, cache.direct=on aio=native",
    "bm-bg": "blockmirror --mode background",
    "bm-wb": "blockmirror --mode write-blocking",
    "qemu-buf": "QEMU blockdev-mirror, cache.direct=off aio=threads",
}


class BenchError(Exception):
    pass


def log(msg):
    ts = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[{ts}] {msg}", file=sys.stderr, flush=True)


def parse_size(s):
    s = str(s).strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": MiB, "G": GiB, "T": 1 << 40}.get(s[-1:], 1)
    if mult != 1:
        s = s[:-1]
    return int(float(s) * mult)


# --------------------------------------------------------------------------
# /proc helpers
# --------------------------------------------------------------------------

def proc_status(pid, keys=("VmHWM", "VmRSS")):
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in keys:
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def proc_cpu(pid):
    """(user, system) CPU seconds of a process, threads included."""
    tck = os.sysconf("SC_CLK_TCK")
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) / tck, int(fields[12]) / tck
    except (OSError, IndexError, ValueError):
        return None


def cpu_delta(a, b):
    if a is None or b is None:
        return None
    return {"user_s": round(b[0] - a[0], 2), "sys_s": round(b[1] - a[1], 2)}


def proc_threads(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return None


def meminfo(keys=("Dirty", "Writeback", "Cached")):
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in keys:
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


class Disk:
    """I/O counters of the block device holding the work dir
    (/proc/diskstats; the whole machine's I/O to that device, so other
    processes add noise)."""

    def __init__(self, path):
        st = os.stat(path)
        self.dev = (os.major(st.st_dev), os.minor(st.st_dev))

    def snap(self):
        s = {"t": time.monotonic()}
        try:
            with open("/proc/diskstats") as f:
                for line in f:
                    x = line.split()
                    if (int(x[0]), int(x[1])) == self.dev:
                        s.update(name=x[2], reads=int(x[3]),
                                 rd_bytes=int(x[5]) * 512,
                                 writes=int(x[7]),
                                 wr_bytes=int(x[9]) * 512)
                        break
        except (OSError, ValueError, IndexError):
            pass
        s.update(meminfo())
        return s


def io_between(a, b):
    """Device I/O and page-cache state between two Disk.snap()s."""
    if "reads" not in a or "reads" not in b:
        return {}
    r, w = b["reads"] - a["reads"], b["writes"] - a["writes"]
    rb, wb = b["rd_bytes"] - a["rd_bytes"], b["wr_bytes"] - a["wr_bytes"]
    return {"dev_read_MiB": round(rb / MiB, 1),
            "dev_write_MiB": round(wb / MiB, 1),
            "dev_reads": r, "dev_writes": w,
            "avg_read_KiB": round(rb / r / 1024) if r else None,
            "avg_write_KiB": round(wb / w / 1024) if w else None,
            "dirty_MiB": round(b.get("Dirty", 0) / MiB, 1),
            "cached_growth_MiB": round(
                (b.get("Cached", 0) - a.get("Cached", 0)) / MiB, 1)}


def drop_caches():
    """sync, then drop page cache, dentries and inodes. True if dropped."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def evict(path):
    """Writes back, then drops, every cached page of one file, so a run
    starts from the same page-cache state whatever ran before it. (Left
    cached, a run inherits the folios earlier runs left: a source written
    in 4 MiB pieces is cached as large folios, O_DIRECT writes evict what
    they touch, buffered 4 KiB writes leave small folios, and a 4 KiB write
    into a large folio costs 2-3 times as much: 13-19 k against 36-41 k
    IOPS at QD4 on Linux 6.18, ext4.)"""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------

def make_source(path, size):
    t0 = time.monotonic()
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(4 * MiB, left)
            f.write(os.urandom(n))
            left -= n
        f.flush()
        os.fsync(f.fileno())
    log(f"random source {path}: {size // MiB} MiB in "
        f"{time.monotonic() - t0:.1f}s")


def allocated_bytes(path):
    return os.stat(path).st_blocks * 512


def verify(src, dst, size, who):
    """Byte-for-byte check; raises BenchError on any difference."""
    if not os.path.exists(dst):
        raise BenchError(f"{who}: target {dst} does not exist")
    got = os.path.getsize(dst)
    if got != size:
        raise BenchError(f"{who}: target is {got} bytes, source {size}")
    t0 = time.monotonic()
    cp = subprocess.run(["cmp", src, dst], stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True)
    if cp.returncode != 0:
        raise BenchError(f"{who}: COPY DIFFERS FROM SOURCE: "
                         f"{cp.stdout.strip() or cp.returncode}")
    return round(time.monotonic() - t0, 2)


# --------------------------------------------------------------------------
# dd
# --------------------------------------------------------------------------

def run_dd(ctx, src, dst):
    rm(dst)
    ctx.prepare()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    s0 = ctx.disk.snap()
    t0 = time.monotonic()
    cp = subprocess.run(["dd", f"if={src}", f"of={dst}", "bs=1M",
                         "iflag=direct", "oflag=direct", "conv=fsync",
                         "status=none"],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True)
    dt = time.monotonic() - t0
    s1 = ctx.disk.snap()
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if cp.returncode:
        raise BenchError(f"dd failed: {cp.stderr.strip()}")
    return {"t_ready_s": dt, "t_done_s": dt,
            "cpu": {"user_s": round(ru1.ru_utime - ru0.ru_utime, 2),
                    "sys_s": round(ru1.ru_stime - ru0.ru_stime, 2)},
            "peak_rss": None,
            "io_ready": io_between(s0, s1), "io_done": io_between(s0, s1)}


# --------------------------------------------------------------------------
# QEMU: minimal QMP client (same node set-up as qemu_mirror_peer.py)
# --------------------------------------------------------------------------

class QMP:
    def __init__(self, path, timeout=10.0):
        deadline = time.monotonic() + timeout
        while True:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.rfile = self.sock.makefile("rb")
        self.greeting = json.loads(self.rfile.readline())
        self.events = []
        self.cmd("qmp_capabilities")

    def _read(self):
        line = self.rfile.readline()
        if not line:
            raise BenchError("QMP connection closed")
        msg = json.loads(line)
        if "event" in msg:
            ts = msg.get("timestamp", {})
            msg["_t"] = ts.get("seconds", 0) + ts.get("microseconds", 0) / 1e6
            self.events.append(msg)
        return msg

    def cmd(self, name, args=None):
        msg = {"execute": name}
        if args is not None:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self._read()
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise BenchError(f"QMP {name}: {r['error'].get('desc')}")

    def wait_event(self, names, timeout):
        seen = 0
        deadline = time.monotonic() + timeout
        while True:
            for e in self.events[seen:]:
                if e["event"] in names:
                    self.events.remove(e)
                    return e
            seen = len(self.events)
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"QMP: no {names} within {timeout}s")
            self.sock.settimeout(left)
            try:
                self._read()
            finally:
                self.sock.settimeout(None)

    def close(self):
        self.sock.close()


def qemu_node(node, filename, direct=True):
    return {"driver": "raw", "node-name": node, "cache": {"direct": direct},
            "file": {"driver": "file", "node-name": node + "-file",
                     "filename": filename,
                     "aio": "native" if direct else "threads",
                     "cache": {"direct": direct}}}


def run_qemu(ctx, src, dst, size, direct=True):
    rm(dst)
    with open(dst, "wb") as f:  # fresh sparse target, like blockmirror's
        f.truncate(size)
    qmp_path = os.path.join(ctx.dir, "qmp.sock")
    rm(qmp_path)
    logf = open(os.path.join(ctx.dir, "qsd.log"), "ab")
    proc = subprocess.Popen(
        ["qemu-storage-daemon", "--chardev",
         f"socket,id=qmp0,path={qmp_path},server=on,wait=off",
         "--monitor", "chardev=qmp0"],
        stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    qmp = None
    try:
        qmp = QMP(qmp_path)
        v = qmp.greeting["QMP"]["version"]["qemu"]
        ctx.versions["qemu"] = "{major}.{minor}.{micro}".format(**v)
        qmp.cmd("blockdev-add", qemu_node("src", src, direct))
        qmp.cmd("blockdev-add", qemu_node("tgt", dst, direct))
        ctx.prepare()
        cpu0 = proc_cpu(proc.pid)
        s0 = ctx.disk.snap()
        t0 = time.time()
        qmp.cmd("blockdev-mirror", {
            "job-id": "mirror0", "device": "src", "target": "tgt",
            "sync": "full", "copy-mode": "background",
            "auto-finalize": True, "auto-dismiss": False})
        ready = qmp.wait_event(("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED",
                                "BLOCK_JOB_CANCELLED"), ctx.timeout)
        if ready["event"] != "BLOCK_JOB_READY":
            raise BenchError(f"qemu: job ended before READY: {ready}")
        s1 = ctx.disk.snap()
        t_req = time.time()
        qmp.cmd("block-job-complete", {"device": "mirror0"})
        done = qmp.wait_event(("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"),
                              ctx.timeout)
        cpu1 = proc_cpu(proc.pid)
        s2 = ctx.disk.snap()
        if done["event"] != "BLOCK_JOB_COMPLETED" or \
                done["data"].get("error"):
            raise BenchError(f"qemu: job did not complete: {done}")
        mem = proc_status(proc.pid)
        threads = proc_threads(proc.pid)
        qmp.cmd("job-dismiss", {"id": "mirror0"})
        qmp.cmd("quit")
    finally:
        if qmp:
            qmp.close()
        stop_proc(proc, grace=5)  # after `quit` it exits by itself
        logf.close()
    return {"t_ready_s": ready["_t"] - t0, "t_done_s": done["_t"] - t0,
            "bytes_copied": done["data"].get("offset"),
            "t_complete_s": done["_t"] - t_req,
            "cpu": cpu_delta(cpu0, cpu1), "peak_rss": mem.get("VmHWM"),
            "threads_at_end": threads,
            "io_ready": io_between(s0, s1), "io_done": io_between(s0, s2)}


# --------------------------------------------------------------------------
# blockmirror
# --------------------------------------------------------------------------

def parse_rfc3339(s):
    if not s:
        return None
    s = s.replace("Z", "+00:00")
    # Python 3.11 accepts at most 6 fractional digits.
    if "." in s:
        head, frac = s.split(".", 1)
        digits = "".join(c for c in frac if c.isdigit())
        tz = frac[len(digits):]
        s = f"{head}.{digits[:6].ljust(6, '0')}{tz}"
    try:
        return datetime.datetime.fromisoformat(s).timestamp()
    except ValueError:
        return None


class Watch:
    """`mirrorctl -o json watch` in the background: server-side event times."""

    def __init__(self, sock):
        self.lines = []
        self.proc = subprocess.Popen(
            [CTL, "--socket", sock, "-o", "json", "watch"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            bufsize=1)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        for line in self.proc.stdout:
            try:
                self.lines.append(json.loads(line))
            except ValueError:
                pass

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.thread.join(2)

    def job_times(self, job):
        """Server times of the job's first event, READY and COMPLETED."""
        first = ready = done = None
        self.completed = None
        for ev in self.lines:
            if ev.get("job_id") != job:
                continue
            t = parse_rfc3339(ev.get("time"))
            if t is None:
                continue
            kind = str(ev.get("type", "")).upper()
            first = first if first is not None else t
            if kind == "BLOCK_JOB_READY" and ready is None:
                ready = t
            if kind == "BLOCK_JOB_COMPLETED" and done is None:
                done = t
                self.completed = ev
        return first, ready, done


def ctl(sock, *args, check=True, timeout=None):
    cp = subprocess.run([CTL, "--socket", sock] + list(args),
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True, timeout=timeout)
    if check and cp.returncode:
        raise BenchError(f"mirrorctl {' '.join(args)} (rc {cp.returncode}): "
                         f"{(cp.stderr or cp.stdout).strip()[:500]}")
    return cp


def run_blockmirror(ctx, src, dst, mode, tag):
    rm(dst)  # must not exist: blockmirror creates it sparse
    state = os.path.join(ctx.dir, f"bm-state-{tag}")
    shutil.rmtree(state, ignore_errors=True)
    os.makedirs(state)
    sock = os.path.join(state, "blockmirror.sock")
    logf = open(os.path.join(ctx.dir, "blockmirrord.log"), "ab")
    proc = subprocess.Popen([BMD, "--state-dir", state],
                            stdout=logf, stderr=subprocess.STDOUT,
                            start_new_session=True)
    watch = None
    try:
        deadline = time.monotonic() + 20
        while not (os.path.exists(sock) and
                   ctl(sock, "volume", "list", check=False).returncode == 0):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError("blockmirrord did not start; see "
                                 f"{ctx.dir}/blockmirrord.log")
            time.sleep(0.02)
        attach = ["volume", "attach", "src", "--path", src]
        if ctx.bm_direct:
            attach.append("--direct")
        ctl(sock, *attach)
        watch = Watch(sock)
        ctx.prepare()
        # reload mirrorctl's pages after the cache drop (touches no image)
        ctl(sock, "volume", "list")
        cpu0 = proc_cpu(proc.pid)
        s0 = ctx.disk.snap()
        t0 = time.monotonic()
        ctl(sock, "mirror", "start", "src", "--target", f"file:{dst}",
            "--job", "b", "--mode", mode, "--wait", "ready",
            timeout=ctx.timeout)
        t1 = time.monotonic()
        s1 = ctx.disk.snap()
        ctl(sock, "job", "complete", "b", "--wait", timeout=ctx.timeout)
        t2 = time.monotonic()
        s2 = ctx.disk.snap()
        cpu1 = proc_cpu(proc.pid)
        mem = proc_status(proc.pid)
        threads = proc_threads(proc.pid)
        time.sleep(0.2)  # let the watch print the last events
        first, ready, done = watch.job_times("b")
    finally:
        if watch:
            watch.stop()
        stop_proc(proc)
        logf.close()
    srv = {}
    if watch and watch.completed and watch.completed.get("pause_us") is not None:
        srv["pivot_pause_ms"] = round(watch.completed["pause_us"] / 1000, 1)
    if first is not None and ready is not None:
        srv["server_ready_s"] = round(ready - first, 3)
    if first is not None and done is not None:
        srv["server_done_s"] = round(done - first, 3)
    return {"t_ready_s": t1 - t0, "t_done_s": t2 - t0,
            "t_complete_s": t2 - t1, **srv,
            "cpu": cpu_delta(cpu0, cpu1), "peak_rss": mem.get("VmHWM"),
            "threads_at_end": threads,
            "io_ready": io_between(s0, s1), "io_done": io_between(s0, s2)}


# --------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------

def rm(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def stop_proc(proc, sig=signal.SIGTERM, grace=0.0, timeout=20):
    """Stop a daemon we started: wait `grace` s for it to exit by itself,
    then send `sig`, then SIGKILL its process group after `timeout` s."""
    try:
        proc.wait(timeout=grace) if grace else None
    except subprocess.TimeoutExpired:
        pass
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class Ctx:
    def __init__(self, d, timeout, bm_direct):
        self.dir = d
        self.timeout = timeout
        self.bm_direct = bm_direct
        self.versions = {}
        self.caches_dropped = None
        self.disk = Disk(d)

    def prepare(self):
        """Same starting conditions for every contender: dirty data of
        earlier runs written back, page cache empty."""
        ok = drop_caches()
        self.caches_dropped = ok if self.caches_dropped is None else \
            (self.caches_dropped and ok)
        time.sleep(0.5)


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(v, nd=0, suffix=""):
    if v is None:
        return "-"
    return f"{v:.{nd}f}{suffix}"


def summarize(runs, size):
    mb = size / 1e6
    out = {}
    for c in ALL_CONTENDERS:
        rs = [r for r in runs if r["contender"] == c]
        if not rs:
            continue
        tr = med([r["t_ready_s"] for r in rs])
        td = med([r["t_done_s"] for r in rs])
        out[c] = {
            "runs": len(rs),
            "t_ready_s": tr, "t_done_s": td,
            "MBps_ready": mb / tr, "MBps_done": mb / td,
            "cpu_s": med([(r["cpu"]["user_s"] + r["cpu"]["sys_s"])
                          if r.get("cpu") else None for r in rs]),
            "peak_rss": med([r.get("peak_rss") for r in rs]),
            "server_ready_s": med([r.get("server_ready_s") for r in rs]),
            "t_complete_s": med([r.get("t_complete_s") for r in rs]),
            "pivot_pause_ms": med([r.get("pivot_pause_ms") for r in rs]),
            "dev_write_ready_MiB": med([r.get("io_ready", {}).get(
                "dev_write_MiB") for r in rs]),
            "dirty_ready_MiB": med([r.get("io_ready", {}).get(
                "dirty_MiB") for r in rs]),
            "cached_growth_MiB": med([r.get("io_done", {}).get(
                "cached_growth_MiB") for r in rs]),
        }
    return out


def markdown(res):
    s, size = res["summary"], res["config"]["size"]
    lines = [
        f"### Idle mirror of {size / GiB:g} GiB of random data to a new "
        f"file: medians of {res['config']['repeat']} runs",
        "",
        "MB/s = 10^6 bytes / s. *ready*: job start to READY (dd: the whole "
        "copy). *done*: job start to COMPLETED, with block-job-complete / "
        "`job complete --wait` sent at READY; it includes blockmirror's "
        "target flush. QEMU flushes its target before READY. Pivot pause: "
        "blockmirror's own `pause_us` (guest I/O held while it finalizes); "
        "QEMU's is at most its complete→COMPLETED. CPU: the daemon's (dd's) "
        "user+sys from job start to COMPLETED. Disk and "
        "page-cache columns come from /proc/diskstats and /proc/meminfo "
        "(whole machine), medians.",
        "",
        "| contender | to READY (s) | MB/s (ready) | to COMPLETED (s) | "
        "MB/s (done) | complete→COMPLETED (ms) | guest I/O pause at pivot "
        "(ms) | CPU (s) | peak RSS (MiB) | written to disk by READY (MiB) | "
        "dirty page cache at READY (MiB) | page cache growth (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in ALL_CONTENDERS:
        if c not in s:
            continue
        x = s[c]
        rss = x["peak_rss"] / MiB if x["peak_rss"] else None
        lines.append(
            f"| {LABELS[c]} | {fmt(x['t_ready_s'], 2)} | "
            f"{fmt(x['MBps_ready'])} | {fmt(x['t_done_s'], 2)} | "
            f"{fmt(x['MBps_done'])} | "
            f"{fmt(x['t_complete_s'] and x['t_complete_s'] * 1000)} | "
            f"{fmt(x['pivot_pause_ms'], 1)} | {fmt(x['cpu_s'], 2)} | "
            f"{fmt(rss, 1)} | {fmt(x['dev_write_ready_MiB'])} | "
            f"{fmt(x['dirty_ready_MiB'])} | {fmt(x['cached_growth_MiB'])} |")
    lines += ["", "| ratio | ready | done |", "|---|---|---|"]
    for c in ("bm-bg", "bm-wb"):
        for ref in ("qemu", "dd", "qemu-buf"):
            if c in s and ref in s:
                lines.append(
                    f"| {LABELS[c].split(' --mode ')[1]} / {ref} | "
                    f"{s[c]['MBps_ready'] / s[ref]['MBps_ready']:.2f}× | "
                    f"{s[c]['MBps_done'] / s[ref]['MBps_done']:.2f}× |")
    used = [c for c in ALL_CONTENDERS if c in s]
    lines += ["", "Per run (s to READY / s to COMPLETED):", "",
              "| rep | " + " | ".join(used) + " |",
              "|---" * (len(used) + 1) + "|"]
    for rep in range(1, res["config"]["repeat"] + 1):
        cells = []
        for c in used:
            r = [x for x in res["runs"]
                 if x["rep"] == rep and x["contender"] == c]
            cells.append(f"{r[0]['t_ready_s']:.2f} / {r[0]['t_done_s']:.2f}"
                         if r else "-")
        lines.append(f"| {rep} | " + " | ".join(cells) + " |")
    lines += ["", f"Caches dropped before every run: "
              f"{'yes' if res['caches_dropped'] else 'NO (not writable)'}; "
              f"every copy verified with cmp: "
              f"{'yes, all equal' if res['verified'] else 'no'}; "
              f"blockmirror volume I/O: "
              f"{'O_DIRECT' if res['config']['bm_direct'] else 'buffered'}; "
              f"{res['host']['cpus']} CPUs; load average (1/5/15 min) "
              f"{res.get('loadavg_start')} at start, {res.get('loadavg_end')} "
              f"at end; {res['date']}."]
    return "\n".join(lines)


def binaries_stale():
    """Sources newer than the binaries (a hint, not an error)."""
    newest_bin = min(os.path.getmtime(BMD), os.path.getmtime(CTL))
    for top in ("server", "client", "proto"):
        for d, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith((".rs", ".proto", ".toml")) and \
                        os.path.getmtime(os.path.join(d, f)) > newest_bin:
                    return os.path.join(d, f)
    return None


def main():
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G",
                    help="source size, a multiple of 1M (default 1G)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="repetitions; medians are reported (default 3)")
    ap.add_argument("--workdir", default=None,
                    help="parent of the run's temp dir (default "
                         "target/bench-work); all images live there")
    ap.add_argument("--keep", action="store_true",
                    help="keep the run's temp dir (images, logs)")
    ap.add_argument("--md", default=None, help="also write markdown here")
    ap.add_argument("--json", default=None, help="write all data here")
    ap.add_argument("--contenders", default=",".join(CONTENDERS),
                    help=f"comma list from {','.join(ALL_CONTENDERS)} "
                         f"(default {','.join(CONTENDERS)})")
    ap.add_argument("--bm-direct", action="store_true",
                    help="attach the source with `--direct` (O_DIRECT); "
                         "its new target file is opened the same way")
    ap.add_argument("--timeout", type=float, default=600,
                    help="per-job timeout in seconds")
    args = ap.parse_args()
    size = parse_size(args.size)
    if size <= 0 or size % MiB:
        ap.error("--size must be a positive multiple of 1M")
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    for c in contenders:
        if c not in ALL_CONTENDERS:
            ap.error(f"unknown contender {c}")

    missing = [b for b in (BMD, CTL) if not os.access(b, os.X_OK)]
    if missing:
        print(f"missing release binaries: {', '.join(missing)}\n"
              f"build them first:\n  (cd {ROOT} && cargo build --release "
              "--bins)", file=sys.stderr)
        return 2
    tools = ["dd", "cmp"] + (["qemu-storage-daemon"] if any(
        c.startswith("qemu") for c in contenders) else [])
    absent = [t for t in tools if not shutil.which(t)]
    if absent:
        print(f"missing tools: {', '.join(absent)}", file=sys.stderr)
        return 2
    stale = binaries_stale()
    if stale:
        log(f"warning: {stale} is newer than the release binaries "
            "(cargo build --release --bins?)")

    base = os.path.abspath(args.workdir or
                           os.path.join(ROOT, "target", "bench-work"))
    os.makedirs(base, exist_ok=True)
    rundir = tempfile.mkdtemp(prefix="mirror-idle-", dir=base)
    ctx = Ctx(rundir, args.timeout, args.bm_direct)
    src = os.path.join(rundir, "src.raw")
    dst = os.path.join(rundir, "dst.raw")
    results = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": {"cpus": os.cpu_count(), "uname": " ".join(
            platform.uname()[i] for i in (0, 2, 4)),
            "mem_total": proc_meminfo("MemTotal")},
        "config": {"size": size, "repeat": args.repeat,
                   "contenders": contenders, "bm_direct": args.bm_direct,
                   "workdir": rundir},
        "runs": []}
    results["loadavg_start"] = loadavg()
    log(f"work dir {rundir}; load average {results['loadavg_start']}")
    ok = False
    try:
        make_source(src, size)
        if allocated_bytes(src) < size:
            raise BenchError("source image is sparse")
        for rep in range(1, args.repeat + 1):
            k = (rep - 1) % len(contenders)
            order = contenders[k:] + contenders[:k]
            for c in order:
                if c == "dd":
                    r = run_dd(ctx, src, dst)
                elif c == "qemu":
                    r = run_qemu(ctx, src, dst, size)
                elif c == "qemu-buf":
                    r = run_qemu(ctx, src, dst, size, direct=False)
                else:
                    mode = "background" if c == "bm-bg" else "write-blocking"
                    r = run_blockmirror(ctx, src, dst, mode, f"{c}-{rep}")
                r["verify_s"] = verify(src, dst, size, f"{c} rep {rep}")
                r["dst_allocated"] = allocated_bytes(dst)
                r.update(contender=c, rep=rep)
                results["runs"].append(r)
                log(f"rep {rep} {c:8s} ready {r['t_ready_s']:6.2f}s "
                    f"({size / 1e6 / r['t_ready_s']:5.0f} MB/s)  done "
                    f"{r['t_done_s']:6.2f}s "
                    f"({size / 1e6 / r['t_done_s']:5.0f} MB/s)  "
                    f"rss {fmt(r['peak_rss'] and r['peak_rss'] / MiB, 1)} MiB  "
                    f"cpu {r.get('cpu')}  cmp ok")
                rm(dst)
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
        if ok and not args.keep:
            shutil.rmtree(rundir, ignore_errors=True)
    results["loadavg_end"] = loadavg()
    results["caches_dropped"] = bool(ctx.caches_dropped)
    results["verified"] = True
    results["versions"] = dict(ctx.versions, blockmirrord=version(BMD),
                               git_head_at_bench=git_state(),
                               source_newer_than_binaries=stale,
                               binaries_built=datetime.datetime.fromtimestamp(
                                   os.path.getmtime(BMD)).isoformat(
                                       timespec="seconds"))
    results["summary"] = summarize(results["runs"], size)
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


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return None


def proc_meminfo(key):
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def git_state():
    """HEAD and whether the work tree had changes (when the bench ran)."""
    try:
        head = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short",
                               "HEAD"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True).stdout
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain",
                                "--untracked-files=no"],
                               stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True).stdout
    except OSError:
        return None
    return head.strip() + (" (modified)" if dirty.strip() else "")


def version(binary):
    cp = subprocess.run([binary, "--version"], stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True)
    return cp.stdout.strip() if cp.returncode == 0 else None


if __name__ == "__main__":
    sys.exit(main())
