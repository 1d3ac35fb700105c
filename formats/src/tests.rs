//! A raw node over a file node, wired through the graph.

use std::sync::Arc;

use strata_graph::{BlockDriver, BlockError, Graph, GraphError, IoOp, IoVecs};

use crate::file::{FileNode, FileOptions};
use crate::raw::{RawError, RawNode, RawOptions};
use strata_runtime::reactor::block_on;

fn graph_with_file(content: &[u8]) -> (tempfile::NamedTempFile, Graph, strata_graph::NodeId) {
    let tmp = tempfile::NamedTempFile::new_in("/var/tmp").unwrap();
    std::fs::write(tmp.path(), content).unwrap();
    let g = Graph::new();
    let opts = FileOptions {
        filename: tmp.path().into(),
        discard: true,
        ..Default::default()
    };
    let file = g
        .add_node("file0", |_| {
            FileNode::open(&opts).map(|n| Arc::new(n) as Arc<dyn BlockDriver>)
        })
        .unwrap();
    (tmp, g, file)
}

fn add_raw(
    g: &Graph,
    file: strata_graph::NodeId,
    opts: RawOptions,
) -> Result<strata_graph::NodeId, GraphError> {
    g.add_node("raw0", |b| {
        RawNode::open(b, file, &opts).map(|n| Arc::new(n) as Arc<dyn BlockDriver>)
    })
}

#[test]
fn a_window_maps_onto_the_file() {
    let content: Vec<u8> = (0..65536u32).map(|i| (i / 512) as u8).collect();
    let (_tmp, g, file) = graph_with_file(&content);
    let raw = add_raw(
        &g,
        file,
        RawOptions {
            offset: 4096,
            size: Some(8192),
            ..Default::default()
        },
    )
    .unwrap();
    let v = g.view();
    let node = v.node(raw).unwrap().driver();
    assert_eq!(node.size(&v).unwrap(), 8192);

    let mut buf = vec![0u8; 1024];
    let iov = IoVecs::from_slice(&mut buf);
    block_on(node.read(&v, 512, &iov)).unwrap().unwrap();
    drop(iov);
    assert_eq!(
        &buf[..512],
        &[9u8; 512][..],
        "window byte 512 is file byte 4608"
    );

    let mut data = vec![0xabu8; 512];
    let iov = IoVecs::from_slice(&mut data);
    block_on(node.write(&v, 8192 - 512, &iov)).unwrap().unwrap();
    let err = block_on(node.write(&v, 8192, &iov)).unwrap().unwrap_err();
    assert!(matches!(
        err,
        BlockError::OutOfRange {
            op: IoOp::Write,
            offset: 8192,
            size: 8192,
            ..
        }
    ));
    drop(iov);
    let on_disk = std::fs::read(_tmp.path()).unwrap();
    assert_eq!(&on_disk[4096 + 8192 - 512..4096 + 8192], &[0xab; 512][..]);
    assert_eq!(
        on_disk[4096 + 8192],
        ((4096 + 8192) / 512) as u8,
        "just past the window"
    );
}

#[test]
fn without_options_raw_is_the_whole_file() {
    let (_tmp, g, file) = graph_with_file(&[5u8; 4096]);
    let raw = add_raw(&g, file, RawOptions::default()).unwrap();
    let v = g.view();
    assert_eq!(v.node(raw).unwrap().driver().size(&v).unwrap(), 4096);
    let (slot, s) = v.children(raw).next().unwrap();
    assert_eq!((s.role(), s.child()), ("file", file));
    assert!(v.child(slot).is_ok());
}

#[test]
fn a_window_past_the_file_is_refused() {
    let (_tmp, g, file) = graph_with_file(&[0u8; 4096]);
    let err = add_raw(
        &g,
        file,
        RawOptions {
            offset: 2048,
            size: Some(4096),
            ..Default::default()
        },
    )
    .unwrap_err();
    let GraphError::Open { source, .. } = &err else {
        panic!("{err}")
    };
    let raw_err = source.downcast_ref::<RawError>().unwrap();
    assert!(matches!(
        raw_err,
        RawError::WindowTooLarge {
            offset: 2048,
            size: 4096,
            child_size: 4096
        }
    ));
    assert_eq!(
        err.to_string(),
        "cannot open node 'raw0': offset 2048 plus size 4096 ends past the end of the 4096-byte file"
    );
    assert!(g.view().find("raw0").is_none());
}

#[test]
fn a_guarded_raw_refuses_writes_that_would_make_it_qcow2() {
    let (tmp, g, file) = graph_with_file(&[0u8; 8192]);
    let raw = add_raw(
        &g,
        file,
        RawOptions {
            guard_format: true,
            ..Default::default()
        },
    )
    .unwrap();
    let v = g.view();
    let node = v.node(raw).unwrap().driver();
    assert_eq!(node.request_alignment(&v), 512);

    let mut header = vec![0u8; 512];
    header[..4].copy_from_slice(b"QFI\xfb");
    let iov = IoVecs::from_slice(&mut header);
    let err = block_on(node.write(&v, 0, &iov)).unwrap().unwrap_err();
    assert!(
        matches!(&err, BlockError::Io { op: IoOp::Write, offset: 0, source } if source.raw_os_error() == Some(libc::EPERM)),
        "{err}"
    );
    assert!(
        block_on(node.write(&v, 512, &iov)).unwrap().is_ok(),
        "only block 0 is guarded"
    );
    drop(iov);

    let mut plain = vec![0x55u8; 512];
    let iov = IoVecs::from_slice(&mut plain);
    block_on(node.write(&v, 0, &iov)).unwrap().unwrap();
    drop(iov);
    let on_disk = std::fs::read(tmp.path()).unwrap();
    assert_eq!(&on_disk[..4], &[0x55; 4]);
    assert_eq!(&on_disk[512..516], b"QFI\xfb");
}
