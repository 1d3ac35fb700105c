//! TLS objects, as QEMU names them: `tls-creds-x509` (a directory of PEM
//! files, loaded into rustls configurations) and `authz-simple` (the one
//! client identity a server lets in).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::pki_types::{ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::options::{Options, OptionsError};

/// Which side of a connection credentials are for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// They prove a server's identity.
    Server,
    /// They verify a server, and may prove a client's identity.
    Client,
}

/// A loaded `tls-creds-x509` object.
#[derive(Debug)]
pub struct TlsCreds {
    /// The object's id.
    pub id: String,
    /// The side these are for.
    pub endpoint: Endpoint,
    /// Whether the peer's certificate is checked against the CA.
    pub verify_peer: bool,
    server: Option<Arc<ServerConfig>>,
    client: Option<Arc<ClientConfig>>,
}

impl TlsCreds {
    /// The configuration of a server; an error names the object when the
    /// credentials are a client's.
    pub fn server(&self) -> Result<Arc<ServerConfig>, String> {
        self.server.clone().ok_or_else(|| {
            format!(
                "TLS credentials '{}' are for a client; a server needs endpoint=server",
                self.id
            )
        })
    }

    /// The configuration of a client; an error names the object when the
    /// credentials are a server's.
    pub fn client(&self) -> Result<Arc<ClientConfig>, String> {
        self.client.clone().ok_or_else(|| {
            format!(
                "TLS credentials '{}' are for a server; a client needs endpoint=client",
                self.id
            )
        })
    }
}

/// An `authz-simple` object: the one distinguished name let in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authz {
    /// The object's id.
    pub id: String,
    /// The client certificate's subject, as QEMU spells it: its RDNs in
    /// the certificate's order, e.g. `O=Example,CN=client`.
    pub identity: String,
}

impl Authz {
    /// Lets in a client whose first certificate has our identity.
    pub fn check(&self, peer: Option<&[CertificateDer<'_>]>) -> Result<(), String> {
        let cert = peer
            .and_then(|c| c.first())
            .ok_or("TLS authz check failed: the client sent no certificate")?;
        let dn = subject(cert)?;
        if dn == self.identity {
            Ok(())
        } else {
            Err(format!("TLS x509 authz check for {dn} is denied"))
        }
    }
}

/// The TLS objects added by `--object` or `object-add`.
#[derive(Debug, Default)]
pub struct TlsObjects {
    creds: Mutex<HashMap<String, Arc<TlsCreds>>>,
    authz: Mutex<HashMap<String, Arc<Authz>>>,
}

impl TlsObjects {
    /// Parses and loads `tls-creds-x509` or `authz-simple` (`ty`) options.
    /// `Ok(false)` when `ty` is neither.
    pub fn add(&self, ty: &str, id: &str, o: &mut Options) -> Result<bool, OptionsError> {
        match ty {
            "tls-creds-x509" => {
                let creds = Arc::new(load_x509(id, o)?);
                insert(&self.creds, id, creds)?;
            }
            "authz-simple" => {
                let identity = o.take_str("identity")?;
                let identity = o.required("identity", identity)?;
                let authz = Arc::new(Authz {
                    id: id.to_string(),
                    identity,
                });
                insert(&self.authz, id, authz)?;
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// Removes the object `id`; `false` if there is none.
    pub fn remove(&self, id: &str) -> bool {
        lock(&self.creds).remove(id).is_some() || lock(&self.authz).remove(id).is_some()
    }

    /// The credentials `id`.
    pub fn creds(&self, id: &str) -> Result<Arc<TlsCreds>, String> {
        lock(&self.creds).get(id).cloned().ok_or_else(|| {
            format!("no TLS credentials with id '{id}' (add a tls-creds-x509 object)")
        })
    }

    /// The authorization object `id`.
    pub fn authz(&self, id: &str) -> Result<Arc<Authz>, String> {
        lock(&self.authz).get(id).cloned().ok_or_else(|| {
            format!("no authorization object with id '{id}' (add an authz-simple object)")
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn insert<T>(
    map: &Mutex<HashMap<String, Arc<T>>>,
    id: &str,
    v: Arc<T>,
) -> Result<(), OptionsError> {
    let mut map = lock(map);
    if map.contains_key(id) {
        return Err(OptionsError::Invalid(format!(
            "attempt to add duplicate property '{id}' to object (type 'container')"
        )));
    }
    map.insert(id.to_string(), v);
    Ok(())
}

/// The crypto every configuration uses.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_x509(id: &str, o: &mut Options) -> Result<TlsCreds, OptionsError> {
    let dir = o.take_str("dir")?;
    let dir = PathBuf::from(o.required("dir", dir)?);
    let endpoint = match o.take_enum("endpoint", &["server", "client"])?.as_deref() {
        Some("server") => Endpoint::Server,
        _ => Endpoint::Client,
    };
    let verify_peer = o.take_bool("verify-peer")?.unwrap_or(true);
    o.take_bool("sanity-check")?;
    for unsupported in ["priority", "passwordid"] {
        if let Some(v) = o.take_str(unsupported)? {
            return Err(OptionsError::Invalid(format!(
                "tls-creds-x509 '{id}': {unsupported}='{v}' is not supported \
                 (rustls picks the ciphers; keys must be unencrypted)"
            )));
        }
    }
    let fail = |e: String| OptionsError::Invalid(format!("tls-creds-x509 '{id}': {e}"));
    let (server, client) = match endpoint {
        Endpoint::Server => (Some(server_config(&dir, verify_peer).map_err(fail)?), None),
        Endpoint::Client => (None, Some(client_config(&dir, verify_peer).map_err(fail)?)),
    };
    Ok(TlsCreds {
        id: id.to_string(),
        endpoint,
        verify_peer,
        server,
        client,
    })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| unreadable("certificates", path, e))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", path.display()));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| unreadable("a private key", path, e))
}

fn unreadable(what: &str, path: &Path, e: rustls::pki_types::pem::Error) -> String {
    let hint = match &e {
        rustls::pki_types::pem::Error::Io(io)
            if io.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            " (a sandboxed daemon reads only the directories its command line names \
             and those given with --sandbox-allow)"
        }
        _ => "",
    };
    format!("cannot read {what} from {}: {e}{hint}", path.display())
}

fn roots(dir: &Path) -> Result<Arc<RootCertStore>, String> {
    let path = dir.join("ca-cert.pem");
    let mut roots = RootCertStore::empty();
    for cert in certs(&path)? {
        roots
            .add(cert)
            .map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
    }
    Ok(Arc::new(roots))
}

fn crls(dir: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    let path = dir.join("ca-crl.pem");
    if !path.exists() {
        return Ok(Vec::new());
    }
    CertificateRevocationListDer::pem_file_iter(&path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| unreadable("revocation lists", &path, e))
}

fn server_config(dir: &Path, verify_peer: bool) -> Result<Arc<ServerConfig>, String> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = if verify_peer {
        let verifier = WebPkiClientVerifier::builder_with_provider(roots(dir)?, provider())
            .with_crls(crls(dir)?)
            .build()
            .map_err(|e| format!("cannot verify clients: {e}"))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let chain = certs(&dir.join("server-cert.pem"))?;
    let config = builder
        .with_single_cert(chain, key(&dir.join("server-key.pem"))?)
        .map_err(|e| format!("server-cert.pem and server-key.pem: {e}"))?;
    Ok(Arc::new(config))
}

fn client_config(dir: &Path, verify_peer: bool) -> Result<Arc<ClientConfig>, String> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = if verify_peer {
        builder.with_root_certificates(roots(dir)?)
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer(provider())))
    };
    let (cert, key_path) = (dir.join("client-cert.pem"), dir.join("client-key.pem"));
    let config = if cert.exists() {
        builder
            .with_client_auth_cert(certs(&cert)?, key(&key_path)?)
            .map_err(|e| format!("client-cert.pem and client-key.pem: {e}"))?
    } else {
        builder.with_no_client_auth()
    };
    Ok(Arc::new(config))
}

/// `verify-peer=off` on a client: any server certificate is taken, though
/// its signatures over the handshake are still checked.
#[derive(Debug)]
struct AnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A certificate's subject as GnuTLS (and so QEMU's authz) spells it: the
/// RDNs in the certificate's order, joined by commas, values escaped as
/// RFC 4514 says.
pub fn subject(cert: &CertificateDer<'_>) -> Result<String, String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("cannot parse the peer's certificate: {e}"))?;
    let mut rdns = Vec::new();
    for rdn in parsed.subject().iter_rdn() {
        let mut parts = Vec::new();
        for atv in rdn.iter() {
            let oid = atv.attr_type().to_id_string();
            let value = match atv.as_str() {
                Ok(s) => escape(s),
                Err(_) => format!("#{}", hex(atv.attr_value().data)),
            };
            parts.push(format!("{}={value}", short_name(&oid).unwrap_or(&oid)));
        }
        rdns.push(parts.join("+"));
    }
    Ok(rdns.join(","))
}

fn short_name(oid: &str) -> Option<&'static str> {
    Some(match oid {
        "2.5.4.3" => "CN",
        "2.5.4.4" => "SN",
        "2.5.4.5" => "serialNumber",
        "2.5.4.6" => "C",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.9" => "STREET",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "2.5.4.12" => "title",
        "2.5.4.42" => "GN",
        "0.9.2342.19200300.100.1.1" => "UID",
        "0.9.2342.19200300.100.1.25" => "DC",
        "1.2.840.113549.1.9.1" => "EMAIL",
        _ => return None,
    })
}

fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let last = v.chars().count().saturating_sub(1);
    for (i, c) in v.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_escaped_as_rfc4514_says() {
        assert_eq!(escape("Acme, Inc."), "Acme\\, Inc.");
        assert_eq!(escape("#1 "), "\\#1\\ ");
        assert_eq!(escape("a+b"), "a\\+b");
        assert_eq!(escape("plain"), "plain");
    }
}
