"""Image locks follow the graph's permissions as the graph is rewired:
blockdev-add, exports, reopen, snapshot, stream and commit. The oracle is
the kernel's /proc/locks (the bytes QEMU's layout defines) and qemu-io, a
writer that must be refused whenever strata needs the image consistent."""

import os
import subprocess
import threading
import time
import unittest

from strata_qmp import DaemonTest

MiB = 1 << 20
# QEMU's layout: 100+N for each permission held, 200+N for each not shared;
# N is 0 consistent-read, 1 write, 2 write-unchanged, 3 resize.
READER = {100, 201, 203}
# A writer shares resize, as QEMU's resizable guest devices do.
WRITER = {100, 101, 201}
# qcow2 lets no one else resize its file (QEMU's format drivers neither).
QCOW2_WRITER = {100, 101, 103, 201, 203}


def locked_bytes(path):
    """The bytes of `path` that anyone holds OFD locks on. /proc/locks is
    read in pieces and a line can slip between them while locks change:
    read until two reads agree."""
    last = locked_once(path)
    for _ in range(20):
        now = locked_once(path)
        if now == last:
            return now
        last = now
    return last


def locked_once(path):
    st = os.stat(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    held = set()
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if "->" in parts:
                continue
            if parts[1] == "OFDLCK" and parts[5] == dev:
                held.update(range(int(parts[6]), int(parts[7]) + 1))
    return held


def settled_locks(path, want, timeout=10):
    """The locks on `path` once they equal `want`, or after `timeout`: a
    job's last graph change may land just after its completion event."""
    deadline = time.monotonic() + timeout
    while True:
        held = locked_bytes(path)
        if held == want or time.monotonic() > deadline:
            return held
        time.sleep(0.05)


def qemu_io_writes(fmt, img):
    r = subprocess.run(["qemu-io", "-f", fmt, "-c", "write 0 512", img], capture_output=True, text=True)
    return r.returncode == 0, r.stderr


class Locks(DaemonTest):
    def setUp(self):
        super().setUp()
        self.base = self.image("base.img", 4 * MiB, byte=5)
        self.top = str(self.dir / "top.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", self.base, "-F", "raw", self.top],
                       check=True)

    def export(self, node):
        self.d.ok("block-export-add", type="vhost-user-blk", id="exp", node_name=node, writable=True,
                  addr={"type": "unix", "path": str(self.dir / "vhost.sock")})

    def wait_job(self, job):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ev = self.d.qmp.pull_event(wait=1)
            if ev and ev["event"] == "BLOCK_JOB_COMPLETED" and ev["data"]["device"] == job:
                self.assertNotIn("error", ev["data"], ev)
                return
            if ev and ev["event"] == "BLOCK_JOB_READY" and ev["data"]["device"] == job:
                self.d.ok("block-job-complete", device=job)
        raise AssertionError(f"job {job} did not complete")

    def test_locks_follow_exports_snapshots_and_commits(self):
        self.d.ok("blockdev-add", driver="raw", node_name="disk",
                  file={"driver": "file", "filename": self.base})
        # Nobody uses the node yet: it holds nothing, as in QEMU.
        self.assertEqual(locked_bytes(self.base), set())
        self.export("disk")
        self.assertEqual(locked_bytes(self.base), WRITER)
        ok, err = qemu_io_writes("raw", self.base)
        self.assertFalse(ok)
        self.assertIn('Failed to get "write" lock', err)

        # The live disk becomes the backing file of a new top.
        self.d.ok("blockdev-add", driver="qcow2", node_name="snap",
                  file={"driver": "file", "filename": self.top}, backing=None)
        self.d.ok("blockdev-snapshot", node="disk", overlay="snap")
        self.assertEqual(locked_bytes(self.base), READER)
        self.assertEqual(locked_bytes(self.top), QCOW2_WRITER)
        self.assertFalse(qemu_io_writes("raw", self.base)[0])

        # Active commit back down: the base is written again, then is the
        # exported node.
        self.d.ok("block-commit", device="snap", job_id="c")
        self.wait_job("c")
        self.assertEqual(settled_locks(self.base, WRITER), WRITER)
        self.assertFalse(qemu_io_writes("raw", self.base)[0])
        self.d.ok("block-export-del", id="exp")
        deadline = time.monotonic() + 10
        while self.d.ok("query-block-exports") and time.monotonic() < deadline:
            time.sleep(0.05)
        self.d.ok("blockdev-del", node_name="snap")
        self.assertEqual(locked_bytes(self.top), set())
        self.assertEqual(settled_locks(self.base, set()), set())
        self.assertTrue(qemu_io_writes("raw", self.base)[0])

    def test_stream_keeps_the_top_locked_and_lets_the_base_go(self):
        self.d.ok("blockdev-add", driver="qcow2", node_name="top",
                  file={"driver": "file", "filename": self.top})
        self.export("top")
        self.assertEqual(locked_bytes(self.base), READER)
        self.d.ok("block-stream", device="top", job_id="s")
        self.wait_job("s")
        self.assertEqual(locked_bytes(self.top), QCOW2_WRITER)
        # The backing file is no longer part of the graph.
        self.assertEqual(settled_locks(self.base, set()), set())
        self.assertTrue(qemu_io_writes("raw", self.base)[0])

    def test_no_reopen_leaves_the_image_unlocked(self):
        self.d.ok("blockdev-add", driver="file", node_name="f", filename=self.base)
        self.d.ok("blockdev-add", driver="raw", node_name="disk", file="f")
        self.export("disk")
        stop = threading.Event()
        wrote, tried = [], []

        def writer():
            while not stop.is_set():
                ok, _ = qemu_io_writes("raw", self.base)
                tried.append(ok)
                if ok:
                    wrote.append(time.monotonic())

        t = threading.Thread(target=writer)
        t.start()
        try:
            i = 0
            while i < 40 or len(tried) < 5:
                i += 1
                r = self.d.cmd("blockdev-reopen", options=[
                    {"driver": "file", "node-name": "f", "filename": self.base,
                     "discard": "unmap" if i % 2 else "ignore"}])
                self.assertNotIn("error", r)
                self.assertEqual(locked_bytes(self.base), WRITER)
        finally:
            stop.set()
            t.join()
        self.assertEqual(wrote, [], f"qemu-io wrote while strata reopened the image ({len(tried)} tries)")

    def test_force_share_and_locking_off(self):
        # A second node on a written image must share everything.
        self.d.ok("blockdev-add", driver="qcow2", node_name="top",
                  file={"driver": "file", "filename": self.top})
        self.export("top")
        e = self.d.err("blockdev-add", driver="qcow2", node_name="peek", read_only=True,
                       file={"driver": "file", "filename": self.top}, backing=None)
        self.assertIn('Failed to get shared "write" lock', e["desc"])
        self.assertIn(f"[{self.top}]", e["desc"])
        self.d.ok("blockdev-add", driver="qcow2", node_name="peek", read_only=True, force_share=True,
                  file={"driver": "file", "filename": self.top}, backing=None)
        e = self.d.err("blockdev-add", driver="file", node_name="rw", filename=self.top, force_share=True)
        self.assertIn("force-share", e["desc"])
        # locking=off takes and tests nothing.
        self.d.ok("blockdev-add", driver="file", node_name="nolock", filename=self.base, locking="off")
        self.d.ok("blockdev-add", driver="raw", node_name="nolock-raw", file="nolock")
        self.d.ok("block-export-add", type="vhost-user-blk", id="e2", node_name="nolock-raw", writable=True,
                  addr={"type": "unix", "path": str(self.dir / "e2.sock")})
        # The base is top's backing file, read; the unlocked writer adds
        # nothing to that.
        self.assertEqual(locked_bytes(self.base), READER)


if __name__ == "__main__":
    unittest.main()
