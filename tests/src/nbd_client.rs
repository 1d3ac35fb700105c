//! A bare NBD client over a unix socket, for what qemu-img and qemu-io
//! will not send: malformed options and requests, chosen metadata
//! contexts, and a client that stops reading.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use strata_nbd::consts::{
    chunk, opt, rep, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, IHAVEOPT, NBDMAGIC, REPLY_MAGIC,
    SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
};
use strata_nbd::{Command, OptionHeader, Request};

/// A TCP port on 127.0.0.1 that nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A connection, after the server's greeting.
pub struct RawClient {
    /// The socket, for tests that write bytes of their own.
    pub s: UnixStream,
}

/// One message of a reply.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// A simple reply: error and cookie (READ data is read separately).
    Simple {
        /// The error value.
        error: u32,
        /// The request's cookie.
        cookie: u64,
    },
    /// A structured chunk.
    Chunk {
        /// Its flags.
        flags: u16,
        /// Its type.
        ty: u16,
        /// The request's cookie.
        cookie: u64,
        /// Its payload.
        payload: Vec<u8>,
    },
}

impl RawClient {
    /// Connects and reads the greeting, which must be fixed newstyle.
    pub fn connect(path: &Path) -> RawClient {
        let s = UnixStream::connect(path).expect("connect to the NBD socket");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = RawClient { s };
        let mut hello = [0u8; 18];
        c.s.read_exact(&mut hello).unwrap();
        assert_eq!(u64::from_be_bytes(hello[..8].try_into().unwrap()), NBDMAGIC);
        assert_eq!(
            u64::from_be_bytes(hello[8..16].try_into().unwrap()),
            IHAVEOPT
        );
        c
    }

    /// Sends the client flags (fixed newstyle, no zeroes).
    pub fn flags(&mut self) {
        let f = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
        self.s.write_all(&f.to_be_bytes()).unwrap();
    }

    /// Sends option `o` with `data` and collects its replies, up to the
    /// final one (ACK or an error).
    pub fn option(&mut self, o: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let h = OptionHeader {
            option: o,
            len: data.len() as u32,
        };
        self.s.write_all(&h.encode()).unwrap();
        self.s.write_all(data).unwrap();
        let mut out = Vec::new();
        loop {
            let mut h = [0u8; 20];
            self.s.read_exact(&mut h).unwrap();
            assert_eq!(u64::from_be_bytes(h[..8].try_into().unwrap()), REPLY_MAGIC);
            assert_eq!(u32::from_be_bytes(h[8..12].try_into().unwrap()), o);
            let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
            let mut d = vec![0u8; len as usize];
            self.s.read_exact(&mut d).unwrap();
            out.push((ty, d));
            if ty == rep::ACK || ty & (1 << 31) != 0 {
                return out;
            }
        }
    }

    /// Negotiates structured replies and `contexts` and enters
    /// transmission on export `name`. Returns the export's size.
    pub fn go(path: &Path, name: &str, contexts: &[&str]) -> (RawClient, u64) {
        let mut c = RawClient::connect(path);
        c.flags();
        assert_eq!(c.option(opt::STRUCTURED_REPLY, &[])[0].0, rep::ACK);
        if !contexts.is_empty() {
            let mut d = (name.len() as u32).to_be_bytes().to_vec();
            d.extend(name.as_bytes());
            d.extend((contexts.len() as u32).to_be_bytes());
            for q in contexts {
                d.extend((q.len() as u32).to_be_bytes());
                d.extend(q.as_bytes());
            }
            let r = c.option(opt::SET_META_CONTEXT, &d);
            assert_eq!(r.last().unwrap().0, rep::ACK, "{r:?}");
            assert_eq!(r.len(), contexts.len() + 1, "every context selected: {r:?}");
        }
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend(name.as_bytes());
        d.extend(0u16.to_be_bytes());
        let r = c.option(opt::GO, &d);
        assert_eq!(r.last().unwrap().0, rep::ACK, "GO: {r:?}");
        let export = r
            .iter()
            .find(|(ty, d)| *ty == rep::INFO && d[..2] == [0, 0])
            .expect("INFO_EXPORT");
        let size = u64::from_be_bytes(export.1[2..10].try_into().unwrap());
        (c, size)
    }

    /// Sends a request (and a WRITE's payload).
    pub fn send(
        &mut self,
        command: Command,
        flags: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let r = Request {
            flags,
            command,
            cookie,
            offset,
            len,
        };
        self.s.write_all(&r.encode()).unwrap();
        self.s.write_all(payload).unwrap();
    }

    /// Reads one reply message (a chunk's payload with it).
    pub fn reply(&mut self) -> Reply {
        let mut magic = [0u8; 4];
        self.s.read_exact(&mut magic).unwrap();
        match u32::from_be_bytes(magic) {
            SIMPLE_REPLY_MAGIC => {
                let mut b = [0u8; 12];
                self.s.read_exact(&mut b).unwrap();
                Reply::Simple {
                    error: u32::from_be_bytes(b[..4].try_into().unwrap()),
                    cookie: u64::from_be_bytes(b[4..].try_into().unwrap()),
                }
            }
            STRUCTURED_REPLY_MAGIC => {
                let mut b = [0u8; 16];
                self.s.read_exact(&mut b).unwrap();
                let len = u32::from_be_bytes(b[12..16].try_into().unwrap());
                let mut payload = vec![0u8; len as usize];
                self.s.read_exact(&mut payload).unwrap();
                Reply::Chunk {
                    flags: u16::from_be_bytes(b[..2].try_into().unwrap()),
                    ty: u16::from_be_bytes(b[2..4].try_into().unwrap()),
                    cookie: u64::from_be_bytes(b[4..12].try_into().unwrap()),
                    payload,
                }
            }
            m => panic!("bad reply magic {m:#x}"),
        }
    }

    /// The error value of a structured error chunk or simple reply.
    pub fn error_of(r: &Reply) -> u32 {
        match r {
            Reply::Simple { error, .. } => *error,
            Reply::Chunk { ty, payload, .. } if *ty == chunk::ERROR => {
                u32::from_be_bytes(payload[..4].try_into().unwrap())
            }
            _ => 0,
        }
    }

    /// True when the server closes the connection (within the read
    /// timeout) rather than sending anything.
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0))
            || matches!(self.s.read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
    }
}
