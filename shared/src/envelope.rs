//! Envelope encryption of upstream secrets. A value is AEAD ciphertext
//! (ChaCha20-Poly1305, ring) under its own random DEK; the control plane
//! keeps the DEK wrapped by a KEK (`kms`) and gives it to a cache only sealed
//! to that cache's own X25519 key with HPKE (RFC 9180, base mode,
//! DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / ChaCha20-Poly1305). A value
//! is bound by its AAD to its secret (each version has its own DEK); a
//! sealed DEK to its secret, version and recipient cache.

use hpke::aead::ChaCha20Poly1305;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem as _, OpModeR, OpModeS, Serializable};
use ring::aead::{self, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

pub const DEK_LEN: usize = 32;
const TAG_LEN: usize = 16;
/// HPKE `info`: the purpose of every envelope.
const HPKE_INFO: &[u8] = b"lattice/v1/secret-dek";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("the secret ciphertext does not open under its DEK (tampered, or not this version's)")]
    Open,
    #[error(
        "the sealed DEK does not open with this cache's key (tampered, or sealed to another cache)"
    )]
    Unseal,
    #[error("malformed HPKE public key")]
    PublicKey,
    #[error("malformed HPKE private key")]
    PrivateKey,
    #[error("random number generator failed")]
    Rng,
}

/// Largest secret value accepted (an API key, a certificate bundle).
pub const MAX_SECRET_VALUE_LEN: usize = 64 * 1024;

/// A fresh random DEK.
pub fn new_dek() -> Result<Zeroizing<[u8; DEK_LEN]>, EnvelopeError> {
    let mut dek = Zeroizing::new([0u8; DEK_LEN]);
    SystemRandom::new()
        .fill(&mut *dek)
        .map_err(|_| EnvelopeError::Rng)?;
    Ok(dek)
}

fn aead_key(dek: &[u8]) -> Result<LessSafeKey, EnvelopeError> {
    Ok(LessSafeKey::new(
        UnboundKey::new(&CHACHA20_POLY1305, dek).map_err(|_| EnvelopeError::Open)?,
    ))
}

/// Encrypts `plaintext` under `dek`: nonce || ciphertext || tag.
pub fn encrypt(dek: &[u8], plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
    let key = aead_key(dek)?;
    let mut nonce = [0u8; aead::NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| EnvelopeError::Rng)?;
    let mut body = plaintext.to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad),
        &mut body,
    )
    .map_err(|_| EnvelopeError::Rng)?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&body);
    Ok(out)
}

pub fn decrypt(dek: &[u8], sealed: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
    let key = aead_key(dek)?;
    if sealed.len() < aead::NONCE_LEN + TAG_LEN {
        return Err(EnvelopeError::Open);
    }
    let (nonce, body) = sealed.split_at(aead::NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| EnvelopeError::Open)?;
    let mut body = Zeroizing::new(body.to_vec());
    let len = key
        .open_in_place(nonce, Aad::from(aad), &mut body)
        .map_err(|_| EnvelopeError::Open)?
        .len();
    body.truncate(len);
    Ok(body)
}

/// The AAD of a secret value: its name. (Each version has its own DEK, and
/// the sealed DEK is bound to the version.)
pub fn value_aad(name: &str) -> Vec<u8> {
    format!("lattice/secret/{name}").into_bytes()
}

/// The AAD of a DEK sealed to a cache: recipient, name and version.
pub fn seal_aad(cache_id: &str, name: &str, version: u64) -> Vec<u8> {
    format!("lattice/seal/{cache_id}/{name}/v{version}").into_bytes()
}

/// A cache's X25519 key pair for receiving sealed DEKs. The private half is
/// zeroized on drop by the HPKE crate and never shown by `Debug`.
pub struct HpkeKeyPair {
    private: <X25519HkdfSha256 as hpke::Kem>::PrivateKey,
    public: <X25519HkdfSha256 as hpke::Kem>::PublicKey,
}

impl std::fmt::Debug for HpkeKeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HpkeKeyPair")
            .field("public", &hex::encode(self.public_bytes()))
            .finish_non_exhaustive()
    }
}

impl HpkeKeyPair {
    pub fn generate() -> Self {
        let (private, public) = X25519HkdfSha256::gen_keypair();
        Self { private, public }
    }

    /// Restores a pair from its private key bytes (as sealed at rest).
    pub fn from_private_bytes(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        let private = <X25519HkdfSha256 as hpke::Kem>::PrivateKey::from_bytes(bytes)
            .map_err(|_| EnvelopeError::PrivateKey)?;
        let public = X25519HkdfSha256::sk_to_pk(&private);
        Ok(Self { private, public })
    }

    /// The private key, to be sealed at rest; keep the borrow short.
    pub fn private_bytes(&self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(self.private.to_bytes().to_vec())
    }

    pub fn public_bytes(&self) -> Vec<u8> {
        self.public.to_bytes().to_vec()
    }

    /// Opens a DEK sealed to this key.
    pub fn open(
        &self,
        enc: &[u8],
        sealed: &[u8],
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, EnvelopeError> {
        let enc = <X25519HkdfSha256 as hpke::Kem>::EncappedKey::from_bytes(enc)
            .map_err(|_| EnvelopeError::Unseal)?;
        hpke::single_shot_open::<ChaCha20Poly1305, HkdfSha256, X25519HkdfSha256>(
            &OpModeR::Base,
            &self.private,
            &enc,
            HPKE_INFO,
            sealed,
            aad,
        )
        .map(Zeroizing::new)
        .map_err(|_| EnvelopeError::Unseal)
    }
}

/// Seals `dek` to the holder of `public_key`: (encapsulated key, ciphertext).
pub fn seal_to(
    public_key: &[u8],
    dek: &[u8],
    aad: &[u8],
) -> Result<(Vec<u8>, Vec<u8>), EnvelopeError> {
    let pk = <X25519HkdfSha256 as hpke::Kem>::PublicKey::from_bytes(public_key)
        .map_err(|_| EnvelopeError::PublicKey)?;
    let (enc, ct) = hpke::single_shot_seal::<ChaCha20Poly1305, HkdfSha256, X25519HkdfSha256>(
        &OpModeS::Base,
        &pk,
        HPKE_INFO,
        dek,
        aad,
    )
    .map_err(|_| EnvelopeError::PublicKey)?;
    Ok((enc.to_bytes().to_vec(), ct))
}

/// Checks that a public key can be sealed to: 32 bytes that HPKE accepts,
/// and not a low-order point (the Diffie-Hellman would be all zeros, which
/// HPKE refuses at seal time). A trial seal decides.
pub fn check_public_key(public_key: &[u8]) -> Result<(), EnvelopeError> {
    seal_to(public_key, b"probe", b"lattice/probe").map(|_| ())
}

/// A keyed fingerprint of a secret value (HMAC-SHA256, first 16 bytes, hex):
/// audit records name which value was served without revealing it, and the
/// key keeps an offline guess of a short value from being checked.
pub fn fingerprint(key: &[u8], value: &[u8]) -> String {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    hex::encode(&ring::hmac::sign(&k, value).as_ref()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_round_trip_binding_and_tamper() {
        let dek = new_dek().expect("dek");
        let ct = encrypt(&*dek, b"sk-live-marker", &value_aad("openai")).expect("encrypt");
        assert!(!ct.windows(7).any(|w| w == b"sk-live"));
        assert_eq!(
            &*decrypt(&*dek, &ct, &value_aad("openai")).expect("decrypt"),
            b"sk-live-marker"
        );
        assert_eq!(
            decrypt(&*dek, &ct, &value_aad("anthropic")),
            Err(EnvelopeError::Open)
        );
        let mut bad = ct.clone();
        bad[20] ^= 0x40;
        assert_eq!(
            decrypt(&*dek, &bad, &value_aad("openai")),
            Err(EnvelopeError::Open)
        );
        let other = new_dek().expect("dek");
        assert_eq!(
            decrypt(&*other, &ct, &value_aad("openai")),
            Err(EnvelopeError::Open)
        );
        assert_eq!(decrypt(&*dek, &ct[..10], b""), Err(EnvelopeError::Open));
    }

    #[test]
    fn hpke_seals_to_one_cache_only() {
        let cache = HpkeKeyPair::generate();
        let other = HpkeKeyPair::generate();
        let dek = new_dek().expect("dek");
        let aad = seal_aad("spiffe://td/cache/eu-1", "openai", 3);
        let (enc, ct) = seal_to(&cache.public_bytes(), &*dek, &aad).expect("seal");
        assert_eq!(&*cache.open(&enc, &ct, &aad).expect("open"), &*dek);
        assert_eq!(other.open(&enc, &ct, &aad), Err(EnvelopeError::Unseal));
        let wrong_aad = seal_aad("spiffe://td/cache/us-1", "openai", 3);
        assert_eq!(
            cache.open(&enc, &ct, &wrong_aad),
            Err(EnvelopeError::Unseal)
        );
        let mut bad = ct.clone();
        bad[0] ^= 1;
        assert_eq!(cache.open(&enc, &bad, &aad), Err(EnvelopeError::Unseal));
        assert_eq!(cache.open(&enc[..5], &ct, &aad), Err(EnvelopeError::Unseal));

        // A pair restored from its private bytes opens the same envelopes.
        let restored = HpkeKeyPair::from_private_bytes(&cache.private_bytes()).expect("restore");
        assert_eq!(restored.public_bytes(), cache.public_bytes());
        assert_eq!(&*restored.open(&enc, &ct, &aad).expect("open"), &*dek);
        assert!(!format!("{cache:?}").contains(&hex::encode(&*cache.private_bytes())));
        assert_eq!(
            seal_to(b"short", &*dek, &aad),
            Err(EnvelopeError::PublicKey)
        );
        // A low-order point is refused up front (enrolment checks this).
        assert_eq!(check_public_key(&[0u8; 32]), Err(EnvelopeError::PublicKey));
        assert!(check_public_key(&cache.public_bytes()).is_ok());
    }

    #[test]
    fn fingerprints_are_keyed() {
        let a = fingerprint(b"key one", b"value");
        assert_eq!(a.len(), 32);
        assert_eq!(a, fingerprint(b"key one", b"value"));
        assert_ne!(a, fingerprint(b"key two", b"value"));
        assert_ne!(a, fingerprint(b"key one", b"other"));
    }
}
