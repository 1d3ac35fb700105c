"""Helpers for QMP tests: run a daemon (strata, or qemu-storage-daemon for
comparison) with a monitor, and talk to it with the qemu.qmp library."""

import os
import subprocess
import tempfile
import time
import unittest
from pathlib import Path

from qemu.qmp.legacy import QEMUMonitorProtocol

ROOT = Path(__file__).resolve().parents[2]
STRATA = os.environ.get("STRATA_BIN", str(ROOT / "target" / "debug" / "strata"))


class Daemon:
    """A daemon with a QMP monitor, given extra command-line options."""

    def __init__(self, workdir, args=(), binary=STRATA):
        self.dir = Path(workdir)
        self.sock = self.dir / "qmp.sock"
        self.log = open(self.dir / "daemon.log", "w+")
        cmd = [
            binary,
            "--chardev", f"socket,id=m0,path={self.sock},server=on,wait=off",
            "--monitor", "chardev=m0",
            *args,
        ]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not self.sock.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}: {self.log_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no QMP socket: {self.log_text()}")
            time.sleep(0.02)
        self.qmp = QEMUMonitorProtocol(str(self.sock))
        self.greeting = self.qmp.connect(negotiate=True)

    def log_text(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def cmd(self, name, **args):
        """The full response to `name` (dashes in argument names are
        written as underscores)."""
        args = {k.replace("_", "-"): v for k, v in args.items()}
        return self.qmp.cmd_raw(name, args)

    def ok(self, name, **args):
        r = self.cmd(name, **args)
        if "error" in r:
            raise AssertionError(f"{name} failed: {r['error']}")
        return r["return"]

    def err(self, name, **args):
        r = self.cmd(name, **args)
        if "error" not in r:
            raise AssertionError(f"{name} succeeded: {r}")
        return r["error"]

    def node(self, name):
        for n in self.ok("query-named-block-nodes"):
            if n["node-name"] == name:
                return n
        return None

    def children(self, name):
        return [(c["child"], c["node-name"]) for c in self.node(name)["children"]]

    def close(self):
        try:
            self.cmd("quit")
        except Exception:
            pass
        try:
            self.qmp.close()
        except Exception:
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class DaemonTest(unittest.TestCase):
    """A test case with a fresh strata daemon in a temporary directory."""

    args = ()

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = Path(self.tmp.name)
        self.d = Daemon(self.dir, self.args)

    def tearDown(self):
        self.d.close()
        self.tmp.cleanup()

    def image(self, name, size=1 << 20, byte=0):
        p = self.dir / name
        p.write_bytes(bytes([byte]) * size)
        return str(p)

    def assertError(self, name, desc, cls="GenericError", **args):
        e = self.d.err(name, **args)
        self.assertEqual(e["class"], cls, e)
        self.assertEqual(e["desc"], desc)
