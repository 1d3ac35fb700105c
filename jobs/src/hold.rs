//! What a job holds while it runs: the slots it froze and its users on
//! the nodes it works on.

use strata_graph::{
    Graph, GraphError, GraphView, NodeId, Perm, SlotId, SlotPerm, Transaction, User, UserKind,
};

/// What a job holds while it runs: the slots it froze and its users.
pub(crate) struct Hold {
    pub(crate) job: String,
    pub(crate) frozen: Vec<SlotId>,
}

impl Hold {
    /// Lets go of everything, in `tx`.
    pub(crate) fn release_in(&self, tx: &mut Transaction<'_>) -> Result<(), GraphError> {
        for &s in &self.frozen {
            tx.unfreeze(s);
        }
        tx.detach_user(&self.job)
    }

    /// Lets go of everything now (clean-up after the job's last change).
    pub(crate) fn release(&self, graph: &Graph) {
        let mut tx = graph.transaction();
        let res = self.release_in(&mut tx).and_then(|()| tx.commit());
        if let Err(e) = res {
            tracing::error!("job '{}': cannot release its nodes: {e}", self.job);
        }
    }
}

/// A user slot of job `job` on a node: what it needs and lets others do.
pub(crate) fn job_user(job: &str, need: Perm, share: Perm) -> User {
    User {
        kind: UserKind::Job,
        name: job.into(),
        perm: SlotPerm { need, share },
    }
}

/// Refuses nodes another job already works on.
pub(crate) fn check_free(v: &GraphView, nodes: &[NodeId]) -> Result<(), String> {
    for &n in nodes {
        if let Some(u) = v.job_using(n) {
            return Err(GraphError::InJob {
                node: v.name(n).into(),
                job: u.name.to_string(),
            }
            .to_string());
        }
    }
    Ok(())
}

/// The `backing` slot of each of `nodes`.
pub(crate) fn backing_slots(v: &GraphView, nodes: &[NodeId]) -> Vec<SlotId> {
    nodes
        .iter()
        .filter_map(|&n| v.child_slot(n, "backing"))
        .collect()
}
