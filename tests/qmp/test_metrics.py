"""`--metrics`: a real scrape over HTTP, parsed by the Prometheus project's
own Python client (its strict OpenMetrics parser), after qemu-io sent a
known set of requests over an NBD export of a qcow2 node; a running
stream job shows its progress. Requests that are not a scrape get HTTP
errors and leave the endpoint serving."""

import http.client
import re
import socket
import subprocess
import time
import urllib.request

from prometheus_client.openmetrics.parser import text_string_to_metric_families

from strata_qmp import DaemonTest

MiB = 1 << 20


def qemu_img(*args):
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


class Metrics(DaemonTest):
    args = ("--metrics", "127.0.0.1:0")

    def setUp(self):
        super().setUp()
        deadline = time.monotonic() + 10
        while not (m := re.search(r"metrics on http://([\d.]+):(\d+)/metrics", self.d.log_text())):
            self.assertLess(time.monotonic(), deadline, self.d.log_text())
            time.sleep(0.02)
        self.host, self.port = m.group(1), int(m.group(2))

    def scrape(self):
        with urllib.request.urlopen(f"http://{self.host}:{self.port}/metrics", timeout=10) as r:
            self.assertEqual(r.status, 200)
            self.assertTrue(r.headers["Content-Type"].startswith("application/openmetrics-text"))
            text = r.read().decode()
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return samples

    @staticmethod
    def pick(samples, name, **labels):
        """Samples of `name` whose labels include `labels`, by their labels."""
        want = set(labels.items())
        return {dict(k)["op"] if "op" in dict(k) else k: v for (n, k), v in samples.items()
                if n == name and want <= set(k)}

    def test_a_scrape_counts_what_an_nbd_client_sent(self):
        base = str(self.dir / "base.raw")
        top = str(self.dir / "top.qcow2")
        qemu_img("create", "-f", "raw", base, "16M")
        qemu_img("create", "-f", "qcow2", "-b", base, "-F", "raw", top)
        self.d.ok("blockdev-add", driver="file", node_name="bf", filename=base)
        self.d.ok("blockdev-add", driver="raw", node_name="base", file="bf")
        self.d.ok("blockdev-add", driver="file", node_name="tf", filename=top)
        self.d.ok("blockdev-add", driver="qcow2", node_name="top", file="tf", backing="base")
        sock = str(self.dir / "nbd.sock")
        self.d.ok("nbd-server-start", addr={"type": "unix", "path": sock})
        r = self.d.qmp.cmd_raw("block-export-add", {"type": "nbd", "id": "e", "node-name": "top",
                                                     "name": "vm", "writable": True})
        self.assertIn("return", r)

        r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 7 0 1M",
                            "-c", "read -P 7 0 1M", "-c", "read -P 7 0 64k",
                            "-c", "discard 0 64k",
                            f"nbd+unix:///vm?socket={sock}"], capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

        s = self.scrape()
        requests = self.pick(s, "strata_export_requests_total", export="e", type="nbd",
                             node="top")
        self.assertEqual(requests["write"], 1, requests)
        self.assertEqual(requests["read"], 2, requests)
        self.assertEqual(requests["discard"], 1, requests)
        moved = self.pick(s, "strata_export_transferred_bytes_total", export="e")
        self.assertEqual(moved["write"], MiB)
        self.assertEqual(moved["read"], MiB + 64 * 1024)
        self.assertEqual(self.pick(s, "strata_export_latency_seconds_count", export="e")["read"], 2)
        inf = self.pick(s, "strata_export_latency_seconds_bucket", export="e", op="read", le="+Inf")
        self.assertEqual(list(inf.values()), [2])
        self.assertEqual(list(self.pick(s, "strata_export_in_flight", export="e").values()), [0])
        self.assertEqual(self.pick(s, "strata_export_failed_requests_total", export="e")["read"], 0)

        # The qcow2 node read its L2 table once and then found it cached.
        l2 = {"node": "top", "driver": "qcow2", "cache": "l2"}
        self.assertGreaterEqual(list(self.pick(s, "strata_node_cache_misses_total", **l2).values())[0], 1)
        self.assertGreaterEqual(list(self.pick(s, "strata_node_cache_hits_total", **l2).values())[0], 1)
        size = list(self.pick(s, "strata_node_size_bytes", node="top").values())[0]
        self.assertEqual(size, 16 * MiB)
        ratio = list(self.pick(s, "strata_node_allocated_ratio", node="top").values())[0]
        self.assertTrue(0 < ratio < 1, ratio)

        self.assertGreater(s[("strata_process_resident_memory_bytes", ())], 1 << 20)
        self.assertGreaterEqual(s[("strata_process_threads", ())], 2)
        self.assertGreater(s[("strata_process_uptime_seconds", ())], 0)

        # A job shows its progress while it runs (slowly, at 1 KiB/s).
        self.d.ok("block-stream", device="top", job_id="s", speed=1024)
        s = self.scrape()
        total = self.pick(s, "strata_job_progress_total", job="s", type="stream")
        self.assertEqual(list(total.values()), [16 * MiB])
        self.assertIn(("strata_job_progress_current", (("job", "s"), ("status", "running"),
                                                       ("type", "stream"))), s)
        self.d.ok("block-job-cancel", device="s")

    def test_what_is_not_a_scrape_gets_an_http_error(self):
        c = http.client.HTTPConnection(self.host, self.port, timeout=10)
        c.request("GET", "/")
        self.assertEqual(c.getresponse().status, 404)
        c = http.client.HTTPConnection(self.host, self.port, timeout=10)
        c.request("POST", "/metrics", body=b"x")
        self.assertEqual(c.getresponse().status, 405)
        c = http.client.HTTPConnection(self.host, self.port, timeout=10)
        c.putrequest("GET", "/metrics")
        c.putheader("X-Big", "a" * 10000)
        c.endheaders()
        self.assertEqual(c.getresponse().status, 431)
        with socket.create_connection((self.host, self.port), timeout=10) as raw:
            raw.sendall(b"\x16\x03\x01\x00\x05hello\r\n\r\n")
            self.assertTrue(raw.recv(100).startswith(b"HTTP/1.1 400"))
        # A client that connects and says nothing does not stop the next
        # scrape for longer than the endpoint's timeout.
        idle = socket.create_connection((self.host, self.port), timeout=10)
        self.addCleanup(idle.close)
        self.scrape()
