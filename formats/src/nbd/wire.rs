//! The client's socket, plain or TLS, split into the half that sends
//! (the connection's thread) and the half that receives (its reader
//! thread). Under TLS both halves share the session, each holding its lock
//! only to seal or open records, never while waiting on the socket.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::ClientConnection;

/// Where the server is. Host names are resolved once, when the node
/// opens, so that reconnecting needs no name service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Server {
    /// A unix socket.
    Unix(PathBuf),
    /// TCP, at the first of these addresses that answers.
    Tcp {
        /// The host as given, for messages and TLS.
        host: String,
        /// Its port.
        port: u16,
        /// Its addresses.
        addrs: Vec<SocketAddr>,
    },
}

impl std::fmt::Display for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Server::Unix(p) => write!(f, "unix:{}", p.display()),
            Server::Tcp { host, port, .. } => write!(f, "{host}:{port}"),
        }
    }
}

/// A connected socket, the client's or one a server accepted.
#[derive(Debug)]
pub enum Socket {
    /// On a unix socket.
    Unix(UnixStream),
    /// On TCP.
    Tcp(TcpStream),
}

impl Socket {
    /// Connects to `server`, each attempt bounded by `timeout`.
    pub fn connect(server: &Server, timeout: Duration) -> io::Result<Socket> {
        match server {
            Server::Unix(p) => UnixStream::connect(p).map(Socket::Unix),
            Server::Tcp { addrs, .. } => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
                for a in addrs {
                    match TcpStream::connect_timeout(a, timeout) {
                        Ok(s) => {
                            // Requests are whole messages; waiting to
                            // merge them only adds latency.
                            let _ = s.set_nodelay(true);
                            return Ok(Socket::Tcp(s));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
        }
    }

    /// A second handle on the socket.
    pub fn try_clone(&self) -> io::Result<Socket> {
        Ok(match self {
            Socket::Unix(s) => Socket::Unix(s.try_clone()?),
            Socket::Tcp(s) => Socket::Tcp(s.try_clone()?),
        })
    }

    /// Ends the connection both ways; a blocked read returns.
    pub fn shutdown(&self) {
        let _ = match self {
            Socket::Unix(s) => s.shutdown(Shutdown::Both),
            Socket::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// Bounds each read (`None`: no bound).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Socket::Unix(s) => s.set_read_timeout(t),
            Socket::Tcp(s) => s.set_read_timeout(t),
        }
    }
}

impl From<Socket> for OwnedFd {
    fn from(s: Socket) -> OwnedFd {
        match s {
            Socket::Unix(s) => s.into(),
            Socket::Tcp(s) => s.into(),
        }
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => s.read(buf),
            Socket::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => s.write(buf),
            Socket::Tcp(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Socket::Unix(s) => s.write_vectored(bufs),
            Socket::Tcp(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The sending half.
pub struct Sender {
    sock: Socket,
    tls: Option<Arc<Mutex<ClientConnection>>>,
    sealed: Vec<u8>,
}

/// The receiving half.
pub struct Receiver {
    sock: Socket,
    tls: Option<Arc<Mutex<ClientConnection>>>,
    /// Bytes received and not yet consumed (under TLS, records not yet
    /// handed to the session): `records[start..end]`.
    records: Vec<u8>,
    start: usize,
    end: usize,
}

/// Bytes received from the socket at once: many reply headers, or under
/// TLS a record and more.
const RECORDS: usize = 32 << 10;

fn lock(m: &Mutex<ClientConnection>) -> std::sync::MutexGuard<'_, ClientConnection> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Splits a negotiated connection into its halves.
pub fn split(sock: Socket, tls: Option<ClientConnection>) -> io::Result<(Sender, Receiver)> {
    let tls = tls.map(|t| Arc::new(Mutex::new(t)));
    Ok((
        Sender {
            sock: sock.try_clone()?,
            tls: tls.clone(),
            sealed: Vec::new(),
        },
        Receiver {
            sock,
            tls,
            records: vec![0; RECORDS],
            start: 0,
            end: 0,
        },
    ))
}

impl Sender {
    /// Sends every byte of `parts`, in order, with as few system calls as
    /// the socket allows.
    pub fn send(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        let Some(tls) = self.tls.clone() else {
            return write_all_vectored(&mut self.sock, parts);
        };
        let tls = &*tls;
        for p in parts {
            let mut rest = *p;
            while !rest.is_empty() {
                let n = lock(tls).writer().write(rest)?;
                rest = &rest[n..];
                if n == 0 || !rest.is_empty() {
                    // The session's send buffer is full: out with it.
                    self.flush_tls(tls)?;
                }
            }
        }
        self.flush_tls(tls)
    }

    fn flush_tls(&mut self, tls: &Mutex<ClientConnection>) -> io::Result<()> {
        {
            let mut t = lock(tls);
            while t.wants_write() {
                t.write_tls(&mut self.sealed)?;
            }
        }
        let res = self.sock.write_all(&self.sealed);
        self.sealed.clear();
        res
    }

    /// Ends the connection both ways.
    pub fn shutdown(&self) {
        self.sock.shutdown();
    }
}

/// Hands `session` what it takes of `records` and opens them; returns
/// the bytes taken. Callers hand records over only once the plaintext
/// before them is consumed, which bounds the session's buffers.
pub fn open_records<D>(
    session: &mut rustls::ConnectionCommon<D>,
    records: &[u8],
) -> io::Result<usize> {
    let mut rest = records;
    session.read_tls(&mut rest)?;
    session
        .process_new_packets()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}")))?;
    Ok(records.len() - rest.len())
}

fn write_all_vectored(sock: &mut Socket, parts: &[&[u8]]) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = parts
        .iter()
        .filter(|p| !p.is_empty())
        .map(|p| IoSlice::new(p))
        .collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = match sock.write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
}

impl Receiver {
    /// Plain reads: small ones from what one receive brought in, large
    /// ones straight into `buf`.
    fn read_plain(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.start == self.end {
            if buf.len() >= RECORDS / 2 {
                return self.sock.read(buf);
            }
            let n = self.sock.read(&mut self.records)?;
            (self.start, self.end) = (0, n);
        }
        let n = (self.end - self.start).min(buf.len());
        buf[..n].copy_from_slice(&self.records[self.start..self.start + n]);
        self.start += n;
        Ok(n)
    }
}

impl Read for Receiver {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = &self.tls else {
            return self.read_plain(buf);
        };
        loop {
            {
                let mut t = lock(tls);
                match t.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if self.start < self.end {
                    self.start += open_records(&mut t, &self.records[self.start..self.end])?;
                    continue;
                }
            }
            let n = self.sock.read(&mut self.records)?;
            if n == 0 {
                return Ok(0);
            }
            (self.start, self.end) = (0, n);
        }
    }
}
