//! The PKCS#11 adapter for [`Kms`]: KEK versions live inside an HSM token, so
//! a DEK is wrapped and unwrapped by the token and the KEK never reaches
//! this process.
//!
//! - KEKs: AES-256 secret keys generated on the token (`CKA_TOKEN`,
//!   `CKA_PRIVATE`, `CKA_SENSITIVE`, not `CKA_EXTRACTABLE`, encrypt/decrypt
//!   only), labelled `{prefix}-v{N}`; the label is the version, so the token
//!   itself is the version index and a restart rebuilds it from the labels.
//! - Wrapping: `CKM_AES_GCM` with a random 12-byte IV (host CSPRNG, `ring`)
//!   and a 128-bit tag; the AAD is `lattice/kek/v{N}/` followed by the
//!   caller's AAD, the same binding as `LocalKms`, so a wrapped key cannot be
//!   moved to another use or relabelled to another version. Output:
//!   IV || ciphertext || tag. GCM (rather than `CKM_AES_KEY_WRAP_PAD`) because
//!   it authenticates an AAD; SoftHSM2 2.6 supports it. Random 96-bit IVs
//!   are safe up to 2^32 wraps per KEK version, far beyond one rotation
//!   period. A failed tag check is `KmsError::Unwrap` whatever code the
//!   token returns for it (SoftHSM2 says `CKR_GENERAL_ERROR`); only codes
//!   that are about the session or device are `KmsError::Backend`.
//! - One `Pkcs11` context per module path for the whole process, never
//!   dropped: `C_Initialize` succeeds once per process, and `C_Finalize` or
//!   unloading the library would pull the token out from under every other
//!   instance.
//! - One session per instance behind a `Mutex` (a cryptoki `Session` is not
//!   `Sync`). If the token forgets the session (closed, logged out, stale
//!   handles after an HSM restart; SoftHSM2 reports a logged-out private
//!   key as `CKR_OBJECT_HANDLE_INVALID`) the call reconnects once and
//!   retries.
//! - PKCS#11 login state belongs to the process, not the session: a second
//!   instance on a token this process is already logged in to is let in
//!   without its PIN being checked again.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::mechanism::{Mechanism, MechanismType};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{Kms, KmsError, WrappedKey};
use crate::secret::Secret;

const IV_LEN: usize = 12;
const TAG_LEN: usize = 16;
const TAG_BITS: u64 = 128;
const KEK_BYTES: u64 = 32;

/// Where the KEKs live: a PKCS#11 module, a token in it and the user PIN.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Config {
    /// The module (shared library), e.g. `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    pub token_label: String,
    /// The user PIN.
    pub pin: Secret,
    /// KEK labels are `{key_label_prefix}-v{N}`.
    #[serde(default = "default_key_label_prefix")]
    pub key_label_prefix: String,
}

fn default_key_label_prefix() -> String {
    "lattice-kek".into()
}

impl Pkcs11Config {
    /// A config with the default key label prefix (`lattice-kek`).
    pub fn new(module: impl Into<PathBuf>, token_label: impl Into<String>, pin: Secret) -> Self {
        Self {
            module: module.into(),
            token_label: token_label.into(),
            pin,
            key_label_prefix: default_key_label_prefix(),
        }
    }
}

/// KEKs in a PKCS#11 token; see the module docs.
pub struct Pkcs11Kms {
    token_label: String,
    prefix: String,
    ctx: Pkcs11,
    slot: Slot,
    // Kept to log in again when the token drops the session.
    pin: Secret,
    rng: SystemRandom,
    state: Mutex<State>,
}

struct State {
    session: Session,
    /// Version → handle of the KEK labelled `{prefix}-v{version}`.
    keys: BTreeMap<u32, ObjectHandle>,
}

impl std::fmt::Debug for Pkcs11Kms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pkcs11Kms")
            .field("token_label", &self.token_label)
            .field("key_label_prefix", &self.prefix)
            .field("slot", &self.slot.id())
            .finish_non_exhaustive()
    }
}

/// Why an operation on the session failed: a PKCS#11 call (with what it was
/// doing, for the message) or an error already in `Kms` terms.
enum Fail {
    Ck(&'static str, CkError),
    Kms(KmsError),
}

fn ck(what: &'static str) -> impl FnOnce(CkError) -> Fail {
    move |e| Fail::Ck(what, e)
}

fn rv(e: &CkError) -> Option<RvError> {
    match e {
        CkError::Pkcs11(rv, _) => Some(*rv),
        _ => None,
    }
}

/// Errors after which the session or its handles are no longer usable and a
/// fresh session (and login) may succeed.
fn session_lost(e: &CkError) -> bool {
    matches!(
        rv(e),
        Some(
            RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::DeviceRemoved
                | RvError::DeviceError
                | RvError::TokenNotPresent
                | RvError::UserNotLoggedIn
                | RvError::KeyHandleInvalid
                | RvError::ObjectHandleInvalid
        )
    )
}

/// Errors that say nothing about the ciphertext: a failed decrypt with one
/// of these is a backend problem, not a wrong KEK or tampered data.
fn infrastructure(e: &CkError) -> bool {
    session_lost(e)
        || !matches!(e, CkError::Pkcs11(..))
        || matches!(
            rv(e),
            Some(
                RvError::HostMemory
                    | RvError::DeviceMemory
                    | RvError::CryptokiNotInitialized
                    | RvError::OperationActive
                    | RvError::MechanismInvalid
                    | RvError::KeyFunctionNotPermitted
                    | RvError::KeyTypeInconsistent
            )
        )
}

fn describe_error(what: &str, e: &CkError) -> String {
    match rv(e) {
        Some(RvError::PinIncorrect) => format!("{what}: incorrect PIN (CKR_PIN_INCORRECT)"),
        Some(RvError::PinLocked) => format!("{what}: the PIN is locked (CKR_PIN_LOCKED)"),
        Some(RvError::PinExpired) => format!("{what}: the PIN has expired (CKR_PIN_EXPIRED)"),
        Some(RvError::UserPinNotInitialized) => {
            format!("{what}: the token has no user PIN yet (CKR_USER_PIN_NOT_INITIALIZED)")
        }
        _ => format!("{what}: {e}"),
    }
}

/// One context per module for the whole process, never finalized: see the
/// module docs.
fn context(module: &Path) -> Result<Pkcs11, String> {
    static CONTEXTS: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    // Two spellings of one library are one library (and one C_Initialize).
    let path = std::fs::canonicalize(module)
        .map_err(|e| format!("PKCS#11 module {}: {e}", module.display()))?;
    let mut contexts = CONTEXTS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(ctx) = contexts.get(&path) {
        return Ok(ctx.clone());
    }
    let ctx = Pkcs11::new(&path)
        .map_err(|e| format!("loading PKCS#11 module {}: {e}", path.display()))?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        // Already initialised by other code in this process: share it.
        Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(describe_error(
                &format!("initialising PKCS#11 module {}", path.display()),
                &e,
            ));
        }
    }
    contexts.insert(path, ctx.clone());
    Ok(ctx)
}

/// The slot holding the token labelled `label`; several is an error, as a
/// KEK must not depend on slot order.
fn find_slot(ctx: &Pkcs11, module: &Path, label: &str) -> Result<Slot, String> {
    let slots = ctx
        .get_slots_with_token()
        .map_err(|e| describe_error("listing slots", &e))?;
    let mut found = Vec::new();
    let mut others = Vec::new();
    for slot in slots {
        let info = ctx
            .get_token_info(slot)
            .map_err(|e| describe_error("reading token info", &e))?;
        if !info.token_initialized() {
            continue;
        }
        if info.label() == label {
            found.push(slot);
        } else {
            others.push(format!("{:?}", info.label()));
        }
    }
    match found.as_slice() {
        [slot] => Ok(*slot),
        [] => Err(format!(
            "no initialised token labelled {label:?} in module {} (tokens found: {})",
            module.display(),
            if others.is_empty() {
                "none".to_owned()
            } else {
                others.join(", ")
            }
        )),
        _ => Err(format!(
            "{} tokens are labelled {label:?} in module {}; the label must name one token",
            found.len(),
            module.display()
        )),
    }
}

fn login(session: &Session, pin: &Secret) -> Result<(), CkError> {
    let pin = AuthPin::from(pin.expose().to_owned());
    match session.login(UserType::User, Some(&pin)) {
        // Login state is per process and token: another instance did it.
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(e) => Err(e),
    }
}

fn label(prefix: &str, version: u32) -> String {
    format!("{prefix}-v{version}")
}

/// The version a label names, if it is one of ours (`{prefix}-v{N}`, N ≥ 1
/// written without leading zeros, so one version has one label).
fn parse_label(prefix: &str, label: &str) -> Option<u32> {
    let digits = label.strip_prefix(prefix)?.strip_prefix("-v")?;
    let v: u32 = digits.parse().ok()?;
    (v >= 1 && v.to_string() == digits).then_some(v)
}

/// Finds the KEK versions on the token by label.
fn scan(session: &Session, prefix: &str) -> Result<BTreeMap<u32, ObjectHandle>, Fail> {
    let template = [
        Attribute::Token(true),
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
    ];
    let mut keys = BTreeMap::new();
    for handle in session
        .find_objects(&template)
        .map_err(ck("searching the token for KEKs"))?
    {
        let attrs = session
            .get_attributes(handle, &[AttributeType::Label, AttributeType::Extractable])
            .map_err(ck("reading KEK attributes"))?;
        let mut version = None;
        let mut extractable = false;
        for attr in attrs {
            match attr {
                Attribute::Label(l) => {
                    version = std::str::from_utf8(&l)
                        .ok()
                        .and_then(|l| parse_label(prefix, l));
                }
                Attribute::Extractable(e) => extractable = e,
                _ => {}
            }
        }
        let Some(version) = version else { continue };
        if extractable {
            // Not made here: ours are never extractable. Usable, but say so.
            tracing::warn!(
                label = %label(prefix, version),
                "KEK on the PKCS#11 token is extractable"
            );
        }
        if keys.insert(version, handle).is_some() {
            // Which one wrapped a given DEK is unknowable: refuse to guess.
            return Err(Fail::Kms(KmsError::Backend {
                kms: String::new(),
                message: format!(
                    "more than one key on the token is labelled {:?}",
                    label(prefix, version)
                ),
            }));
        }
    }
    Ok(keys)
}

impl Pkcs11Kms {
    /// Opens the token named by `cfg`, logging in as the user; creates KEK
    /// version 1 when the token holds no KEK yet.
    pub fn open(cfg: &Pkcs11Config) -> Result<Self, KmsError> {
        let kms = format!("pkcs11:{}", cfg.token_label);
        let backend = |message: String| KmsError::Backend {
            kms: kms.clone(),
            message,
        };
        if cfg.key_label_prefix.is_empty() {
            return Err(backend("key_label_prefix must not be empty".into()));
        }
        let ctx = context(&cfg.module).map_err(backend)?;
        let slot = find_slot(&ctx, &cfg.module, &cfg.token_label).map_err(backend)?;
        let mechanisms = ctx
            .get_mechanism_list(slot)
            .map_err(|e| backend(describe_error("listing mechanisms", &e)))?;
        for (mechanism, name) in [
            (MechanismType::AES_KEY_GEN, "CKM_AES_KEY_GEN"),
            (MechanismType::AES_GCM, "CKM_AES_GCM"),
        ] {
            if !mechanisms.contains(&mechanism) {
                return Err(backend(format!("the token does not support {name}")));
            }
        }
        let this = Self {
            token_label: cfg.token_label.clone(),
            prefix: cfg.key_label_prefix.clone(),
            state: Mutex::new(State {
                session: Self::connect(&ctx, slot, &cfg.pin)
                    .map_err(|f| Self::fail_to_kms(&kms, f))?,
                keys: BTreeMap::new(),
            }),
            ctx,
            slot,
            pin: cfg.pin.clone(),
            rng: SystemRandom::new(),
        };
        this.with_state(|st| {
            st.keys = this.rescan(&st.session)?;
            if st.keys.is_empty() {
                this.generate(st, 1)?;
            }
            Ok(())
        })
        .map_err(|f| this.to_kms(f))?;
        Ok(this)
    }

    fn connect(ctx: &Pkcs11, slot: Slot, pin: &Secret) -> Result<Session, Fail> {
        let session = ctx
            .open_rw_session(slot)
            .map_err(ck("opening a read/write session"))?;
        login(&session, pin).map_err(ck("login as user"))?;
        Ok(session)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `op` on the session; if the token lost the session, reconnects
    /// (new session, login, fresh handles) and runs it once more.
    fn with_state<T>(&self, mut op: impl FnMut(&mut State) -> Result<T, Fail>) -> Result<T, Fail> {
        let mut st = self.lock();
        match op(&mut st) {
            Err(Fail::Ck(what, e)) if session_lost(&e) => {
                tracing::warn!(
                    kms = %self.describe(),
                    error = %describe_error(what, &e),
                    "PKCS#11 session lost; reconnecting"
                );
                let session = Self::connect(&self.ctx, self.slot, &self.pin)?;
                st.keys = self.rescan(&session)?;
                st.session = session;
                op(&mut st)
            }
            other => other,
        }
    }

    fn rescan(&self, session: &Session) -> Result<BTreeMap<u32, ObjectHandle>, Fail> {
        scan(session, &self.prefix)
    }

    /// Generates KEK `version` on the token.
    fn generate(&self, st: &mut State, version: u32) -> Result<(), Fail> {
        let label = label(&self.prefix, version);
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(KEK_BYTES.into()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            // Only what wrapping needs: no raw key wrapping, no derivation.
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Derive(false),
            Attribute::Label(label.clone().into_bytes()),
        ];
        let handle = st
            .session
            .generate_key(&Mechanism::AesKeyGen, &template)
            .map_err(ck("generating a KEK"))?;
        st.keys.insert(version, handle);
        tracing::info!(kms = %self.describe(), %label, "created KEK version {version}");
        Ok(())
    }

    fn fail_to_kms(kms: &str, f: Fail) -> KmsError {
        match f {
            Fail::Ck(what, e) => KmsError::Backend {
                kms: kms.to_owned(),
                message: describe_error(what, &e),
            },
            Fail::Kms(KmsError::Backend { message, .. }) => KmsError::Backend {
                kms: kms.to_owned(),
                message,
            },
            Fail::Kms(e) => e,
        }
    }

    fn to_kms(&self, f: Fail) -> KmsError {
        Self::fail_to_kms(&self.describe(), f)
    }

    fn no_such_version(&self, version: u32) -> Fail {
        Fail::Kms(KmsError::NoSuchVersion {
            kms: self.describe(),
            version,
        })
    }
}

impl Kms for Pkcs11Kms {
    fn describe(&self) -> String {
        format!("pkcs11:{}", self.token_label)
    }

    fn current_version(&self) -> Result<u32, KmsError> {
        let st = self.lock();
        st.keys
            .keys()
            .next_back()
            .copied()
            .ok_or_else(|| KmsError::NoSuchVersion {
                kms: self.describe(),
                version: 0,
            })
    }

    fn versions(&self) -> Result<Vec<u32>, KmsError> {
        Ok(self.lock().keys.keys().copied().collect())
    }

    fn wrap(&self, dek: &[u8], aad: &[u8]) -> Result<WrappedKey, KmsError> {
        self.with_state(|st| {
            let (&version, &key) = st
                .keys
                .iter()
                .next_back()
                .ok_or_else(|| self.no_such_version(0))?;
            // Fresh for every attempt, retries included.
            let mut iv = [0u8; IV_LEN];
            self.rng
                .fill(&mut iv)
                .map_err(|_| Fail::Kms(KmsError::Rng))?;
            let aad = super::versioned_aad(version, aad);
            let mut params_iv = iv;
            let params = GcmParams::new(&mut params_iv, &aad, TAG_BITS.into())
                .map_err(ck("preparing AES-GCM"))?;
            let sealed = st
                .session
                .encrypt(&Mechanism::AesGcm(params), key, dek)
                .map_err(ck("wrapping with AES-GCM"))?;
            let mut bytes = Vec::with_capacity(IV_LEN + sealed.len());
            bytes.extend_from_slice(&iv);
            bytes.extend_from_slice(&sealed);
            Ok(WrappedKey {
                kek_version: version,
                bytes,
            })
        })
        .map_err(|f| self.to_kms(f))
    }

    fn unwrap(&self, wrapped: &WrappedKey, aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        let version = wrapped.kek_version;
        let unwrap_failed = || KmsError::Unwrap {
            kms: self.describe(),
            version,
        };
        if wrapped.bytes.len() < IV_LEN + TAG_LEN {
            return Err(unwrap_failed());
        }
        let (iv, sealed) = wrapped.bytes.split_at(IV_LEN);
        let aad = super::versioned_aad(version, aad);
        let mut rescanned = false;
        self.with_state(|st| {
            if !st.keys.contains_key(&version) && !rescanned {
                // Another process may have rotated since we looked.
                rescanned = true;
                st.keys = self.rescan(&st.session)?;
            }
            let key = *st
                .keys
                .get(&version)
                .ok_or_else(|| self.no_such_version(version))?;
            let mut iv = iv.to_vec();
            let params =
                GcmParams::new(&mut iv, &aad, TAG_BITS.into()).map_err(ck("preparing AES-GCM"))?;
            st.session
                .decrypt(&Mechanism::AesGcm(params), key, sealed)
                .map(Zeroizing::new)
                .map_err(ck("unwrapping with AES-GCM"))
        })
        .map_err(|f| match f {
            // The token could not authenticate the ciphertext: wrong KEK,
            // wrong AAD or tampering, which the caller must tell apart from
            // an HSM outage.
            Fail::Ck(_, e) if !infrastructure(&e) => unwrap_failed(),
            f => self.to_kms(f),
        })
    }

    fn rotate(&self) -> Result<u32, KmsError> {
        self.with_state(|st| {
            // Versions another process created count: never reuse a label.
            st.keys = self.rescan(&st.session)?;
            let next = st
                .keys
                .keys()
                .next_back()
                .map_or(Some(1), |v| v.checked_add(1));
            let next = next.ok_or_else(|| {
                Fail::Kms(KmsError::Backend {
                    kms: self.describe(),
                    message: "KEK versions exhausted".into(),
                })
            })?;
            self.generate(st, next)?;
            Ok(next)
        })
        .map_err(|f| self.to_kms(f))
    }
}

/// Runs a test against throwaway SoftHSM2 tokens (unit and integration
/// tests). Not for production use.
#[cfg(any(test, feature = "dangerous-test-util"))]
pub mod testing {
    use std::path::PathBuf;
    use std::process::Command;

    use super::Pkcs11Config;
    use crate::secret::Secret;

    pub const CHILD_ENV: &str = "LATTICE_SOFTHSM_TEST_CHILD";
    pub const PIN: &str = "1234";
    const SO_PIN: &str = "5678";

    pub fn module() -> PathBuf {
        std::env::var_os("LATTICE_SOFTHSM2_MODULE")
            .map_or_else(|| "/usr/lib/softhsm/libsofthsm2.so".into(), PathBuf::from)
    }

    pub fn config(token: &str) -> Pkcs11Config {
        Pkcs11Config::new(module(), token, Secret::new(PIN))
    }

    /// Runs the calling test against fresh SoftHSM2 tokens labelled
    /// `tokens`: `Some(())` means "run the test body now".
    ///
    /// SoftHSM2 reads its config (token directory) from `SOFTHSM2_CONF`
    /// when the module is initialised, once per process, and changing this
    /// process's environment needs `unsafe` in edition 2024 (forbidden
    /// here). So the test re-runs itself in a child process whose
    /// environment points at a throwaway token directory; the child gets
    /// `Some` and runs the body, the parent gets `None` once the child has
    /// passed. This also gives every test its own tokens and its own
    /// `C_Initialize`.
    /// `test` is the name libtest knows the calling test by (its path
    /// inside the test crate, e.g. `kms::pkcs11::tests::x` or just `x` for an
    /// integration test).
    pub fn softhsm(test: &str, tokens: &[&str]) -> Option<()> {
        if std::env::var_os(CHILD_ENV).is_some() {
            return Some(());
        }
        let module = module();
        let util = Command::new("softhsm2-util").arg("--version").output();
        let missing = if !module.exists() {
            Some(format!("the module {}", module.display()))
        } else if util.is_err() {
            Some("softhsm2-util".to_owned())
        } else {
            None
        };
        if let Some(missing) = missing {
            if std::env::var_os("LATTICE_REQUIRE_SOFTHSM").is_some() {
                panic!(
                    "SoftHSM2 is required (LATTICE_REQUIRE_SOFTHSM is set) but {missing} is \
                     missing: apt-get install softhsm2 (or set LATTICE_SOFTHSM2_MODULE)"
                );
            }
            eprintln!(
                "skipping {test}: SoftHSM2 not installed ({missing} is missing; apt-get install softhsm2)"
            );
            return None;
        }

        let dir = tempfile::tempdir().expect("tempdir");
        let tokendir = dir.path().join("tokens");
        std::fs::create_dir(&tokendir).expect("token dir");
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n\
                 slots.removable = false\n",
                tokendir.display()
            ),
        )
        .expect("write softhsm2.conf");
        for token in tokens {
            let out = Command::new("softhsm2-util")
                .env("SOFTHSM2_CONF", &conf)
                .args(["--init-token", "--free", "--label", token])
                .args(["--pin", PIN, "--so-pin", SO_PIN])
                .output()
                .expect("run softhsm2-util");
            assert!(
                out.status.success(),
                "softhsm2-util --init-token {token}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }

        let name = test.to_string();
        let out = Command::new(std::env::current_exe().expect("test binary"))
            .args([name.as_str(), "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, "1")
            .env("SOFTHSM2_CONF", &conf)
            .output()
            .expect("run the test in a child process");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        // "1 passed" also proves the filter matched: 0 tests would succeed.
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "{name} failed in its SoftHSM2 child process:\n{stdout}\n{stderr}"
        );
        None
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::testing::config;
    use super::*;

    /// The name libtest knows a test of this module by.
    fn name(test: &str) -> String {
        let path = module_path!()
            .split_once("::")
            .map_or(module_path!(), |(_, p)| p);
        format!("{path}::{test}")
    }

    #[test]
    fn conforms_on_softhsm() {
        let Some(()) = testing::softhsm(&name("conforms_on_softhsm"), &["conformance"]) else {
            return;
        };
        let kms = Pkcs11Kms::open(&config("conformance")).expect("open");
        assert_eq!(kms.describe(), "pkcs11:conformance");
        assert_eq!(kms.versions().expect("versions"), vec![1]);
        super::super::conformance(&kms);

        // The KEKs were made as promised: on the token, unreadable.
        let st = kms.lock();
        for handle in st.keys.values() {
            let attrs = st
                .session
                .get_attributes(
                    *handle,
                    &[
                        AttributeType::Token,
                        AttributeType::Private,
                        AttributeType::Sensitive,
                        AttributeType::Extractable,
                        AttributeType::ValueLen,
                    ],
                )
                .expect("attributes");
            for attr in attrs {
                match attr {
                    Attribute::Token(v) | Attribute::Private(v) | Attribute::Sensitive(v) => {
                        assert!(v)
                    }
                    Attribute::Extractable(v) => assert!(!v),
                    Attribute::ValueLen(n) => assert_eq!(u64::from(n), KEK_BYTES),
                    other => panic!("unexpected {other:?}"),
                }
            }
            assert!(
                st.session
                    .get_attributes(*handle, &[AttributeType::Value])
                    .expect("value")
                    .is_empty(),
                "the KEK value must not be readable"
            );
        }
    }

    #[test]
    fn reopen_sees_versions_and_unwraps() {
        let Some(()) = testing::softhsm(&name("reopen_sees_versions_and_unwraps"), &["reopen"])
        else {
            return;
        };
        let first = Pkcs11Kms::open(&config("reopen")).expect("open");
        let old = first.wrap(b"0123456789abcdef", b"x").expect("wrap v1");
        assert_eq!(first.rotate().expect("rotate"), 2);
        let new = first.wrap(b"fedcba9876543210", b"y").expect("wrap v2");
        assert_eq!(new.kek_version, 2);

        // While the first is open (the process is already logged in)…
        let again = Pkcs11Kms::open(&config("reopen")).expect("reopen");
        assert_eq!(again.versions().expect("versions"), vec![1, 2]);
        assert_eq!(again.current_version().expect("current"), 2);
        assert_eq!(
            &*again.unwrap(&old, b"x").expect("old"),
            b"0123456789abcdef"
        );
        assert_eq!(
            &*again.unwrap(&new, b"y").expect("new"),
            b"fedcba9876543210"
        );

        // …and after every session closed (a fresh login).
        drop(first);
        drop(again);
        let third = Pkcs11Kms::open(&config("reopen")).expect("open again");
        assert_eq!(third.versions().expect("versions"), vec![1, 2]);
        assert_eq!(
            &*third.unwrap(&old, b"x").expect("old"),
            b"0123456789abcdef"
        );

        // A rotation by another instance is seen by this one's unwrap.
        let other = Pkcs11Kms::open(&config("reopen")).expect("other");
        assert_eq!(other.rotate().expect("rotate"), 3);
        let v3 = other.wrap(b"v3 dek v3 dek v3", b"z").expect("wrap v3");
        assert_eq!(&*third.unwrap(&v3, b"z").expect("v3"), b"v3 dek v3 dek v3");
        assert_eq!(third.rotate().expect("rotate after theirs"), 4);
    }

    #[test]
    fn wrong_pin_is_a_login_error() {
        let Some(()) = testing::softhsm(&name("wrong_pin_is_a_login_error"), &["wrong-pin"]) else {
            return;
        };
        let mut cfg = config("wrong-pin");
        cfg.pin = Secret::new("0000");
        let err = Pkcs11Kms::open(&cfg).expect_err("wrong PIN");
        assert!(matches!(err, KmsError::Backend { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("login"), "{msg}");
        assert!(msg.contains("incorrect PIN"), "{msg}");
        assert!(!msg.contains("0000"), "the PIN must not leak: {msg}");
        // The right PIN still works.
        Pkcs11Kms::open(&config("wrong-pin")).expect("right PIN");
    }

    #[test]
    fn unknown_token_is_named() {
        let Some(()) = testing::softhsm(&name("unknown_token_is_named"), &["present"]) else {
            return;
        };
        let err = Pkcs11Kms::open(&config("absent-token")).expect_err("no such token");
        assert!(matches!(err, KmsError::Backend { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("\"absent-token\""), "{msg}");
        assert!(msg.contains("\"present\""), "lists the tokens found: {msg}");
    }

    #[test]
    fn another_tokens_kek_does_not_unwrap() {
        let Some(()) = testing::softhsm(
            &name("another_tokens_kek_does_not_unwrap"),
            &["token-a", "token-b"],
        ) else {
            return;
        };
        let a = Pkcs11Kms::open(&config("token-a")).expect("a");
        let b = Pkcs11Kms::open(&config("token-b")).expect("b");
        let wrapped = a.wrap(b"dek bytes dek bytes", b"x").expect("wrap");
        let err = b.unwrap(&wrapped, b"x").expect_err("other token's KEK");
        assert!(
            matches!(err, KmsError::Unwrap { version: 1, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("wrong KEK"), "{err}");
        assert_eq!(
            &*a.unwrap(&wrapped, b"x").expect("a"),
            b"dek bytes dek bytes"
        );
    }

    #[test]
    fn shared_across_threads() {
        let Some(()) = testing::softhsm(&name("shared_across_threads"), &["threads"]) else {
            return;
        };
        let kms = Arc::new(Pkcs11Kms::open(&config("threads")).expect("open"));
        let workers: Vec<_> = (0u8..8)
            .map(|i| {
                let kms = Arc::clone(&kms);
                std::thread::spawn(move || {
                    for j in 0u8..20 {
                        if i == 0 && j == 10 {
                            kms.rotate().expect("rotate");
                        }
                        let dek = [i ^ j; 32];
                        let aad = [i, j];
                        let w = kms.wrap(&dek, &aad).expect("wrap");
                        assert_eq!(&*kms.unwrap(&w, &aad).expect("unwrap"), &dek);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().expect("worker");
        }
        assert_eq!(kms.versions().expect("versions"), vec![1, 2]);
    }

    #[test]
    fn reconnects_after_the_token_logs_out() {
        let Some(()) = testing::softhsm(&name("reconnects_after_the_token_logs_out"), &["relogin"])
        else {
            return;
        };
        let kms = Pkcs11Kms::open(&config("relogin")).expect("open");
        let wrapped = kms.wrap(b"0123456789abcdef", b"x").expect("wrap");
        kms.lock().session.logout().expect("logout");
        assert_eq!(
            &*kms.unwrap(&wrapped, b"x").expect("unwrap"),
            b"0123456789abcdef"
        );
        kms.lock().session.logout().expect("logout");
        assert_eq!(kms.rotate().expect("rotate"), 2);
    }

    #[test]
    fn config_defaults_the_prefix_and_redacts_the_pin() {
        let cfg: Pkcs11Config =
            serde_json::from_str(r#"{"module": "/m.so", "token_label": "t", "pin": "s3cret-pin"}"#)
                .expect("parse");
        assert_eq!(cfg.key_label_prefix, "lattice-kek");
        assert_eq!(cfg.pin.expose(), "s3cret-pin");
        assert!(!format!("{cfg:?}").contains("s3cret-pin"));
        assert!(
            serde_json::from_str::<Pkcs11Config>(
                r#"{"module": "/m.so", "token_label": "t", "pin": "p", "pin_file": "x"}"#
            )
            .is_err(),
            "unknown fields are rejected"
        );
        assert_eq!(parse_label("lattice-kek", "lattice-kek-v12"), Some(12));
        for bad in [
            "lattice-kek-v0",
            "lattice-kek-v01",
            "lattice-kek-v",
            "other-v1",
            "lattice-kek-v1x",
        ] {
            assert_eq!(parse_label("lattice-kek", bad), None, "{bad}");
        }
    }
}
