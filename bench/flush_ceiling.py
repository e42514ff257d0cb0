#!/usr/bin/env python3
"""The physical limit of a write-blocking mirror under a flushing guest.

A write-blocking mirror acknowledges a guest flush once both the source and
the target are durable (DESIGN.md, "Write path"), so every guest flush
costs two `fdatasync`s. On one disk each of them ends in a device cache
flush, and a guest that flushes every few writes (the seed's workload:
1 KiB at queue depth 1, a flush every 4 writes) is bound by those flushes.

This measures that bound with plain system calls — no NBD, no engine, no
mirror: the seed's loop on one file ("no mirror"), against the same loop
writing each 1 KiB to two files and flushing both, the second on another
thread in parallel ("durable on both sides", what the engine does). Slices
of the two alternate so both see the same machine; the ratio of their
medians is the most a mirror with these semantics can keep of the guest's
flush-bound rate on this disk. Through NBD each operation also pays a
round trip, which dilutes the flush cost, so the guest-visible ratio sits
above this figure.

    python3 bench/flush_ceiling.py [--dir DIR] [--seconds 10]
"""

import argparse
import os
import random
import statistics
import tempfile
import threading
import time

KiB = 1 << 10
MiB = 1 << 20


class _Flusher:
    """A thread that runs one `fdatasync` per request, so two can run in
    parallel (the engine's flush runs the source's and the target's on two
    threads)."""

    def __init__(self, fd):
        self.fd = fd
        self.go = threading.Event()
        self.done = threading.Event()
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            self.go.wait()
            self.go.clear()
            if self.stop:
                return
            os.fdatasync(self.fd)
            self.done.set()

    def start(self):
        self.go.set()

    def wait(self):
        self.done.wait()
        self.done.clear()

    def close(self):
        self.stop = True
        self.go.set()
        self.thread.join()


def _slice(fds, flusher, region, every, seconds, rng):
    """Writes/s of the seed's loop for `seconds`: 1 KiB random writes in
    `region` bytes, a flush of every file after each `every` writes."""
    buf = os.urandom(KiB)
    blocks = region // KiB
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(every):
            off = rng.randrange(blocks) * KiB
            for fd in fds:
                os.pwrite(fd, buf, off)
        if flusher:
            flusher.start()
        os.fdatasync(fds[0])
        if flusher:
            flusher.wait()
        n += every
    return n / (time.perf_counter() - t0)


def measure(workdir, seconds=10.0, region=16 * MiB, every=4, slice_s=0.5):
    """{"one": writes/s, "two": writes/s, "pct": two ÷ one in %, ...}
    (medians over alternating slices; `seconds` in all)."""
    rng = random.Random(1)
    paths = []
    fds = []
    flusher = None
    try:
        for name in ("ceiling-a.raw", "ceiling-b.raw"):
            p = os.path.join(workdir, name)
            paths.append(p)
            fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            fds.append(fd)
            # written and synced first: no allocation during the loop,
            # as on a volume the copier has filled
            for off in range(0, region, MiB):
                os.pwrite(fd, os.urandom(MiB), off)
            os.fdatasync(fd)
        flusher = _Flusher(fds[1])
        one, two, pct = [], [], []
        for _ in range(max(1, int(seconds / (2 * slice_s)))):
            a = _slice(fds[:1], None, region, every, slice_s, rng)
            b = _slice(fds, flusher, region, every, slice_s, rng)
            one.append(a)
            two.append(b)
            pct.append(100 * b / a)
        return {"one": statistics.median(one),
                "two": statistics.median(two),
                "pct": statistics.median(pct),
                "slices": len(pct), "slice_s": slice_s,
                "region": region, "flush_every": every}
    finally:
        if flusher:
            flusher.close()
        for fd in fds:
            os.close(fd)
        for p in paths:
            os.unlink(p)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=None,
                    help="where the two scratch files go (default: a temp "
                    "dir under target/bench-work, the benchmarks' disk)")
    ap.add_argument("--seconds", type=float, default=10.0)
    a = ap.parse_args()
    base = a.dir
    if base is None:
        base = os.path.join(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))), "target", "bench-work")
        os.makedirs(base, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=base) as d:
        r = measure(d, a.seconds)
    print(f"1 KiB QD1, fdatasync every {r['flush_every']}: one file "
          f"{r['one']:.0f} writes/s, two files flushed in parallel "
          f"{r['two']:.0f} writes/s: {r['pct']:.0f} % "
          f"(median of {r['slices']} alternating slices)")


if __name__ == "__main__":
    main()
