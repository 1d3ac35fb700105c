"""blockdev-reopen, after the scenarios of QEMU's iotest 245."""

import unittest

from strata_qmp import DaemonTest


class Reopen(DaemonTest):
    def setUp(self):
        super().setUp()
        self.a = self.image("a.img", byte=1)
        self.b = self.image("b.img", byte=2)
        self.d.ok("blockdev-add", driver="file", node_name="fa", filename=self.a)
        self.d.ok("blockdev-add", driver="file", node_name="fb", filename=self.b)
        self.d.ok("blockdev-add", driver="raw", node_name="ra", file="fa")
        self.d.ok("blockdev-add", driver="raw", node_name="rb", file="fb")

    def reopen(self, *options):
        return self.d.cmd("blockdev-reopen", options=list(options))

    def test_options_that_cannot_change(self):
        r = self.reopen({"driver": "null-co", "node-name": "ra"})
        self.assertEqual(r["error"]["desc"], "Cannot change the option 'driver'")
        r = self.reopen({"driver": "file", "node-name": "fa", "filename": self.b})
        self.assertEqual(r["error"]["desc"], "Cannot change the option 'filename'")
        r = self.reopen({"driver": "raw"})
        self.assertEqual(r["error"]["desc"], "Parameter 'node-name' is missing")
        r = self.reopen({"driver": "raw", "node-name": "ghost"})
        self.assertEqual(r["error"]["class"], "DeviceNotFound")

    def test_omitted_options_go_back_to_their_defaults(self):
        self.assertNotIn("error", self.reopen({"driver": "raw", "node-name": "ra", "file": "fa", "size": 4096}))
        self.assertEqual(self.d.node("ra")["image"]["virtual-size"], 4096)
        self.assertNotIn("error", self.reopen({"driver": "raw", "node-name": "ra", "file": "fa"}))
        self.assertEqual(self.d.node("ra")["image"]["virtual-size"], 1 << 20)
        self.assertNotIn("error", self.reopen({"driver": "file", "node-name": "fa", "filename": self.a,
                                               "read-only": True}))
        self.assertTrue(self.d.node("fa")["ro"])
        self.assertNotIn("error", self.reopen({"driver": "file", "node-name": "fa", "filename": self.a}))
        self.assertFalse(self.d.node("fa")["ro"])

    def test_swapping_file_changes_the_child(self):
        self.assertNotIn("error", self.reopen({"driver": "raw", "node-name": "ra", "file": "fb"}))
        self.assertEqual(self.d.children("ra"), [("file", "fb")])
        self.assertEqual(self.d.node("ra")["file"], self.b)

    def test_two_reopens_in_one_transaction_may_swap_files(self):
        for i, node in enumerate(["ra", "rb"]):
            self.d.ok("block-export-add", type="vhost-user-blk", id=f"e{i}", node_name=node, writable=True,
                      addr={"type": "unix", "path": str(self.dir / f"{i}.sock")})
        r = self.reopen({"driver": "raw", "node-name": "ra", "file": "fb"})
        self.assertIn("does not allow 'write' on 'fb'", r["error"]["desc"])
        self.assertEqual(self.d.children("ra"), [("file", "fa")], "refused whole")
        r = self.reopen({"driver": "raw", "node-name": "ra", "file": "fb"},
                        {"driver": "raw", "node-name": "rb", "file": "fa"})
        self.assertNotIn("error", r)
        self.assertEqual(self.d.children("ra"), [("file", "fb")])
        self.assertEqual(self.d.children("rb"), [("file", "fa")])

    def test_a_cycle_is_refused(self):
        self.d.ok("blockdev-add", driver="raw", node_name="top", file="ra")
        r = self.reopen({"driver": "raw", "node-name": "ra", "file": "top"})
        self.assertEqual(r["error"]["desc"],
                         "cannot open node 'ra': Making 'top' the 'file' child of 'ra' would create a cycle")

    def test_a_node_in_use_cannot_be_deleted(self):
        e = self.d.err("blockdev-del", node_name="fa")
        self.assertEqual(e["desc"], "Node 'fa' is busy: it is used by 'ra' as 'file'")

    def test_filters_can_be_inserted_and_removed(self):
        self.d.ok("object-add", qom_type="throttle-group", id="tg0", limits={"bps-total": 1 << 30})
        self.d.ok("blockdev-add", driver="throttle", node_name="thr", throttle_group="tg0", file="fa")
        self.d.ok("blockdev-add", driver="copy-on-read", node_name="cor", file="thr")
        self.assertNotIn("error", self.reopen({"driver": "raw", "node-name": "ra", "file": "cor"}))
        self.assertEqual(self.d.children("ra"), [("file", "cor")])
        self.assertNotIn("error", self.reopen({"driver": "raw", "node-name": "ra", "file": "fa"}))
        self.assertEqual(self.d.children("ra"), [("file", "fa")])
        self.d.ok("blockdev-del", node_name="cor")
        self.d.ok("blockdev-del", node_name="thr")
        self.d.ok("object-del", id="tg0")

    def test_a_failed_reopen_changes_nothing(self):
        before = self.d.ok("x-debug-query-block-graph")
        r = self.reopen({"driver": "raw", "node-name": "ra", "file": "fb"},
                        {"driver": "raw", "node-name": "rb", "file": "ghost"})
        self.assertEqual(r["error"]["class"], "DeviceNotFound")
        self.assertEqual(self.d.ok("x-debug-query-block-graph"), before)


if __name__ == "__main__":
    unittest.main()
