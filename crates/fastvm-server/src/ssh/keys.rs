//! Validation of users' SSH public keys beyond their text form (which
//! `fastvm_types::ssh_key` checks): the key blob must decode as the key type
//! it claims, and RSA keys must have at least [`MIN_RSA_BITS`] bits.
//!
//! Signatures of every accepted type, the FIDO `sk-*` ones included, are
//! verified by the gateway's SSH library (russh over the `ssh-key` crate:
//! see the tests below, which build `sk-*` signatures the way an
//! authenticator and OpenSSH do, per OpenSSH's PROTOCOL.u2f, and check
//! them through the same verifier the gateway calls).

use fastvm_types::ssh_key::ParsedSshKey;
use fastvm_types::{codes, ValidationError};
use russh::keys::ssh_key::public::KeyData;
use russh::keys::PublicKey;

/// Smallest RSA modulus accepted.
pub const MIN_RSA_BITS: u32 = 2048;

/// Decode the key (its type must match) and check its strength.
pub fn check_public_key(key: &ParsedSshKey) -> Result<(), ValidationError> {
    let err = |msg: String| ValidationError::new(codes::INVALID_SSH_KEY, msg);
    let decoded = PublicKey::from_bytes(&key.blob).map_err(|e| {
        err(format!(
            "the key data is not a valid {} public key ({e})",
            key.key_type
        ))
    })?;
    if decoded.algorithm().as_str() != key.key_type {
        return Err(err(format!(
            "the key data holds a {} key, not a {} key",
            decoded.algorithm().as_str(),
            key.key_type
        )));
    }
    if let KeyData::Rsa(rsa) = decoded.key_data() {
        let bits = rsa.key_size();
        if bits < MIN_RSA_BITS {
            return Err(err(format!(
                "this RSA key has {bits} bits; at least {MIN_RSA_BITS} are required (make one with `ssh-keygen -t ed25519`)"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fastvm_types::ssh_key::parse_ssh_public_key;
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
    use russh::keys::signature::Verifier;
    use russh::keys::ssh_key::Signature;
    use sha2::{Digest, Sha256};

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// SSH wire `string`.
    fn string(out: &mut Vec<u8>, b: &[u8]) {
        out.extend((b.len() as u32).to_be_bytes());
        out.extend(b);
    }

    /// SSH wire `mpint` of a positive big-endian number.
    fn mpint(out: &mut Vec<u8>, mut b: &[u8]) {
        while let [0, rest @ ..] = b {
            b = rest;
        }
        let mut v = Vec::new();
        if b.first().is_some_and(|x| x & 0x80 != 0) {
            v.push(0);
        }
        v.extend(b);
        string(out, &v);
    }

    /// What a FIDO authenticator signs for OpenSSH (PROTOCOL.u2f):
    /// SHA256(application) || flags || counter || SHA256(message).
    fn sk_signed_data(application: &str, flags: u8, counter: u32, message: &[u8]) -> Vec<u8> {
        let mut d = Sha256::digest(application.as_bytes()).to_vec();
        d.push(flags);
        d.extend(counter.to_be_bytes());
        d.extend(Sha256::digest(message));
        d
    }

    /// The SSH signature blob of an sk key: string type, string inner
    /// signature, byte flags, uint32 counter.
    fn sk_signature_blob(key_type: &str, inner: &[u8], flags: u8, counter: u32) -> Vec<u8> {
        let mut blob = Vec::new();
        string(&mut blob, key_type.as_bytes());
        string(&mut blob, inner);
        blob.push(flags);
        blob.extend(counter.to_be_bytes());
        blob
    }

    fn verifies(key_blob: &[u8], message: &[u8], sig_blob: &[u8]) -> bool {
        let (Ok(key), Ok(sig)) = (
            PublicKey::from_bytes(key_blob),
            Signature::try_from(sig_blob),
        ) else {
            return false;
        };
        // The call russh makes for every signed userauth request.
        Verifier::verify(&key, message, &sig).is_ok()
    }

    const APP: &str = "ssh:";
    const UP: u8 = 0x01;

    #[test]
    fn sk_ed25519_signatures_verify() -> TestResult {
        let rng = SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| "keygen")?;
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|_| "key")?;
        let mut key_blob = Vec::new();
        string(&mut key_blob, b"sk-ssh-ed25519@openssh.com");
        string(&mut key_blob, pair.public_key().as_ref());
        string(&mut key_blob, APP.as_bytes());
        // The registration path accepts it.
        let line = format!(
            "sk-ssh-ed25519@openssh.com {} yubikey",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &key_blob)
        );
        check_public_key(&parse_ssh_public_key(&line)?)?;

        let message = b"session id || userauth request";
        let sign = |app: &str, counter: u32, msg: &[u8]| {
            let sig = pair.sign(&sk_signed_data(app, UP, counter, msg));
            sk_signature_blob("sk-ssh-ed25519@openssh.com", sig.as_ref(), UP, counter)
        };
        assert!(verifies(&key_blob, message, &sign(APP, 7, message)));
        // Another message, another application, or a changed counter or flags fail.
        assert!(!verifies(&key_blob, b"other", &sign(APP, 7, message)));
        assert!(!verifies(
            &key_blob,
            message,
            &sign("ssh:other", 7, message)
        ));
        let mut tampered = sign(APP, 7, message);
        let n = tampered.len();
        tampered[n - 1] ^= 1;
        assert!(!verifies(&key_blob, message, &tampered));
        let mut flags = sign(APP, 7, message);
        flags[n - 5] = 0x05;
        assert!(!verifies(&key_blob, message, &flags));
        Ok(())
    }

    #[test]
    fn sk_ecdsa_p256_signatures_verify() -> TestResult {
        let rng = SystemRandom::new();
        let alg = &ECDSA_P256_SHA256_FIXED_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).map_err(|_| "keygen")?;
        let pair = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).map_err(|_| "key")?;
        let mut key_blob = Vec::new();
        string(&mut key_blob, b"sk-ecdsa-sha2-nistp256@openssh.com");
        string(&mut key_blob, b"nistp256");
        string(&mut key_blob, pair.public_key().as_ref());
        string(&mut key_blob, APP.as_bytes());
        let line = format!(
            "sk-ecdsa-sha2-nistp256@openssh.com {}",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &key_blob)
        );
        check_public_key(&parse_ssh_public_key(&line)?)?;

        let message = b"session id || userauth request";
        let sign = |app: &str, msg: &[u8]| -> Result<Vec<u8>, Box<dyn std::error::Error>> {
            // ECDSA over SHA-256 of the authenticator data (ring hashes).
            let sig = pair
                .sign(&rng, &sk_signed_data(app, UP, 42, msg))
                .map_err(|_| "sign")?;
            let (r, s) = sig.as_ref().split_at(32);
            let mut inner = Vec::new();
            mpint(&mut inner, r);
            mpint(&mut inner, s);
            Ok(sk_signature_blob(
                "sk-ecdsa-sha2-nistp256@openssh.com",
                &inner,
                UP,
                42,
            ))
        };
        assert!(verifies(&key_blob, message, &sign(APP, message)?));
        assert!(!verifies(&key_blob, b"other", &sign(APP, message)?));
        assert!(!verifies(&key_blob, message, &sign("ssh:x", message)?));
        Ok(())
    }

    #[test]
    fn weak_or_mismatched_keys_are_refused() -> TestResult {
        // A 1024-bit RSA key: string "ssh-rsa", mpint e, mpint n.
        let mut blob = Vec::new();
        string(&mut blob, b"ssh-rsa");
        mpint(&mut blob, &[1, 0, 1]);
        let mut n = vec![0xC3u8; 128];
        n[127] |= 1;
        mpint(&mut blob, &n);
        let line = format!(
            "ssh-rsa {}",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &blob)
        );
        let e = check_public_key(&parse_ssh_public_key(&line)?).err();
        assert!(e.is_some_and(|e| e.message.contains("1024 bits")));
        // A truncated ed25519 blob.
        let mut blob = Vec::new();
        string(&mut blob, b"ssh-ed25519");
        string(&mut blob, &[1, 2, 3]);
        let line = format!(
            "ssh-ed25519 {}",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &blob)
        );
        assert!(check_public_key(&parse_ssh_public_key(&line)?).is_err());
        Ok(())
    }
}
