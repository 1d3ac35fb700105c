//! The image tools: `strata create`, `info`, `map` and `check`, with
//! qemu-img's options, output and exit codes.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context as _};
use serde_json::{json, Value};
use strata_blockdev::options::{parse_size, Options};
use strata_blockdev::{self as blockdev, OpenContext};
use strata_formats::file::{FileNode, FileOptions};
use strata_formats::image;
use strata_formats::qcow2::check::{check_slot, CheckReport, Repair};
use strata_formats::qcow2::create::{create as create_qcow2, CreateOptions};
use strata_formats::qcow2::header::Compression;
use strata_formats::throttle::group::ThrottleGroups;
use strata_graph::{
    BlockDriver, Graph, GraphView, NoEvents, NodeId, Perm, SlotPerm, User, UserKind,
};
use strata_runtime::reactor::block_on;

use crate::cli::{CheckArgs, CreateArgs, InfoArgs, MapArgs, OutputFormat};

/// An image opened read-only with its chain, used by a reader that needs
/// consistent reads (the image locks say so to other processes).
struct Opened {
    graph: Graph,
    top: NodeId,
}

fn open(
    path: &Path,
    format: Option<&str>,
    force_share: bool,
    backing: bool,
) -> anyhow::Result<Opened> {
    let format = match format {
        Some(f) => f.to_owned(),
        None => image::probe(path)?.name().to_owned(),
    };
    let graph = Graph::new();
    let ctx = OpenContext {
        tls: Default::default(),
        secrets: Default::default(),
        throttle_groups: ThrottleGroups::default(),
        events: Arc::new(NoEvents),
    };
    let mut opts = json!({
        "driver": format,
        "node-name": "image",
        "read-only": true,
        "force-share": force_share,
        "file": {"driver": "file", "filename": path.to_string_lossy()},
    });
    if !backing && format == "qcow2" {
        opts["backing"] = Value::Null;
    }
    let mut tx = graph.transaction();
    let could_not = |e: &dyn std::fmt::Display| anyhow!("Could not open '{}': {e}", path.display());
    let top = blockdev::add(&mut tx, Options::from_json(opts)?, &ctx).map_err(|e| could_not(&e))?;
    tx.attach_user(reader(), top)?;
    tx.commit().map_err(|e| could_not(&e))?;
    Ok(Opened { graph, top })
}

/// The user an image tool opens an image as: it reads, and minds no one
/// else's writes unless the format does (as qemu-img).
fn reader() -> User {
    User {
        kind: UserKind::Job,
        name: "strata-img".into(),
        perm: SlotPerm::user(false),
    }
}

/// `strata create`.
pub fn create(a: CreateArgs) -> anyhow::Result<()> {
    let mut opts = CreateOptions::default();
    let mut backing_file = a.backing.clone();
    let mut backing_fmt = a.backing_format.clone();
    let mut extra = Vec::new();
    for o in a
        .options
        .iter()
        .flat_map(|o| o.split(','))
        .filter(|o| !o.is_empty())
    {
        let (k, v) = o
            .split_once('=')
            .ok_or_else(|| anyhow!("Invalid option '{o}': expected key=value"))?;
        let on = || match v {
            "on" | "true" => Ok(true),
            "off" | "false" => Ok(false),
            _ => Err(anyhow!("Parameter '{k}' expects 'on' or 'off'")),
        };
        match k {
            "cluster_size" => {
                opts.cluster_size = parse_size(v)
                    .ok_or_else(|| anyhow!("Parameter 'cluster_size' expects a size"))?
            }
            "refcount_bits" => {
                opts.refcount_bits = v
                    .parse()
                    .map_err(|_| anyhow!("Parameter 'refcount_bits' expects a number"))?
            }
            "extended_l2" => opts.extended_l2 = on()?,
            "lazy_refcounts" => opts.lazy_refcounts = on()?,
            "compat" => {
                opts.version = match v {
                    "0.10" | "v2" => 2,
                    "1.1" | "v3" => 3,
                    _ => bail!("Invalid parameter value for 'compat': '{v}' (use 0.10 or 1.1)"),
                }
            }
            "compression_type" => {
                opts.compression = match v {
                    "zlib" => Compression::Zlib,
                    "zstd" => Compression::Zstd,
                    _ => bail!(
                        "Invalid parameter value for 'compression_type': '{v}' (use zlib or zstd)"
                    ),
                }
            }
            "backing_file" => backing_file = Some(v.into()),
            "backing_fmt" => backing_fmt = Some(v.into()),
            "preallocation" if v == "off" => {}
            "preallocation" => bail!("preallocation={v} is not supported"),
            _ => bail!("Invalid parameter '{k}'"),
        }
        extra.push(o.to_owned());
    }
    // The backing file is only looked at (it may well be in use, as the
    // image being snapshotted): shared, as qemu-img create opens it.
    let size = match &a.size {
        Some(s) => parse_size(s).ok_or_else(|| anyhow!("Invalid image size specified: '{s}'"))?,
        None => {
            let b = backing_file
                .as_ref()
                .ok_or_else(|| anyhow!("Image creation needs a size parameter"))?;
            let full = resolve_backing(&a.file, b);
            let opened = open(&full, backing_fmt.as_deref(), true, true)?;
            let v = opened.graph.view();
            v.node(opened.top).expect("opened").driver().size(&v)?
        }
    };
    match a.format.as_str() {
        "raw" => {
            if backing_file.is_some() || !extra.is_empty() {
                bail!("raw images take no options or backing file");
            }
            image::create_raw(&a.file, size)?;
            if !a.quiet {
                println!("Formatting '{}', fmt=raw size={size}", a.file.display());
            }
        }
        "qcow2" => {
            if let Some(b) = &backing_file {
                // qemu-img checks that the backing file opens.
                let full = resolve_backing(&a.file, b);
                let fmt = match &backing_fmt {
                    Some(f) => f.clone(),
                    None => image::probe(&full)
                        .with_context(|| format!("Could not open backing file '{b}'"))?
                        .name()
                        .to_owned(),
                };
                open(&full, Some(&fmt), true, true)
                    .with_context(|| format!("Could not open backing image '{b}'"))?;
                backing_fmt = Some(fmt);
            }
            opts.size = size;
            opts.backing_file = backing_file.clone();
            opts.backing_format = backing_fmt.clone();
            create_qcow2(&a.file, &opts)?;
            let mut line = format!(
                "Formatting '{}', fmt=qcow2 cluster_size={} extended_l2={} compression_type={} size={size}",
                a.file.display(),
                opts.cluster_size,
                if opts.extended_l2 { "on" } else { "off" },
                if opts.compression == Compression::Zstd { "zstd" } else { "zlib" },
            );
            if let Some(b) = &opts.backing_file {
                line += &format!(" backing_file={b}");
            }
            if let Some(f) = &opts.backing_format {
                line += &format!(" backing_fmt={f}");
            }
            line += &format!(
                " lazy_refcounts={} refcount_bits={}",
                if opts.lazy_refcounts { "on" } else { "off" },
                opts.refcount_bits
            );
            if !a.quiet {
                println!("{line}");
            }
        }
        f => bail!("Unknown file format '{f}' (Strata creates raw and qcow2)"),
    }
    Ok(())
}

fn resolve_backing(image: &Path, backing: &str) -> PathBuf {
    let b = Path::new(backing);
    if b.is_absolute() {
        b.into()
    } else {
        image.parent().unwrap_or(Path::new("")).join(b)
    }
}

/// The next image of a chain: its path and format, if the header says.
type Next = Option<(PathBuf, Option<String>)>;

/// Facts about one image of a chain, as `qemu-img info --output=json`.
fn info_of(path: &Path, format: Option<&str>, force_share: bool) -> anyhow::Result<(Value, Next)> {
    let opened = open(path, format, force_share, false)?;
    let v = opened.graph.view();
    let node = v.node(opened.top).expect("opened");
    let driver = node.driver();
    let actual = std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0);
    let mut out = json!({
        "virtual-size": driver.size(&v)?,
        "filename": path.to_string_lossy(),
        "format": driver.driver_name(),
        "actual-size": actual,
        "dirty-flag": false,
    });
    if driver.driver_name() != "qcow2" {
        return Ok((out, None));
    }
    let file = v
        .node(
            v.child_id(v.child_slot(opened.top, "file").expect("qcow2 has a file"))
                .expect("attached"),
        )
        .expect("exists");
    let (h, _) = block_on(strata_formats::qcow2::header::read_from(&v, file.driver()))??;
    out["cluster-size"] = json!(h.geometry.cluster_size());
    out["dirty-flag"] = json!(h.is_dirty());
    let mut data = json!({
        "compat": if h.version == 3 { "1.1" } else { "0.10" },
        "compression-type": if h.compression == Compression::Zstd { "zstd" } else { "zlib" },
        "lazy-refcounts": h.compatible & 1 != 0,
        "refcount-bits": h.geometry.refcount_bits(),
        "corrupt": h.is_corrupt(),
        "extended-l2": h.geometry.extended,
    });
    if h.version == 2 {
        data = json!({"compat": "0.10", "compression-type": "zlib", "refcount-bits": 16});
    }
    out["format-specific"] = json!({"type": "qcow2", "data": data});
    let mut next = None;
    if let Some(b) = &h.backing_file {
        let full = resolve_backing(path, b);
        out["backing-filename"] = json!(b);
        out["full-backing-filename"] = json!(full.to_string_lossy());
        if let Some(f) = &h.backing_format {
            out["backing-filename-format"] = json!(f);
        }
        next = Some((full, h.backing_format.clone()));
    }
    Ok((out, next))
}

/// `strata info`.
pub fn info(a: InfoArgs) -> anyhow::Result<()> {
    let mut chain = Vec::new();
    let mut next = Some((a.file.clone(), a.format.clone()));
    while let Some((path, fmt)) = next.take() {
        if chain.len() > 64 {
            bail!("the backing chain is deeper than 64 images");
        }
        let (v, n) = info_of(&path, fmt.as_deref(), a.force_share)?;
        chain.push(v);
        if a.backing_chain {
            next = n;
        }
    }
    match a.output {
        OutputFormat::Json if a.backing_chain => {
            println!("{}", serde_json::to_string_pretty(&chain)?)
        }
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&chain[0])?),
        OutputFormat::Human => {
            for (i, v) in chain.iter().enumerate() {
                if i > 0 {
                    println!();
                }
                print_info(v);
            }
        }
    }
    Ok(())
}

fn human_size(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else if v.fract() == 0.0 {
        format!("{v:.0} {}", units[u])
    } else {
        format!("{v:.3} {}", units[u]).replace(".000", "")
    }
}

fn print_info(v: &Value) {
    println!("image: {}", v["filename"].as_str().unwrap_or(""));
    println!("file format: {}", v["format"].as_str().unwrap_or(""));
    let size = v["virtual-size"].as_u64().unwrap_or(0);
    println!("virtual size: {} ({size} bytes)", human_size(size));
    println!(
        "disk size: {}",
        human_size(v["actual-size"].as_u64().unwrap_or(0))
    );
    if let Some(cs) = v["cluster-size"].as_u64() {
        println!("cluster_size: {cs}");
    }
    if let Some(b) = v["backing-filename"].as_str() {
        println!("backing file: {b}");
        if let Some(f) = v["backing-filename-format"].as_str() {
            println!("backing file format: {f}");
        }
    }
    if let Some(d) = v["format-specific"]["data"].as_object() {
        println!("Format specific information:");
        for (k, val) in d {
            let shown = match val {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            println!("    {}: {shown}", k.replace('-', " "));
        }
    }
}

/// One entry of `qemu-img map`.
#[derive(Clone, Debug, PartialEq)]
struct MapEntry {
    start: u64,
    length: u64,
    depth: u64,
    present: bool,
    zero: bool,
    data: bool,
    offset: Option<u64>,
}

/// The nodes of the chain from the top: format nodes, by `backing`.
fn chain_nodes(v: &GraphView, top: NodeId) -> Vec<NodeId> {
    let mut out = vec![top];
    while let Some(b) = v
        .child_slot(*out.last().expect("not empty"), "backing")
        .and_then(|s| v.child_id(s))
    {
        out.push(b);
    }
    out
}

fn map_entries(
    path: &Path,
    format: Option<&str>,
    force_share: bool,
) -> anyhow::Result<Vec<MapEntry>> {
    let opened = open(path, format, force_share, true)?;
    let v = opened.graph.view();
    let layers = chain_nodes(&v, opened.top);
    let size = v.node(opened.top).expect("opened").driver().size(&v)?;
    let mut out: Vec<MapEntry> = Vec::new();
    let mut pos = 0;
    while pos < size {
        let mut entry = None;
        let mut len = size - pos;
        for (depth, &id) in layers.iter().enumerate() {
            let d = v.node(id).expect("in chain").driver();
            let lsize = d.size(&v)?;
            if pos >= lsize {
                // Past the end of a shorter backing layer: zeroes.
                entry = Some(MapEntry {
                    start: pos,
                    length: len,
                    depth: depth as u64,
                    present: false,
                    zero: true,
                    data: false,
                    offset: None,
                });
                break;
            }
            let st = block_on(d.block_status(&v, pos, len.min(lsize - pos)))??;
            len = st.len;
            if st.allocated {
                entry = Some(MapEntry {
                    start: pos,
                    length: len,
                    depth: depth as u64,
                    present: true,
                    zero: st.zero,
                    data: !st.zero,
                    offset: st.offset,
                });
                break;
            }
        }
        let e = entry.unwrap_or(MapEntry {
            start: pos,
            length: len,
            depth: layers.len() as u64 - 1,
            present: false,
            zero: true,
            data: false,
            offset: None,
        });
        pos += e.length;
        match out.last_mut() {
            Some(last)
                if last.depth == e.depth
                    && last.present == e.present
                    && last.zero == e.zero
                    && last.data == e.data
                    && match (last.offset, e.offset) {
                        (Some(a), Some(b)) => a + last.length == b,
                        (None, None) => true,
                        _ => false,
                    } =>
            {
                last.length += e.length
            }
            _ => out.push(e),
        }
    }
    Ok(out)
}

/// `strata map`.
pub fn map(a: MapArgs) -> anyhow::Result<()> {
    let entries = map_entries(&a.file, a.format.as_deref(), a.force_share)?;
    match a.output {
        OutputFormat::Json => {
            let lines: Vec<String> = entries
                .iter()
                .map(|e| {
                    let mut s = format!(
                        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}",
                        e.start, e.length, e.depth, e.present, e.zero, e.data
                    );
                    if let Some(o) = e.offset {
                        s += &format!(", \"offset\": {o}");
                    }
                    s + "}"
                })
                .collect();
            println!("[{}]", lines.join(",\n"));
        }
        OutputFormat::Human => {
            println!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
            for e in entries.iter().filter(|e| e.data && e.offset.is_some()) {
                println!(
                    "{:<16}{:<16}{:<16}{}",
                    format!("{:#x}", e.start),
                    format!("{:#x}", e.length),
                    format!("{:#x}", e.offset.unwrap_or(0)),
                    a.file.display()
                );
            }
        }
    }
    Ok(())
}

/// `strata check`: returns qemu-img's exit code (0 clean, 2 corrupt,
/// 3 leaks only, 1 the check itself failed).
pub fn check_image(a: CheckArgs) -> anyhow::Result<i32> {
    let format = match &a.format {
        Some(f) => f.clone(),
        None => image::probe(&a.file)?.name().to_owned(),
    };
    if format != "qcow2" {
        bail!("This image format does not support checks");
    }
    let repair = match a.repair.as_deref() {
        None => Repair::None,
        Some("leaks") => Repair::Leaks,
        Some("all") => Repair::All,
        Some(r) => bail!("Unknown option for -r: '{r}' (use leaks or all)"),
    };
    let graph = Graph::new();
    if a.force_share && repair != Repair::None {
        bail!(
            "Could not open '{}': force-share=on can only be used with read-only images",
            a.file.display()
        );
    }
    let fopts = FileOptions {
        filename: a.file.clone(),
        read_only: repair == Repair::None,
        force_share: a.force_share,
        ..Default::default()
    };
    let file = graph
        .add_node("file", |_| {
            FileNode::open(&fopts).map(|n| Arc::new(n) as Arc<dyn BlockDriver>)
        })
        .map_err(|e| anyhow!("Could not open '{}': {e}", a.file.display()))?;
    // The metadata must not change underneath, as for qemu-img check.
    let mut need = Perm::CONSISTENT_READ;
    if repair != Repair::None {
        need |= Perm::WRITE | Perm::RESIZE;
    }
    let user = User {
        kind: UserKind::Job,
        name: "check".into(),
        perm: SlotPerm {
            need,
            share: Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
        },
    };
    let slot = graph
        .attach_user(user, file)
        .map_err(|e| anyhow!("Could not open '{}': {e}", a.file.display()))?;
    let v = graph.view();
    let report = block_on(check_slot(&v, slot, repair))?
        .map_err(|e| anyhow!("Could not check '{}': {e}", a.file.display()))?;
    print_check(&a, &format, &report)?;
    Ok(if report.check_errors > 0 {
        1
    } else if report.corruptions > report.corruptions_fixed {
        2
    } else if report.leaks > report.leaks_fixed {
        3
    } else {
        0
    })
}

fn print_check(a: &CheckArgs, format: &str, r: &CheckReport) -> anyhow::Result<()> {
    match a.output {
        OutputFormat::Json => {
            let mut out = serde_json::Map::new();
            out.insert("image-end-offset".into(), json!(r.image_end_offset));
            out.insert("total-clusters".into(), json!(r.total_clusters));
            out.insert("check-errors".into(), json!(r.check_errors));
            for (k, n) in [
                ("allocated-clusters", r.allocated_clusters),
                ("fragmented-clusters", r.fragmented_clusters),
                ("compressed-clusters", r.compressed_clusters),
                ("leaks", r.leaks - r.leaks_fixed),
                ("corruptions", r.corruptions - r.corruptions_fixed),
                ("leaks-fixed", r.leaks_fixed),
                ("corruptions-fixed", r.corruptions_fixed),
            ] {
                if n > 0 {
                    out.insert(k.into(), json!(n));
                }
            }
            out.insert("filename".into(), json!(a.file.to_string_lossy()));
            out.insert("format".into(), json!(format));
            println!("{}", serde_json::to_string_pretty(&Value::Object(out))?);
        }
        OutputFormat::Human => {
            for m in &r.messages {
                eprintln!("{m}");
            }
            let (leaks, corrupt) = (r.leaks - r.leaks_fixed, r.corruptions - r.corruptions_fixed);
            if r.leaks_fixed > 0 || r.corruptions_fixed > 0 {
                println!("The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n", r.leaks_fixed, r.corruptions_fixed);
            }
            if corrupt > 0 {
                println!("\n{corrupt} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.");
            }
            if leaks > 0 {
                println!("\n{leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.");
            }
            if corrupt == 0 && leaks == 0 {
                println!("No errors were found on the image.");
            }
            let pct = |n: u64, d: u64| {
                if d == 0 {
                    0.0
                } else {
                    n as f64 * 100.0 / d as f64
                }
            };
            println!(
                "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
                r.allocated_clusters,
                r.total_clusters,
                pct(r.allocated_clusters, r.total_clusters),
                pct(r.fragmented_clusters, r.allocated_clusters),
                pct(r.compressed_clusters, r.allocated_clusters)
            );
            println!("Image end offset: {}", r.image_end_offset);
        }
    }
    Ok(())
}
