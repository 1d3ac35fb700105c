"""Block jobs through the real qemu.qmp client: stream, commit, snapshot and
the job controls, in scenarios modelled on QEMU's iotest 030. qemu-img and
qemu-io are the oracle for what ends up in the images."""

import json
import os
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

    def single_chain(self, top_write=None):
        """backing (raw) <- mid <- top, with data in backing and mid (and
        `top_write` in top), added to the daemon."""
        self.backing = self.image("backing.img", MiB)
        self.mid = str(self.dir / "mid.qcow2")
        self.top = str(self.dir / "top.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", "-b", self.backing, "-F", "raw", self.mid)
        qemu_img("create", "-q", "-f", "qcow2", "-b", self.mid, "-F", "qcow2", self.top)
        qemu_io("raw", self.backing, "write -P 0x1 0 512")
        qemu_io("qcow2", self.mid, "write -P 0x1 524288 512")
        if top_write:
            qemu_io("qcow2", self.top, top_write)
        self.before = content(self.top)
        self.add_raw("base", self.backing)
        self.add_qcow2("mid", self.mid, "base")
        self.add_qcow2("top", self.top, "mid")

    def no_jobs(self):
        self.assertEqual(self.d.ok("query-block-jobs"), [])
        self.assertEqual(self.d.ok("query-jobs"), [])


class SingleChain(JobTest):
    """backing (raw) <- mid <- top, as in iotest 030's TestSingleDrive."""

    def setUp(self):
        super().setUp()
        self.single_chain()

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
        def statuses():
            return [e["data"]["status"] for e in self.events
                    if e["event"] == "JOB_STATUS_CHANGE" and e["data"]["id"] == "s"]
        # The dismissal's event follows its reply: wait for it rather than
        # take only what already arrived.
        deadline = time.monotonic() + 10
        while "null" not in statuses() and time.monotonic() < deadline:
            self.pull(timeout=max(0.1, deadline - time.monotonic()))
        self.assertEqual(statuses(), ["created", "running", "waiting", "pending", "concluded", "null"])
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


class ParallelChain(JobTest):
    """node0 (raw) <- node1 <- ... <- node8, data in the odd nodes, as in
    iotest 030's TestParallelOps."""

    num = 9
    size = 4 * MiB

    def setUp(self):
        super().setUp()
        self.build()

    def build(self):
        self.imgs = [self.image("img-0.img", self.size)]
        for i in range(1, self.num):
            p = str(self.dir / f"img-{i}.qcow2")
            qemu_img("create", "-q", "-f", "qcow2", "-b", self.imgs[-1],
                     "-F", "raw" if i == 1 else "qcow2", p)
            self.imgs.append(p)
        for i in range(self.num // 2):
            # 512 KiB and 1 MiB alternately, so the jobs end in another
            # order than they start.
            kib = 512 + 512 * (i % 2)
            qemu_io("qcow2", self.imgs[2 * i + 1], f"write -P {i + 1} {i * MiB} {kib * 1024}")
        self.before = [content(p) for p in self.imgs]
        self.add_raw("node0", self.imgs[0])
        for i in range(1, self.num):
            self.add_qcow2(f"node{i}", self.imgs[i], f"node{i - 1}")

    def wait_all(self, jobs):
        """Waits for every job to complete without error, completing the
        ones that become ready."""
        pending = set(jobs)
        while pending:
            ev = self.pull()
            if ev["event"] == "BLOCK_JOB_READY":
                self.d.ok("block-job-complete", device=ev["data"]["device"])
            elif ev["event"] == "BLOCK_JOB_COMPLETED":
                self.assertNotIn("error", ev["data"], ev)
                pending.discard(ev["data"]["device"])
        self.no_jobs()

    def check_images(self, changed=()):
        self.d.close()
        for i, p in enumerate(self.imgs):
            if i > 0:
                check_clean(self, p)
            if i not in changed:
                self.assertEqual(content(p), self.before[i], f"content of img-{i} changed")

    def test_parallel_streams_on_one_chain(self):
        for i in range(2, self.num, 2):
            self.assertNotEqual(qemu_map("qcow2", self.imgs[i]), qemu_map("qcow2", self.imgs[i - 1]))
        jobs = []
        for i in range(2, self.num, 2):
            job = f"stream-node{i}"
            self.d.ok("block-stream", device=f"node{i}", job_id=job, bottom=f"node{i - 1}", speed=1024)
            jobs.append(job)
        # All four run at once, each in its own part of the chain.
        running = {j["device"] for j in self.d.ok("query-block-jobs")}
        self.assertEqual(running, set(jobs))
        for job in jobs:
            self.d.ok("block-job-set-speed", device=job, speed=0)
        self.wait_all(jobs)
        for i in range(2, self.num, 2):
            self.assertIn(("backing", f"node{i - 2}"), self.d.children(f"node{i}"))
        self.check_images()
        for i in range(2, self.num, 2):
            self.assertEqual(qemu_map("qcow2", self.imgs[i]), qemu_map("qcow2", self.imgs[i - 1]))
            self.assertEqual(info(self.imgs[i])["backing-filename"], self.imgs[i - 2])

    def test_overlapping_streams_and_commits_are_refused(self):
        self.d.ok("block-stream", device="node4", job_id="stream-node4", base=self.imgs[1], speed=1024)
        refused = [
            ("block-stream", dict(device="node5", job_id="stream-node5", base=self.imgs[2]), "node4"),
            ("block-stream", dict(device="node3", job_id="stream-node3", base=self.imgs[2]), "node3"),
            ("block-stream", dict(device="node4", job_id="stream-node4-v2"), "node4"),
            ("block-commit", dict(device="node8", base=self.imgs[4], job_id="commit-node4"), "node4"),
            ("block-commit", dict(device="node8", base=self.imgs[1], top=self.imgs[3],
                                  job_id="commit-node1"), "node4"),
            # It would rewrite node2's backing link, and node2 is streamed from.
            ("block-commit", dict(device="node8", base=self.imgs[0], top=self.imgs[1],
                                  job_id="commit-node0"), "node2"),
        ]
        for cmd, args, node in refused:
            e = self.d.err(cmd, **args)
            self.assertEqual(e["desc"],
                             f"Node '{node}' is busy: block device is in use by block job 'stream-node4'",
                             (cmd, args))
        self.d.ok("block-job-set-speed", device="stream-node4", speed=0)
        self.wait_all(["stream-node4"])
        self.check_images(changed={4})
        self.assertEqual(content(self.imgs[4]), self.before[4])

    def test_a_commit_blocks_what_crosses_its_range(self):
        self.d.ok("block-commit", device="node8", top=self.imgs[5], base=self.imgs[3],
                  job_id="commit-node3", speed=1024)
        for args in [dict(device="node3", job_id="stream-node3"),
                     dict(device="node6", base=self.imgs[2], job_id="stream-node6"),
                     dict(device="node4", base=self.imgs[2], job_id="stream-node4"),
                     dict(device="node6", base=self.imgs[4], job_id="stream-node6-v2"),
                     # node6 is the overlay whose link the commit rewrites.
                     dict(device="node7", base=self.imgs[5], job_id="stream-node6-v3"),
                     dict(device="node8", base=self.imgs[5], job_id="stream-drive0")]:
            e = self.d.err("block-stream", **args)
            self.assertIn("is busy: block device is in use by block job 'commit-node3'", e["desc"], args)
        self.d.ok("block-job-set-speed", device="commit-node3", speed=0)
        self.wait_all(["commit-node3"])
        self.assertIn(("backing", "node3"), self.d.children("node6"))
        # The merged images' own chains now see the merged data below them.
        self.check_images(changed={3, 4, 5, 6})
        self.assertEqual(content(self.imgs[6]), self.before[6])
        self.assertEqual(info(self.imgs[6])["backing-filename"], self.imgs[3])

    def test_an_active_commit_blocks_its_range_until_completed(self):
        self.d.ok("block-commit", device="node8", base=self.imgs[3], job_id="commit-drive0", speed=1024)
        e = self.d.err("block-stream", device="node5", base=self.imgs[3], job_id="stream-node6")
        self.assertIn("block job 'commit-drive0'", e["desc"])
        self.d.ok("block-job-set-speed", device="commit-drive0", speed=0)
        self.wait_all(["commit-drive0"])
        self.check_images(changed={3, 4, 5, 6, 7})
        self.assertEqual(content(self.imgs[3]), self.before[8])

    def test_a_stream_and_a_commit_in_parallel(self):
        self.d.ok("block-stream", device="node2", job_id="node2")
        self.d.ok("block-commit", device="node8", base=self.imgs[3], job_id="drive0")
        self.wait_all(["node2", "drive0"])
        self.check_images(changed={3, 4, 5, 6, 7})
        self.assertEqual(content(self.imgs[3]), self.before[8])
        self.assertNotIn("backing-filename", info(self.imgs[2]))

    def test_base_node_errors_and_success(self):
        self.assertEqual(self.d.err("block-stream", device="node4", base_node="none", job_id="s")["desc"],
                         "Cannot find device='' nor node-name='none'")
        self.assertEqual(self.d.err("block-stream", device="node4", base_node="node6", job_id="s")["desc"],
                         "Node 'node6' is not a backing image of 'node4'")
        self.assertEqual(self.d.err("block-stream", device="node4", base_node="node4", job_id="s")["desc"],
                         "Node 'node4' is not a backing image of 'node4'")
        self.assertEqual(self.d.err("block-stream", device="node4", base=self.imgs[2], base_node="node2",
                                    job_id="s")["desc"],
                         "'base' and 'base-node' cannot be specified at the same time")
        self.d.ok("block-stream", device="node4", base_node="node2", job_id="s")
        self.wait_all(["s"])
        self.check_images()
        self.assertEqual(qemu_map("qcow2", self.imgs[4]), qemu_map("qcow2", self.imgs[3]))


class ParallelAgainstQsd(unittest.TestCase):
    """The parallel-stream scenario, run by the same script against
    qemu-storage-daemon and against Strata: the images must end the same."""

    def run_scenario(self, binary, workdir):
        from strata_qmp import Daemon
        test = ParallelChain("test_parallel_streams_on_one_chain")
        test.tmp = None
        test.dir = workdir
        test.events = []
        test.d = Daemon(workdir, binary=binary)
        try:
            ParallelChain.build(test)
            jobs = []
            for i in range(2, test.num, 2):
                job = f"stream-node{i}"
                test.d.ok("block-stream", device=f"node{i}", job_id=job, bottom=f"node{i - 1}", speed=1024)
                jobs.append(job)
            for job in jobs:
                # A job may be done already (qsd lets the first chunks of a
                # slice through): that is fine, it must complete all the same.
                r = test.d.cmd("block-job-set-speed", device=job, speed=0)
                if "error" in r:
                    self.assertEqual(r["error"]["desc"], f"Block job '{job}' not found")
            test.wait_all(jobs)
        finally:
            test.d.close()
        return test.imgs

    def test_strata_ends_where_qsd_does(self):
        import tempfile
        from pathlib import Path
        results = {}
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            for name, binary, d in [("qsd", "qemu-storage-daemon", a), ("strata", None, b)]:
                from strata_qmp import STRATA
                imgs = self.run_scenario(binary or STRATA, Path(d))
                results[name] = [(qemu_map("qcow2" if i else "raw", p),
                                  os.path.basename(info(p).get("backing-filename", "")),
                                  content(p)) for i, p in enumerate(imgs)]
        for i, (q, s) in enumerate(zip(results["qsd"], results["strata"])):
            self.assertEqual(s[0], q[0], f"map of img-{i}")
            self.assertEqual(s[1], q[1], f"backing file of img-{i}")
            self.assertTrue(s[2] == q[2], f"content of img-{i}")


class Errors(JobTest):
    """A read error in the middle of a stream, injected by blkdebug under the
    backing file, with each on-error policy (iotest 030's TestEIO)."""

    size = 2 * MiB
    chunk = 512 * 1024

    def start(self, errno=5, **args):
        backing = self.image("backing.img", self.size, byte=3)
        top = str(self.dir / "top.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", "-b", backing, "-F", "raw", top)
        self.d.ok("blockdev-add", driver="raw", node_name="base", file={
            "driver": "blkdebug", "image": {"driver": "file", "filename": backing},
            "inject-error": [{"event": "read_aio", "errno": errno, "sector": self.chunk // 512,
                              "once": True}]})
        self.add_qcow2("top", top, "base")
        self.d.ok("block-stream", device="top", job_id="s", **args)

    def test_report_fails_the_job_at_the_error(self):
        self.start()
        ev = self.wait_event("BLOCK_JOB_ERROR", "s")
        self.assertEqual((ev["data"]["operation"], ev["data"]["action"]), ("read", "report"))
        ev = self.wait_completed("s", error="Input/output error")
        self.assertEqual((ev["data"]["offset"], ev["data"]["len"]), (self.chunk, self.size))
        self.assertIn(("backing", "base"), self.d.children("top"))
        self.no_jobs()

    def test_ignore_goes_on_and_reports_at_the_end(self):
        self.start(on_error="ignore")
        ev = self.wait_event("BLOCK_JOB_ERROR", "s")
        self.assertEqual(ev["data"]["action"], "ignore")
        ev = self.wait_completed("s", error="Input/output error")
        self.assertEqual(ev["data"]["offset"], self.size)

    def test_stop_pauses_and_resume_finishes(self):
        self.start(on_error="stop")
        ev = self.wait_event("BLOCK_JOB_ERROR", "s")
        self.assertEqual(ev["data"]["action"], "stop")
        job = self.d.ok("query-block-jobs")[0]
        self.assertEqual((job["paused"], job["offset"], job["io-status"]), (True, self.chunk, "failed"))
        self.d.ok("block-job-resume", device="s")
        ev = self.wait_completed("s")
        self.assertEqual(ev["data"]["offset"], self.size)
        self.assertEqual(self.d.children("top")[1:], [])

    def test_enospc_stops_only_on_enospc(self):
        self.start(on_error="enospc")
        self.wait_completed("s", error="Input/output error")

    def test_enospc_with_enospc_stops(self):
        self.start(errno=28, on_error="enospc")
        self.wait_event("BLOCK_JOB_ERROR", "s")
        job = self.d.ok("query-block-jobs")[0]
        self.assertEqual((job["paused"], job["io-status"]), (True, "nospace"))
        self.d.ok("block-job-resume", device="s")
        self.wait_completed("s")


class SmallerBacking(JobTest):
    def test_a_short_backing_file_reads_as_zeroes_and_does_not_hang(self):
        backing = self.image("backing.img", MiB, byte=9)
        top = str(self.dir / "top.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", "-b", backing, "-F", "raw", top, str(2 * MiB))
        before = content(top)
        self.assertEqual(before, bytes([9]) * MiB + bytes(MiB))
        self.add_raw("base", backing)
        self.add_qcow2("top", top, "base")
        self.d.ok("block-stream", device="top", job_id="s")
        self.wait_completed("s")
        self.d.close()
        self.assertEqual(content(top), before)
        check_clean(self, top)


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


class JobCli(JobTest):
    """`strata job`, the command-line client, against a running daemon."""

    def strata_job(self, *args):
        from strata_qmp import STRATA
        return subprocess.run([STRATA, "job", "--qmp", str(self.d.sock), "--json", *args],
                              capture_output=True, text=True, timeout=120)

    def setUp(self):
        super().setUp()
        self.base = self.image("base.img", 4 * MiB, byte=5)
        self.add_raw("base", self.base)

    def test_snapshot_then_stream_and_commit(self):
        overlay = str(self.dir / "snap.qcow2")
        r = self.strata_job("snapshot", "base", "--overlay", overlay)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(json.loads(r.stdout), {"node": "base", "overlay": "snap"})
        self.assertIn(("backing", "base"), self.d.children("snap"))
        r = self.strata_job("stream", "snap", "--speed", "8M")
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(json.loads(r.stdout)["status"], "completed")
        self.assertEqual(json.loads(r.stdout)["len"], 4 * MiB)
        r = self.strata_job("list")
        self.assertEqual(json.loads(r.stdout), [])
        # Nothing left to commit: the refusal is the daemon's, and exits 1.
        r = self.strata_job("commit", "snap")
        self.assertEqual(r.returncode, 1)
        self.assertIn("nothing to commit", r.stderr)

    def test_a_failing_job_exits_non_zero(self):
        top = str(self.dir / "top.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", "-b", self.base, "-F", "raw", top)
        self.d.ok("blockdev-add", driver="raw", node_name="bad", file={
            "driver": "blkdebug", "image": {"driver": "file", "filename": self.base},
            "inject-error": [{"event": "read_aio"}]})
        self.add_qcow2("top", top, "bad")
        r = self.strata_job("stream", "top", "--job-id", "s")
        self.assertEqual(r.returncode, 1)
        self.assertEqual(json.loads(r.stdout)["status"], "failed")
        self.assertIn("job 's' failed: Input/output error", r.stderr)
        r = self.strata_job("pause", "nope")
        self.assertEqual(r.returncode, 1)
        self.assertIn("Block job 'nope' not found", r.stderr)


class Mirror(JobTest):
    """blockdev-mirror of the chain's top into a separate target, as
    libvirt drives it: the target is added first, the job is ready, then
    completes onto it."""

    def setUp(self):
        super().setUp()
        self.single_chain(top_write="write -P 0x7 65536 4096")

    def target(self, name="tgt", backing=None, size=MiB):
        path = str(self.dir / f"{name}.qcow2")
        if backing:
            qemu_img("create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", path)
        else:
            qemu_img("create", "-q", "-f", "qcow2", path, str(size))
        self.add_qcow2(name, path, backing and "mid")
        return path

    def test_full_mirror_is_ready_and_completes_onto_the_target(self):
        path = self.target()
        self.d.ok("blockdev-mirror", job_id="m", device="top", target="tgt", sync="full",
                  granularity=65536, buf_size=1 << 20)
        ev = self.wait_event("BLOCK_JOB_READY", "m")
        self.assertEqual(ev["data"]["type"], "mirror")
        jobs = self.d.ok("query-block-jobs")
        self.assertEqual((jobs[0]["type"], jobs[0]["ready"]), ("mirror", True))
        self.d.ok("block-job-complete", device="m")
        self.wait_completed("m")
        self.no_jobs()
        self.d.close()
        check_clean(self, path)
        self.assertEqual(content(path), self.before)
        self.assertEqual(info(path).get("backing-filename"), None)

    def test_top_mirror_copies_only_the_top_layer(self):
        path = self.target(backing=self.mid)
        self.d.ok("blockdev-mirror", job_id="m", device="top", target="tgt", sync="top",
                  copy_mode="write-blocking")
        self.wait_event("BLOCK_JOB_READY", "m")
        self.d.ok("block-job-complete", device="m")
        self.wait_completed("m")
        self.d.close()
        self.assertEqual(content(path), self.before)
        # Only the top's cluster is in the target itself.
        self.assertIn("64 KiB (0x10000) bytes     allocated at offset 64 KiB", qemu_map("qcow2", path))

    def test_cancel_when_ready_keeps_the_source(self):
        self.target()
        self.d.ok("blockdev-mirror", job_id="m", device="top", target="tgt", sync="none")
        self.wait_event("BLOCK_JOB_READY", "m")
        self.d.ok("block-job-cancel", device="m")
        self.wait_completed("m")
        self.no_jobs()
        names = [n["node-name"] for n in self.d.ok("query-named-block-nodes")]
        self.assertNotIn("mirror_top", " ".join(names))
        self.assertIn(("backing", "mid"), self.d.children("top"))

    def test_mirror_errors_name_what_is_wrong(self):
        self.target(size=2 * MiB)
        e = self.d.err("blockdev-mirror", job_id="m", device="top", target="tgt", sync="full")
        self.assertIn("different sizes", e["desc"])
        e = self.d.err("blockdev-mirror", job_id="m", device="top", target="mid", sync="full")
        self.assertIn("in the backing chain", e["desc"])
        e = self.d.err("blockdev-mirror", job_id="m", device="top", target="nope", sync="full")
        self.assertIn("nope", e["desc"])
        e = self.d.err("blockdev-mirror", job_id="m", device="top", target="tgt", sync="incremental")
        self.assertIn("'sync' does not accept value 'incremental'", e["desc"])
        e = self.d.err("blockdev-mirror", job_id="m", device="top", target="tgt", sync="full",
                       granularity=1000)
        self.assertIn("power of 2", e["desc"])
        e = self.d.err("blockdev-mirror", job_id="m", device="top", target="tgt", sync="full",
                       on_error="stop")
        self.assertIn("on-source-error", e["desc"])
        e = self.d.err("blockdev-mirror", job_id="m", device="top", target="tgt", sync="full",
                       copy_mode="eager")
        self.assertIn("copy-mode", e["desc"])
        e = self.d.err("drive-mirror", job_id="m", device="top", target="x.qcow2", sync="full")
        self.assertIn("blockdev-mirror", e["desc"])
        self.no_jobs()


class MirrorCli(JobTest):
    def test_strata_job_mirror_follows_the_job_to_completion(self):
        src = self.image("src.img", 4 * MiB, byte=9)
        dst = self.image("dst.img", 4 * MiB, byte=0)
        self.add_raw("src", src)
        self.add_raw("dst", dst)
        from strata_qmp import STRATA
        r = subprocess.run([STRATA, "job", "--qmp", str(self.d.sock), "--json", "mirror", "src",
                            "--target", "dst", "--speed", "16M"],
                           capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr)
        out = json.loads(r.stdout)
        self.assertEqual((out["status"], out["len"]), ("completed", 4 * MiB))
        self.d.close()
        with open(dst, "rb") as f:
            self.assertEqual(f.read(), bytes([9]) * 4 * MiB)


if __name__ == "__main__":
    unittest.main()
