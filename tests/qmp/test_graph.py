"""blockdev-add/del, the graph queries, drivers with their own children,
exports and permissions."""

import unittest

from strata_qmp import DaemonTest


class Blockdev(DaemonTest):
    def test_inline_children_are_named_and_go_with_their_parent(self):
        img = self.image("a.img")
        self.d.ok("blockdev-add", driver="raw", node_name="disk",
                  file={"driver": "file", "filename": img})
        kids = self.d.children("disk")
        self.assertEqual(len(kids), 1)
        role, child = kids[0]
        self.assertEqual(role, "file")
        self.assertTrue(child.startswith("#block"), child)
        self.assertEqual(self.d.node("disk")["file"], img)
        self.assertError("blockdev-del", f"Node {child} is not owned by the monitor", node_name=child)
        self.d.ok("blockdev-del", node_name="disk")
        self.assertEqual(self.d.ok("query-named-block-nodes"), [])

    def test_busy_nodes_cannot_be_deleted(self):
        img = self.image("a.img")
        self.d.ok("blockdev-add", driver="file", node_name="f", filename=img)
        self.d.ok("blockdev-add", driver="raw", node_name="disk", file="f")
        self.assertError("blockdev-del", "Node 'f' is busy: it is used by 'disk' as 'file'", node_name="f")
        self.assertError("blockdev-del", "Failed to find node with node-name='nope'",
                         cls="DeviceNotFound", node_name="nope")
        self.d.ok("blockdev-del", node_name="disk")
        self.d.ok("blockdev-del", node_name="f")

    def test_option_errors_name_the_option(self):
        self.assertError("blockdev-add", "Parameter 'file.filename' is missing",
                         driver="raw", node_name="d", file={"driver": "file"})
        self.assertError("blockdev-add", "Parameter 'file.bogus' is unexpected",
                         driver="raw", node_name="d",
                         file={"driver": "file", "filename": self.image("a.img"), "bogus": 1})
        self.assertError("blockdev-add", "Parameter 'driver' does not accept value 'vmdk'",
                         driver="vmdk", node_name="d")
        self.assertError("blockdev-add", "Cannot find device='ghost' nor node-name='ghost'",
                         cls="DeviceNotFound", driver="raw", node_name="d", file="ghost")
        self.assertError("blockdev-add", "Invalid parameter type for 'size', expected: integer",
                         driver="null-co", node_name="d", size="1G")
        self.d.ok("blockdev-add", driver="null-co", node_name="d")
        self.assertError("blockdev-add", "node name 'd' is already in use", driver="null-co", node_name="d")
        self.assertEqual([n["node-name"] for n in self.d.ok("query-named-block-nodes")], ["d"])


class DriversWithChildren(DaemonTest):
    def edges(self):
        g = self.d.ok("x-debug-query-block-graph")
        names = {n["id"]: n["name"] for n in g["nodes"]}
        return {(names[e["parent"]], e["name"], names[e["child"]]): e for e in g["edges"]}

    def test_quorum_children_have_slot_names_and_can_change(self):
        for i in range(4):
            self.d.ok("blockdev-add", driver="null-co", node_name=f"n{i}", size=1 << 20)
        self.d.ok("blockdev-add", driver="quorum", node_name="q", vote_threshold=2,
                  children=["n0", "n1", "n2"])
        self.assertEqual(self.d.children("q"), [("children.0", "n0"), ("children.1", "n1"), ("children.2", "n2")])
        self.assertIn(("q", "children.1", "n1"), self.edges())
        self.d.ok("x-blockdev-change", parent="q", child="children.1")
        self.d.ok("x-blockdev-change", parent="q", node="n3")
        self.assertEqual(self.d.children("q"), [("children.0", "n0"), ("children.2", "n2"), ("children.3", "n3")])
        self.assertError("x-blockdev-change", "Exactly one of 'child' and 'node' must be given", parent="q")
        self.d.ok("x-blockdev-change", parent="q", child="children.0")
        e = self.d.err("x-blockdev-change", parent="q", child="children.2")
        self.assertIn("vote-threshold must be between 1 and the number of children (1), not 2", e["desc"])
        self.assertEqual(len(self.d.children("q")), 2, "the refused change left the quorum as it was")

    def test_blkverify_and_filters_show_their_children(self):
        t, r = self.image("t.img"), self.image("r.img")
        self.d.ok("object-add", qom_type="throttle-group", id="tg0", limits={"iops-total": 1000})
        self.d.ok("blockdev-add", driver="blkverify", node_name="bv",
                  test={"driver": "file", "node-name": "ft", "filename": t},
                  raw={"driver": "file", "node-name": "fr", "filename": r})
        self.d.ok("blockdev-add", driver="throttle", node_name="thr", throttle_group="tg0", file="bv")
        self.d.ok("blockdev-add", driver="copy-on-read", node_name="cor", file="thr")
        self.assertEqual(self.d.children("bv"), [("test", "ft"), ("raw", "fr")])
        self.assertEqual(self.d.children("thr"), [("file", "bv")])
        self.assertEqual(self.d.children("cor"), [("file", "thr")])
        edges = self.edges()
        for key in [("bv", "test", "ft"), ("bv", "raw", "fr"), ("thr", "file", "bv"), ("cor", "file", "thr")]:
            self.assertIn(key, edges)
        self.assertIn("write-unchanged", edges[("cor", "file", "thr")]["perm"])
        self.assertError("object-del", "throttle group 'tg0' is in use", id="tg0")
        self.assertError("blockdev-add", "Throttle group 'tg9' does not exist",
                         driver="throttle", node_name="t9", throttle_group="tg9", file="bv")


class Exports(DaemonTest):
    def test_export_lifecycle_and_event(self):
        img = self.image("a.img")
        self.d.ok("blockdev-add", driver="raw", node_name="disk", file={"driver": "file", "filename": img})
        sock = str(self.dir / "vhost.sock")
        self.d.ok("block-export-add", type="vhost-user-blk", id="e0", node_name="disk", writable=True,
                  addr={"type": "unix", "path": sock}, num_queues=2)
        self.assertEqual(self.d.ok("query-block-exports"),
                         [{"type": "vhost-user-blk", "id": "e0", "node-name": "disk", "shutting-down": False,
                           "io-status": "ok", "held-requests": 0}])
        self.assertError("block-export-add", "Block export id 'e0' is already in use", type="vhost-user-blk",
                         id="e0", node_name="disk", addr={"type": "unix", "path": sock + "2"})
        self.assertError("blockdev-del", "Node 'disk' is busy: it is used by export 'e0'", node_name="disk")
        edges = self.d.ok("x-debug-query-block-graph")
        exp = [n for n in edges["nodes"] if n["type"] == "block-export"]
        self.assertEqual([n["name"] for n in exp], ["e0"])
        self.d.ok("block-export-del", id="e0")
        ev = self.d.qmp.pull_event(wait=5.0)
        self.assertEqual(ev["event"], "BLOCK_EXPORT_DELETED")
        self.assertEqual(ev["data"], {"id": "e0"})
        self.assertEqual(self.d.ok("query-block-exports"), [])
        self.d.ok("blockdev-del", node_name="disk")

    def test_export_errors(self):
        self.d.ok("blockdev-add", driver="null-co", node_name="n")
        sock = str(self.dir / "v.sock")
        self.assertError("block-export-add", "Parameter 'type' expects one of vhost-user-blk, nbd",
                         type="fuse", id="e", node_name="n", mountpoint=sock)
        # NBD exports live on the NBD server, not on a socket of their own.
        self.assertError("block-export-add", "Parameter 'addr' is unexpected",
                         type="nbd", id="e", node_name="n", addr={"type": "unix", "path": sock})
        self.assertError("block-export-add", "Parameter 'addr.path' is missing",
                         type="vhost-user-blk", id="e", node_name="n", addr={"type": "unix"})
        self.assertError("block-export-add", "Cannot find device='x' nor node-name='x'", cls="DeviceNotFound",
                         type="vhost-user-blk", id="e", node_name="x", addr={"type": "unix", "path": sock})
        self.assertError("block-export-add", "logical-block-size must be a power of 2 between 512 and 32768, not 1000",
                         type="vhost-user-blk", id="e", node_name="n", addr={"type": "unix", "path": sock},
                         logical_block_size=1000)
        self.assertError("block-export-del", "Export 'e' is not found", id="e")

    def test_a_second_writer_is_refused_and_both_are_named(self):
        img = self.image("a.img")
        self.d.ok("blockdev-add", driver="file", node_name="f", filename=img)
        self.d.ok("blockdev-add", driver="raw", node_name="disk", file="f")
        self.d.ok("block-export-add", type="vhost-user-blk", id="e0", node_name="disk", writable=True,
                  addr={"type": "unix", "path": str(self.dir / "a.sock")})
        e = self.d.err("block-export-add", type="vhost-user-blk", id="e1", node_name="f", writable=True,
                       addr={"type": "unix", "path": str(self.dir / "b.sock")})
        self.assertEqual(e["desc"], "Conflicts with use by 'disk' as 'file', which does not allow 'write' on 'f'"
                                    " (needed by export 'e1')")
        # A reader is fine.
        self.d.ok("block-export-add", type="vhost-user-blk", id="e1", node_name="f", writable=False,
                  addr={"type": "unix", "path": str(self.dir / "b.sock")})

    def test_writable_export_of_a_read_only_node_is_refused(self):
        img = self.image("a.img")
        self.d.ok("blockdev-add", driver="file", node_name="f", filename=img, read_only=True)
        e = self.d.err("block-export-add", type="vhost-user-blk", id="e0", node_name="f", writable=True,
                       addr={"type": "unix", "path": str(self.dir / "a.sock")})
        self.assertEqual(e["desc"], "Block node 'f' is read-only, but export 'e0' needs to write to it")
        self.assertEqual(self.d.ok("query-block-exports"), [])


if __name__ == "__main__":
    unittest.main()
