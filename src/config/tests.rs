//! Tests of the configuration loader over real files: ErlMail's fixtures, config/erlmail.yaml
//! and the malformed files in tests/fixtures/config/.
