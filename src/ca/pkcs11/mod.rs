//! The issuing key in a PKCS#11 token (an HSM; SoftHSM2 in tests): a [`CaSigner`] whose
//! private key never leaves the token.
//!
//! - **Where the key is**: the module (the vendor's library), the token (label or serial,
//!   never a slot number: slots are renumbered when tokens change) and the key (label, id, or
//!   both), from `[pkcs11]` in the configuration or an RFC 7512 `pkcs11:` URI. The user PIN
//!   comes from a file (mode 0600) or the environment, never from the configuration itself
//!   or the command line.
//! - **How it signs**: SHA-256 in software, then `CKM_ECDSA` over the digest (SoftHSM2 and
//!   several network HSMs do not offer `CKM_ECDSA_SHA256`); the token answers r‖s, which is
//!   turned into the DER signature X.509 wants.
//! - **Sessions**: a pool of up to `sessions` sessions (a PKCS#11 session serves one
//!   operation at a time). A signature runs on the calling thread, handed off the async
//!   executor's worker first (`block_in_place`), since a network HSM takes milliseconds.
//! - **Faults**: an error that means the session, the login or the token is gone drops every
//!   pooled session and tries once more on a new one (logged in again, the key found again);
//!   if that fails too, the signature fails `UNAVAILABLE` and the next one starts over. Other
//!   errors are `INTERNAL`. The last failure is kept for `/readyz`.

use crate::sync::Unpoisoned;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use sha2::Digest;

mod uri;

use super::signer::CaSigner;
use crate::config::Pkcs11Config;
use crate::error::{Error, Result};
use uri::{parse_uri, UriParts};

/// DER of the P-256 curve's OID (prime256v1), as CKA_EC_PARAMS holds it.
const P256_PARAMS: [u8; 10] = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// How long a signature waits for a pooled session when all are busy.
const SESSION_WAIT: Duration = Duration::from_secs(5);

/// Which token a key is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenRef {
    Label(String),
    Serial(String),
}

impl std::fmt::Display for TokenRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenRef::Label(label) => write!(f, "PKCS#11 token labelled {label:?}"),
            TokenRef::Serial(serial) => write!(f, "PKCS#11 token with serial {serial:?}"),
        }
    }
}

/// Where the issuing key is: module, token, key, and where its PIN comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyLocation {
    pub module: PathBuf,
    pub token: TokenRef,
    pub key_label: Option<String>,
    pub key_id: Option<Vec<u8>>,
    /// A file holding the user PIN (mode 0600); else the environment variable `pin_env`.
    pub pin_file: Option<PathBuf>,
    pub pin_env: String,
    pub sessions: usize,
}

impl KeyLocation {
    /// The key's location from `[pkcs11]`: the URI's attributes, and the fields beside it
    /// (a field and a URI attribute that say different things are refused).
    pub fn from_config(config: &Pkcs11Config) -> Result<KeyLocation> {
        let invalid = |why: String| Error::invalid("pkcs11", why);
        let uri = match &config.uri {
            Some(uri) => parse_uri(uri)?,
            None => UriParts::default(),
        };
        fn merge<T: PartialEq + std::fmt::Debug + Clone>(
            name: &str,
            field: &Option<T>,
            from_uri: &Option<T>,
        ) -> Result<Option<T>> {
            match (field, from_uri) {
                (Some(a), Some(b)) if a != b => Err(Error::invalid(
                    "pkcs11",
                    format!("{name} is {a:?} in the configuration but {b:?} in the URI"),
                )),
                (Some(a), _) => Ok(Some(a.clone())),
                (None, b) => Ok(b.clone()),
            }
        }
        let module = merge("module", &config.module, &uri.module)?.ok_or_else(|| {
            invalid("name the PKCS#11 module (module, or module-path in the URI)".into())
        })?;
        let key_id = match &config.key_id {
            Some(hex_id) => Some(
                hex::decode(hex_id.trim())
                    .map_err(|_| invalid(format!("key_id {hex_id:?} is not hex")))?,
            ),
            None => None,
        };
        let label = merge("token_label", &config.token_label, &uri.token)?;
        let serial = merge("token_serial", &config.token_serial, &uri.serial)?;
        let token = match (label, serial) {
            (Some(label), None) => TokenRef::Label(label),
            (None, Some(serial)) => TokenRef::Serial(serial),
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "name the token by its label or its serial, not both".into(),
                ))
            }
            (None, None) => {
                return Err(invalid(
                    "name the token (token_label or token_serial, or token= in the URI)".into(),
                ))
            }
        };
        let key_label = merge("key_label", &config.key_label, &uri.object)?;
        let key_id = merge("key_id", &key_id, &uri.id)?;
        if key_label.is_none() && key_id.is_none() {
            return Err(invalid(
                "name the key (key_label or key_id, or object=/id= in the URI)".into(),
            ));
        }
        let pin_file = merge("pin_file", &config.pin_file, &uri.pin_file)?;
        if !(1..=64).contains(&config.sessions) {
            return Err(invalid("sessions must be 1 to 64".into()));
        }
        Ok(KeyLocation {
            module,
            token,
            key_label,
            key_id,
            pin_file,
            pin_env: config.pin_env.clone(),
            sessions: config.sessions,
        })
    }

    /// The user PIN: from the file (which must not be readable by group or others), else
    /// from the environment variable, which is then removed from this process's environment.
    pub fn read_pin(&self) -> Result<AuthPin> {
        if let Some(path) = &self.pin_file {
            let text = super::pki::read_private_key(path)?;
            return Ok(AuthPin::from(
                text.trim_end_matches(['\r', '\n']).to_string(),
            ));
        }
        match crate::secrets::env_secret(&self.pin_env) {
            Some(pin) if !pin.is_empty() => Ok(AuthPin::from(pin)),
            _ => Err(Error::FailedPrecondition(format!(
                "no PIN for the PKCS#11 token: set pkcs11.pin_file (mode 0600) or ${}",
                self.pin_env
            ))),
        }
    }

    /// The attributes that find the key's objects of `class`.
    fn template(&self, class: ObjectClass) -> Vec<Attribute> {
        let mut template = vec![Attribute::Class(class), Attribute::KeyType(KeyType::EC)];
        if let Some(label) = &self.key_label {
            template.push(Attribute::Label(label.as_bytes().to_vec()));
        }
        if let Some(id) = &self.key_id {
            template.push(Attribute::Id(id.clone()));
        }
        template
    }

    /// How the key is named, for messages.
    fn key_name(&self) -> String {
        match (&self.key_label, &self.key_id) {
            (Some(label), Some(id)) => format!("key {label:?} (id {})", hex::encode(id)),
            (Some(label), None) => format!("key {label:?}"),
            (None, Some(id)) => format!("key with id {}", hex::encode(id)),
            (None, None) => "key".into(),
        }
    }
}

/// Whether `error` means the session, its login, the key's handle or the token is gone (a
/// new session may succeed), rather than a refusal of this request.
fn connection_lost(error: &P11Error) -> bool {
    matches!(
        error,
        P11Error::Pkcs11(
            RvError::DeviceRemoved
                | RvError::DeviceError
                | RvError::TokenNotPresent
                | RvError::TokenNotRecognized
                | RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::SessionCount
                | RvError::CryptokiNotInitialized
                | RvError::UserNotLoggedIn
                | RvError::KeyHandleInvalid
                | RvError::ObjectHandleInvalid
                | RvError::SlotIdInvalid
                | RvError::GeneralError,
            _
        )
    )
}

/// The SEC1 point in a CKA_EC_POINT value: a DER OCTET STRING around it (what the standard
/// says and SoftHSM2 gives), or the bare point (what some tokens give).
fn sec1_from_ec_point(value: &[u8]) -> Option<Vec<u8>> {
    use der::Decode;
    // By length first: a bare point can happen to parse as DER.
    let point = if value.len() == 65 {
        value.to_vec()
    } else {
        der::asn1::OctetString::from_der(value).ok()?.into_bytes()
    };
    (point.len() == 65 && point[0] == 0x04).then_some(point)
}

/// Sessions not in use, how many are open, and the key's handle in them.
#[derive(Default)]
struct Pool {
    idle: Vec<Session>,
    open: usize,
    key: Option<ObjectHandle>,
    /// Counts the times the pool started over after a lost session.
    generation: u64,
}

/// See the module documentation.
pub struct Pkcs11Signer {
    p11: Pkcs11,
    location: KeyLocation,
    pin: AuthPin,
    public_key: Vec<u8>,
    pool: Mutex<Pool>,
    freed: Condvar,
    /// The last signing failure, cleared by the next success (for `/readyz` and the logs).
    last_failure: Mutex<Option<String>>,
    /// Sessions found lost (and dropped, with the idle ones) since the signer opened.
    lost_sessions: std::sync::atomic::AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unpoisoned()
}

/// Loads and initialises the module once per process, and keeps it: a PKCS#11 library is
/// meant to be initialised once per application, and unloading one without finalising it
/// (or while another thread initialises it again) crashes some (SoftHSM2 among them).
fn load_module(module: &Path) -> Result<Pkcs11> {
    static MODULES: Mutex<Vec<(PathBuf, Pkcs11)>> = Mutex::new(Vec::new());
    let mut modules = lock(&MODULES);
    if let Some((_, p11)) = modules.iter().find(|(path, _)| path == module) {
        return Ok(p11.clone());
    }
    let p11 = Pkcs11::new(module).map_err(|e| {
        Error::FailedPrecondition(format!(
            "cannot load the PKCS#11 module {}: {e}",
            module.display()
        ))
    })?;
    match p11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(P11Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(Error::FailedPrecondition(format!(
                "the PKCS#11 module {} did not initialise: {e}",
                module.display()
            )))
        }
    }
    modules.push((module.to_path_buf(), p11.clone()));
    Ok(p11)
}

/// The slot holding the token `location` names.
fn find_slot(p11: &Pkcs11, location: &KeyLocation) -> Result<Slot> {
    let slots = p11
        .get_slots_with_token()
        .map_err(|e| Error::Unavailable(format!("listing PKCS#11 tokens: {e}")))?;
    let mut present = Vec::new();
    for slot in slots {
        let Ok(info) = p11.get_token_info(slot) else {
            continue;
        };
        let matches = match &location.token {
            TokenRef::Label(label) => info.label() == label,
            TokenRef::Serial(serial) => info.serial_number() == serial,
        };
        if matches {
            return Ok(slot);
        }
        if !info.token_initialized() {
            continue;
        }
        present.push(format!(
            "{:?} (serial {})",
            info.label(),
            info.serial_number()
        ));
    }
    Err(Error::Unavailable(format!(
        "no {} in {}; tokens present: {}",
        location.token,
        location.module.display(),
        if present.is_empty() {
            "none".to_string()
        } else {
            present.join(", ")
        }
    )))
}

/// A logged-in session on the token.
fn open_session(p11: &Pkcs11, location: &KeyLocation, pin: &AuthPin, rw: bool) -> Result<Session> {
    let slot = find_slot(p11, location)?;
    let session = if rw {
        p11.open_rw_session(slot)
    } else {
        p11.open_ro_session(slot)
    }
    .map_err(|e| Error::Unavailable(format!("opening a PKCS#11 session: {e}")))?;
    match session.login(UserType::User, Some(pin)) {
        Ok(()) | Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
        Err(P11Error::Pkcs11(
            rv @ (RvError::PinIncorrect
            | RvError::PinLocked
            | RvError::PinLenRange
            | RvError::PinExpired),
            _,
        )) => Err(Error::FailedPrecondition(format!(
            "the {} refused the PIN ({rv:?}); check pkcs11.pin_file or ${}",
            location.token, location.pin_env
        ))),
        Err(e) => Err(Error::Unavailable(format!(
            "logging in to the {}: {e}",
            location.token
        ))),
    }
}

/// The one object of `class` that `location` names.
fn find_one(
    session: &Session,
    location: &KeyLocation,
    class: ObjectClass,
) -> Result<Option<ObjectHandle>> {
    let found = session
        .find_objects(&location.template(class))
        .map_err(|e| Error::Unavailable(format!("finding the {}: {e}", location.key_name())))?;
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        _ => Err(Error::FailedPrecondition(format!(
            "{} objects in the {} match the {}: name it by label and id",
            found.len(),
            location.token,
            location.key_name()
        ))),
    }
}

/// The public key object's point.
fn read_public_key(session: &Session, location: &KeyLocation) -> Result<Vec<u8>> {
    let handle = find_one(session, location, ObjectClass::PUBLIC_KEY)?.ok_or_else(|| {
        Error::FailedPrecondition(format!(
            "the {} has no public key object for the {} (payra reads the issuing key's \
             public half from the token)",
            location.token,
            location.key_name()
        ))
    })?;
    let attributes = session
        .get_attributes(handle, &[AttributeType::EcParams, AttributeType::EcPoint])
        .map_err(|e| Error::Unavailable(format!("reading the public key: {e}")))?;
    let mut point = None;
    for attribute in attributes {
        match attribute {
            Attribute::EcParams(params) if params != P256_PARAMS => {
                return Err(Error::FailedPrecondition(format!(
                    "the {} is not on P-256 (EC params {})",
                    location.key_name(),
                    hex::encode(params)
                )))
            }
            Attribute::EcPoint(value) => point = sec1_from_ec_point(&value),
            _ => {}
        }
    }
    point.ok_or_else(|| {
        Error::FailedPrecondition(format!(
            "the {}'s public point is not an uncompressed P-256 point",
            location.key_name()
        ))
    })
}

impl Pkcs11Signer {
    /// Opens the key `location` names: loads the module, logs in, finds the private key and
    /// reads the public one. Checks nothing against a certificate (see
    /// [`super::pki::CaMaterial::load_with_signer`]).
    pub fn open(location: &KeyLocation) -> Result<Pkcs11Signer> {
        Pkcs11Signer::open_with_pin(location, location.read_pin()?)
    }

    fn open_with_pin(location: &KeyLocation, pin: AuthPin) -> Result<Pkcs11Signer> {
        let p11 = load_module(&location.module)?;
        let session = open_session(&p11, location, &pin, false)?;
        let key = find_one(&session, location, ObjectClass::PRIVATE_KEY)?.ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "no private {} in the {}",
                location.key_name(),
                location.token
            ))
        })?;
        let public_key = read_public_key(&session, location)?;
        Ok(Pkcs11Signer {
            p11,
            location: location.clone(),
            pin,
            public_key,
            pool: Mutex::new(Pool {
                idle: vec![session],
                open: 1,
                key: Some(key),
                generation: 0,
            }),
            freed: Condvar::new(),
            last_failure: Mutex::new(None),
            lost_sessions: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Generates a P-256 key pair inside the token under the location's label and id (the
    /// private half sensitive and not extractable), for `payra init --pkcs11`. Refuses to
    /// replace a key that is there already.
    pub fn generate(location: &KeyLocation) -> Result<Pkcs11Signer> {
        let pin = location.read_pin()?;
        let p11 = load_module(&location.module)?;
        let session = open_session(&p11, location, &pin, true)?;
        if find_one(&session, location, ObjectClass::PRIVATE_KEY)?.is_some() {
            return Err(Error::FailedPrecondition(format!(
                "the {} already holds a {}; name another key, or delete it on purpose",
                location.token,
                location.key_name()
            )));
        }
        let mut public = vec![
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::KeyType(KeyType::EC),
            Attribute::Verify(true),
            Attribute::EcParams(P256_PARAMS.to_vec()),
        ];
        let mut private = vec![
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::KeyType(KeyType::EC),
        ];
        for template in [&mut public, &mut private] {
            if let Some(label) = &location.key_label {
                template.push(Attribute::Label(label.as_bytes().to_vec()));
            }
            if let Some(id) = &location.key_id {
                template.push(Attribute::Id(id.clone()));
            }
        }
        session
            .generate_key_pair(&Mechanism::EccKeyPairGen, &public, &private)
            .map_err(|e| Error::Unavailable(format!("generating the key in the token: {e}")))?;
        drop(session);
        Pkcs11Signer::open_with_pin(location, pin)
    }

    /// The last signing failure, if the last signature failed.
    pub fn last_failure(&self) -> Option<String> {
        lock(&self.last_failure).clone()
    }

    /// How many times a session was found lost (its login, key handle or token gone) and
    /// the pool started over.
    pub fn lost_sessions(&self) -> u64 {
        self.lost_sessions
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A session, the key's handle and the pool's generation: an idle session, or a new
    /// one if fewer than `sessions` are open, or the first one freed within
    /// [`SESSION_WAIT`] (one deadline for the whole wait).
    fn checkout(&self) -> Result<(Session, ObjectHandle, u64)> {
        let deadline = std::time::Instant::now() + SESSION_WAIT;
        let mut pool = lock(&self.pool);
        loop {
            if let (Some(key), Some(session)) = (pool.key, pool.idle.pop()) {
                return Ok((session, key, pool.generation));
            }
            if pool.open < self.location.sessions {
                pool.open += 1;
                let (known_key, generation) = (pool.key, pool.generation);
                drop(pool);
                let opened =
                    open_session(&self.p11, &self.location, &self.pin, false).and_then(|session| {
                        let key = match known_key {
                            Some(key) => key,
                            None => find_one(&session, &self.location, ObjectClass::PRIVATE_KEY)?
                                .ok_or_else(|| {
                                Error::Unavailable(format!(
                                    "the {} no longer holds the {}",
                                    self.location.token,
                                    self.location.key_name()
                                ))
                            })?,
                        };
                        Ok((session, key))
                    });
                let mut pool = lock(&self.pool);
                match opened {
                    Ok((session, key)) => {
                        // A handle found before the pool was discarded belongs to the old
                        // login: keep it for this signature only.
                        if generation == pool.generation && pool.key.is_none() {
                            pool.key = Some(key);
                            self.freed.notify_all();
                        }
                        return Ok((session, key, generation));
                    }
                    Err(e) => {
                        pool.open -= 1;
                        self.freed.notify_one();
                        return Err(e);
                    }
                }
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(Error::Unavailable(format!(
                    "all {} sessions to the {} stayed busy for {} s",
                    self.location.sessions,
                    self.location.token,
                    SESSION_WAIT.as_secs()
                )));
            }
            pool = self.freed.wait_timeout(pool, left).unpoisoned().0;
        }
    }

    /// Returns `session` to the pool, unless the pool was discarded since it was taken
    /// (it shares the lost login or token): then it is closed.
    fn checkin(&self, session: Session, generation: u64) {
        let mut pool = lock(&self.pool);
        if generation == pool.generation {
            pool.idle.push(session);
        } else {
            pool.open -= 1;
            drop(pool);
            drop(session);
        }
        self.freed.notify_one();
    }

    /// Drops `session` and every idle one (they share the fate of the token or the login),
    /// forgets the key's handle, and starts a new generation: sessions taken before come
    /// back to be closed.
    fn discard_all(&self, session: Session, generation: u64) {
        let idle = {
            let mut pool = lock(&self.pool);
            pool.open -= 1;
            if generation != pool.generation {
                // Another thread started over already; its new sessions stay.
                Vec::new()
            } else {
                let idle = std::mem::take(&mut pool.idle);
                pool.open -= idle.len();
                pool.key = None;
                pool.generation += 1;
                idle
            }
        };
        drop(session);
        drop(idle);
        self.freed.notify_all();
    }

    /// Signs the SHA-256 `digest` with CKM_ECDSA: r‖s.
    fn sign_digest(&self, digest: &[u8]) -> Result<Vec<u8>> {
        let mut lost = None;
        for _ in 0..2 {
            let (session, key, generation) = self.checkout()?;
            match session.sign(&Mechanism::Ecdsa, key, digest) {
                Ok(signature) => {
                    self.checkin(session, generation);
                    return Ok(signature);
                }
                Err(e) if connection_lost(&e) => {
                    tracing::warn!(error = %e, "PKCS#11 session lost; opening a new one");
                    self.lost_sessions
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    self.discard_all(session, generation);
                    lost = Some(e);
                }
                Err(e) => {
                    self.checkin(session, generation);
                    return Err(Error::internal(format!(
                        "the PKCS#11 token refused to sign: {e}"
                    )));
                }
            }
        }
        Err(Error::Unavailable(format!(
            "the CA key's {} is unreachable: {}",
            self.location.token,
            lost.map(|e| e.to_string()).unwrap_or_default()
        )))
    }
}

impl CaSigner for Pkcs11Signer {
    fn public_key_sec1(&self) -> &[u8] {
        &self.public_key
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>> {
        let digest = sha2::Sha256::digest(message);
        let work = || self.sign_digest(&digest);
        // Off the executor's worker: a network HSM takes milliseconds.
        let raw = match tokio::runtime::Handle::try_current() {
            Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(work)
            }
            _ => work(),
        };
        let raw = match raw {
            Ok(raw) => {
                lock(&self.last_failure).take();
                raw
            }
            Err(e) => {
                *lock(&self.last_failure) = Some(e.to_string());
                return Err(e);
            }
        };
        let signature = p256::ecdsa::Signature::from_slice(&raw).map_err(|_| {
            Error::internal(format!(
                "the PKCS#11 token answered a {}-byte ECDSA signature, not r||s",
                raw.len()
            ))
        })?;
        Ok(signature.to_der().as_bytes().to_vec())
    }
}

#[cfg(test)]
mod tests;
