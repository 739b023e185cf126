//! Cluster certificates: a CA and node certificates signed by it (rcgen), and loading them back.
//!
//! A node certificate carries one DNS SAN, the node's name (`node_name(id)`), and both ServerAuth
//! and ClientAuth EKUs, because every node is a QUIC server and client at once. Private keys are
//! written with mode 0600 and never overwritten: an existing file is an error.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::state::NodeId;

/// File name of the CA certificate inside a CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the CA private key inside a CA directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// Largest certificate or key file we read (PEM); anything bigger is not ours.
pub const CERT_FILE_BYTES_MAX: u64 = 64 * 1024;

/// Why creating or loading certificates failed.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file that should exist does not.
    #[error("{0}: file not found")]
    Missing(PathBuf),
    /// A file we were asked to create exists already (we never overwrite keys or certificates).
    #[error("{0}: already exists; remove it first if you mean to replace it")]
    Exists(PathBuf),
    /// A file exists but does not hold what it should (not PEM, wrong kind, truncated, too big).
    #[error("{path}: garbled: {reason}")]
    Garbled { path: PathBuf, reason: String },
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// rcgen refused the parameters or could not sign.
    #[error("certificate generation: {0}")]
    Generate(String),
}

/// The certificate name of node `id`: the SAN its certificate carries and the server name peers
/// dial it by.
pub fn node_name(id: NodeId) -> String {
    format!("node{id}")
}

/// The node id in a certificate name made by `node_name`, if it is one.
pub fn node_id_from_name(name: &str) -> Option<NodeId> {
    let digits = name.strip_prefix("node")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || (digits.len() > 1 && digits.starts_with('0'))
    {
        return None;
    }
    digits.parse().ok()
}

/// Where a node's certificate and key live: `<dir>/<name>.pem` and `<dir>/<name>.key`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeCertPaths {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl NodeCertPaths {
    pub fn in_dir(dir: &Path, name: &str) -> Self {
        NodeCertPaths { cert: dir.join(format!("{name}.pem")), key: dir.join(format!("{name}.key")) }
    }
}

fn gen_err(e: rcgen::Error) -> CertError {
    CertError::Generate(e.to_string())
}

/// Create a new cluster CA in `dir` (created if needed): `ca.pem` and `ca.key` (0600).
pub fn create_ca(dir: &Path) -> Result<(), CertError> {
    std::fs::create_dir_all(dir).map_err(|source| CertError::Io { path: dir.to_path_buf(), source })?;
    let (cert_path, key_path) = (dir.join(CA_CERT_FILE), dir.join(CA_KEY_FILE));
    for p in [&cert_path, &key_path] {
        if p.exists() {
            return Err(CertError::Exists(p.clone()));
        }
    }
    let key = KeyPair::generate().map_err(gen_err)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    // A distinct name per CA, so a certificate from another pickbox cluster is "unknown issuer"
    // rather than a signature mismatch under the same issuer name.
    use sha2::Digest;
    let tag = hex::encode(&sha2::Sha256::digest(key.public_key_raw())[..6]);
    params.distinguished_name.push(DnType::CommonName, format!("pickbox cluster CA {tag}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let cert = params.self_signed(&key).map_err(gen_err)?;
    write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
    Ok(())
}

/// Create a certificate for node `name` signed by the CA in `ca_dir`; writes `<out_dir>/<name>.pem`
/// and `<out_dir>/<name>.key` (0600). SAN = `name`; EKU ServerAuth + ClientAuth.
pub fn create_node_cert(ca_dir: &Path, name: &str, out_dir: &Path) -> Result<NodeCertPaths, CertError> {
    let ca_pem = read_bounded(&ca_dir.join(CA_CERT_FILE))?;
    let ca_key_path = ca_dir.join(CA_KEY_FILE);
    let ca_key_pem = read_bounded(&ca_key_path)?;
    let ca_key = KeyPair::from_pem(&String::from_utf8_lossy(&ca_key_pem))
        .map_err(|e| CertError::Garbled { path: ca_key_path.clone(), reason: e.to_string() })?;
    let issuer = Issuer::from_ca_cert_pem(&String::from_utf8_lossy(&ca_pem), ca_key)
        .map_err(|e| CertError::Garbled { path: ca_dir.join(CA_CERT_FILE), reason: e.to_string() })?;

    std::fs::create_dir_all(out_dir).map_err(|source| CertError::Io { path: out_dir.to_path_buf(), source })?;
    let paths = NodeCertPaths::in_dir(out_dir, name);
    for p in [&paths.cert, &paths.key] {
        if p.exists() {
            return Err(CertError::Exists(p.clone()));
        }
    }
    let key = KeyPair::generate().map_err(gen_err)?;
    let mut params = CertificateParams::new(vec![name.to_string()]).map_err(gen_err)?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::NoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &issuer).map_err(gen_err)?;
    write_new(&paths.key, key.serialize_pem().as_bytes(), 0o600)?;
    write_new(&paths.cert, cert.pem().as_bytes(), 0o644)?;
    Ok(paths)
}

/// Write a new file with `mode` (never replacing one) and sync it.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CertError> {
    let io = |source| CertError::Io { path: path.to_path_buf(), source };
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            CertError::Exists(path.to_path_buf())
        } else {
            io(e)
        }
    })?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok(())
}

/// Read a small file; a missing file and an oversized one get their own clear errors.
fn read_bounded(path: &Path) -> Result<Vec<u8>, CertError> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => CertError::Missing(path.to_path_buf()),
        _ => CertError::Io { path: path.to_path_buf(), source: e },
    })?;
    if meta.len() > CERT_FILE_BYTES_MAX {
        return Err(CertError::Garbled {
            path: path.to_path_buf(),
            reason: format!("{} bytes, more than {CERT_FILE_BYTES_MAX}", meta.len()),
        });
    }
    std::fs::read(path).map_err(|source| CertError::Io { path: path.to_path_buf(), source })
}

/// Every certificate in a PEM file (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let pem = read_bounded(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Garbled { path: path.to_path_buf(), reason: format!("bad PEM: {e}") })?;
    if certs.is_empty() {
        return Err(CertError::Garbled { path: path.to_path_buf(), reason: "no CERTIFICATE block".into() });
    }
    for c in &certs {
        x509_parser::parse_x509_certificate(c.as_ref()).map_err(|e| CertError::Garbled {
            path: path.to_path_buf(),
            reason: format!("not an X.509 certificate: {e}"),
        })?;
    }
    Ok(certs)
}

/// The private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    let pem = read_bounded(path)?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| CertError::Garbled { path: path.to_path_buf(), reason: format!("no usable private key: {e}") })
}

/// Everything a node needs for mutual TLS.
#[derive(Debug)]
pub struct NodeIdentity {
    /// The cluster CA: peers must present a certificate it signed.
    pub ca: Vec<CertificateDer<'static>>,
    /// This node's certificate chain (leaf first).
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for NodeIdentity {
    fn clone(&self) -> Self {
        NodeIdentity { ca: self.ca.clone(), chain: self.chain.clone(), key: self.key.clone_key() }
    }
}

impl NodeIdentity {
    /// Load `<ca_dir>/ca.pem` and the node's certificate and key.
    pub fn load(ca_dir: &Path, node: &NodeCertPaths) -> Result<Self, CertError> {
        Ok(NodeIdentity {
            ca: load_certs(&ca_dir.join(CA_CERT_FILE))?,
            chain: load_certs(&node.cert)?,
            key: load_key(&node.key)?,
        })
    }
}

/// The DNS names (SANs), or failing that the common names, of a DER certificate: for logs.
pub fn cert_names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return vec!["<unparsable certificate>".into()];
    };
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push((*d).to_string());
            }
        }
    }
    if names.is_empty() {
        names.extend(cert.subject().iter_common_name().filter_map(|cn| cn.as_str().ok()).map(str::to_string));
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_round_trip() {
        assert_eq!(node_id_from_name(&node_name(17)), Some(17));
        for bad in ["node", "node01", "nodex", "n1", "node1a", "node-1"] {
            assert_eq!(node_id_from_name(bad), None, "{bad}");
        }
    }
}
