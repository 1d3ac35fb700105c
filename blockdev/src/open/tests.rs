use std::sync::Mutex;

use serde_json::json;
use strata_graph::{BlockError, Graph, IoVecs, NoEvents};

use super::*;
use strata_formats::throttle::group::Limits;
use strata_runtime::reactor::block_on;

/// Records events.
#[derive(Default)]
struct Events(Mutex<Vec<(String, Value)>>);

impl EventSink for Events {
    fn emit(&self, name: &str, data: Value) {
        self.0.lock().unwrap().push((name.into(), data));
    }
}

fn ctx() -> OpenContext {
    OpenContext {
        tls: Default::default(),
        secrets: Default::default(),
        throttle_groups: ThrottleGroups::default(),
        events: Arc::new(NoEvents),
    }
}

fn add_json(g: &Graph, ctx: &OpenContext, v: Value) -> Result<NodeId, BlockdevError> {
    let mut tx = g.transaction();
    let id = add(&mut tx, Options::from_json(v)?, ctx)?;
    tx.commit()?;
    Ok(id)
}

fn reopen_json(g: &Graph, ctx: &OpenContext, v: Value) -> Result<NodeId, BlockdevError> {
    let mut tx = g.transaction();
    let id = reopen(&mut tx, Options::from_json(v)?, ctx)?;
    tx.commit()?;
    Ok(id)
}

fn image(dir: &tempfile::TempDir, name: &str, byte: u8, len: usize) -> String {
    let p = dir.path().join(name);
    std::fs::write(&p, vec![byte; len]).unwrap();
    p.to_str().unwrap().to_owned()
}

fn read(g: &Graph, node: &str, offset: u64, len: usize) -> Result<Vec<u8>, BlockError> {
    let v = g.view();
    let id = v.find(node).unwrap();
    let mut buf = vec![0u8; len];
    let iov = IoVecs::from_slice(&mut buf);
    block_on(v.node(id).unwrap().driver().read(&v, offset, &iov)).unwrap()?;
    drop(iov);
    Ok(buf)
}

fn write(g: &Graph, node: &str, offset: u64, data: &[u8]) -> Result<(), BlockError> {
    let v = g.view();
    let id = v.find(node).unwrap();
    let mut buf = data.to_vec();
    let iov = IoVecs::from_slice(&mut buf);
    block_on(v.node(id).unwrap().driver().write(&v, offset, &iov)).unwrap()
}

#[test]
fn inline_and_referenced_children() {
    let dir = tempfile::tempdir().unwrap();
    let a = image(&dir, "a.img", 0xaa, 65536);
    let g = Graph::new();
    let c = ctx();
    add_json(
        &g,
        &c,
        json!({"driver": "raw", "node-name": "disk", "file": {"driver": "file", "filename": a}}),
    )
    .unwrap();
    let v = g.view();
    let disk = v.find("disk").unwrap();
    let (_, slot) = v.children(disk).next().unwrap();
    let file_name = v.name(slot.child()).to_owned();
    assert!(file_name.starts_with("#block"), "{file_name}");
    assert_eq!(
        v.node(disk).unwrap().options()["file"],
        json!(file_name),
        "recorded by name"
    );
    assert_eq!(read(&g, "disk", 0, 512).unwrap(), vec![0xaa; 512]);

    add_json(
        &g,
        &c,
        json!({"driver": "file", "node-name": "f1", "filename": a, "read-only": true}),
    )
    .unwrap();
    add_json(
        &g,
        &c,
        json!({"driver": "raw", "node-name": "disk2", "file": "f1", "offset": 512, "size": 1024}),
    )
    .unwrap();
    assert_eq!(
        g.view()
            .node(g.view().find("disk2").unwrap())
            .unwrap()
            .driver()
            .size(&g.view())
            .unwrap(),
        1024
    );
}

#[test]
fn errors_name_the_option() {
    let g = Graph::new();
    let c = ctx();
    let cases = [
        (json!({"driver": "raw", "node-name": "d", "file": {"driver": "file"}}), "Parameter 'file.filename' is missing"),
        (json!({"driver": "raw", "node-name": "d", "file": {"driver": "file", "filename": "/x", "oops": 1}}), "Parameter 'file.oops' is unexpected"),
        (json!({"driver": "nope", "node-name": "d"}), "Parameter 'driver' does not accept value 'nope'"),
        (json!({"driver": "null-co"}), "'node-name' must be specified for the root node"),
        (json!({"node-name": "d"}), "Parameter 'driver' is missing"),
        (json!({"driver": "null-co", "node-name": "d", "size": "1G"}), "Invalid parameter type for 'size', expected: integer"),
        (json!({"driver": "raw", "node-name": "d", "file": "ghost"}), "Cannot find device='ghost' nor node-name='ghost'"),
        (json!({"driver": "throttle", "node-name": "d", "throttle-group": "tg9", "file": "x"}), "Throttle group 'tg9' does not exist"),
        (json!({"driver": "null-co", "node-name": "1d"}), "node name '1d' is invalid: use letters, digits, '-', '.' and '_', starting with a letter"),
        (json!({"driver": "null-co", "node-name": "d", "detect-zeroes": "on"}), "detect-zeroes=on is not supported yet"),
        (json!({"driver": "raw", "node-name": "d", "file": {"driver": "file", "filename": "/nonexistent/x"}}),
         "cannot open node '#block"),
    ];
    for (opts, want) in cases {
        let err = add_json(&g, &c, opts.clone()).unwrap_err().to_string();
        assert!(err.starts_with(want), "{opts}: got '{err}', want '{want}'");
    }
    assert_eq!(g.view().nodes().count(), 0, "nothing was left behind");
}

#[test]
fn dotted_options_are_parsed_from_strings() {
    let g = Graph::new();
    let mut tx = g.transaction();
    let o = Options::from_keyval(
        json!({"driver": "null-co", "node-name": "n", "size": "64M", "read-zeroes": "off"}),
    )
    .unwrap();
    add(&mut tx, o, &ctx()).unwrap();
    tx.commit().unwrap();
    let v = g.view();
    assert_eq!(
        v.node(v.find("n").unwrap())
            .unwrap()
            .driver()
            .size(&v)
            .unwrap(),
        64 << 20
    );
}

#[test]
fn reopen_swaps_children_and_resets_omitted_options() {
    let dir = tempfile::tempdir().unwrap();
    let a = image(&dir, "a.img", 1, 65536);
    let b = image(&dir, "b.img", 2, 65536);
    let g = Graph::new();
    let c = ctx();
    add_json(&g, &c, json!({"driver": "raw", "node-name": "disk", "offset": 4096, "file": {"driver": "file", "filename": a}})).unwrap();
    add_json(
        &g,
        &c,
        json!({"driver": "file", "node-name": "fb", "filename": b}),
    )
    .unwrap();
    let inline = g
        .view()
        .child_id(
            g.view()
                .child_slot(g.view().find("disk").unwrap(), "file")
                .unwrap(),
        )
        .unwrap();
    assert_eq!(
        g.view()
            .node(g.view().find("disk").unwrap())
            .unwrap()
            .driver()
            .size(&g.view())
            .unwrap(),
        61440
    );

    reopen_json(
        &g,
        &c,
        json!({"driver": "raw", "node-name": "disk", "file": "fb"}),
    )
    .unwrap();
    let v = g.view();
    assert_eq!(read(&g, "disk", 0, 16).unwrap(), vec![2; 16]);
    assert_eq!(
        v.node(v.find("disk").unwrap())
            .unwrap()
            .driver()
            .size(&v)
            .unwrap(),
        65536,
        "offset back to 0"
    );
    assert!(
        v.node(inline).is_none(),
        "the inline file went with its parent link"
    );

    let err = reopen_json(&g, &c, json!({"driver": "null-co", "node-name": "disk"})).unwrap_err();
    assert_eq!(err.to_string(), "Cannot change the option 'driver'");
    let err = reopen_json(
        &g,
        &c,
        json!({"driver": "file", "node-name": "fb", "filename": a}),
    )
    .unwrap_err();
    assert_eq!(err.to_string(), "Cannot change the option 'filename'");
    // Omitting `file` keeps the current child.
    reopen_json(
        &g,
        &c,
        json!({"driver": "raw", "node-name": "disk", "size": 512}),
    )
    .unwrap();
    assert_eq!(read(&g, "disk", 0, 16).unwrap(), vec![2; 16]);
    let err = reopen_json(&g, &c, json!({"driver": "raw", "node-name": "ghost"})).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Cannot find device='ghost' nor node-name='ghost'"
    );
}

#[test]
fn reopen_read_only_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let a = image(&dir, "a.img", 1, 65536);
    let g = Graph::new();
    let c = ctx();
    add_json(
        &g,
        &c,
        json!({"driver": "file", "node-name": "f", "filename": a}),
    )
    .unwrap();
    write(&g, "f", 0, &[9; 512]).unwrap();
    reopen_json(
        &g,
        &c,
        json!({"driver": "file", "node-name": "f", "filename": a, "read-only": true}),
    )
    .unwrap();
    assert!(matches!(
        write(&g, "f", 0, &[9; 512]),
        Err(BlockError::ReadOnly { .. })
    ));
}

fn quorum_of(g: &Graph, c: &OpenContext, dir: &tempfile::TempDir, bytes: [u8; 3], threshold: u64) {
    for (i, byte) in bytes.iter().enumerate() {
        let p = image(dir, &format!("q{i}.img"), *byte, 65536);
        add_json(
            g,
            c,
            json!({"driver": "file", "node-name": format!("q{i}"), "filename": p}),
        )
        .unwrap();
    }
    add_json(g, c, json!({"driver": "quorum", "node-name": "qu", "vote-threshold": threshold, "children": ["q0", "q1", "q2"]})).unwrap();
}

#[test]
fn quorum_votes_and_reports_the_odd_child_out() {
    let dir = tempfile::tempdir().unwrap();
    let events = Arc::new(Events::default());
    let c = OpenContext {
        events: events.clone(),
        ..ctx()
    };
    let g = Graph::new();
    quorum_of(&g, &c, &dir, [5, 5, 6], 2);
    assert_eq!(read(&g, "qu", 0, 512).unwrap(), vec![5; 512]);
    let ev = events.0.lock().unwrap().clone();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].0, "QUORUM_REPORT_BAD");
    assert_eq!(
        ev[0].1,
        json!({"type": "read", "node-name": "q2", "sector": 0, "sectors-count": 1})
    );
    // Writes reach every child.
    write(&g, "qu", 4096, &[8; 512]).unwrap();
    for i in 0..3 {
        assert_eq!(read(&g, &format!("q{i}"), 4096, 512).unwrap(), vec![8; 512]);
    }
    let v = g.view();
    let roles: Vec<String> = v
        .children(v.find("qu").unwrap())
        .map(|(_, s)| s.role().to_owned())
        .collect();
    assert_eq!(roles, ["children.0", "children.1", "children.2"]);
}

#[test]
fn quorum_without_a_majority_fails() {
    let dir = tempfile::tempdir().unwrap();
    let events = Arc::new(Events::default());
    let c = OpenContext {
        events: events.clone(),
        ..ctx()
    };
    let g = Graph::new();
    quorum_of(&g, &c, &dir, [1, 2, 3], 2);
    let err = read(&g, "qu", 0, 512).unwrap_err();
    assert!(
        matches!(&err, BlockError::Io { source, .. } if source.raw_os_error() == Some(libc::EIO)),
        "{err}"
    );
    let names: Vec<String> = events
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|e| e.0.clone())
        .collect();
    assert_eq!(
        names.iter().filter(|n| *n == "QUORUM_FAILURE").count(),
        1,
        "{names:?}"
    );
}

#[test]
fn quorum_children_can_be_added_and_removed_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let c = ctx();
    let g = Graph::new();
    quorum_of(&g, &c, &dir, [5, 5, 5], 2);
    let p = image(&dir, "q3.img", 5, 65536);
    add_json(
        &g,
        &c,
        json!({"driver": "file", "node-name": "q3", "filename": p}),
    )
    .unwrap();
    let mut tx = g.transaction();
    change_quorum(&mut tx, "qu", None, Some("children.1"), &c).unwrap();
    tx.commit().unwrap();
    let mut tx = g.transaction();
    change_quorum(&mut tx, "qu", Some("q3"), None, &c).unwrap();
    tx.commit().unwrap();
    let v = g.view();
    let kids: Vec<(String, String)> = v
        .children(v.find("qu").unwrap())
        .map(|(_, s)| (s.role().to_owned(), v.name(s.child()).to_owned()))
        .collect();
    assert_eq!(
        kids,
        [
            ("children.0".into(), "q0".into()),
            ("children.2".into(), "q2".into()),
            ("children.3".into(), "q3".into())
        ]
    );
    assert_eq!(read(&g, "qu", 0, 512).unwrap(), vec![5; 512]);
    // Removing below the threshold is refused.
    let mut tx = g.transaction();
    change_quorum(&mut tx, "qu", None, Some("children.0"), &c).unwrap();
    let mut tx2_err = None;
    if let Err(e) = change_quorum(&mut tx, "qu", None, Some("children.2"), &c) {
        tx2_err = Some(e.to_string());
    }
    assert!(tx2_err
        .unwrap()
        .contains("vote-threshold must be between 1 and the number of children (1), not 2"));
}

#[test]
fn blkverify_fails_loudly_on_a_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let t = image(&dir, "t.img", 3, 65536);
    let r = image(&dir, "r.img", 3, 65536);
    let g = Graph::new();
    let c = ctx();
    add_json(
        &g,
        &c,
        json!({"driver": "blkverify", "node-name": "bv",
        "test": {"driver": "file", "filename": t}, "raw": {"driver": "file", "filename": r}}),
    )
    .unwrap();
    assert_eq!(read(&g, "bv", 0, 512).unwrap(), vec![3; 512]);
    write(&g, "bv", 0, &[4; 512]).unwrap();
    assert_eq!(
        read(&g, "bv", 0, 512).unwrap(),
        vec![4; 512],
        "writes went to both"
    );
    // Corrupt the test image behind blkverify's back.
    let mut data = std::fs::read(&t).unwrap();
    data[1000] = 0xff;
    std::fs::write(&t, data).unwrap();
    let err = read(&g, "bv", 512, 1024).unwrap_err();
    assert!(matches!(err, BlockError::Io { offset: 1000, .. }), "{err}");
}

#[test]
fn throttle_and_copy_on_read_pass_data_through() {
    let dir = tempfile::tempdir().unwrap();
    let a = image(&dir, "a.img", 7, 65536);
    let g = Graph::new();
    let c = ctx();
    c.throttle_groups.add("tg0", Limits::default()).unwrap();
    add_json(
        &g,
        &c,
        json!({"driver": "copy-on-read", "node-name": "cor",
        "file": {"driver": "throttle", "node-name": "thr", "throttle-group": "tg0",
                 "file": {"driver": "file", "filename": a}}}),
    )
    .unwrap();
    assert_eq!(read(&g, "cor", 0, 4096).unwrap(), vec![7; 4096]);
    write(&g, "cor", 0, &[1; 512]).unwrap();
    assert_eq!(read(&g, "thr", 0, 512).unwrap(), vec![1; 512]);
    let v = g.view();
    assert_eq!(
        v.node(v.find("thr").unwrap())
            .unwrap()
            .driver()
            .driver_name(),
        "throttle"
    );
}

fn qemu_img(args: &[&str]) {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn qemu_io(path: &str, cmd: &str) {
    let out = std::process::Command::new("qemu-io")
        .args(["-c", cmd, path])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-io {cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn qcow2_opens_its_backing_chain_from_the_header() {
    let dir = tempfile::tempdir().unwrap();
    image(&dir, "base.raw", 0x11, 4 << 20);
    let mid = dir.path().join("mid.qcow2");
    let top = dir.path().join("top.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        mid.to_str().unwrap(),
        "4M",
    ]);
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
        "4M",
    ]);
    qemu_io(mid.to_str().unwrap(), "write -P 0x22 1M 64k");
    qemu_io(top.to_str().unwrap(), "write -P 0x33 2M 64k");
    let g = Graph::new();
    let c = ctx();
    add_json(&g, &c, json!({"driver": "qcow2", "node-name": "top", "file": {"driver": "file", "filename": top.to_str().unwrap()}})).unwrap();
    assert_eq!(
        read(&g, "top", 0, 512).unwrap(),
        vec![0x11; 512],
        "from the raw base"
    );
    assert_eq!(
        read(&g, "top", 1 << 20, 512).unwrap(),
        vec![0x22; 512],
        "from mid"
    );
    assert_eq!(
        read(&g, "top", 2 << 20, 512).unwrap(),
        vec![0x33; 512],
        "from top"
    );
    let v = g.view();
    let top_id = v.find("top").unwrap();
    let mid_id = v
        .child_id(v.child_slot(top_id, "backing").unwrap())
        .unwrap();
    assert_eq!(v.node(mid_id).unwrap().driver().driver_name(), "qcow2");
    let base_id = v
        .child_id(v.child_slot(mid_id, "backing").unwrap())
        .unwrap();
    assert_eq!(v.node(base_id).unwrap().driver().driver_name(), "raw");
    // With "backing": null, unallocated clusters read as zeroes. A second
    // node on an image "top" writes must share everything, as in QEMU.
    add_json(
        &g,
        &c,
        json!({"driver": "qcow2", "node-name": "alone", "backing": null, "read-only": true, "force-share": true,
        "file": {"driver": "file", "filename": top.to_str().unwrap(), "read-only": true}}),
    )
    .unwrap();
    assert_eq!(read(&g, "alone", 0, 512).unwrap(), vec![0; 512]);
    // Reopen must say what becomes of the backing child.
    let err = reopen_json(&g, &c, json!({"driver": "qcow2", "node-name": "top", "file": g.view().name(v.child_id(v.child_slot(top_id, "file").unwrap()).unwrap())})).unwrap_err();
    assert_eq!(err.to_string(), "backing is missing for 'top'");
}

#[test]
fn a_backing_chain_that_loops_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    qemu_img(&["create", "-f", "qcow2", a.to_str().unwrap(), "1M"]);
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "a.qcow2",
        "-F",
        "qcow2",
        b.to_str().unwrap(),
        "1M",
    ]);
    // Point a at b by rewriting its header: offset 1024, length of "b.qcow2".
    let mut bytes = std::fs::read(&a).unwrap();
    bytes[8..16].copy_from_slice(&1024u64.to_be_bytes());
    bytes[16..20].copy_from_slice(&7u32.to_be_bytes());
    bytes[1024..1031].copy_from_slice(b"b.qcow2");
    std::fs::write(&a, &bytes).unwrap();
    let g = Graph::new();
    let err = add_json(
        &g,
        &ctx(),
        json!({"driver": "qcow2", "node-name": "b", "read-only": true,
        "file": {"driver": "file", "filename": b.to_str().unwrap(), "read-only": true}}),
    )
    .unwrap_err();
    assert!(
        err.to_string().starts_with("Backing chain loops: "),
        "{err}"
    );
    assert_eq!(g.view().nodes().count(), 0, "nothing left behind");
}

#[test]
fn reopen_carries_qcow2_state_over() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r.qcow2");
    qemu_img(&["create", "-f", "qcow2", p.to_str().unwrap(), "4M"]);
    let g = Graph::new();
    let c = ctx();
    add_json(
        &g,
        &c,
        json!({"driver": "file", "node-name": "f", "filename": p.to_str().unwrap()}),
    )
    .unwrap();
    add_json(
        &g,
        &c,
        json!({"driver": "qcow2", "node-name": "q", "file": "f"}),
    )
    .unwrap();
    write(&g, "q", 65536, &[9; 4096]).unwrap();
    // The write's metadata is still only in the cache; a reopen must not lose it.
    reopen_json(&g, &c, json!({"driver": "qcow2", "node-name": "q", "file": "f", "backing": null, "l2-cache-size": 65536})).unwrap();
    assert_eq!(read(&g, "q", 65536, 4096).unwrap(), vec![9; 4096]);
    let v = g.view();
    block_on(v.node(v.find("q").unwrap()).unwrap().driver().flush(&v))
        .unwrap()
        .unwrap();
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-U", p.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Drops the backing-format header extension of a qcow2 image, as in
/// images made before QEMU recorded it: its backing is probed.
fn forget_backing_format(path: &std::path::Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let at = bytes[..4096]
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .expect("a backing format extension");
    // An extension type nobody knows is skipped.
    bytes[at..at + 4].copy_from_slice(&[0x12, 0x34, 0x56, 0x78]);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_probed_backing_names_no_further_files() {
    let dir = tempfile::tempdir().unwrap();
    // A "raw" disk a guest filled with a qcow2 header naming a host file.
    let host_file = image(&dir, "secret", 0x5e, 1 << 20);
    let evil = dir.path().join("evil.img");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        &host_file,
        "-F",
        "raw",
        evil.to_str().unwrap(),
        "1M",
    ]);
    let top = dir.path().join("top.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "evil.img",
        "-F",
        "raw",
        top.to_str().unwrap(),
        "1M",
    ]);
    forget_backing_format(&top);
    let g = Graph::new();
    let err = add_json(
        &g,
        &ctx(),
        json!({"driver": "qcow2", "node-name": "top", "read-only": true,
        "file": {"driver": "file", "filename": top.to_str().unwrap(), "read-only": true}}),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains(&host_file), "{err}");
    assert!(err.contains("format was probed, not recorded"), "{err}");
    assert_eq!(g.view().nodes().count(), 0, "nothing left behind");
}

#[test]
fn a_probed_raw_backing_stays_raw_through_a_writable_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let base = image(&dir, "base.img", 0, 1 << 20);
    let top = dir.path().join("top.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.img",
        "-F",
        "raw",
        top.to_str().unwrap(),
        "1M",
    ]);
    forget_backing_format(&top);
    let g = Graph::new();
    let c = ctx();
    add_json(
        &g,
        &c,
        json!({"driver": "qcow2", "node-name": "top",
        "file": {"driver": "file", "filename": top.to_str().unwrap()}}),
    )
    .unwrap();
    let v = g.view();
    let top_id = v.find("top").unwrap();
    let base_id = v
        .child_id(v.child_slot(top_id, "backing").unwrap())
        .unwrap();
    let base_name = v.name(base_id).to_owned();
    let file_name = v
        .name(v.child_id(v.child_slot(base_id, "file").unwrap()).unwrap())
        .to_owned();
    // Writable now, as for a commit into it.
    reopen_json(
        &g,
        &c,
        json!({"driver": "file", "node-name": file_name, "filename": base}),
    )
    .unwrap();
    reopen_json(
        &g,
        &c,
        json!({"driver": "raw", "node-name": base_name, "file": file_name}),
    )
    .unwrap();
    let mut header = vec![0u8; 512];
    header[..4].copy_from_slice(b"QFI\xfb");
    // Refused with EPERM, as QEMU refuses it.
    let err = write(&g, &base_name, 0, &header).unwrap_err();
    assert!(err.to_string().contains("os error 1)"), "{err}");
    write(&g, &base_name, 512, &header).unwrap();
}
