"""Sockets a client hands the running daemon over QMP, as libvirt does:
the descriptor goes with SCM_RIGHTS (qemu.qmp's send_fd_scm), `getfd`
names it, and `nbd-server-start` or `block-export-add` listen on it with
addr.type=fd; `closefd` closes a named one. qemu-io reads over the NBD
server so started."""

import socket
import subprocess

from strata_qmp import DaemonTest

MiB = 1 << 20


class HandedFds(DaemonTest):
    def setUp(self):
        super().setUp()
        img = self.image("disk.img", 4 * MiB, byte=9)
        self.d.ok("blockdev-add", driver="file", node_name="f", filename=img)
        self.d.ok("blockdev-add", driver="raw", node_name="disk", file="f")

    def listening(self, name):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path = str(self.dir / name)
        s.bind(path)
        s.listen(4)
        self.addCleanup(s.close)
        return s, path

    def hand(self, sock, fdname):
        self.d.qmp.send_fd_scm(sock.fileno())
        self.d.ok("getfd", fdname=fdname)

    def test_an_nbd_server_listens_on_a_named_descriptor(self):
        s, path = self.listening("nbd.sock")
        self.hand(s, "nbd0")
        s.close()  # the daemon holds its own copy
        self.d.ok("nbd-server-start", addr={"type": "fd", "str": "nbd0"})
        r = self.d.qmp.cmd_raw("block-export-add",
                               {"type": "nbd", "id": "e", "node-name": "disk", "name": "vm"})
        self.assertIn("return", r)
        r = subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 9 0 1M",
                            f"nbd+unix:///vm?socket={path}"], capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertNotIn("failed", r.stdout + r.stderr)
        # Taken once: the name is gone.
        self.d.ok("nbd-server-stop")
        e = self.d.err("nbd-server-start", addr={"type": "fd", "str": "nbd0"})
        self.assertIn("'nbd0'", e["desc"])

    def test_a_vhost_user_export_listens_on_a_named_descriptor(self):
        s, _ = self.listening("vu.sock")
        self.hand(s, "vm1-disk0")
        self.d.ok("block-export-add", type="vhost-user-blk", id="e", node_name="disk",
                  addr={"type": "fd", "str": "vm1-disk0"}, writable=True)
        ids = [e["id"] for e in self.d.ok("query-block-exports")]
        self.assertEqual(ids, ["e"])

    def test_bad_descriptors_and_names_are_refused(self):
        self.assertError("getfd", "No file descriptor supplied via SCM_RIGHTS", fdname="x")
        self.assertError("closefd", "File descriptor named 'x' not found", fdname="x")
        # A descriptor that does not listen is named as such, and kept.
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        self.hand(a, "pair")
        e = self.d.err("block-export-add", type="vhost-user-blk", id="e", node_name="disk",
                       addr={"type": "fd", "str": "pair"})
        self.assertIn("does not listen", e["desc"])
        self.d.ok("closefd", fdname="pair")
        e = self.d.err("block-export-add", type="vhost-user-blk", id="e", node_name="disk",
                       addr={"type": "fd", "str": "pair"})
        self.assertIn("'pair'", e["desc"])
        e = self.d.err("getfd", fdname="3")
        self.assertIn("fdname", e["desc"])
