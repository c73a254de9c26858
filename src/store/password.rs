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

/// Verifies `pw` against a fixed dummy hash with the same parameters as real ones and
/// returns `false`: an AUTH for a user that does not exist costs as much time as one for a
/// user that does, so the answer's timing does not tell which users exist.
pub fn verify_unknown_user(pw: &str) -> bool {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let phc = DUMMY.get_or_init(|| {
        hash_password("erlmail: no such user; this hash only burns time").unwrap_or_default()
    });
    let _ = verify_password(pw, phc);
    false
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
    fn unknown_users_never_verify_and_cost_a_real_verification() {
        let known = hash_password("pw").unwrap();
        // Warm the dummy hash first: only the verification is compared.
        assert!(!verify_unknown_user("pw"));
        let t = std::time::Instant::now();
        assert!(!verify_unknown_user("pw"));
        let unknown = t.elapsed();
        let t = std::time::Instant::now();
        assert!(verify_password("pw", &known));
        let real = t.elapsed();
        // The same work (argon2 with the same parameters), not a fast path: within a
        // factor that machine noise cannot explain away.
        assert!(unknown * 4 > real, "unknown {unknown:?} vs known {real:?}");
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
