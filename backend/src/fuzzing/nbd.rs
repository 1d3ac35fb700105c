//! The NBD server's negotiation and request checks, fed any bytes a client
//! could send: errors, refusals and closed connections, never a panic, a
//! hang, or memory the input sizes beyond the protocol's bounds.

use std::io::{self, Cursor, Read, Write};
use std::sync::Arc;
use std::time::Duration;

use strata_formats::null::{NullNode, NullOptions};
use strata_graph::{BlockDriver, Graph};
use strata_nbd::{Limits, Request, REQUEST_LEN};

use crate::nbd::channel::{ServerTls, Upgrade};
use crate::nbd::handshake::negotiate;
use crate::nbd::registry::Registry;
use crate::nbd::{NbdExport, NbdExportOptions, MAX_PAYLOAD};

/// A client: `data` is all it sends; what the server answers is kept
/// only to be bounded.
struct Client<'a> {
    input: Cursor<&'a [u8]>,
    answered: usize,
}

impl Read for Client<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.input.read(buf)? {
            // A client that stops sending: the negotiation gives up.
            0 if !buf.is_empty() => Err(io::ErrorKind::UnexpectedEof.into()),
            n => Ok(n),
        }
    }
}

impl Upgrade for Client<'_> {
    fn is_tls(&self) -> bool {
        false
    }

    fn start_tls(&mut self, _: &ServerTls) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

impl Write for Client<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.answered += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Negotiates with a client that sends `data`, then checks what follows
/// as requests against the export.
pub fn nbd_client_bytes(data: &[u8]) {
    let graph = Graph::new();
    let node = graph
        .add_node("null0", |_| {
            Ok::<_, std::convert::Infallible>(Arc::new(NullNode::new(NullOptions {
                size: 64 << 20,
                read_zeroes: true,
                latency: Duration::ZERO,
            })) as Arc<dyn BlockDriver>)
        })
        .expect("a null node");
    let export = NbdExport::new(
        &graph,
        node,
        NbdExportOptions {
            id: "e0".into(),
            name: "n".into(),
            description: Some("fuzz".into()),
            writable: true,
            allocation_depth: true,
            stats_intervals: Vec::new(),
        },
    )
    .expect("an export");
    let registry = Registry::default();
    registry.insert(Arc::clone(&export)).expect("one export");
    let mut c = Client {
        input: Cursor::new(data),
        answered: 0,
    };
    let negotiated = negotiate(&mut c, &registry, None);
    // Replies are bounded by what was asked, option by option.
    assert!(
        c.answered <= 64 + data.len() * 64,
        "{} bytes answered",
        c.answered
    );
    if let Ok(Some(n)) = negotiated {
        let rest = &data[c.input.position() as usize..];
        let limits = Limits {
            size: 64 << 20,
            max_payload: MAX_PAYLOAD,
            alignment: 1,
            read_only: false,
            structured: n.structured,
            has_contexts: n.contexts.any(),
        };
        for chunk in rest.chunks_exact(REQUEST_LEN) {
            let Ok(r) = Request::parse(chunk.try_into().expect("REQUEST_LEN bytes")) else {
                return;
            };
            if r.check(&limits).is_ok() && r.command.writes() {
                assert!(r.offset + u64::from(r.len) <= limits.size);
            }
        }
    }
    export.detach().expect("detach");
}
