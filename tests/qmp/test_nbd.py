"""The NBD server through QMP, as libvirt drives qemu-storage-daemon:
nbd-server-start (QMP's legacy address form), block-export-add type=nbd,
query-block-exports, block-export-del (refused while a client is connected
unless mode=hard) and nbd-server-stop, with qemu-io as the NBD client."""

import socket
import subprocess
import time

from strata_qmp import DaemonTest

MiB = 1 << 20


def qemu_io(url, *cmds):
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    r = subprocess.run(args + [url], capture_output=True, text=True)
    return r.returncode == 0 and "failed" not in r.stdout + r.stderr, r.stdout + r.stderr


def openssl(cwd, *args):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(root):
    """A CA, a server directory and a client directory (subject
    O=Strata,CN=client), laid out as tls-creds-x509 reads them."""
    root.mkdir()
    openssl(root, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-subj", "/CN=ca",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    dirs = {}
    for role, subj, ext in [("server", "/CN=localhost", "subjectAltName=IP:127.0.0.1"),
                            ("client", "/O=Strata/CN=client", "extendedKeyUsage=clientAuth")]:
        d = root / role
        d.mkdir()
        (d / "ca-cert.pem").write_bytes((root / "ca-cert.pem").read_bytes())
        (root / f"{role}.ext").write_text(ext + "\n")
        openssl(root, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{d}/{role}-key.pem",
                "-out", f"{role}.csr", "-subj", subj)
        openssl(root, "x509", "-req", "-days", "2", "-in", f"{role}.csr", "-CA", "ca-cert.pem",
                "-CAkey", "ca-key.pem", "-CAcreateserial", "-out", f"{d}/{role}-cert.pem",
                "-extfile", f"{role}.ext")
        dirs[role] = str(d)
    return dirs


class Nbd(DaemonTest):
    def setUp(self):
        super().setUp()
        img = self.image("disk.img", 4 * MiB, byte=7)
        self.d.ok("blockdev-add", driver="file", node_name="f", filename=img)
        self.d.ok("blockdev-add", driver="raw", node_name="disk", file="f")
        self.sock = str(self.dir / "nbd.sock")
        self.url = f"nbd+unix:///vm?socket={self.sock}"

    def add(self, **args):
        """block-export-add type=nbd (whose `name` the helpers would take
        for the command's)."""
        args = {k.replace("_", "-"): v for k, v in args.items()}
        return self.d.qmp.cmd_raw("block-export-add", {"type": "nbd", **args})

    def wait_log(self, text, times=1, timeout=10):
        deadline = time.monotonic() + timeout
        while self.d.log_text().count(text) < times:
            self.assertLess(time.monotonic(), deadline, f"no '{text}' in the log")
            time.sleep(0.02)

    def test_an_export_lives_from_start_to_stop(self):
        e = self.d.err("block-export-add", type="nbd", id="e0", node_name="disk")
        self.assertIn("NBD server not running", e["desc"])
        self.d.ok("nbd-server-start", addr={"type": "unix", "data": {"path": self.sock}})
        e = self.d.err("nbd-server-start", addr={"type": "unix", "data": {"path": self.sock}})
        self.assertEqual(e["desc"], "NBD server already running")

        self.assertEqual(self.add(id="e0", node_name="disk", name="vm", writable=True), {"return": {}})
        self.assertIn({"type": "nbd", "id": "e0", "node-name": "disk", "shutting-down": False},
                      self.d.ok("query-block-exports"))
        e = self.add(id="e1", node_name="disk", name="vm")["error"]
        self.assertEqual(e["desc"], "NBD export 'vm' already exists")
        ok, out = qemu_io(self.url, "read -P 7 0 1M", "write -P 9 1M 64k", "read -P 9 1M 64k")
        self.assertTrue(ok, out)

        # A connected client keeps the export unless the removal is hard.
        client = subprocess.Popen(["qemu-io", "-f", "raw", "-c", "sleep 20000", self.url],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            # The second client of the export (qemu-io above was the first).
            self.wait_log("NBD export 'e0': a client connected", times=2)
            e = self.d.err("block-export-del", id="e0")
            self.assertIn("still in use by 1 NBD client", e["desc"])
            self.d.ok("block-export-del", id="e0", mode="hard")
        finally:
            client.kill()
            client.wait()
        self.assertEqual(self.d.ok("query-block-exports"), [])
        ok, out = qemu_io(self.url, "read 0 512")
        self.assertFalse(ok, "the export is gone")

        self.assertEqual(self.add(id="e2", node_name="disk", name="vm"), {"return": {}})
        self.d.ok("nbd-server-stop")
        self.assertEqual(self.d.ok("query-block-exports"), [])
        e = self.d.err("nbd-server-stop")
        self.assertEqual(e["desc"], "NBD server not running")
        # The node is free again: blockdev-del works.
        self.d.ok("blockdev-del", node_name="disk")

    def test_bad_arguments_are_named(self):
        e = self.d.err("nbd-server-start",
                       addr={"type": "inet", "data": {"host": "127.0.0.1", "port": "nbd-port"}})
        self.assertIn("addr.port 'nbd-port': not a port number", e["desc"])
        e = self.d.err("nbd-server-start", addr={"type": "vsock", "data": {"cid": "3", "port": "1"}})
        self.assertIn("addr.type", e["desc"])
        e = self.d.err("nbd-server-start", addr={"type": "unix", "data": {"path": self.sock}},
                       tls_creds="tls0")
        self.assertIn("no TLS credentials with id 'tls0'", e["desc"])
        self.d.ok("nbd-server-start", addr={"type": "unix", "data": {"path": self.sock}})
        e = self.d.err("block-export-add", type="nbd", id="e0", node_name="nope")
        self.assertIn("nope", e["desc"])
        e = self.d.err("block-export-add", type="nbd", id="e0", node_name="disk", bitmaps=["b0"])
        self.assertIn("bitmaps", e["desc"])

    def test_tls_objects_added_over_qmp_guard_the_server(self):
        pki = make_pki(self.dir / "pki")
        self.d.ok("object-add", qom_type="tls-creds-x509", id="tls0", dir=pki["server"],
                  endpoint="server", verify_peer=True)
        e = self.d.err("object-add", qom_type="tls-creds-x509", id="tls0", dir=pki["server"],
                       endpoint="server")
        self.assertIn("duplicate property 'tls0'", e["desc"])
        e = self.d.err("object-add", qom_type="tls-creds-x509", id="tls1",
                       dir=str(self.dir / "nowhere"), endpoint="server")
        self.assertIn("nowhere/ca-cert.pem", e["desc"])
        self.d.ok("object-add", qom_type="authz-simple", id="authz0",
                  identity="O=Strata,CN=client")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.d.ok("nbd-server-start", addr={"type": "inet", "host": "127.0.0.1", "port": str(port)},
                  tls_creds="tls0", tls_authz="authz0")
        self.assertEqual(self.add(id="e0", node_name="disk", name="vm"), {"return": {}})

        url = f"nbd://127.0.0.1:{port}/vm"
        ok, out = qemu_io(url, "read 0 4k")
        self.assertFalse(ok, out)
        self.assertIn("requires TLS", out)
        r = subprocess.run(
            ["qemu-io", "--object",
             f"tls-creds-x509,id=t,dir={pki['client']},endpoint=client",
             "--image-opts", "-r", "-c", "read -P 7 0 1M",
             f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},"
             "export=vm,tls-creds=t"],
            capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertNotIn("failed", r.stdout + r.stderr)
        self.d.ok("nbd-server-stop")
        self.d.ok("object-del", id="authz0")
        self.d.ok("object-del", id="tls0")
        e = self.d.err("nbd-server-start", addr={"type": "unix", "data": {"path": self.sock}},
                       tls_creds="tls0")
        self.assertIn("no TLS credentials with id 'tls0'", e["desc"])
