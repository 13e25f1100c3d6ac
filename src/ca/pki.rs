//! The development PKI (`payra init`) and loading the CA material at start, refusing to start
//! with a key that others can read or that does not match its certificate.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::signer::{CaSigner, KeyFileSigner, RcgenSigner};
use super::ROLE_URI_PREFIX;
use crate::error::{Error, Result};
use crate::model::Serial;

/// The file names `payra init` writes, relative to the certs directory.
#[derive(Debug, Clone)]
pub struct PkiFiles {
    pub dir: PathBuf,
}

impl PkiFiles {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        PkiFiles { dir: dir.into() }
    }
    pub fn root_cert(&self) -> PathBuf {
        self.dir.join("root.pem")
    }
    pub fn root_key(&self) -> PathBuf {
        self.dir.join("root.key")
    }
    pub fn issuing_cert(&self) -> PathBuf {
        self.dir.join("issuing.pem")
    }
    pub fn issuing_key(&self) -> PathBuf {
        self.dir.join("issuing.key")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }
    /// The SM2 hierarchy (GM/T 0015): root and issuing CA, beside the P-256 one.
    pub fn sm2_root_cert(&self) -> PathBuf {
        self.dir.join("sm2-root.pem")
    }
    pub fn sm2_root_key(&self) -> PathBuf {
        self.dir.join("sm2-root.key")
    }
    pub fn sm2_issuing_cert(&self) -> PathBuf {
        self.dir.join("sm2-issuing.pem")
    }
    pub fn sm2_issuing_key(&self) -> PathBuf {
        self.dir.join("sm2-issuing.key")
    }
    /// `operator.pem` / `service.pem` and their keys.
    pub fn client_cert(&self, role: &str) -> PathBuf {
        self.dir.join(format!("{role}.pem"))
    }
    pub fn client_key(&self, role: &str) -> PathBuf {
        self.dir.join(format!("{role}.key"))
    }

    /// Every file `payra init` writes.
    pub fn all(&self) -> Vec<PathBuf> {
        vec![
            self.root_cert(),
            self.root_key(),
            self.issuing_cert(),
            self.issuing_key(),
            self.server_cert(),
            self.server_key(),
            self.client_cert("operator"),
            self.client_key("operator"),
            self.client_cert("service"),
            self.client_key("service"),
            self.sm2_root_cert(),
            self.sm2_root_key(),
            self.sm2_issuing_cert(),
            self.sm2_issuing_key(),
        ]
    }
}

fn now_utc() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

fn random_serial() -> SerialNumber {
    SerialNumber::from_slice(Serial::random().as_bytes())
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "payra");
    dn.push(DnType::CommonName, common_name);
    dn
}

fn new_key() -> Result<KeyPair> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| Error::internal(format!("key generation: {e}")))
}

fn rcgen_err(e: rcgen::Error) -> Error {
    Error::internal(format!("certificate generation: {e}"))
}

/// Writes `contents` to `path` with mode 0600 (keys) or 0644 (certificates).
fn write_file(path: &Path, contents: &str, secret: bool) -> Result<()> {
    let mode = if secret { 0o600 } else { 0o644 };
    let _ = fs::remove_file(path);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| Error::internal(format!("{}: {e}", path.display())))?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()?;
    Ok(())
}

/// Params for a client certificate of `role`, issued by the issuing CA.
fn client_params(role: &str, not_before: OffsetDateTime) -> Result<CertificateParams> {
    let mut params = CertificateParams::default();
    params.distinguished_name = name(&format!("payra {role}"));
    params.serial_number = Some(random_serial());
    params.not_before = not_before;
    params.not_after = not_before + Duration::days(365 * 2);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.subject_alt_names = vec![SanType::URI(
        format!("{ROLE_URI_PREFIX}{role}")
            .try_into()
            .map_err(rcgen_err)?,
    )];
    Ok(params)
}

/// Writes a development PKI into `dir`: root CA (10 years), issuing CA (pathLen 0, 5 years),
/// a localhost TLS server certificate and `operator` / `service` client certificates. Keys are
/// PKCS#8 PEM with mode 0600. Refuses to overwrite an existing PKI unless `force`.
pub fn init_dev_pki(dir: &Path, force: bool) -> Result<()> {
    let issuing_key = new_key()?;
    let issuing_pem = issuing_key.serialize_pem();
    init_pki(dir, force, &issuing_key, Some(&issuing_pem), true)
}

/// [`init_dev_pki`] with the issuing key in `signer` (a PKCS#11 token): writes no
/// `issuing.key` (and removes one a previous PKI left), the rest as a development PKI.
pub fn init_pki_with_issuing_signer(
    dir: &Path,
    force: bool,
    signer: Arc<dyn CaSigner>,
) -> Result<()> {
    // No SM2 hierarchy: its issuing key would be a file beside a P-256 key kept in a token
    // so that no CA key lives on disk (`payra ca init-sm2` adds one, knowingly).
    init_pki(dir, force, &SharedSigner(signer), None, false)?;
    match fs::remove_file(PkiFiles::new(dir).issuing_key()) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
        _ => Ok(()),
    }
}

/// Refuses to write a PKI into `dir` if one is there, unless `force`.
pub fn refuse_existing_pki(dir: &Path, force: bool) -> Result<()> {
    if force {
        return Ok(());
    }
    match PkiFiles::new(dir).all().into_iter().find(|p| p.exists()) {
        Some(existing) => Err(Error::AlreadyExists(format!(
            "{} exists; refusing to overwrite a PKI (use --force to replace it)",
            existing.display()
        ))),
        None => Ok(()),
    }
}

fn init_pki<K: rcgen::SigningKey>(
    dir: &Path,
    force: bool,
    issuing_key: &K,
    issuing_pem: Option<&str>,
    with_sm2: bool,
) -> Result<()> {
    let files = PkiFiles::new(dir);
    refuse_existing_pki(dir, force)?;
    fs::create_dir_all(dir)?;
    let not_before = now_utc() - Duration::hours(1);

    let root_key = new_key()?;
    let mut root_params = CertificateParams::default();
    root_params.distinguished_name = name("payra development root CA");
    root_params.serial_number = Some(random_serial());
    root_params.not_before = not_before;
    root_params.not_after = not_before + Duration::days(3653);
    root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root_cert = root_params.self_signed(&root_key).map_err(rcgen_err)?;
    let root_issuer = Issuer::new(root_params, &root_key);

    let mut issuing_params = CertificateParams::default();
    issuing_params.distinguished_name = name("payra development issuing CA");
    issuing_params.serial_number = Some(random_serial());
    issuing_params.not_before = not_before;
    issuing_params.not_after = not_before + Duration::days(1827);
    issuing_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    issuing_params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
    ];
    issuing_params.use_authority_key_identifier_extension = true;
    let issuing_cert = issuing_params
        .signed_by(issuing_key, &root_issuer)
        .map_err(rcgen_err)?;
    let issuing_issuer = Issuer::new(issuing_params, issuing_key);

    let server_key = new_key()?;
    let mut server_params = CertificateParams::new(vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ])
    .map_err(rcgen_err)?;
    server_params.distinguished_name = name("localhost");
    server_params.serial_number = Some(random_serial());
    server_params.not_before = not_before;
    server_params.not_after = not_before + Duration::days(365 * 2);
    server_params.is_ca = IsCa::ExplicitNoCa;
    server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server_params.use_authority_key_identifier_extension = true;
    let server_cert = server_params
        .signed_by(&server_key, &issuing_issuer)
        .map_err(rcgen_err)?;

    // Everything is signed before anything is written: a signer that fails half-way (an
    // HSM) leaves the directory as it was.
    let mut writes = vec![
        (files.root_cert(), root_cert.pem(), false),
        (files.root_key(), root_key.serialize_pem(), true),
        (files.issuing_cert(), issuing_cert.pem(), false),
        (files.server_cert(), server_cert.pem(), false),
        (files.server_key(), server_key.serialize_pem(), true),
    ];
    if let Some(pem) = issuing_pem {
        writes.push((files.issuing_key(), pem.to_string(), true));
    }
    if with_sm2 {
        writes.extend(sm2_hierarchy(&files, not_before)?);
    }
    for role in ["operator", "service"] {
        let key = new_key()?;
        let cert = client_params(role, not_before)?
            .signed_by(&key, &issuing_issuer)
            .map_err(rcgen_err)?;
        writes.push((files.client_cert(role), cert.pem(), false));
        writes.push((files.client_key(role), key.serialize_pem(), true));
    }
    for (path, contents, secret) in writes {
        write_file(&path, &contents, secret)?;
    }
    Ok(())
}

/// The SM2 root (10 years) and issuing CA (pathLen 0, 5 years), signed SM2-with-SM3, as
/// files to write: `sm2-root.pem/.key`, `sm2-issuing.pem/.key`.
fn sm2_hierarchy(
    files: &PkiFiles,
    not_before: OffsetDateTime,
) -> Result<Vec<(PathBuf, String, bool)>> {
    use super::sm2::{self, CertificateSpec, Sm2Issuer, Sm2KeyFileSigner};
    use x509_cert::ext::pkix::KeyUsages;
    let start_s = not_before.unix_timestamp();
    let (root_signer, root_pem) = Sm2KeyFileSigner::generate()?;
    let (issuing_signer, issuing_pem) = Sm2KeyFileSigner::generate()?;
    let root_point: [u8; 65] = root_signer
        .public_key_sec1()
        .try_into()
        .map_err(|_| Error::internal("SM2 root key"))?;
    let issuing_point: [u8; 65] = issuing_signer
        .public_key_sec1()
        .try_into()
        .map_err(|_| Error::internal("SM2 issuing key"))?;
    let root_name = sm2::name("CN=payra development SM2 root CA,O=payra,C=CN")?;
    let root = Sm2Issuer {
        name: root_name.clone(),
        key_id: sm2::key_id(&root_point),
        signer: Arc::new(root_signer),
    };
    let root_der = root.sign_certificate(&CertificateSpec {
        serial: Serial::random().as_bytes(),
        subject: root_name,
        not_before_s: start_s,
        not_after_s: start_s + 3653 * 86_400,
        subject_key: &root_point,
        ca_path_len: Some(None),
        key_usage: &[KeyUsages::KeyCertSign, KeyUsages::CRLSign],
        client_auth: false,
        uris: &[],
        crl_url: None,
        ocsp_url: None,
    })?;
    let issuing_der = root.sign_certificate(&CertificateSpec {
        serial: Serial::random().as_bytes(),
        subject: sm2::name("CN=payra development SM2 issuing CA,O=payra,C=CN")?,
        not_before_s: start_s,
        not_after_s: start_s + 1827 * 86_400,
        subject_key: &issuing_point,
        ca_path_len: Some(Some(0)),
        key_usage: &[
            KeyUsages::DigitalSignature,
            KeyUsages::KeyCertSign,
            KeyUsages::CRLSign,
        ],
        client_auth: false,
        uris: &[],
        crl_url: None,
        ocsp_url: None,
    })?;
    let pem = |der: Vec<u8>| pem::encode(&pem::Pem::new("CERTIFICATE", der));
    Ok(vec![
        (files.sm2_root_cert(), pem(root_der), false),
        (files.sm2_root_key(), root_pem, true),
        (files.sm2_issuing_cert(), pem(issuing_der), false),
        (files.sm2_issuing_key(), issuing_pem, true),
    ])
}

/// Writes an SM2 hierarchy into an existing PKI's `dir` (one made before payra had SM2),
/// refusing to replace one that is there.
pub fn init_sm2_hierarchy(dir: &Path) -> Result<()> {
    let files = PkiFiles::new(dir);
    let ours = [
        files.sm2_root_cert(),
        files.sm2_root_key(),
        files.sm2_issuing_cert(),
        files.sm2_issuing_key(),
    ];
    if let Some(existing) = ours.iter().find(|p| p.exists()) {
        return Err(Error::AlreadyExists(format!(
            "{} exists; refusing to overwrite the SM2 hierarchy",
            existing.display()
        )));
    }
    let not_before = now_utc() - Duration::hours(1);
    for (path, contents, secret) in sm2_hierarchy(&files, not_before)? {
        write_file(&path, &contents, secret)?;
    }
    Ok(())
}

/// Reads a private key file, refusing one that group or others may read.
pub fn read_private_key(path: &Path) -> Result<String> {
    let meta = fs::metadata(path)
        .map_err(|e| Error::FailedPrecondition(format!("{}: {e}", path.display())))?;
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(Error::FailedPrecondition(format!(
            "{} has mode {:o}; a private key must not be readable by group or others (chmod 600)",
            path.display(),
            mode & 0o777
        )));
    }
    fs::read_to_string(path)
        .map_err(|e| Error::FailedPrecondition(format!("{}: {e}", path.display())))
}

/// Reads the first certificate of a PEM file.
pub fn read_certificate_der(path: &Path) -> Result<Vec<u8>> {
    let text = fs::read_to_string(path)
        .map_err(|e| Error::FailedPrecondition(format!("{}: {e}", path.display())))?;
    let block = pem::parse(&text).map_err(|e| {
        Error::FailedPrecondition(format!("{}: not a PEM certificate: {e}", path.display()))
    })?;
    if block.tag() != "CERTIFICATE" {
        return Err(Error::FailedPrecondition(format!(
            "{}: expected a CERTIFICATE block, found {}",
            path.display(),
            block.tag()
        )));
    }
    Ok(block.into_contents())
}

/// The uncompressed SEC1 public key of a certificate.
/// The notAfter (Unix seconds) of a DER certificate, if it parses.
pub fn not_after_s(der: &[u8]) -> Option<i64> {
    X509Certificate::from_der(der)
        .ok()
        .map(|(_, cert)| cert.validity().not_after.timestamp())
}

/// The public key (SEC1 point) of a DER certificate.
pub fn certificate_public_key_sec1(der: &[u8]) -> Result<Vec<u8>> {
    certificate_public_key(der, Path::new("certificate"))
}

fn certificate_public_key(der: &[u8], what: &Path) -> Result<Vec<u8>> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| {
        Error::FailedPrecondition(format!("{}: not an X.509 certificate: {e}", what.display()))
    })?;
    Ok(cert.public_key().subject_public_key.data.to_vec())
}

/// The subjectKeyIdentifier of a CA certificate; CRLs and issued certificates must point
/// to it.
fn subject_key_id(der: &[u8], what: &Path) -> Result<Vec<u8>> {
    use x509_parser::extensions::ParsedExtension;
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| {
        Error::FailedPrecondition(format!("{}: not an X.509 certificate: {e}", what.display()))
    })?;
    cert.extensions()
        .iter()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
            _ => None,
        })
        .ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "{}: a CA certificate needs a subjectKeyIdentifier",
                what.display()
            ))
        })
}

/// Refuses an issuing CA certificate that is not a CA, or that may not sign certificates and
/// CRLs (relying parties would reject what payra signs with it).
fn check_issuing_ca(der: &[u8], what: &Path) -> Result<()> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| {
        Error::FailedPrecondition(format!("{}: not an X.509 certificate: {e}", what.display()))
    })?;
    let is_ca = matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca);
    let usage = cert.key_usage().ok().flatten().map(|ku| ku.value);
    let signs = usage.is_some_and(|ku| ku.key_cert_sign() && ku.crl_sign());
    if !is_ca || !signs {
        return Err(Error::FailedPrecondition(format!(
            "{} must be a CA certificate (basicConstraints CA:true) with keyCertSign and \
             cRLSign; refusing to start",
            what.display()
        )));
    }
    Ok(())
}

/// Owns the issuing CA's signer in a form rcgen can borrow for every issuance.
#[derive(Clone)]
pub struct SharedSigner(pub Arc<dyn CaSigner>);

impl rcgen::PublicKeyData for SharedSigner {
    fn der_bytes(&self) -> &[u8] {
        self.0.public_key_sec1()
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &PKCS_ECDSA_P256_SHA256
    }
}

impl rcgen::SigningKey for SharedSigner {
    fn sign(&self, message: &[u8]) -> std::result::Result<Vec<u8>, rcgen::Error> {
        rcgen::SigningKey::sign(&RcgenSigner(self.0.as_ref()), message)
    }
}

/// The CA material the server runs with: issuing CA certificate and signer, the root, and the
/// TLS server identity.
pub struct CaMaterial {
    pub root_der: Vec<u8>,
    pub issuing_der: Vec<u8>,
    /// The issuing certificate's subjectKeyIdentifier, for the CRL's AKI.
    pub issuing_key_id: Vec<u8>,
    /// The issuing certificate's notAfter, in Unix seconds.
    pub issuing_not_after_s: i64,
    pub issuer: Issuer<'static, SharedSigner>,
    pub signer: Arc<dyn CaSigner>,
    /// `server.pem` followed by `issuing.pem`, for the TLS handshake.
    pub server_chain_pem: String,
    pub server_key_pem: String,
    /// The SM2 hierarchy, when the certs directory has one.
    pub sm2: Option<Sm2Material>,
}

/// The SM2 issuing CA the server runs with (`sm2-issuing.pem` and `sm2-issuing.key`).
pub struct Sm2Material {
    pub root_der: Vec<u8>,
    pub issuing_der: Vec<u8>,
    /// The issuing certificate's notAfter, in Unix seconds.
    pub issuing_not_after_s: i64,
    pub issuer: super::sm2::Sm2Issuer,
}

impl Sm2Material {
    /// Loads the SM2 hierarchy from `dir` if `sm2-issuing.pem` is there, refusing a key that
    /// others can read, that does not match the certificate or does not sign for it.
    pub fn load(dir: &Path, passphrase: Option<&str>) -> Result<Option<Sm2Material>> {
        let files = PkiFiles::new(dir);
        if !files.sm2_issuing_cert().exists() {
            return Ok(None);
        }
        let key_path = files.sm2_issuing_key();
        let pkcs8 = super::signer::pkcs8_from_pem(
            &read_private_key(&key_path)?,
            passphrase,
            "SM2 issuing key",
        )?;
        let signer: Arc<dyn CaSigner> =
            Arc::new(super::sm2::Sm2KeyFileSigner::from_pkcs8_der(&pkcs8)?);
        let issuing_der = read_certificate_der(&files.sm2_issuing_cert())?;
        check_issuing_ca(&issuing_der, &files.sm2_issuing_cert())?;
        let issuer = super::sm2::Sm2Issuer::from_certificate(&issuing_der, signer.clone())
            .map_err(|e| {
                Error::FailedPrecondition(format!("{}: {e}; refusing to start", key_path.display()))
            })?;
        check_signer(signer.as_ref()).map_err(|why| {
            Error::FailedPrecondition(format!(
                "{} does not sign for its certificate's key: {why}; refusing to start",
                key_path.display()
            ))
        })?;
        let issuing_not_after_s = not_after_s(&issuing_der).ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "{}: not an X.509 certificate",
                files.sm2_issuing_cert().display()
            ))
        })?;
        Ok(Some(Sm2Material {
            root_der: read_certificate_der(&files.sm2_root_cert())?,
            issuing_der,
            issuing_not_after_s,
            issuer,
        }))
    }
}

/// Signs a test message with `signer` and verifies the signature with its public key (what
/// `payra ca check` and every start do).
pub fn check_signer(signer: &dyn CaSigner) -> Result<()> {
    use p256::ecdsa::signature::Verifier;
    let message = format!(
        "payra signer check {}",
        hex::encode(rand::random::<[u8; 16]>())
    );
    let der = signer.sign(message.as_bytes())?;
    if signer.algorithm() == crate::model::KeyAlgorithm::Sm2 {
        return match super::sm2::verify_der(signer.public_key_sec1(), message.as_bytes(), &der) {
            true => Ok(()),
            false => Err(Error::FailedPrecondition(
                "a test signature does not verify with the signer's public key".into(),
            )),
        };
    }
    let signature = p256::ecdsa::Signature::from_der(&der)
        .map_err(|e| Error::internal(format!("the signer's signature is not DER: {e}")))?;
    let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(signer.public_key_sec1())
        .map_err(|e| Error::internal(format!("the signer's public key: {e}")))?;
    key.verify(message.as_bytes(), &signature).map_err(|_| {
        Error::FailedPrecondition(
            "a test signature does not verify with the signer's public key".into(),
        )
    })
}

impl CaMaterial {
    /// Loads the PKI from `dir`, refusing keys readable by others and an issuing key that does
    /// not match the issuing certificate. `passphrase` decrypts an encrypted issuing key.
    pub fn load(dir: &Path, passphrase: Option<&str>) -> Result<CaMaterial> {
        let files = PkiFiles::new(dir);
        let signer: Arc<dyn CaSigner> = Arc::new(KeyFileSigner::from_pem(
            &read_private_key(&files.issuing_key())?,
            passphrase,
        )?);
        let mut material =
            CaMaterial::load_with_signer(dir, signer, &files.issuing_key().display().to_string())?;
        material.sm2 = Sm2Material::load(dir, passphrase)?;
        Ok(material)
    }

    /// Loads the certificates from `dir` with the issuing key `signer` (named `key_name` in
    /// messages), refusing a key that does not match the issuing certificate: its public key
    /// must be the certificate's, and a test signature must verify with it (a token whose
    /// public object does not belong to its private key fails here, not at the first
    /// enrollment).
    pub fn load_with_signer(
        dir: &Path,
        signer: Arc<dyn CaSigner>,
        key_name: &str,
    ) -> Result<CaMaterial> {
        let files = PkiFiles::new(dir);
        let root_der = read_certificate_der(&files.root_cert())?;
        let issuing_der = read_certificate_der(&files.issuing_cert())?;
        let cert_key = certificate_public_key(&issuing_der, &files.issuing_cert())?;
        if cert_key != signer.public_key_sec1() {
            return Err(Error::FailedPrecondition(format!(
                "{key_name} does not match the public key of {}; refusing to start",
                files.issuing_cert().display()
            )));
        }
        check_signer(signer.as_ref()).map_err(|why| {
            Error::FailedPrecondition(format!(
                "{key_name} does not sign for the public key of {}: {why}; refusing to start",
                files.issuing_cert().display()
            ))
        })?;
        let issuer = Issuer::from_ca_cert_der(
            &CertificateDer::from(issuing_der.clone()),
            SharedSigner(signer.clone()),
        )
        .map_err(|e| Error::FailedPrecondition(format!("issuing CA certificate: {e}")))?;
        let issuing_key_id = subject_key_id(&issuing_der, &files.issuing_cert())?;
        let issuing_not_after_s = X509Certificate::from_der(&issuing_der)
            .map_err(|e| {
                Error::FailedPrecondition(format!("{}: {e}", files.issuing_cert().display()))
            })?
            .1
            .validity()
            .not_after
            .timestamp();
        let server_key_pem = read_private_key(&files.server_key())?;
        let server_pem = fs::read_to_string(files.server_cert())?;
        let issuing_pem = fs::read_to_string(files.issuing_cert())?;
        Ok(CaMaterial {
            root_der,
            issuing_der,
            issuing_key_id,
            issuing_not_after_s,
            issuer,
            signer,
            server_chain_pem: format!("{}\n{}", server_pem.trim_end(), issuing_pem),
            server_key_pem,
            sm2: None,
        })
    }
}

/// The rustls client configuration that trusts the certificate authorities in the PEM file
/// `ca_file` (named `field` in errors).
pub fn tls_client_config(field: &str, ca_file: &std::path::Path) -> Result<rustls::ClientConfig> {
    let text = std::fs::read_to_string(ca_file)
        .map_err(|e| Error::FailedPrecondition(format!("{field} {}: {e}", ca_file.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    let mut found = 0;
    for block in pem::parse_many(&text)
        .map_err(|e| Error::FailedPrecondition(format!("{field} {}: {e}", ca_file.display())))?
    {
        if block.tag() == "CERTIFICATE" {
            roots
                .add(rustls_pki_types::CertificateDer::from(
                    block.into_contents(),
                ))
                .map_err(|e| {
                    Error::FailedPrecondition(format!(
                        "{field} {}: a certificate is not usable as a trust anchor: {e}",
                        ca_file.display()
                    ))
                })?;
            found += 1;
        }
    }
    if found == 0 {
        return Err(Error::FailedPrecondition(format!(
            "{field} {} holds no PEM certificate",
            ca_file.display()
        )));
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::internal(format!("TLS for {field}: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ok_init_then_load() {
        let dir = tempfile::tempdir().unwrap();
        init_dev_pki(dir.path(), false).unwrap();
        let files = PkiFiles::new(dir.path());
        for path in files.all() {
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            if path.extension().is_some_and(|e| e == "key") {
                assert_eq!(mode, 0o600, "{}", path.display());
            }
        }
        CaMaterial::load(dir.path(), None).unwrap();
    }

    #[test]
    fn fail_init_refuses_overwrite_without_force() {
        let dir = tempfile::tempdir().unwrap();
        init_dev_pki(dir.path(), false).unwrap();
        let before = fs::read(dir.path().join("root.pem")).unwrap();
        let err = init_dev_pki(dir.path(), false).unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
        assert_eq!(before, fs::read(dir.path().join("root.pem")).unwrap());
        init_dev_pki(dir.path(), true).unwrap();
        assert_ne!(before, fs::read(dir.path().join("root.pem")).unwrap());
    }

    #[test]
    fn ok_encrypted_issuing_key_needs_its_passphrase() {
        use pkcs8::der::Decode;
        let dir = tempfile::tempdir().unwrap();
        init_dev_pki(dir.path(), false).unwrap();
        let key_path = dir.path().join("issuing.key");
        let (_, plain) =
            pkcs8::SecretDocument::from_pem(&fs::read_to_string(&key_path).unwrap()).unwrap();
        // PBKDF2-SHA256 + AES-256-CBC, as `openssl pkcs8 -topk8 -v2 aes-256-cbc` writes; with
        // OpenSSL's default of 2048 iterations the key is refused as too weak.
        let encrypt = |iterations: u32| {
            let params = pkcs8::pkcs5::pbes2::Parameters::pbkdf2_sha256_aes256cbc(
                iterations, &[7; 16], &[9; 16],
            )
            .unwrap();
            let encrypted = pkcs8::PrivateKeyInfo::from_der(plain.as_bytes())
                .unwrap()
                .encrypt_with_params(params, "correct horse")
                .unwrap();
            let pem = encrypted
                .to_pem("ENCRYPTED PRIVATE KEY", pkcs8::LineEnding::LF)
                .unwrap();
            write_file(&key_path, &pem, true).unwrap();
        };
        encrypt(2048);
        let err = CaMaterial::load(dir.path(), Some("correct horse"))
            .err()
            .unwrap();
        assert!(err.to_string().contains("too weak"), "{err}");
        assert!(err.to_string().contains("2048 PBKDF2 iterations"), "{err}");
        encrypt(crate::ca::signer::MIN_PBKDF2_ITERATIONS);
        let err = CaMaterial::load(dir.path(), None).err().unwrap();
        assert!(err.to_string().contains("PAYRA_CA_KEY_PASSPHRASE"), "{err}");
        let err = CaMaterial::load(dir.path(), Some("wrong")).err().unwrap();
        assert!(err.to_string().contains("wrong passphrase"), "{err}");
        CaMaterial::load(dir.path(), Some("correct horse")).expect("decrypts");
    }

    #[test]
    fn ok_init_writes_an_sm2_hierarchy_that_loads_and_refuses_a_non_ca() {
        let dir = tempfile::tempdir().unwrap();
        init_dev_pki(dir.path(), false).unwrap();
        let sm2 = Sm2Material::load(dir.path(), None)
            .unwrap()
            .expect("an SM2 hierarchy");
        assert_eq!(
            sm2.issuer.signer.algorithm(),
            crate::model::KeyAlgorithm::Sm2
        );
        assert!(CaMaterial::load(dir.path(), None).unwrap().sm2.is_some());
        // init-sm2 refuses to replace it.
        let err = init_sm2_hierarchy(dir.path()).unwrap_err();
        assert!(err.to_string().contains("refusing to overwrite"), "{err}");
        // An end-entity certificate as the SM2 issuing CA: refused at start.
        fs::copy(
            dir.path().join("server.pem"),
            dir.path().join("sm2-issuing.pem"),
        )
        .unwrap();
        let err = Sm2Material::load(dir.path(), None).err().unwrap();
        assert!(
            err.to_string().contains("must be a CA certificate"),
            "{err}"
        );
        // Without the files, no SM2 hierarchy, and no error.
        for file in [
            "sm2-issuing.pem",
            "sm2-issuing.key",
            "sm2-root.pem",
            "sm2-root.key",
        ] {
            fs::remove_file(dir.path().join(file)).unwrap();
        }
        assert!(Sm2Material::load(dir.path(), None).unwrap().is_none());
        init_sm2_hierarchy(dir.path()).unwrap();
        assert!(Sm2Material::load(dir.path(), None).unwrap().is_some());
    }

    #[test]
    fn fail_load_key_readable_by_others() {
        let dir = tempfile::tempdir().unwrap();
        init_dev_pki(dir.path(), false).unwrap();
        let key = dir.path().join("issuing.key");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let err = CaMaterial::load(dir.path(), None).err().unwrap();
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn fail_load_key_not_matching_certificate() {
        let dir = tempfile::tempdir().unwrap();
        init_dev_pki(dir.path(), false).unwrap();
        fs::copy(
            dir.path().join("server.key"),
            dir.path().join("issuing.key"),
        )
        .unwrap();
        let err = CaMaterial::load(dir.path(), None).err().unwrap();
        assert!(err.to_string().contains("does not match"), "{err}");
    }
}
