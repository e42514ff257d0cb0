#!/usr/bin/env python3
"""What a full copy leaves in the source's page cache, and what it costs the
guest afterwards.

For each repetition, on one fresh blockmirrord:

  1. the source (random bytes, written back) is evicted from the page cache;
  2. a background mirror copies all of it onto a fresh sparse target, and is
     cancelled at READY (no job is left);
  3. `fincore` reports how much of the source the copy left cached;
  4. fio writes 4 KiB at random over NBD for --runtime s: guest IOPS *after
     the copy*;
  5. the source is evicted again and fio runs again: the same writes on a
     source no copy has touched (*cold*), the reference.

A copier that reads through the page cache brings the whole source in by
readahead, as large folios, and a 4 KiB buffered write into a large folio
costs far more than one into a small folio; one that reads with
RWF_DONTCACHE leaves the cache as it found it. The ratio after-copy / cold
is the cost of what the copy left behind (1.0: none).

Python 3 standard library; needs release binaries (it builds nothing),
fio with the nbd engine, and util-linux's fincore:
    cargo build --release --bins
    python3 bench/copy_page_cache.py [--repeat 3] [--size 1G] [--bin-dir DIR]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mirror_idle as mi  # noqa: E402  (paths, sizes, sources, eviction)

MiB = mi.MiB
log = mi.log


def resident_bytes(path):
    out = subprocess.run(["fincore", "--raw", "--noheadings", "--bytes",
                          "--output", "RES", path], check=True,
                         capture_output=True, text=True).stdout
    return int(out.strip() or 0)


class Daemon:
    def __init__(self, bin_dir, workdir):
        self.state = tempfile.mkdtemp(prefix="bm-state-", dir=workdir)
        self.sock = os.path.join(self.state, "blockmirror.sock")
        self.ctlbin = os.path.join(bin_dir, "mirrorctl")
        self.log = open(os.path.join(workdir, "blockmirrord.log"), "ab")
        self.proc = subprocess.Popen(
            [os.path.join(bin_dir, "blockmirrord"), "--state-dir",
             self.state], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while self.ctl("volume", "list", check=False).returncode:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("blockmirrord did not start")
            time.sleep(0.05)

    def ctl(self, *args, check=True):
        cp = subprocess.run([self.ctlbin, "--socket", self.sock, *args],
                            capture_output=True, text=True, timeout=120)
        if check and cp.returncode:
            raise RuntimeError(f"mirrorctl {' '.join(args)}: "
                               f"{cp.stderr.strip()}")
        return cp

    def job_state(self, job):
        cp = self.ctl("-o", "json", "job", "show", job, check=False)
        return json.loads(cp.stdout).get("state") if cp.returncode == 0 \
            else None

    def uri(self):
        return f"nbd+unix:///src?socket={os.path.join(self.state, 'nbd.sock')}"

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        self.log.close()


def fio_iops(uri, workdir, runtime, iodepth):
    out = os.path.join(workdir, "fio.json")
    subprocess.run(["fio", "--name=guest", "--ioengine=nbd", f"--uri={uri}",
                    "--rw=randwrite", "--bs=4k", f"--iodepth={iodepth}",
                    "--time_based", f"--runtime={runtime}",
                    "--randrepeat=0", "--output-format=json",
                    f"--output={out}"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(out) as f:
        return json.load(f)["jobs"][0]["write"]["iops"]


def one_rep(a, workdir, src, rep):
    tgt = os.path.join(workdir, "tgt.raw")
    if os.path.exists(tgt):
        os.unlink(tgt)
    with open(tgt, "wb") as f:
        f.truncate(a.size)
    mi.evict(src)
    d = Daemon(a.bin_dir, workdir)
    try:
        d.ctl("volume", "attach", "src", "--path", src)
        d.ctl("volume", "attach", "dst", "--path", tgt)
        d.ctl("export", "add", "src")
        t0 = time.monotonic()
        d.ctl("mirror", "start", "src", "--target", "volume:dst", "--job",
              "copy", "--mode", "background")
        while d.job_state("copy") != "ready":
            if time.monotonic() - t0 > 300:
                raise RuntimeError("the copy did not reach READY in 300 s")
            time.sleep(0.1)
        copy_s = time.monotonic() - t0
        d.ctl("job", "cancel", "copy")
        while d.job_state("copy") is not None:
            time.sleep(0.1)
        cached = resident_bytes(src)
        after = fio_iops(d.uri(), workdir, a.runtime, a.iodepth)
        mi.evict(src)
        cold = fio_iops(d.uri(), workdir, a.runtime, a.iodepth)
    finally:
        d.stop()
    r = {"rep": rep, "copy_s": copy_s, "cached_after_copy": cached,
         "iops_after_copy": after, "iops_cold": cold}
    log(f"rep {rep}: copy {copy_s:.1f} s, left {cached / MiB:.0f} MiB of "
        f"{a.size // MiB} MiB cached; 4k QD{a.iodepth} after the copy "
        f"{after:.0f} IOPS, cold {cold:.0f} IOPS ({100 * after / cold:.0f} %)")
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1G", help="source size (1G)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=5,
                    help="seconds of guest writes per measurement (5)")
    ap.add_argument("--iodepth", type=int, default=4)
    ap.add_argument("--bin-dir", default=mi.BIN_DIR)
    ap.add_argument("--workdir", default=os.path.join(mi.ROOT, "target",
                                                      "bench-work"))
    ap.add_argument("--json", help="write the runs here")
    a = ap.parse_args()
    a.size = mi.parse_size(a.size)
    for tool in ("fio", "fincore"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed")
    os.makedirs(a.workdir, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="copy-page-cache-", dir=a.workdir)
    try:
        src = os.path.join(workdir, "src.raw")
        mi.make_source(src, a.size)
        runs = [one_rep(a, workdir, src, i + 1) for i in range(a.repeat)]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    med = {k: statistics.median(r[k] for r in runs)
           for k in ("cached_after_copy", "iops_after_copy", "iops_cold")}
    ratios = [r["iops_after_copy"] / r["iops_cold"] for r in runs]
    print(f"source {a.size // MiB} MiB, {a.repeat} repetitions, medians "
          f"(binaries: {a.bin_dir})")
    print(f"  left cached by the copy:  {med['cached_after_copy'] / MiB:.0f} "
          "MiB")
    print(f"  4k QD{a.iodepth} after the copy:    "
          f"{med['iops_after_copy']:.0f} IOPS")
    print(f"  4k QD{a.iodepth} cold:              {med['iops_cold']:.0f} IOPS")
    print(f"  after ÷ cold:             {100 * statistics.median(ratios):.0f} "
          f"% (per repetition: "
          f"{', '.join(f'{100 * x:.0f}' for x in ratios)} %)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"size": a.size, "iodepth": a.iodepth,
                       "runtime": a.runtime, "bin_dir": a.bin_dir,
                       "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
