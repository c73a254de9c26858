//! Password hashing for `users`: argon2id with a random salt, stored as a PHC string.
//!
//! This module owns the only code that sees a clear-text password. It must never log,
//! print or store one; callers pass the PHC string it returns to the store.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use rand::RngCore;

use super::StoreError;

/// Hash `pw` with argon2id (default parameters) and a fresh 16-byte random salt; returns
/// the PHC string (`$argon2id$v=19$m=...$salt$hash`).
pub fn hash_password(pw: &str) -> Result<String, StoreError> {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt)
        .map_err(|e| StoreError::Backend(format!("password salt: {e}")))?;
    Argon2::default()
        .hash_password(pw.as_bytes(), &salt)
        .map(|h| h.to_string())
        // The argon2 error never contains the password; it names a parameter problem.
        .map_err(|e| StoreError::Backend(format!("password hashing failed: {e}")))
}

/// Whether `pw` matches the PHC string `phc`. A malformed `phc` never matches.
pub fn verify_password(pw: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => Argon2::default()
            .verify_password(pw.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// Whether `s` parses as a PHC hash string; the store refuses anything else so that a
/// clear-text password can never be stored by mistake.
pub fn is_phc_hash(s: &str) -> bool {
    PasswordHash::new(s).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_then_verify() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$v=19$"), "{h}");
        assert!(!h.contains("correct horse"));
        assert!(verify_password("correct horse", &h));
        assert!(!verify_password("correct horsE", &h));
        assert!(!verify_password("", &h));
    }

    #[test]
    fn salts_differ() {
        let a = hash_password("pw").unwrap();
        let b = hash_password("pw").unwrap();
        assert_ne!(a, b);
        assert!(verify_password("pw", &a) && verify_password("pw", &b));
    }

    #[test]
    fn malformed_hash_never_matches() {
        assert!(!verify_password("pw", "pw"));
        assert!(!verify_password("pw", ""));
        assert!(!is_phc_hash("secret"));
        assert!(is_phc_hash(&hash_password("x").unwrap()));
    }
}
