//! `blockdev-mirror`: copies a live node into a separate target node (a
//! local image, or an NBD export on another host), keeps copying the
//! guest's writes, and on `complete` switches the node's parents to the
//! target. The [mirror](crate::mirror) engine does the work.

use strata_graph::{Graph, Perm};

use crate::chain::chain;
use crate::copy::CHUNK;
use crate::hold::{backing_slots, check_free, job_user};
use crate::job::JobBody;
use crate::mirror::{Copy, Mirror, Setup};

/// What `sync` asks the first copy to take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sync {
    /// Everything the source reads, its backing chain included.
    Full,
    /// What the source's top layer holds; the target has the same backing.
    Top,
    /// Nothing: only what the guest writes from now on.
    None,
}

impl Sync {
    /// Parses QMP's spelling.
    pub fn parse(s: &str) -> Option<Sync> {
        Some(match s {
            "full" => Sync::Full,
            "top" => Sync::Top,
            "none" => Sync::None,
            _ => return None,
        })
    }
}

/// The arguments of `blockdev-mirror`.
#[derive(Clone, Debug)]
pub struct MirrorArgs {
    /// The node mirrored.
    pub device: String,
    /// The node copied to.
    pub target: String,
    /// What the first copy takes.
    pub sync: Sync,
    /// The dirty map's granule in bytes (a power of two, 512 to 64 MiB).
    pub granularity: Option<u64>,
    /// The most data in flight at once.
    pub buf_size: Option<u64>,
    /// `copy-mode=write-blocking`.
    pub write_blocking: bool,
    /// The filter's node name.
    pub filter_node_name: Option<String>,
}

/// The default granule, as QEMU's for images without clusters.
const GRANULE: u64 = 64 << 10;

/// Sets up mirror job `job`.
pub fn mirror(graph: &Graph, job: &str, args: MirrorArgs) -> Result<Box<dyn JobBody>, String> {
    let granularity = args.granularity.unwrap_or(GRANULE);
    if !granularity.is_power_of_two() || !(512..=64 << 20).contains(&granularity) {
        return Err(format!(
            "Parameter 'granularity' expects a power of 2 between 512 and 64M (got {granularity})"
        ));
    }
    let buf_size = args.buf_size.unwrap_or(16 << 20);
    if buf_size < granularity {
        return Err(format!(
            "Parameter 'buf-size' ({buf_size}) must be at least the granularity ({granularity})"
        ));
    }
    let mut tx = graph.transaction();
    let v = tx.view();
    let find = |n: &str| {
        v.find(n)
            .ok_or_else(|| format!("Cannot find device='{n}' nor node-name='{n}'"))
    };
    let (source, target) = (find(&args.device)?, find(&args.target)?);
    let chain = chain(v, source);
    if chain.contains(&target) {
        return Err(format!(
            "Target '{}' is in the backing chain of '{}': commit it instead",
            args.target, args.device
        ));
    }
    let size_of = |n| {
        v.node(n)
            .ok_or("a node went away")?
            .driver()
            .size(v)
            .map_err(|e| e.to_string())
    };
    let (size, target_size) = (size_of(source)?, size_of(target)?);
    if size != target_size {
        return Err(format!(
            "Source and target image have different sizes ({size} and {target_size} bytes)"
        ));
    }
    if v.node(target).is_some_and(|n| n.driver().is_read_only()) {
        return Err(format!("Block node '{}' is read-only", args.target));
    }
    let (layers, copy) = match args.sync {
        Sync::Full => (chain.clone(), Copy::Full),
        Sync::Top => (vec![source], Copy::Top),
        Sync::None => (Vec::new(), Copy::None),
    };
    let mut claimed = layers.clone();
    claimed.extend([source, target]);
    check_free(v, &claimed)?;
    let frozen = backing_slots(v, &layers);
    let setup = Setup {
        kind: "mirror",
        source,
        target,
        layers: layers.clone(),
        copy,
        granularity,
        chunk: CHUNK.min(buf_size) / 512 * 512,
        write_blocking: args.write_blocking,
        filter_node_name: args.filter_node_name,
    };
    let mirror = Mirror::insert(&mut tx, graph, job, setup, size, frozen)?;
    let reads = job_user(job, Perm::CONSISTENT_READ, Perm::all());
    for (i, &n) in chain.iter().enumerate() {
        tx.attach_user_as(
            reads.clone(),
            if i == 0 { "source" } else { "backing node" },
            n,
        )
        .map_err(|e| e.to_string())?;
    }
    tx.attach_user_as(
        job_user(
            job,
            Perm::CONSISTENT_READ | Perm::WRITE,
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
        ),
        "target",
        target,
    )
    .map_err(|e| e.to_string())?;
    tx.commit().map_err(|e| e.to_string())?;
    Ok(Box::new(mirror))
}
