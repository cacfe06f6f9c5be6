//! Test certificates made with the `openssl` command: a CA, a server certificate for
//! 127.0.0.1, a client certificate, and a second CA nobody trusts; laid out as libnbd
//! (`tls-certificates=DIR`) and qemu (`tls-creds-x509,dir=DIR`) look for them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::run_ok;

/// The files of one test PKI.
#[derive(Debug)]
pub struct Certs {
    /// The server's certificate (signed by the CA, SAN IP:127.0.0.1).
    pub server_cert: PathBuf,
    /// The server's key (mode 0600).
    pub server_key: PathBuf,
    /// The CA's certificate (also what the server trusts for client certificates).
    pub ca_cert: PathBuf,
    /// `ca-cert.pem`, `client-cert.pem`, `client-key.pem`: a client with a certificate.
    pub client_dir: PathBuf,
    /// `ca-cert.pem` only: a client that trusts the server but has no certificate.
    pub anonymous_dir: PathBuf,
    /// `ca-cert.pem` of another CA: a client that does not trust the server.
    pub stranger_dir: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    run_ok(Command::new("openssl").current_dir(dir).args(args), Duration::from_secs(60));
}

/// `openssl req` arguments for a new unencrypted P-256 key written to `key`.
fn new_key(key: &str) -> [&str; 7] {
    ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", key]
}

fn new_key_and_request(dir: &Path, name: &str, cn: &str) {
    let key = format!("{name}-key.pem");
    let csr = format!("{name}.csr");
    let subj = format!("/CN={cn}");
    let mut args = vec!["req", "-new"];
    args.extend(new_key(&key));
    args.extend(["-out", &csr, "-subj", &subj]);
    openssl(dir, &args);
}

fn ca(dir: &Path, name: &str) {
    let key = format!("{name}-key.pem");
    let cert = format!("{name}-cert.pem");
    let mut args = vec!["req", "-x509"];
    args.extend(new_key(&key));
    args.extend(["-out", &cert, "-days", "3", "-subj", "/CN=duet test CA"]);
    args.extend(["-addext", "basicConstraints=critical,CA:TRUE"]);
    args.extend(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
    openssl(dir, &args);
}

fn sign(dir: &Path, name: &str, ext: &str) {
    let ext_file = format!("{name}.ext");
    std::fs::write(dir.join(&ext_file), ext).expect("write extensions");
    let (csr, cert) = (format!("{name}.csr"), format!("{name}-cert.pem"));
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            &cert,
            "-days",
            "3",
            "-extfile",
            &ext_file,
        ],
    );
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to)
        .unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), to.display()));
}

impl Certs {
    /// Makes the PKI under `dir`.
    pub fn new(dir: &Path) -> Self {
        let pki = dir.join("pki");
        std::fs::create_dir_all(&pki).expect("pki dir");
        ca(&pki, "ca");
        ca(&pki, "stranger");
        for (name, cn, ext) in [
            (
                "server",
                "127.0.0.1",
                "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
            ),
            (
                "client",
                "duet-test-client",
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n",
            ),
        ] {
            new_key_and_request(&pki, name, cn);
            sign(&pki, name, ext);
        }
        let server_key = pki.join("server-key.pem");
        std::fs::set_permissions(&server_key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod key");
        let dirs = ["client", "anonymous", "stranger"].map(|d| {
            let p = dir.join(format!("tls-{d}"));
            std::fs::create_dir_all(&p).expect("client dir");
            p
        });
        copy(&pki.join("ca-cert.pem"), &dirs[0].join("ca-cert.pem"));
        copy(&pki.join("client-cert.pem"), &dirs[0].join("client-cert.pem"));
        copy(&pki.join("client-key.pem"), &dirs[0].join("client-key.pem"));
        copy(&pki.join("ca-cert.pem"), &dirs[1].join("ca-cert.pem"));
        copy(&pki.join("stranger-cert.pem"), &dirs[2].join("ca-cert.pem"));
        let [client_dir, anonymous_dir, stranger_dir] = dirs;
        Certs {
            server_cert: pki.join("server-cert.pem"),
            server_key,
            ca_cert: pki.join("ca-cert.pem"),
            client_dir,
            anonymous_dir,
            stranger_dir,
        }
    }

    /// A `[resource.nbd]` section with `tls` and this PKI's server files (and the CA for
    /// client certificates when `client_ca`).
    pub fn nbd_section(&self, tls: &str, client_ca: bool) -> String {
        let mut s = format!(
            "[resource.nbd]\ntls = \"{tls}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
            self.server_cert.display(),
            self.server_key.display()
        );
        if client_ca {
            s += &format!("tls_client_ca = \"{}\"\n", self.ca_cert.display());
        }
        s
    }
}
