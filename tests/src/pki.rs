//! Test certificates made with openssl: a CA, and directories laid out as
//! QEMU's `tls-creds-x509` objects read them.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A certificate authority in a directory of its own.
pub struct Pki {
    dir: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pki {
    /// A new CA, named `name`, under `dir/name`.
    pub fn new(dir: &Path, name: &str) -> Pki {
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        openssl(
            &dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-keyout",
                "ca-key.pem",
                "-out",
                "ca-cert.pem",
                "-subj",
                &format!("/CN={name}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        Pki { dir }
    }

    /// The CA's certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca-cert.pem")
    }

    /// A server's directory: `ca-cert.pem` and a `server-cert.pem` for
    /// 127.0.0.1 and localhost, with its key.
    pub fn server(&self, name: &str) -> PathBuf {
        self.issue(
            name,
            "server",
            "/O=Strata/CN=localhost",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        )
    }

    /// A client's directory: `ca-cert.pem` and a `client-cert.pem` whose
    /// subject is `subject` (openssl's `/O=.../CN=...`), with its key.
    pub fn client(&self, name: &str, subject: &str) -> PathBuf {
        self.issue(name, "client", subject, "extendedKeyUsage=clientAuth\n")
    }

    fn issue(&self, name: &str, role: &str, subject: &str, ext: &str) -> PathBuf {
        let out = self.dir.join(name);
        std::fs::create_dir_all(&out).unwrap();
        std::fs::copy(self.ca_cert(), out.join("ca-cert.pem")).unwrap();
        let ext_file = out.join("ext.cnf");
        std::fs::write(
            &ext_file,
            format!("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n{ext}"),
        )
        .unwrap();
        let (key, csr, cert) = (
            out.join(format!("{role}-key.pem")),
            out.join(format!("{role}.csr")),
            out.join(format!("{role}-cert.pem")),
        );
        let p = |p: &Path| p.to_str().unwrap().to_string();
        openssl(
            &self.dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &p(&key),
                "-out",
                &p(&csr),
                "-subj",
                subject,
            ],
        );
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-days",
                "2",
                "-in",
                &p(&csr),
                "-CA",
                "ca-cert.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-out",
                &p(&cert),
                "-extfile",
                &p(&ext_file),
            ],
        );
        out
    }
}
