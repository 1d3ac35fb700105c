//! The metrics endpoint's HTTP side: one thread answers `GET /metrics`
//! one connection at a time. A scrape is small and rare, so a client that
//! dawdles only waits its turn behind a timeout, and memory per connection
//! is one bounded request head.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context as _};

use crate::daemon::Daemon;

/// The most a request head may take; a scraper's is a few hundred bytes.
const MAX_HEAD: usize = 8192;
/// How long a client has to send its request and take the answer.
const TIMEOUT: Duration = Duration::from_secs(5);
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Parses `--metrics`'s `HOST:PORT` (`[::1]:9100` for IPv6; a name is
/// resolved, and its first address taken).
pub fn parse_addr(s: &str) -> anyhow::Result<SocketAddr> {
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    if !s.contains(':') {
        return Err(anyhow!(
            "'{s}' is not HOST:PORT (for example 127.0.0.1:9100)"
        ));
    }
    s.to_socket_addrs()
        .with_context(|| format!("'{s}' is not HOST:PORT with a known host"))?
        .next()
        .ok_or_else(|| anyhow!("'{s}': the host has no address"))
}

/// Listens on `addr` and answers scrapes on a thread of its own for as
/// long as the process runs.
pub fn serve(daemon: Arc<Daemon>, addr: SocketAddr) -> anyhow::Result<SocketAddr> {
    let listener =
        TcpListener::bind(addr).with_context(|| format!("--metrics: cannot listen on {addr}"))?;
    let bound = listener.local_addr().context("--metrics")?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                match conn {
                    Ok(c) => {
                        if let Err(e) = answer(&daemon, c) {
                            tracing::debug!("metrics: {e:#}");
                        }
                    }
                    Err(e) => {
                        // Out of descriptors, say: back off rather than spin.
                        tracing::warn!("metrics: accept failed: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })
        .context("--metrics: cannot start its thread")?;
    tracing::info!("metrics on http://{bound}/metrics");
    Ok(bound)
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Ask {
    Metrics { head_only: bool },
    NotFound,
    BadMethod,
    Bad(&'static str),
    TooLarge,
}

/// Reads one request head and answers it; the connection then closes.
fn answer(daemon: &Arc<Daemon>, mut c: TcpStream) -> anyhow::Result<()> {
    c.set_read_timeout(Some(TIMEOUT))?;
    c.set_write_timeout(Some(TIMEOUT))?;
    let ask = read_head(&mut c)?;
    let (status, body) = match ask {
        Ask::Metrics { head_only } => match super::render(daemon) {
            Ok(text) => ("200 OK", if head_only { None } else { Some(text) }),
            Err(_) => (
                "500 Internal Server Error",
                Some("cannot encode the metrics\n".into()),
            ),
        },
        Ask::NotFound => (
            "404 Not Found",
            Some("the metrics are at /metrics\n".into()),
        ),
        Ask::BadMethod => ("405 Method Not Allowed", Some("only GET and HEAD\n".into())),
        Ask::Bad(why) => ("400 Bad Request", Some(format!("{why}\n"))),
        Ask::TooLarge => (
            "431 Request Header Fields Too Large",
            Some(format!("the request head is over {MAX_HEAD} bytes\n")),
        ),
    };
    let ty = if status.starts_with("200") {
        CONTENT_TYPE
    } else {
        "text/plain; charset=utf-8"
    };
    let len = body.as_ref().map_or(0, String::len);
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ty}\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
    );
    if let Some(b) = body {
        out.push_str(&b);
    }
    c.write_all(out.as_bytes())?;
    let _ = c.shutdown(std::net::Shutdown::Write);
    Ok(())
}

fn read_head(c: &mut impl Read) -> std::io::Result<Ask> {
    let mut buf = vec![0; MAX_HEAD];
    let mut have = 0;
    loop {
        let n = c.read(&mut buf[have..])?;
        if n == 0 {
            return Ok(Ask::Bad("the request ended before its head did"));
        }
        have += n;
        match classify(&buf[..have]) {
            Some(ask) => return Ok(ask),
            None if have == MAX_HEAD => return Ok(Ask::TooLarge),
            None => {}
        }
    }
}

/// What a (possibly partial) head asks; `None` while it is incomplete.
fn classify(head: &[u8]) -> Option<Ask> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Partial) => None,
        Err(httparse::Error::TooManyHeaders) => Some(Ask::TooLarge),
        Err(_) => Some(Ask::Bad("not an HTTP/1 request")),
        Ok(httparse::Status::Complete(_)) => {
            let path = req.path.unwrap_or("");
            let path = path.split('?').next().unwrap_or("");
            let head_only = match req.method {
                Some("GET") => false,
                Some("HEAD") => true,
                _ => return Some(Ask::BadMethod),
            };
            Some(if path == "/metrics" {
                Ask::Metrics { head_only }
            } else {
                Ask::NotFound
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_classified_once_complete() {
        let get = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(classify(&get[..20]), None);
        assert_eq!(classify(get), Some(Ask::Metrics { head_only: false }));
        assert_eq!(
            classify(b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Some(Ask::Metrics { head_only: true })
        );
        assert_eq!(classify(b"GET / HTTP/1.1\r\n\r\n"), Some(Ask::NotFound));
        assert_eq!(
            classify(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Some(Ask::BadMethod)
        );
        assert!(matches!(
            classify(b"\x16\x03\x01 tls\r\n\r\n"),
            Some(Ask::Bad(_))
        ));
    }

    #[test]
    fn a_head_that_never_ends_is_refused_at_the_bound() {
        let mut endless = std::io::repeat(b'a');
        let mut head = b"GET /metrics HTTP/1.1\r\nX: ".chain(&mut endless);
        assert_eq!(read_head(&mut head).unwrap(), Ask::TooLarge);
    }

    #[test]
    fn addresses_name_what_is_wrong() {
        assert_eq!(parse_addr("127.0.0.1:9100").unwrap().port(), 9100);
        assert_eq!(parse_addr("[::1]:9100").unwrap().port(), 9100);
        assert!(parse_addr("localhost:9100").is_ok());
        let e = parse_addr("9100").unwrap_err().to_string();
        assert!(e.contains("HOST:PORT"), "{e}");
        assert!(parse_addr("127.0.0.1:port").is_err());
    }
}
