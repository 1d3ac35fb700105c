use std::sync::Arc;

use super::*;
use crate::{BlockError, IoFuture, IoVecs, Parent};

/// A leaf that only knows its size.
struct Leaf(u64);

impl BlockDriver for Leaf {
    fn driver_name(&self) -> &'static str {
        "leaf"
    }
    fn size(&self, _g: &GraphView) -> Result<u64, BlockError> {
        Ok(self.0)
    }
    fn read<'a>(&'a self, _: &'a GraphView, _: u64, buf: &'a IoVecs<'a>) -> IoFuture<'a> {
        buf.zero();
        IoFuture::ready(Ok(()))
    }
    fn write<'a>(&'a self, _: &'a GraphView, _: u64, _: &'a IoVecs<'a>) -> IoFuture<'a> {
        IoFuture::ready(Ok(()))
    }
    fn write_zeroes<'a>(&'a self, _: &'a GraphView, _: u64, _: u64, _: bool) -> IoFuture<'a> {
        IoFuture::ready(Ok(()))
    }
    fn discard<'a>(&'a self, _: &'a GraphView, _: u64, _: u64) -> IoFuture<'a> {
        IoFuture::ready(Ok(()))
    }
    fn flush<'a>(&'a self, _: &'a GraphView) -> IoFuture<'a> {
        IoFuture::ready(Ok(()))
    }
}

/// A filter whose size is its child's, found through its slot.
struct Filter(SlotId);

impl BlockDriver for Filter {
    fn driver_name(&self) -> &'static str {
        "filter"
    }
    fn size(&self, g: &GraphView) -> Result<u64, BlockError> {
        g.child(self.0)?.size(g)
    }
    fn read<'a>(&'a self, g: &'a GraphView, off: u64, buf: &'a IoVecs<'a>) -> IoFuture<'a> {
        IoFuture::new(async move { g.child(self.0)?.read(g, off, buf).await })
    }
    fn write<'a>(&'a self, g: &'a GraphView, off: u64, buf: &'a IoVecs<'a>) -> IoFuture<'a> {
        match g.child(self.0) {
            Ok(c) => c.write(g, off, buf),
            Err(e) => IoFuture::ready(Err(e)),
        }
    }
    fn write_zeroes<'a>(&'a self, _: &'a GraphView, _: u64, _: u64, _: bool) -> IoFuture<'a> {
        IoFuture::ready(Ok(()))
    }
    fn discard<'a>(&'a self, _: &'a GraphView, _: u64, _: u64) -> IoFuture<'a> {
        IoFuture::ready(Ok(()))
    }
    fn flush<'a>(&'a self, _: &'a GraphView) -> IoFuture<'a> {
        IoFuture::ready(Ok(()))
    }
}

fn export(name: &str, writable: bool) -> User {
    User {
        kind: crate::UserKind::Export,
        name: name.into(),
        perm: crate::SlotPerm::user(writable),
    }
}

fn leaf(g: &Graph, name: &str, size: u64) -> NodeId {
    g.add_node(name, |_| {
        Ok::<_, GraphError>(Arc::new(Leaf(size)) as Arc<dyn BlockDriver>)
    })
    .unwrap()
}

fn filter(g: &Graph, name: &str, child: NodeId) -> Result<NodeId, GraphError> {
    g.add_node(name, |b| {
        let slot = b.attach("file", child)?;
        Ok::<_, GraphError>(Arc::new(Filter(slot)) as Arc<dyn BlockDriver>)
    })
}

/// Every slot's ends exist and children()/parents() agree with the table.
fn check_invariants(v: &GraphView) {
    for (sid, s) in v.slots() {
        assert!(
            v.node(s.child()).is_some(),
            "{sid} points at a missing node"
        );
        if let Parent::Node(p) = s.parent() {
            assert!(v.node(*p).is_some(), "{sid} has a missing parent");
            assert!(v.children(*p).any(|(c, _)| c == sid));
        }
        assert!(v.parents(s.child()).any(|(c, _)| c == sid));
    }
    let mut names: Vec<_> = v.nodes().map(|(_, n)| n.name().to_owned()).collect();
    let before = names.len();
    names.sort();
    names.dedup();
    assert_eq!(before, names.len(), "node names are unique");
}

#[test]
fn a_driver_reaches_its_child_only_through_the_slot() {
    let g = Graph::new();
    let a = leaf(&g, "a", 4096);
    let f = filter(&g, "f", a).unwrap();
    let v = g.view();
    check_invariants(&v);
    let driver = v.node(f).unwrap().driver();
    assert_eq!(driver.size(&v).unwrap(), 4096);
    let (slot, s) = v.children(f).next().unwrap();
    assert_eq!((s.role(), s.child()), ("file", a));
    assert_eq!(v.parents(a).map(|(id, _)| id).collect::<Vec<_>>(), [slot]);
}

#[test]
fn the_same_child_may_fill_several_slots() {
    let g = Graph::new();
    let a = leaf(&g, "a", 512);
    let both = g
        .add_node("both", |b| {
            b.attach("children.0", a)?;
            let s = b.attach("children.1", a)?;
            Ok::<_, GraphError>(Arc::new(Filter(s)) as Arc<dyn BlockDriver>)
        })
        .unwrap();
    let v = g.view();
    check_invariants(&v);
    assert_eq!(v.children(both).count(), 2);
    assert_eq!(v.parents(a).count(), 2);
}

#[test]
fn duplicate_and_malformed_names_are_refused() {
    let g = Graph::new();
    leaf(&g, "disk", 512);
    let err = g
        .add_node("disk", |_| {
            Ok::<_, GraphError>(Arc::new(Leaf(1)) as Arc<dyn BlockDriver>)
        })
        .unwrap_err();
    assert!(matches!(err, GraphError::DuplicateName { ref name } if name == "disk"));
    assert_eq!(err.to_string(), "node name 'disk' is already in use");
    for bad in ["", "1abc", "a b", "a/b"] {
        let err = g
            .add_node(bad, |_| {
                Ok::<_, GraphError>(Arc::new(Leaf(1)) as Arc<dyn BlockDriver>)
            })
            .unwrap_err();
        assert!(matches!(err, GraphError::InvalidName { .. }), "{bad:?}");
    }
    assert_eq!(g.view().nodes().count(), 1);
}

#[test]
fn a_failed_open_leaves_the_graph_unchanged() {
    let g = Graph::new();
    let a = leaf(&g, "a", 512);
    let before = g.view();
    let err = g
        .add_node("f", |b| {
            b.attach("file", a).unwrap();
            Err::<Arc<dyn BlockDriver>, _>(std::io::Error::other("bad header"))
        })
        .unwrap_err();
    assert_eq!(err.to_string(), "cannot open node 'f': bad header");
    let after = g.view();
    assert!(Arc::ptr_eq(&before, &after), "nothing was published");
    assert_eq!(after.slots().count(), 0);
}

#[test]
fn attaching_a_missing_node_fails() {
    let g = Graph::new();
    let err = g.attach_user(export("vda", false), NodeId(7)).unwrap_err();
    assert!(matches!(err, GraphError::NoSuchNode { id } if id == NodeId(7)));
}

#[test]
fn local_views_follow_edits() {
    let g = Graph::new();
    let mut local = g.local_views();
    let first = local.current();
    assert!(Rc::ptr_eq(&first, &local.current()), "no edit, same view");
    let a = leaf(&g, "a", 512);
    let second = local.current();
    assert!(second.node(a).is_some());
    assert!(first.node(a).is_none(), "old views stay as they were");
}

#[test]
fn requests_resolve_children_at_call_time() {
    let g = Graph::new();
    let a = leaf(&g, "a", 512);
    let f = filter(&g, "f", a).unwrap();
    g.attach_user(export("vda", false), f).unwrap();
    let v = g.view();
    check_invariants(&v);
    let mut buf = [0xffu8; 512];
    let iov = IoVecs::from_slice(&mut buf);
    futures::executor::block_on(v.node(f).unwrap().driver().read(&v, 0, &iov)).unwrap();
    drop(iov);
    assert_eq!(buf, [0u8; 512]);
}
