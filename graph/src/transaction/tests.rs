use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use proptest::prelude::*;

use super::*;
use crate::{BlockError, IoFuture, IoVecs, Perm, Quiesce, SlotPerm, UserKind};

/// A driver with any children, for graph-shape tests.
struct Stub {
    read_only: bool,
}

impl BlockDriver for Stub {
    fn driver_name(&self) -> &'static str {
        "stub"
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }
    fn size(&self, _: &GraphView) -> Result<u64, BlockError> {
        Ok(512)
    }
    fn read<'a>(&'a self, _: &'a GraphView, _: u64, _: &'a IoVecs<'a>) -> IoFuture<'a> {
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

fn stub(read_only: bool) -> Result<Arc<dyn BlockDriver>, GraphError> {
    Ok(Arc::new(Stub { read_only }))
}

/// Adds a node with `children` as (role, child) in one transaction.
fn add(g: &Graph, name: &str, children: &[(&str, NodeId)]) -> Result<NodeId, GraphError> {
    let mut tx = g.transaction();
    let id = tx.add_node(Some(name), serde_json::Value::Null, true, |b| {
        for (role, c) in children {
            b.attach(role, *c)?;
        }
        stub(false)
    })?;
    tx.commit()?;
    Ok(id)
}

fn user(kind: UserKind, name: &str, writable: bool) -> User {
    User {
        kind,
        name: name.into(),
        perm: SlotPerm::user(writable),
    }
}

fn export(name: &str, writable: bool) -> User {
    user(UserKind::Export, name, writable)
}

/// The invariants every published view keeps.
fn check_invariants(v: &GraphView) {
    assert!(v.parents_first().is_some(), "no cycles");
    let mut names = std::collections::HashSet::new();
    for (_, n) in v.nodes() {
        assert!(
            names.insert(n.name().to_owned()),
            "unique name {}",
            n.name()
        );
    }
    for (sid, s) in v.slots() {
        assert!(v.node(s.child()).is_some(), "{sid}'s child exists");
        if let Parent::Node(p) = s.parent() {
            assert!(v.node(*p).is_some(), "{sid}'s parent exists");
            assert!(v.children(*p).any(|(c, _)| c == sid));
        }
        assert!(v.parents(s.child()).any(|(c, _)| c == sid));
    }
    for (_, n) in v.nodes() {
        let owned_or_used =
            n.monitor_owned() || v.parents(v.find(n.name()).unwrap()).next().is_some();
        assert!(owned_or_used, "orphan {} was collected", n.name());
    }
    crate::perm::check(v, &v.parents_first().unwrap()).expect("permissions are consistent");
}

#[test]
fn deleting_a_used_node_is_busy_and_names_the_parent_and_slot() {
    let g = Graph::new();
    let base = add(&g, "base", &[]).unwrap();
    add(&g, "top", &[("backing", base)]).unwrap();
    let mut tx = g.transaction();
    let err = tx.delete_node(base).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Node 'base' is busy: it is used by 'top' as 'backing'"
    );
    drop(tx);

    let top = g.view().find("top").unwrap();
    g.attach_user(export("vda", false), top).unwrap();
    let mut tx = g.transaction();
    let err = tx.delete_node(top).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Node 'top' is busy: it is used by export 'vda'"
    );
}

#[test]
fn frozen_slots_cannot_be_rewritten() {
    let g = Graph::new();
    let base = add(&g, "base", &[]).unwrap();
    let other = add(&g, "other", &[]).unwrap();
    let top = add(&g, "top", &[("backing", base)]).unwrap();
    let slot = g.view().child_slot(top, "backing").unwrap();
    let mut tx = g.transaction();
    tx.freeze(slot, "job0").unwrap();
    tx.commit().unwrap();

    let frozen = "Cannot change frozen 'backing' link of top: it is frozen by job 'job0'";
    let mut tx = g.transaction();
    assert_eq!(tx.set_child(slot, other).unwrap_err().to_string(), frozen);
    assert_eq!(tx.detach(slot).unwrap_err().to_string(), frozen);
    let err = tx
        .reopen_node(top, serde_json::Value::Null, |b| {
            b.attach("backing", other)?;
            stub(false)
        })
        .unwrap_err();
    assert_eq!(err.to_string(), format!("cannot open node 'top': {frozen}"));
    let err = tx
        .reopen_node(top, serde_json::Value::Null, |_| stub(false))
        .unwrap_err();
    assert_eq!(err.to_string(), frozen, "dropping the role is a change too");
    assert!(
        tx.freeze(slot, "job1").is_err(),
        "a second job cannot take it"
    );
    drop(tx);

    let mut tx = g.transaction();
    tx.unfreeze(slot);
    tx.set_child(slot, other).unwrap();
    tx.commit().unwrap();
    assert_eq!(g.view().child_id(slot), Some(other));
}

#[test]
fn cycles_are_refused() {
    let g = Graph::new();
    let a = add(&g, "a", &[]).unwrap();
    let b = add(&g, "b", &[("file", a)]).unwrap();
    let c = add(&g, "c", &[("file", b)]).unwrap();
    let mut tx = g.transaction();
    let err = tx
        .reopen_node(a, serde_json::Value::Null, |bld| {
            bld.attach("file", c)?;
            stub(false)
        })
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot open node 'a': Making 'c' the 'file' child of 'a' would create a cycle"
    );
    let slot = tx.view().child_slot(b, "file").unwrap();
    let err = tx.set_child(slot, c).unwrap_err();
    assert!(matches!(err, GraphError::Cycle { .. }), "{err}");
}

#[test]
fn a_second_writer_is_refused_and_named() {
    let g = Graph::new();
    let base = add(&g, "base", &[]).unwrap();
    let top = add(&g, "top", &[("backing", base)]).unwrap();
    g.attach_user(export("vda", true), top).unwrap();
    // The backing link lets nobody write to base.
    let err = g.attach_user(export("vdb", true), base).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Conflicts with use by 'top' as 'backing', which does not allow 'write' on 'base' (needed by export 'vdb')"
    );
    // Readers are fine.
    g.attach_user(export("vdb", false), base).unwrap();
    // Two writable exports of one node (vhost-user and NBD, say) write
    // through it alike; any other writer is still refused.
    g.attach_user(export("vdc", true), top).unwrap();
    let err = g
        .attach_user(user(UserKind::Job, "job0", true), top)
        .unwrap_err();
    assert!(
        matches!(err, GraphError::PermissionConflict { .. }),
        "{err}"
    );
    assert!(
        err.to_string().contains("export 'vd") && err.to_string().contains("job0"),
        "{err}"
    );
}

#[test]
fn writing_to_a_read_only_node_is_refused() {
    let g = Graph::new();
    let mut tx = g.transaction();
    let f = tx
        .add_node(Some("f"), serde_json::Value::Null, true, |_| stub(true))
        .unwrap();
    let raw = tx
        .add_node(Some("raw"), serde_json::Value::Null, true, |b| {
            b.attach("file", f)?;
            stub(false)
        })
        .unwrap();
    tx.commit().unwrap();
    let err = g.attach_user(export("vda", true), raw).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Block node 'f' is read-only, but 'raw' as 'file' needs to write to it"
    );
    g.attach_user(export("vda", false), raw).unwrap();
}

#[test]
fn children_created_inline_go_with_their_last_parent() {
    let g = Graph::new();
    let mut tx = g.transaction();
    let f = tx
        .add_node(None, serde_json::Value::Null, false, |_| stub(false))
        .unwrap();
    let raw = tx
        .add_node(Some("raw"), serde_json::Value::Null, true, |b| {
            b.attach("file", f)?;
            stub(false)
        })
        .unwrap();
    tx.commit().unwrap();
    assert!(g.view().name(f).starts_with("#block"));
    let other = add(&g, "other", &[]).unwrap();
    // Swapping the file away drops the inline child.
    let mut tx = g.transaction();
    tx.reopen_node(raw, serde_json::Value::Null, |b| {
        b.attach("file", other)?;
        stub(false)
    })
    .unwrap();
    tx.commit().unwrap();
    let v = g.view();
    assert!(v.node(f).is_none());
    assert!(v.node(other).is_some(), "monitor-owned nodes stay");
    check_invariants(&v);
}

#[test]
fn reopen_keeps_the_slot_of_a_role_and_drops_roles_not_given() {
    let g = Graph::new();
    let a = add(&g, "a", &[]).unwrap();
    let b = add(&g, "b", &[]).unwrap();
    let top = add(&g, "top", &[("file", a), ("backing", b)]).unwrap();
    let file_slot = g.view().child_slot(top, "file").unwrap();
    let mut tx = g.transaction();
    tx.reopen_node(top, serde_json::json!({"driver": "stub"}), |bld| {
        bld.attach("file", b)?;
        stub(false)
    })
    .unwrap();
    tx.commit().unwrap();
    let v = g.view();
    assert_eq!(
        v.child_slot(top, "file"),
        Some(file_slot),
        "same slot, new child"
    );
    assert_eq!(v.child_id(file_slot), Some(b));
    assert_eq!(v.child_slot(top, "backing"), None);
    assert_eq!(v.node(top).unwrap().options()["driver"], "stub");
    check_invariants(&v);
}

#[test]
fn two_reopens_in_one_transaction_may_swap_files() {
    let g = Graph::new();
    let fa = add(&g, "fa", &[]).unwrap();
    let fb = add(&g, "fb", &[]).unwrap();
    let a = add(&g, "a", &[("file", fa)]).unwrap();
    let b = add(&g, "b", &[("file", fb)]).unwrap();
    g.attach_user(export("va", true), a).unwrap();
    g.attach_user(export("vb", true), b).unwrap();
    // Either reopen alone puts two writers on one file; both together are fine.
    let mut tx = g.transaction();
    tx.reopen_node(a, serde_json::Value::Null, |bld| {
        bld.attach("file", fb)?;
        stub(false)
    })
    .unwrap();
    assert!(matches!(
        tx.commit(),
        Err(GraphError::PermissionConflict { .. })
    ));
    let mut tx = g.transaction();
    tx.reopen_node(a, serde_json::Value::Null, |bld| {
        bld.attach("file", fb)?;
        stub(false)
    })
    .unwrap();
    tx.reopen_node(b, serde_json::Value::Null, |bld| {
        bld.attach("file", fa)?;
        stub(false)
    })
    .unwrap();
    tx.commit().unwrap();
    let v = g.view();
    assert_eq!(v.child_id(v.child_slot(a, "file").unwrap()), Some(fb));
    assert_eq!(v.child_id(v.child_slot(b, "file").unwrap()), Some(fa));
}

/// Records quiesce/resume calls.
#[derive(Default)]
struct Recorder {
    log: Mutex<Vec<String>>,
    fail: bool,
    calls: AtomicUsize,
}

struct Named(String, Arc<Recorder>);

impl Quiesce for Named {
    fn quiesce(&self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        self.1.calls.fetch_add(1, Ordering::SeqCst);
        self.1
            .log
            .lock()
            .unwrap()
            .push(format!("quiesce {}", self.0));
        if self.1.fail {
            return Err("requests still in flight".into());
        }
        Ok(())
    }
    fn resume(&self) {
        self.1
            .log
            .lock()
            .unwrap()
            .push(format!("resume {}", self.0));
    }
}

#[test]
fn only_users_above_a_changed_edge_are_drained() {
    let g = Graph::new();
    let fa = add(&g, "fa", &[]).unwrap();
    let fb = add(&g, "fb", &[]).unwrap();
    let spare = add(&g, "spare", &[]).unwrap();
    let a = add(&g, "a", &[("file", fa)]).unwrap();
    let b = add(&g, "b", &[("file", fb)]).unwrap();
    g.attach_user(export("va", false), a).unwrap();
    g.attach_user(export("vb", false), b).unwrap();
    let rec = Arc::new(Recorder::default());
    g.register_quiesce("va", Arc::new(Named("va".into(), rec.clone())));
    g.register_quiesce("vb", Arc::new(Named("vb".into(), rec.clone())));

    let mut tx = g.transaction();
    let slot = tx.view().child_slot(a, "file").unwrap();
    tx.set_child(slot, spare).unwrap();
    tx.commit().unwrap();
    assert_eq!(*rec.log.lock().unwrap(), ["quiesce va", "resume va"]);
}

#[test]
fn a_failed_drain_aborts_the_commit() {
    let g = Graph::new();
    let fa = add(&g, "fa", &[]).unwrap();
    let spare = add(&g, "spare", &[]).unwrap();
    let a = add(&g, "a", &[("file", fa)]).unwrap();
    g.attach_user(export("va", false), a).unwrap();
    let rec = Arc::new(Recorder {
        fail: true,
        ..Default::default()
    });
    g.register_quiesce("va", Arc::new(Named("va".into(), rec.clone())));
    let before = g.view();
    let mut tx = g.transaction();
    let slot = tx.view().child_slot(a, "file").unwrap();
    tx.set_child(slot, spare).unwrap();
    let err = tx.commit().unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot drain export 'va': requests still in flight"
    );
    assert!(Arc::ptr_eq(&before, &g.view()), "nothing published");
    assert_eq!(*rec.log.lock().unwrap(), ["quiesce va"]);
}

/// One random operation on a graph of up to 6 nodes and 3 users.
#[derive(Clone, Debug)]
enum Op {
    Add {
        name: u8,
        children: Vec<(u8, u8)>,
        read_only: bool,
        inline: bool,
    },
    Delete {
        name: u8,
    },
    Reopen {
        name: u8,
        children: Vec<(u8, u8)>,
    },
    AttachUser {
        user: u8,
        node: u8,
        writable: bool,
    },
    DetachUser {
        user: u8,
    },
    Freeze {
        slot: u8,
    },
    Unfreeze {
        slot: u8,
    },
}

const ROLES: [&str; 4] = ["file", "backing", "children.0", "children.1"];

fn op() -> impl Strategy<Value = Op> {
    let children = prop::collection::vec((0u8..6, 0u8..4), 0..3);
    prop_oneof![
        (0u8..6, children.clone(), any::<bool>(), any::<bool>()).prop_map(
            |(name, children, read_only, inline)| Op::Add {
                name,
                children,
                read_only,
                inline
            }
        ),
        (0u8..6).prop_map(|name| Op::Delete { name }),
        (0u8..6, children).prop_map(|(name, children)| Op::Reopen { name, children }),
        (0u8..3, 0u8..6, any::<bool>()).prop_map(|(user, node, writable)| Op::AttachUser {
            user,
            node,
            writable
        }),
        (0u8..3).prop_map(|user| Op::DetachUser { user }),
        (0u8..12).prop_map(|slot| Op::Freeze { slot }),
        (0u8..12).prop_map(|slot| Op::Unfreeze { slot }),
    ]
}

fn node_name(i: u8) -> String {
    format!("n{i}")
}

/// Applies `op`; Err means the transaction refused it.
fn apply(g: &Graph, op: &Op) -> Result<(), GraphError> {
    let mut tx = g.transaction();
    let find = |tx: &Transaction<'_>, i: u8| tx.view().find(&node_name(i));
    let attach_all = |b: &mut NodeBuilder<'_>, kids: &[(NodeId, &str)]| -> Result<(), GraphError> {
        let mut used = std::collections::HashSet::new();
        for (c, role) in kids {
            if used.insert(*role) {
                b.attach(role, *c)?;
            }
        }
        Ok(())
    };
    match op {
        Op::Add {
            name,
            children,
            read_only,
            inline,
        } => {
            let kids: Vec<(NodeId, &str)> = children
                .iter()
                .filter_map(|&(c, r)| Some((find(&tx, c)?, ROLES[r as usize])))
                .collect();
            let ro = *read_only;
            tx.add_node(
                Some(&node_name(*name)),
                serde_json::Value::Null,
                !inline,
                |b| {
                    attach_all(b, &kids)?;
                    stub(ro)
                },
            )?;
        }
        Op::Delete { name } => {
            let id = find(&tx, *name).ok_or(GraphError::UnknownNode {
                name: node_name(*name),
            })?;
            tx.delete_node(id)?;
        }
        Op::Reopen { name, children } => {
            let id = find(&tx, *name).ok_or(GraphError::UnknownNode {
                name: node_name(*name),
            })?;
            let kids: Vec<(NodeId, &str)> = children
                .iter()
                .filter_map(|&(c, r)| Some((find(&tx, c)?, ROLES[r as usize])))
                .collect();
            let ro = tx.view().node(id).unwrap().driver().is_read_only();
            tx.reopen_node(id, serde_json::Value::Null, |b| {
                attach_all(b, &kids)?;
                stub(ro)
            })?;
        }
        Op::AttachUser {
            user,
            node,
            writable,
        } => {
            let id = find(&tx, *node).ok_or(GraphError::UnknownNode {
                name: node_name(*node),
            })?;
            tx.attach_user(export(&format!("u{user}"), *writable), id)?;
        }
        Op::DetachUser { user } => {
            let slot = tx
                .view()
                .user_slot(&format!("u{user}"))
                .ok_or(GraphError::UnknownNode {
                    name: format!("u{user}"),
                })?;
            tx.detach(slot)?;
        }
        Op::Freeze { slot } => {
            let sid = tx
                .view()
                .slots()
                .nth(*slot as usize)
                .map(|(s, _)| s)
                .ok_or(GraphError::NoSuchSlot { slot: SlotId(999) })?;
            tx.freeze(sid, "job")?;
        }
        Op::Unfreeze { slot } => {
            let sid = tx
                .view()
                .slots()
                .nth(*slot as usize)
                .map(|(s, _)| s)
                .ok_or(GraphError::NoSuchSlot { slot: SlotId(999) })?;
            tx.unfreeze(sid);
        }
    }
    tx.commit()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Any sequence of operations keeps the invariants; a refused one
    /// changes nothing; frozen slots keep their child; a node with parents
    /// is never deleted.
    #[test]
    fn random_operations_keep_the_invariants(ops in prop::collection::vec(op(), 1..40)) {
        let g = Graph::new();
        for op in &ops {
            let before = g.view();
            let frozen: BTreeMap<SlotId, NodeId> = before
                .slots()
                .filter(|(_, s)| s.frozen_by().is_some())
                .map(|(id, s)| (id, s.child()))
                .collect();
            let parents: HashMap<String, usize> = before
                .nodes()
                .map(|(id, n)| (n.name().to_owned(), before.parents(id).count()))
                .collect();
            let res = apply(&g, op);
            let after = g.view();
            check_invariants(&after);
            match res {
                Err(_) => prop_assert!(Arc::ptr_eq(&before, &after), "a refused {:?} changed the graph", op),
                Ok(()) => {
                    if let Op::Delete { name } = op {
                        prop_assert_eq!(parents.get(&node_name(*name)).copied(), Some(0), "deleted a node with parents");
                    }
                    if !matches!(op, Op::Unfreeze { .. }) {
                        for (sid, child) in &frozen {
                            prop_assert_eq!(after.child_id(*sid), Some(*child), "frozen {} changed", sid);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn perm_names_follow_qemu() {
    assert_eq!(
        (Perm::CONSISTENT_READ | Perm::WRITE).names(),
        ["consistent-read", "write"]
    );
}
