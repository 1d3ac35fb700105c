"""The QMP wire protocol, through the qemu.qmp client."""

import json
import os
import socket
import subprocess
import tempfile
import time
import unittest

from strata_qmp import STRATA, Daemon, DaemonTest


class Protocol(DaemonTest):
    def test_greeting_and_version(self):
        g = self.d.greeting["QMP"]
        self.assertEqual(g["capabilities"], [])
        self.assertEqual(g["version"]["qemu"]["major"], 7)
        v = self.d.ok("query-version")
        self.assertTrue(v["package"].startswith("strata"))

    def test_query_commands_lists_what_exists(self):
        names = {c["name"] for c in self.d.ok("query-commands")}
        for c in ["blockdev-add", "blockdev-del", "blockdev-reopen", "query-named-block-nodes",
                  "x-debug-query-block-graph", "block-export-add", "block-export-del",
                  "query-block-exports", "query-version", "query-commands", "quit"]:
            self.assertIn(c, names)

    def test_unknown_commands_and_arguments(self):
        self.assertError("no-such-command", "The command no-such-command has not been found",
                         cls="CommandNotFound")
        self.assertError("blockdev-del", "Parameter 'node-name' is missing")
        self.assertError("blockdev-del", "Invalid parameter type for 'node-name', expected: string",
                         node_name=3)
        self.assertError("query-version", "Parameter 'extra' is unexpected", extra=1)
        self.assertError("qmp_capabilities",
                         "Capabilities negotiation is already complete, command ignored",
                         cls="CommandNotFound")

    def raw_session(self):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(self.d.sock))
        f = s.makefile("rw")
        greeting = json.loads(f.readline())
        self.assertIn("QMP", greeting)
        return s, f

    def send(self, f, obj):
        f.write(json.dumps(obj) + "\n")
        f.flush()
        return json.loads(f.readline())

    def test_negotiation_comes_first_and_ids_are_echoed(self):
        s, f = self.raw_session()
        r = self.send(f, {"execute": "query-version", "id": "a"})
        self.assertEqual(r["error"]["class"], "CommandNotFound")
        self.assertEqual(r["id"], "a")
        r = self.send(f, {"execute": "qmp_capabilities", "id": 7})
        self.assertEqual(r, {"return": {}, "id": 7})
        r = self.send(f, {"execute": "query-version", "id": {"x": [1]}})
        self.assertEqual(r["id"], {"x": [1]})
        r = self.send(f, {"arguments": {}})
        self.assertEqual(r["error"]["desc"], "QMP input lacks member 'execute'")
        r = self.send(f, {"execute": "quit", "bogus": 1})
        self.assertEqual(r["error"]["desc"], "QMP input member 'bogus' is unexpected")
        r = self.send(f, {"execute": "blockdev-del", "arguments": [1]})
        self.assertEqual(r["error"]["desc"], "QMP input member 'arguments' must be an object")
        s.close()
        # The daemon still answers other clients.
        self.d.ok("query-version")

    def test_a_message_past_one_mib_ends_only_its_session(self):
        s, f = self.raw_session()
        self.send(f, {"execute": "qmp_capabilities"})
        # A string that never ends: the daemon must stop reading at 1 MiB.
        try:
            s.sendall(b'{"execute": "query-version", "id": "' + b"x" * (2 << 20))
        except (BrokenPipeError, ConnectionResetError):
            pass
        r = json.loads(f.readline())
        self.assertIn("at most 1048576 bytes", r["error"]["desc"])
        self.assertEqual(f.readline(), "", "the session ends")
        s.close()
        self.d.ok("query-version")

    def test_connections_are_capped(self):
        sessions = [self.raw_session() for _ in range(15)]  # and the helper's own
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(self.d.sock))
        r = json.loads(s.makefile("r").readline())
        self.assertEqual(r["error"]["desc"], "Too many QMP connections (at most 16)")
        s.close()
        for s, f in sessions:
            f.close()
            s.close()
        # Slots come back as sessions end.
        deadline = time.monotonic() + 10
        while True:
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(self.d.sock))
            first = json.loads(s.makefile("r").readline())
            s.close()
            if "QMP" in first or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        self.assertIn("QMP", first)

    def test_the_socket_is_the_owners_alone(self):
        self.assertEqual(os.stat(self.d.sock).st_mode & 0o777, 0o600)


class Sockets(unittest.TestCase):
    def test_a_file_in_the_way_is_kept_and_named(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "qmp.sock")
            with open(path, "w") as f:
                f.write("precious")
            r = subprocess.run([STRATA, "--chardev", f"socket,id=m,path={path},server=on,wait=off",
                                "--monitor", "chardev=m"], capture_output=True, text=True, timeout=30)
            self.assertNotEqual(r.returncode, 0)
            self.assertIn(f"'{path}' exists and is not a socket", r.stderr)
            with open(path) as f:
                self.assertEqual(f.read(), "precious")

    def test_socket_mode_and_a_live_socket(self):
        with tempfile.TemporaryDirectory() as d:
            dd = Daemon(d, ["--socket-mode", "0660"])
            try:
                self.assertEqual(os.stat(dd.sock).st_mode & 0o777, 0o660)
                r = subprocess.run([STRATA, "--chardev", f"socket,id=m,path={dd.sock},server=on,wait=off",
                                    "--monitor", "chardev=m"], capture_output=True, text=True, timeout=30)
                self.assertIn("is in use: a server is listening on it", r.stderr)
                dd.ok("query-version")
            finally:
                dd.close()
            r = subprocess.run([STRATA, "--socket-mode", "999", "--chardev", "socket,id=m,path=x,server=on,wait=off",
                                "--monitor", "chardev=m"], capture_output=True, text=True, timeout=30)
            self.assertIn("'999' is not an octal permission mode", r.stderr)


if __name__ == "__main__":
    unittest.main()
