//! SMTP AUTH (RFC 4954): the PLAIN and LOGIN exchanges, offered and accepted only over
//! TLS (`530 5.7.0` before). The credentials go out in [`Action::Authenticate`] with the
//! password as a [`Secret`] (never printed by `Debug`); checking them, and slowing
//! failures down, is the actor's business.

use super::{Action, Mode, Secret, Session};
use crate::protocol::{auth, Reply};

impl Session {
    pub(super) fn auth(&mut self, mechanism: &str, initial: Option<Secret>, out: &mut Vec<Action>) {
        if !self.tls {
            let r = Reply::new(530, "5.7.0 Must issue a STARTTLS command first");
            return self.error(out, r);
        }
        if self.helo.is_none() {
            return self.error(out, Reply::new(503, "5.5.1 Error: send HELO/EHLO first"));
        }
        if self.user.is_some() {
            return self.error(out, Reply::new(503, "5.5.1 Error: already authenticated"));
        }
        if self.envelope.is_some() {
            let r = Reply::new(503, "5.5.1 Error: MAIL transaction in progress");
            return self.error(out, r);
        }
        match (mechanism, initial) {
            ("PLAIN", Some(response)) => self.auth_plain(response.expose(), out),
            ("PLAIN", None) => {
                self.mode = Mode::AuthPlain;
                self.reply(out, Reply::new(334, ""));
            }
            ("LOGIN", Some(user)) => self.auth_login_user(user.expose(), out),
            ("LOGIN", None) => {
                self.mode = Mode::AuthLoginUser;
                self.reply(out, Reply::new(334, auth::LOGIN_USERNAME_PROMPT));
            }
            _ => self.error(
                out,
                Reply::new(504, "5.5.4 Unrecognized authentication type"),
            ),
        }
    }

    /// One line of a SASL exchange, in an `Auth*` mode.
    pub(super) fn auth_response(&mut self, line: &[u8], out: &mut Vec<Action>) {
        let mode = std::mem::replace(&mut self.mode, Mode::Command);
        if auth::is_cancel(line) {
            return self.error(out, Reply::new(501, "5.7.0 Authentication aborted"));
        }
        let Ok(text) = std::str::from_utf8(line) else {
            return self.error(out, Reply::new(501, "5.5.2 Cannot decode response"));
        };
        match mode {
            Mode::AuthPlain => self.auth_plain(text, out),
            Mode::AuthLoginUser => self.auth_login_user(text, out),
            Mode::AuthLoginPassword(user) => match auth::decode_text(text) {
                Some(password) => self.request_auth(user, Secret(password), out),
                None => self.error(out, Reply::new(501, "5.5.2 Cannot decode response")),
            },
            other => self.mode = other,
        }
    }

    fn auth_plain(&mut self, response: &str, out: &mut Vec<Action>) {
        // `=` is an empty initial response (RFC 4954 §4), which PLAIN cannot use.
        match auth::decode_plain(response) {
            Some((user, password)) => self.request_auth(user, password, out),
            None => self.error(out, Reply::new(501, "5.5.2 Cannot decode response")),
        }
    }

    fn auth_login_user(&mut self, response: &str, out: &mut Vec<Action>) {
        match auth::decode_text(response) {
            Some(user) if !user.is_empty() => {
                self.mode = Mode::AuthLoginPassword(user);
                self.reply(out, Reply::new(334, auth::LOGIN_PASSWORD_PROMPT));
            }
            _ => self.error(out, Reply::new(501, "5.5.2 Cannot decode response")),
        }
    }

    fn request_auth(&mut self, user: String, password: Secret, out: &mut Vec<Action>) {
        out.push(Action::Authenticate {
            user: user.clone(),
            password,
        });
        self.mode = Mode::AwaitAuth(user);
    }
}

pub(super) fn auth_failed() -> Reply {
    Reply::new(535, "5.7.8 Error: authentication failed")
}
