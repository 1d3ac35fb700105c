"""The QMP wire protocol, through the qemu.qmp client."""

import json
import socket
import unittest

from strata_qmp import DaemonTest


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


if __name__ == "__main__":
    unittest.main()
