//! Transactions: every edit of the graph is made on a private copy of the
//! current view, checked whole (cycles, permissions, frozen slots), and
//! published in one store after the affected users have drained. A
//! transaction that fails, or is dropped, changes nothing.

use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};

use crate::drain::Drained;
use crate::{
    perm, BlockDriver, Graph, GraphError, GraphView, Node, NodeId, Parent, Slot, SlotId, User,
};

/// An edit in progress. See the module docs.
pub struct Transaction<'g> {
    graph: &'g Graph,
    _guard: MutexGuard<'g, ()>,
    base: Arc<GraphView>,
    next: GraphView,
    /// Nodes whose children or driver change, or that go away.
    affected: Vec<NodeId>,
    /// Users whose root slot changes.
    affected_users: Vec<Arc<str>>,
}

impl<'g> Transaction<'g> {
    pub(crate) fn new(graph: &'g Graph, guard: MutexGuard<'g, ()>) -> Self {
        let base = graph.view();
        Transaction {
            graph,
            _guard: guard,
            next: GraphView::clone(&base),
            base,
            affected: Vec::new(),
            affected_users: Vec::new(),
        }
    }

    /// The graph as this transaction has it so far.
    pub fn view(&self) -> &GraphView {
        &self.next
    }

    /// Adds a node. Without a name, the node gets a generated one
    /// (`#block<n>`). `open` attaches the node's children and returns its
    /// driver; if it fails, the transaction is as it was before the call.
    pub fn add_node<E>(
        &mut self,
        name: Option<&str>,
        options: serde_json::Value,
        monitor_owned: bool,
        open: impl FnOnce(&mut NodeBuilder<'_>) -> Result<Arc<dyn BlockDriver>, E>,
    ) -> Result<NodeId, GraphError>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let name: Arc<str> = match name {
            Some(n) => {
                check_name(n)?;
                if self.next.find(n).is_some() {
                    return Err(GraphError::DuplicateName { name: n.into() });
                }
                n.into()
            }
            None => format!(
                "#block{:03}",
                self.graph.next_auto_name.fetch_add(1, Ordering::Relaxed)
            )
            .into(),
        };
        let saved = self.next.clone();
        let id = NodeId(self.next.nodes.len() as u32);
        // Reserve the id so slots attached during `open` name a real parent.
        self.next.nodes.push(None);
        let mut b = NodeBuilder {
            next: &mut self.next,
            id,
            name: name.clone(),
            previous: None,
            existing: Vec::new(),
        };
        match open(&mut b) {
            Ok(driver) => {
                self.next.nodes[id.index()] = Some(Node {
                    name,
                    driver,
                    options: Arc::new(options),
                    monitor_owned,
                    active: true,
                });
                Ok(id)
            }
            Err(e) => {
                self.next = saved;
                Err(GraphError::Open {
                    name: name.to_string(),
                    source: e.into(),
                })
            }
        }
    }

    /// Replaces node `id`'s driver and options. `open` attaches children as
    /// for a new node; a role the node had keeps its slot (its child may
    /// change), and roles not attached again are detached.
    pub fn reopen_node<E>(
        &mut self,
        id: NodeId,
        options: serde_json::Value,
        open: impl FnOnce(&mut NodeBuilder<'_>) -> Result<Arc<dyn BlockDriver>, E>,
    ) -> Result<(), GraphError>
    where
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let node = self
            .next
            .node(id)
            .ok_or(GraphError::NoSuchNode { id })?
            .clone();
        let saved = self.next.clone();
        let existing = self
            .next
            .children(id)
            .map(|(sid, s)| (sid, s.role.clone(), false))
            .collect();
        let mut b = NodeBuilder {
            next: &mut self.next,
            id,
            name: node.name.clone(),
            previous: Some(node.driver.clone()),
            existing,
        };
        let res = open(&mut b).map_err(|e| GraphError::Open {
            name: node.name.to_string(),
            source: e.into(),
        });
        let res = res.and_then(|driver| {
            let unused: Vec<SlotId> = b.existing.iter().filter(|e| !e.2).map(|e| e.0).collect();
            for sid in unused {
                remove_slot(b.next, sid)?;
            }
            Ok(driver)
        });
        match res {
            Ok(driver) => {
                self.next.nodes[id.index()] = Some(Node {
                    driver,
                    options: Arc::new(options),
                    ..node
                });
                self.affected.push(id);
                Ok(())
            }
            Err(e) => {
                self.next = saved;
                Err(e)
            }
        }
    }

    /// Makes node `id` active or inactive. An inactive node takes no I/O
    /// from users (their requests fail with
    /// [`BlockError::Inactive`](crate::BlockError::Inactive)) and asks its
    /// children for nothing, so the images below it hold no
    /// locks; its users ask nothing of it either. The caller keeps a
    /// node's subtree in one state, and reopens what must drop or re-read
    /// cached state.
    pub fn set_active(&mut self, id: NodeId, active: bool) -> Result<(), GraphError> {
        let node = self.next.nodes[id.index()]
            .as_mut()
            .ok_or(GraphError::NoSuchNode { id })?;
        node.active = active;
        self.affected.push(id);
        Ok(())
    }

    /// Deletes node `id` and its child slots. Refused while anything uses
    /// the node.
    pub fn delete_node(&mut self, id: NodeId) -> Result<(), GraphError> {
        let node = self.next.node(id).ok_or(GraphError::NoSuchNode { id })?;
        if let Some((_, s)) = self.next.parents(id).next() {
            return Err(GraphError::Busy {
                node: node.name().into(),
                user: match &s.parent {
                    Parent::Node(p) => format!("'{}' as '{}'", self.next.name(*p), s.role),
                    Parent::User(u) => u.to_string(),
                },
            });
        }
        let saved = self.next.clone();
        let children: Vec<SlotId> = self.next.children(id).map(|(sid, _)| sid).collect();
        for sid in children {
            if let Err(e) = remove_slot(&mut self.next, sid) {
                self.next = saved;
                return Err(e);
            }
        }
        self.next.nodes[id.index()] = None;
        self.affected.push(id);
        Ok(())
    }

    /// Gives `user` a slot holding `child`.
    pub fn attach_user(&mut self, user: User, child: NodeId) -> Result<SlotId, GraphError> {
        if self.next.user_slot(&user.name).is_some() {
            return Err(GraphError::DuplicateUser {
                user: user.to_string(),
            });
        }
        self.attach_user_as(user, "root", child)
    }

    /// Gives `user` one more slot, in `role`, holding `child`: a job holds
    /// each node it works on this way ("main node", "base", ...).
    pub fn attach_user_as(
        &mut self,
        user: User,
        role: &str,
        child: NodeId,
    ) -> Result<SlotId, GraphError> {
        let name = user.name.clone();
        let sid = push_slot(&mut self.next, Parent::User(user), role, child)?;
        self.affected_users.push(name);
        Ok(sid)
    }

    /// Removes every slot of the user named `name`.
    pub fn detach_user(&mut self, name: &str) -> Result<(), GraphError> {
        let slots: Vec<SlotId> = self
            .next
            .slots()
            .filter(|(_, s)| matches!(&s.parent, Parent::User(u) if &*u.name == name))
            .map(|(sid, _)| sid)
            .collect();
        for sid in slots {
            self.detach(sid)?;
        }
        Ok(())
    }

    /// Puts `new` in every slot that holds `old`, except the slots in
    /// `except` (the new node's own edge to `old`, say): `new` takes
    /// `old`'s place for all its parents.
    pub fn replace_node(
        &mut self,
        old: NodeId,
        new: NodeId,
        except: &[SlotId],
    ) -> Result<(), GraphError> {
        let parents: Vec<SlotId> = self
            .next
            .parents(old)
            .map(|(sid, _)| sid)
            .filter(|sid| !except.contains(sid))
            .collect();
        for sid in parents {
            self.set_child(sid, new)?;
        }
        Ok(())
    }

    /// Removes a slot (a node's child or a user's root).
    pub fn detach(&mut self, slot: SlotId) -> Result<(), GraphError> {
        self.note_change(slot)?;
        remove_slot(&mut self.next, slot)
    }

    /// Puts `child` in `slot` in place of its current child.
    pub fn set_child(&mut self, slot: SlotId, child: NodeId) -> Result<(), GraphError> {
        self.note_change(slot)?;
        set_slot_child(&mut self.next, slot, child)
    }

    /// Freezes `slot` for `job`: nothing may change its child until the job
    /// unfreezes it.
    pub fn freeze(&mut self, slot: SlotId, job: &str) -> Result<(), GraphError> {
        let s = self
            .next
            .slot(slot)
            .ok_or(GraphError::NoSuchSlot { slot })?;
        if let Some(by) = s.frozen_by.as_deref().filter(|&by| by != job) {
            return Err(frozen_error(&self.next, slot, by));
        }
        self.next.slots[slot.index()]
            .as_mut()
            .expect("checked above")
            .frozen_by = Some(job.into());
        Ok(())
    }

    /// Lifts `job`'s freeze from `slot`.
    pub fn unfreeze(&mut self, slot: SlotId) {
        if let Some(s) = self
            .next
            .slots
            .get_mut(slot.index())
            .and_then(Option::as_mut)
        {
            s.frozen_by = None;
        }
    }

    fn note_change(&mut self, slot: SlotId) -> Result<(), GraphError> {
        let s = self
            .next
            .slot(slot)
            .ok_or(GraphError::NoSuchSlot { slot })?;
        match &s.parent {
            Parent::Node(p) => self.affected.push(*p),
            Parent::User(u) => self.affected_users.push(u.name.clone()),
        }
        Ok(())
    }

    /// Checks the result and publishes it: nodes created inline that no
    /// longer have a parent go, then cycles and permissions are checked,
    /// the users whose requests may cross a changed edge are drained, and
    /// the new view is stored.
    pub fn commit(self) -> Result<(), GraphError> {
        self.commit_drained(|| Ok(()))
    }

    /// As [`commit`](Self::commit), running `last` while the affected users
    /// are drained, just before the new view is published: work that must
    /// see no guest request (a mirror's final copy). If `last` fails,
    /// nothing is published.
    pub fn commit_drained(
        mut self,
        last: impl FnOnce() -> Result<(), GraphError>,
    ) -> Result<(), GraphError> {
        self.collect_orphans()?;
        let order = match self.next.parents_first() {
            Some(order) => order,
            None => return Err(some_cycle(&self.next)),
        };
        perm::check(&self.next, &order)?;
        let prepared = self.prepare_perms(&order)?;
        let drained = self.drain()?;
        last()?;
        let gone: Vec<_> = self
            .base
            .nodes()
            .filter(|(id, _)| self.next.node(*id).is_none())
            .map(|(_, n)| n.driver_arc().clone())
            .collect();
        self.graph.views.store(Arc::new(self.next));
        drop(drained);
        prepared.commit();
        // A deleted node lets go now, not when the last request that saw
        // it has finished with its driver.
        for d in gone {
            if d.prepare_perm(crate::SlotPerm::UNUSED).is_ok() {
                d.commit_perm();
            }
        }
        Ok(())
    }

    /// Has every node take what its parents will need, newcomers included.
    fn prepare_perms(&self, order: &[NodeId]) -> Result<PreparedPerms, GraphError> {
        let mut prepared = PreparedPerms(Vec::new());
        for (id, perm) in perm::node_perms(&self.next, order) {
            let node = self.next.node(id).expect("listed");
            // Listed first: a node that fails halfway aborts too.
            prepared.0.push(node.driver_arc().clone());
            node.driver()
                .prepare_perm(perm)
                .map_err(|source| GraphError::Perm {
                    node: node.name().into(),
                    source,
                })?;
        }
        Ok(prepared)
    }

    /// Deletes nodes created inline that nothing uses any more.
    fn collect_orphans(&mut self) -> Result<(), GraphError> {
        loop {
            let orphan = self
                .next
                .nodes()
                .find(|(id, n)| !n.monitor_owned && self.next.parents(*id).next().is_none())
                .map(|(id, _)| id);
            match orphan {
                Some(id) => self.delete_node(id)?,
                None => return Ok(()),
            }
        }
    }

    /// Quiesces every user whose requests could reach an affected node.
    fn drain(&self) -> Result<Drained, GraphError> {
        let mut drained = Drained(Vec::new());
        for (_, s) in self.base.slots() {
            let Parent::User(u) = &s.parent else { continue };
            let hit = self.affected_users.contains(&u.name)
                || self.affected.iter().any(|&n| self.base.reaches(s.child, n));
            if !hit {
                continue;
            }
            if let Some(q) = self.graph.quiescers.get(&u.name) {
                q.quiesce().map_err(|source| GraphError::Drain {
                    user: u.to_string(),
                    source,
                })?;
                drained.0.push(q);
            }
        }
        Ok(drained)
    }
}

/// Permissions prepared by a commit in progress: aborted unless committed.
struct PreparedPerms(Vec<Arc<dyn BlockDriver>>);

impl PreparedPerms {
    fn commit(mut self) {
        for d in self.0.drain(..) {
            d.commit_perm();
        }
    }
}

impl Drop for PreparedPerms {
    fn drop(&mut self) {
        for d in self.0.drain(..) {
            d.abort_perm();
        }
    }
}

/// Lets a driver's open function attach the node's children.
pub struct NodeBuilder<'a> {
    next: &'a mut GraphView,
    id: NodeId,
    name: Arc<str>,
    previous: Option<Arc<dyn BlockDriver>>,
    /// On reopen: the node's slots, by role, and whether re-attached.
    existing: Vec<(SlotId, Arc<str>, bool)>,
}

impl NodeBuilder<'_> {
    /// The id of the node being opened.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The name of the node being opened.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Attaches `child` in the slot for `role`: a new slot, or on reopen
    /// the slot the role already had.
    pub fn attach(&mut self, role: &str, child: NodeId) -> Result<SlotId, GraphError> {
        if let Some(e) = self.existing.iter_mut().find(|e| &*e.1 == role && !e.2) {
            e.2 = true;
            let sid = e.0;
            set_slot_child(self.next, sid, child)?;
            return Ok(sid);
        }
        if self.previous.is_some() && self.next.reaches(child, self.id) {
            return Err(cycle_error(self.next, self.id, child, role));
        }
        push_slot(self.next, Parent::Node(self.id), role, child)
    }

    /// The graph the node will be published in, including the slots
    /// attached so far.
    pub fn view(&self) -> &GraphView {
        self.next
    }

    /// On reopen, the node's current driver (to carry state over).
    pub fn previous(&self) -> Option<&Arc<dyn BlockDriver>> {
        self.previous.as_ref()
    }
}

fn push_slot(
    next: &mut GraphView,
    parent: Parent,
    role: &str,
    child: NodeId,
) -> Result<SlotId, GraphError> {
    if next.node(child).is_none() {
        return Err(GraphError::NoSuchNode { id: child });
    }
    let id = SlotId(next.slots.len() as u32);
    next.slots.push(Some(Slot {
        parent,
        role: role.into(),
        child,
        frozen_by: None,
    }));
    Ok(id)
}

fn set_slot_child(next: &mut GraphView, slot: SlotId, child: NodeId) -> Result<(), GraphError> {
    let s = next.slot(slot).ok_or(GraphError::NoSuchSlot { slot })?;
    if s.child == child {
        return Ok(());
    }
    if let Some(by) = &s.frozen_by {
        return Err(frozen_error(next, slot, by));
    }
    if next.node(child).is_none() {
        return Err(GraphError::NoSuchNode { id: child });
    }
    if let Parent::Node(p) = s.parent {
        if next.reaches(child, p) {
            return Err(cycle_error(next, p, child, &s.role));
        }
    }
    next.slots[slot.index()]
        .as_mut()
        .expect("checked above")
        .child = child;
    Ok(())
}

fn remove_slot(next: &mut GraphView, slot: SlotId) -> Result<(), GraphError> {
    let s = next.slot(slot).ok_or(GraphError::NoSuchSlot { slot })?;
    if let Some(by) = &s.frozen_by {
        return Err(frozen_error(next, slot, by));
    }
    next.slots[slot.index()] = None;
    Ok(())
}

fn frozen_error(v: &GraphView, slot: SlotId, job: &str) -> GraphError {
    let s = v.slot(slot);
    GraphError::Frozen {
        role: s.map_or("?".into(), |s| s.role.to_string()),
        parent: s.map_or("?".into(), |s| match &s.parent {
            Parent::Node(p) => v.name(*p).to_string(),
            Parent::User(u) => u.to_string(),
        }),
        job: job.into(),
    }
}

/// An edge on a cycle of `v`, which has one.
fn some_cycle(v: &GraphView) -> GraphError {
    for (_, s) in v.slots() {
        if let Parent::Node(p) = s.parent {
            if v.reaches(s.child, p) {
                return cycle_error(v, p, s.child, &s.role);
            }
        }
    }
    unreachable!("some_cycle called on a graph without a cycle")
}

fn cycle_error(v: &GraphView, parent: NodeId, child: NodeId, role: &str) -> GraphError {
    GraphError::Cycle {
        parent: v.name(parent).into(),
        child: v.name(child).into(),
        role: role.into(),
    }
}

fn check_name(name: &str) -> Result<(), GraphError> {
    if crate::ids::valid_id(name) {
        Ok(())
    } else {
        Err(GraphError::InvalidName { name: name.into() })
    }
}

#[cfg(test)]
mod tests;
