"""Block jobs through the real qemu.qmp client: stream, commit, snapshot and
the job controls, in scenarios modelled on QEMU's iotest 030. qemu-img and
qemu-io are the oracle for what ends up in the images."""

import json
import subprocess
import time
import unittest

from strata_qmp import DaemonTest

MiB = 1 << 20


def qemu_img(*args):
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def qemu_io(fmt, img, cmd):
    subprocess.run(["qemu-io", "-f", fmt, "-c", cmd, img], check=True, capture_output=True)


def qemu_map(fmt, img):
    """qemu-io's map: which ranges the image itself holds."""
    return subprocess.run(["qemu-io", "-f", fmt, "-r", "-U", "-c", "map", img], check=True,
                          capture_output=True, text=True).stdout


def content(img):
    """The guest-visible bytes of an image, through its whole chain."""
    out = img + ".raw"
    qemu_img("convert", "-U", "-O", "raw", img, out)
    with open(out, "rb") as f:
        return f.read()


def info(img):
    return json.loads(qemu_img("info", "-U", "--output=json", img))


def check_clean(test, img):
    r = subprocess.run(["qemu-img", "check", img], capture_output=True, text=True)
    test.assertEqual(r.returncode, 0, r.stdout + r.stderr)


class JobTest(DaemonTest):
    """Helpers for running jobs and waiting for their events."""

    def setUp(self):
        super().setUp()
        self.events = []

    def pull(self, timeout=60):
        """Every event until now, waiting up to `timeout` for the first."""
        ev = self.d.qmp.pull_event(wait=timeout)
        if ev is None:
            raise AssertionError("no event arrived")
        self.events.append(ev)
        return ev

    def wait_event(self, name, job=None, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ev = self.pull(timeout=max(0.1, deadline - time.monotonic()))
            if ev["event"] == name and (job is None or ev["data"].get("device", ev["data"].get("id")) == job):
                return ev
        raise AssertionError(f"{name} for {job} did not arrive; saw {self.events}")

    def wait_completed(self, job, error=None):
        ev = self.wait_event("BLOCK_JOB_COMPLETED", job)
        if error is None:
            self.assertNotIn("error", ev["data"], ev)
        else:
            self.assertEqual(ev["data"].get("error"), error, ev)
        return ev

    def add_qcow2(self, name, path, backing):
        self.d.ok("blockdev-add", driver="qcow2", node_name=name,
                  file={"driver": "file", "filename": path}, backing=backing)

    def add_raw(self, name, path):
        self.d.ok("blockdev-add", driver="raw", node_name=name,
                  file={"driver": "file", "filename": path})

    def no_jobs(self):
        self.assertEqual(self.d.ok("query-block-jobs"), [])
        self.assertEqual(self.d.ok("query-jobs"), [])


class SingleChain(JobTest):
    """backing (raw) <- mid <- top, as in iotest 030's TestSingleDrive."""

    def setUp(self):
        super().setUp()
        self.backing = self.image("backing.img", MiB)
        self.mid = str(self.dir / "mid.qcow2")
        self.top = str(self.dir / "top.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", "-b", self.backing, "-F", "raw", self.mid)
        qemu_img("create", "-q", "-f", "qcow2", "-b", self.mid, "-F", "qcow2", self.top)
        qemu_io("raw", self.backing, "write -P 0x1 0 512")
        qemu_io("qcow2", self.mid, "write -P 0x1 524288 512")
        self.before = content(self.top)
        self.add_raw("base", self.backing)
        self.add_qcow2("mid", self.mid, "base")
        self.add_qcow2("top", self.top, "mid")

    def finish(self):
        """Closes the daemon, so qemu-img sees the images at rest."""
        self.d.close()
        for img in (self.top, self.mid):
            check_clean(self, img)

    def test_stream_everything_into_the_top(self):
        self.d.ok("block-stream", device="top", job_id="s")
        self.wait_completed("s")
        self.no_jobs()
        self.assertEqual(self.d.children("top"), [("file", self.d.children("top")[0][1])])
        self.finish()
        self.assertEqual(content(self.top), self.before)
        self.assertNotIn("backing-filename", info(self.top))
        self.assertEqual(qemu_map("raw", self.backing), qemu_map("qcow2", self.top))

    def test_stream_into_the_intermediate_node(self):
        self.assertNotEqual(qemu_map("raw", self.backing), qemu_map("qcow2", self.mid))
        self.d.ok("block-stream", device="mid", job_id="stream-mid")
        self.wait_completed("stream-mid")
        self.finish()
        self.assertEqual(qemu_map("raw", self.backing), qemu_map("qcow2", self.mid))
        self.assertEqual(content(self.top), self.before)

    def test_streaming_to_the_direct_backing_is_a_no_op(self):
        empty = qemu_map("qcow2", self.top)
        self.d.ok("block-stream", device="top", job_id="s", base_node="mid")
        self.wait_completed("s")
        self.finish()
        self.assertEqual(qemu_map("qcow2", self.top), empty)
        self.assertEqual(info(self.top)["backing-filename"], self.mid)

    def test_partial_stream_keeps_the_base(self):
        self.d.ok("block-stream", device="top", job_id="s", base=self.backing)
        self.wait_completed("s")
        self.assertEqual([c for c, _ in self.d.children("top")], ["file", "backing"])
        self.assertIn(("backing", "base"), self.d.children("top"))
        self.finish()
        self.assertEqual(qemu_map("qcow2", self.mid), qemu_map("qcow2", self.top))
        i = info(self.top)
        self.assertEqual(i["backing-filename"], self.backing)
        self.assertEqual(i["backing-filename-format"], "raw")
        self.assertEqual(content(self.top), self.before)

    def test_pause_holds_the_offset_and_resume_finishes(self):
        self.d.ok("block-stream", device="top", job_id="s", speed=64 * 1024)
        self.d.ok("block-job-pause", device="s")
        self.wait_event("JOB_STATUS_CHANGE", "s")
        while self.d.ok("query-block-jobs")[0]["status"] != "paused":
            time.sleep(0.05)
        offset = self.d.ok("query-block-jobs")[0]["offset"]
        time.sleep(0.5)
        jobs = self.d.ok("query-block-jobs")
        self.assertEqual(jobs[0]["offset"], offset)
        self.assertTrue(jobs[0]["paused"])
        self.assertEqual(self.d.err("block-job-pause", device="s")["desc"], "Job 's' is already paused")
        self.d.ok("block-job-resume", device="s")
        self.d.ok("block-job-set-speed", device="s", speed=0)
        self.wait_completed("s")
        self.finish()
        self.assertEqual(content(self.top), self.before)

    def test_cancel_leaves_the_chain_as_it_was(self):
        self.d.ok("block-stream", device="top", job_id="s", speed=1024)
        self.d.ok("block-job-cancel", device="s")
        self.wait_event("BLOCK_JOB_CANCELLED", "s")
        self.no_jobs()
        self.assertIn(("backing", "mid"), self.d.children("top"))
        # Nothing stays frozen: the link can change again.
        self.d.ok("blockdev-reopen", options=[{
            "driver": "qcow2", "node-name": "top", "file": self.d.children("top")[0][1],
            "backing": "base"}])
        self.finish()

    def test_errors_name_what_is_wrong(self):
        e = self.d.err("block-stream", device="nonexistent", job_id="s")
        self.assertEqual(e["class"], "GenericError")
        self.assertEqual(e["desc"], "Cannot find device='nonexistent' nor node-name='nonexistent'")
        self.assertIn("job-id", self.d.err("block-stream", device="mid")["desc"])
        self.assertEqual(self.d.err("block-stream", device="top", job_id="s", base_node="none")["desc"],
                         "Cannot find device='' nor node-name='none'")
        self.assertEqual(self.d.err("block-stream", device="mid", job_id="s", base_node="top")["desc"],
                         "Node 'top' is not a backing image of 'mid'")
        self.assertEqual(self.d.err("block-stream", device="top", job_id="s", base_node="top")["desc"],
                         "Node 'top' is not a backing image of 'top'")
        self.assertEqual(
            self.d.err("block-stream", device="top", job_id="s", base=self.backing, base_node="base")["desc"],
            "'base' and 'base-node' cannot be specified at the same time")
        self.assertEqual(self.d.err("block-stream", device="top", job_id="1x")["desc"], "Invalid job ID '1x'")
        self.assertEqual(self.d.err("block-stream", device="top", job_id="s", speed=-1)["desc"],
                         "Parameter 'speed' expects a non-negative value")
        self.assertEqual(self.d.err("block-stream", device="top", job_id="s", bogus=1)["desc"],
                         "Parameter 'bogus' is unexpected")
        e = self.d.err("block-job-pause", device="nope")
        self.assertEqual((e["class"], e["desc"]), ("DeviceNotActive", "Block job 'nope' not found"))
        self.assertEqual(self.d.err("job-pause", id="nope")["desc"], "Job 'nope' not found")
        self.no_jobs()

    def test_a_read_only_top_cannot_be_streamed_into(self):
        ro = str(self.dir / "ro.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", "-b", self.top, "-F", "qcow2", ro)
        self.d.ok("blockdev-add", driver="qcow2", node_name="ro", read_only=True,
                  file={"driver": "file", "filename": ro, "read-only": True}, backing="top")
        self.assertEqual(self.d.err("block-stream", device="ro", job_id="s")["desc"],
                         "Block node 'ro' is read-only")
        self.no_jobs()

    def test_a_job_freezes_its_links_and_holds_its_nodes(self):
        self.d.ok("block-stream", device="top", job_id="s", speed=1024)
        e = self.d.err("blockdev-reopen", options=[{
            "driver": "qcow2", "node-name": "top", "file": self.d.children("top")[0][1],
            "backing": "base"}])
        self.assertIn("frozen", e["desc"])
        self.assertIn("job 's'", e["desc"])
        e = self.d.err("block-stream", device="top", job_id="s2")
        self.assertEqual(e["desc"], "Node 'top' is busy: block device is in use by block job 's'")
        self.assertEqual(self.d.err("block-stream", device="top", job_id="s")["desc"],
                         "Job ID 's' already in use")
        # The device cannot become read-only while the job writes to it.
        e = self.d.err("blockdev-reopen", options=[{
            "driver": "qcow2", "node-name": "top", "read-only": True,
            "file": self.d.children("top")[0][1], "backing": "mid"}])
        self.assertIn("read-only", e["desc"])
        self.d.ok("block-job-set-speed", device="s", speed=0)
        self.wait_completed("s")
        self.finish()

    def test_manual_finalize_and_dismiss_walk_the_job_states(self):
        self.d.ok("block-stream", device="top", job_id="s", auto_finalize=False, auto_dismiss=False)
        self.wait_event("BLOCK_JOB_PENDING", "s")
        self.assertEqual(self.d.ok("query-jobs")[0]["status"], "pending")
        # Nothing changed in the graph yet: that happens on finalize.
        self.assertIn(("backing", "mid"), self.d.children("top"))
        self.assertEqual(self.d.err("job-pause", id="s")["desc"],
                         "Job 's' in state 'pending' cannot accept command verb 'pause'")
        self.d.ok("job-finalize", id="s")
        self.wait_completed("s")
        self.assertEqual(self.d.ok("query-jobs")[0]["status"], "concluded")
        self.d.ok("job-dismiss", id="s")
        self.no_jobs()
        statuses = [e["data"]["status"] for e in self.events
                    if e["event"] == "JOB_STATUS_CHANGE" and e["data"]["id"] == "s"]
        for _ in range(50):
            ev = self.d.qmp.pull_event(wait=False)
            if ev is None:
                break
            if ev["event"] == "JOB_STATUS_CHANGE":
                statuses.append(ev["data"]["status"])
        self.assertEqual(statuses, ["created", "running", "waiting", "pending", "concluded", "null"])
        self.finish()

    def test_commit_of_the_intermediate_node(self):
        self.d.ok("block-commit", device="top", job_id="c", top_node="mid", base_node="base")
        self.wait_completed("c")
        self.no_jobs()
        self.assertIn(("backing", "base"), self.d.children("top"))
        self.d.close()
        check_clean(self, self.top)
        self.assertEqual(info(self.top)["backing-filename"], self.backing)
        self.assertEqual(content(self.top), self.before)

    def test_active_commit_is_ready_and_completes(self):
        self.d.ok("block-commit", device="top", job_id="c", base_node="mid")
        ev = self.wait_event("BLOCK_JOB_READY", "c")
        self.assertEqual(ev["data"]["type"], "commit")
        self.assertEqual(self.d.err("block-job-complete", device="nope")["desc"], "Block job 'nope' not found")
        self.d.ok("block-job-complete", device="c")
        self.wait_completed("c")
        self.d.close()
        self.assertEqual(content(self.mid), self.before)
        check_clean(self, self.mid)

    def test_commit_errors(self):
        self.assertEqual(self.d.err("block-commit", device="top", job_id="c", base_node="top")["desc"],
                         "Top image 'top' and base image are the same: nothing to commit")
        self.assertEqual(
            self.d.err("block-commit", device="top", job_id="c", top_node="base", base_node="mid")["desc"],
            "Base image 'mid' is above top image 'base' in the backing chain")
        self.assertEqual(self.d.err("block-job-complete", device="nope")["class"], "DeviceNotActive")
        self.d.ok("block-stream", device="top", job_id="s", speed=1024)
        self.assertEqual(self.d.err("block-job-complete", device="s")["desc"],
                         "Job 's' of type 'stream' does not support completion")
        self.d.ok("block-job-cancel", device="s")
        self.wait_event("BLOCK_JOB_CANCELLED", "s")


class Snapshot(JobTest):
    def test_snapshot_puts_the_overlay_above_a_live_disk(self):
        base = self.image("base.img", MiB, byte=7)
        overlay = str(self.dir / "overlay.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", overlay)
        self.add_raw("disk", base)
        sock = str(self.dir / "vhost.sock")
        self.d.ok("block-export-add", type="vhost-user-blk", id="exp", node_name="disk", writable=True,
                  addr={"type": "unix", "path": sock})
        self.add_qcow2("snap", overlay, None)
        self.d.ok("blockdev-snapshot", node="disk", overlay="snap")
        self.assertEqual(self.d.ok("query-block-exports")[0]["node-name"], "snap")
        self.assertIn(("backing", "disk"), self.d.children("snap"))
        e = self.d.err("blockdev-snapshot", node="disk", overlay="snap")
        self.assertEqual(e["desc"], "The overlay 'snap' is already in use")
        self.assertEqual(self.d.err("blockdev-snapshot", node="disk", overlay="nope")["desc"],
                         "Cannot find device='nope' nor node-name='nope'")


if __name__ == "__main__":
    unittest.main()
