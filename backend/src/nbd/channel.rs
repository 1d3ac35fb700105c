//! A client's socket during the negotiation: plain until STARTTLS, then
//! TLS, with blocking I/O on the connection's thread.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::Duration;

use rustls::{ServerConfig, ServerConnection};
use strata_blockdev::tls::Authz;
use strata_formats::nbd::wire::Socket;

/// The server's TLS: its credentials and whom it lets in.
#[derive(Clone)]
pub struct ServerTls {
    /// From the `tls-creds` object.
    pub config: Arc<ServerConfig>,
    /// From the `tls-authz` object; without it, any client the CA signed.
    pub authz: Option<Arc<Authz>>,
}

/// A negotiation's byte stream, which STARTTLS can encrypt.
pub trait Upgrade: Read + Write {
    /// True once STARTTLS succeeded.
    fn is_tls(&self) -> bool;
    /// Runs the TLS handshake as the server, then checks the client's
    /// identity. An error ends the connection.
    fn start_tls(&mut self, tls: &ServerTls) -> io::Result<()>;
}

/// The negotiation's byte stream on a socket.
pub struct Channel {
    stream: Socket,
    tls: Option<ServerConnection>,
}

impl Channel {
    /// A plain channel on `stream`.
    pub fn new(stream: Socket) -> Channel {
        Channel { stream, tls: None }
    }

    /// Bounds each read (`None`: no bound).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.stream.set_read_timeout(t)
    }

    /// The socket and, after STARTTLS, the session, which may hold bytes
    /// the client sent early.
    pub fn into_parts(self) -> (Socket, Option<ServerConnection>) {
        (self.stream, self.tls)
    }
}

impl Upgrade for Channel {
    fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    fn start_tls(&mut self, tls: &ServerTls) -> io::Result<()> {
        let mut conn = ServerConnection::new(Arc::clone(&tls.config)).map_err(io::Error::other)?;
        while conn.is_handshaking() {
            conn.complete_io(&mut self.stream)
                .map_err(|e| io::Error::new(e.kind(), format!("TLS handshake failed: {e}")))?;
        }
        if let Some(authz) = &tls.authz {
            if let Err(e) = authz.check(conn.peer_certificates()) {
                conn.send_close_notify();
                let _ = conn.complete_io(&mut self.stream);
                return Err(io::Error::new(io::ErrorKind::PermissionDenied, e));
            }
        }
        self.tls = Some(conn);
        Ok(())
    }
}

impl Read for Channel {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.tls {
            Some(c) => rustls::Stream::new(c, &mut self.stream).read(buf),
            None => self.stream.read(buf),
        }
    }
}

impl Write for Channel {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.tls {
            Some(c) => {
                let mut s = rustls::Stream::new(c, &mut self.stream);
                let n = s.write(buf)?;
                s.flush()?;
                Ok(n)
            }
            None => self.stream.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.tls {
            Some(c) => rustls::Stream::new(c, &mut self.stream).flush(),
            None => Ok(()),
        }
    }
}
