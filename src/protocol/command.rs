//! SMTP commands: one complete command line in, one [`Command`] (or a
//! [`CommandError`] that knows its exact reply) out.
//!
//! The parser sees a line without its CRLF, already checked for bare CR/LF and length by
//! `protocol::line`. It checks syntax only (verbs, paths, ESMTP parameters of RFC 1870,
//! 6152, 6531 and 3461); whether a command is allowed now, and what the server does with
//! it, is the session's business.

use super::address::{parse_path, Path};
use super::auth::Secret;
use super::reply::Reply;

/// One parsed SMTP command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `HELO domain`.
    Helo(String),
    /// `EHLO domain`.
    Ehlo(String),
    /// `MAIL FROM:<path> params`; `from` is `None` for the null sender `<>`.
    Mail {
        /// The sender path; `None` is `<>`.
        from: Option<Path>,
        /// ESMTP parameters.
        params: MailParams,
    },
    /// `RCPT TO:<path> params`.
    Rcpt {
        /// The recipient path as written.
        to: Path,
        /// ESMTP parameters.
        params: RcptParams,
    },
    /// `DATA`.
    Data,
    /// `RSET`.
    Rset,
    /// `NOOP [text]`.
    Noop,
    /// `QUIT`.
    Quit,
    /// `VRFY string`.
    Vrfy(String),
    /// `EXPN string`.
    Expn(String),
    /// `HELP [topic]`.
    Help,
    /// `STARTTLS` (RFC 3207).
    StartTls,
    /// `AUTH mechanism [initial-response]` (RFC 4954). The initial response carries
    /// credentials, so it is a [`Secret`] that `Debug` does not print.
    Auth {
        /// The SASL mechanism, upper-cased.
        mechanism: String,
        /// The base64 initial response, if given (`=` is an empty one).
        initial: Option<Secret>,
    },
}

/// `BODY=` values (RFC 6152).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// `BODY=7BIT`.
    SevenBit,
    /// `BODY=8BITMIME`.
    EightBitMime,
}

/// `MAIL FROM` parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MailParams {
    /// `SIZE=` (RFC 1870); a number too big for u64 becomes `u64::MAX`.
    pub size: Option<u64>,
    /// `BODY=`.
    pub body: Option<Body>,
    /// `SMTPUTF8` (RFC 6531).
    pub smtputf8: bool,
    /// `RET=FULL|HDRS` (RFC 3461), upper-cased.
    pub ret: Option<String>,
    /// `ENVID=` (RFC 3461), the raw xtext.
    pub envid: Option<String>,
}

/// `RCPT TO` parameters (RFC 3461).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RcptParams {
    /// `NOTIFY=` upper-cased: `NEVER` or a list of `SUCCESS`, `FAILURE`, `DELAY`.
    pub notify: Option<String>,
    /// `ORCPT=addr-type;xtext`, raw.
    pub orcpt: Option<String>,
}

/// Why a command line was refused; each maps to one exact reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// Unknown verb (or an empty line).
    #[error("command not recognized")]
    Unrecognized,
    /// The line is not UTF-8.
    #[error("bad UTF-8 syntax")]
    NotUtf8,
    /// Wrong arguments; the field is the usage shown to the client.
    #[error("syntax: {0}")]
    Syntax(&'static str),
    /// The `MAIL FROM` path does not parse.
    #[error("bad sender address syntax")]
    BadSender,
    /// The `RCPT TO` path does not parse.
    #[error("bad recipient address syntax")]
    BadRecipient,
    /// An ESMTP parameter this server does not know (reply 555).
    #[error("unsupported option {0}")]
    UnknownParameter(String),
    /// A known ESMTP parameter with a bad or repeated value; the field names it.
    #[error("bad {0} syntax")]
    BadParameter(&'static str),
}

impl CommandError {
    /// The reply sent to the client for this error.
    pub fn reply(&self) -> Reply {
        match self {
            CommandError::Unrecognized => Reply::new(500, "5.5.2 Error: command not recognized"),
            CommandError::NotUtf8 => Reply::new(500, "5.5.2 Error: bad UTF-8 syntax"),
            CommandError::Syntax(usage) => Reply::new(501, format!("5.5.4 Syntax: {usage}")),
            CommandError::BadSender => Reply::new(501, "5.1.7 Bad sender address syntax"),
            CommandError::BadRecipient => Reply::new(501, "5.1.3 Bad recipient address syntax"),
            CommandError::UnknownParameter(p) => {
                Reply::new(555, format!("5.5.4 Unsupported option: {p}"))
            }
            CommandError::BadParameter(p) => Reply::new(501, format!("5.5.4 Bad {p} syntax")),
        }
    }
}

/// Parses one command line (without its CRLF).
pub fn parse_command(line: &[u8]) -> Result<Command, CommandError> {
    let line = std::str::from_utf8(line).map_err(|_| CommandError::NotUtf8)?;
    // Trailing blanks are common from hand-typed sessions and harmless.
    let line = line.trim_end_matches([' ', '\t']);
    let (verb, arg) = match line.find(' ') {
        Some(i) => (&line[..i], line[i + 1..].trim_start_matches(' ')),
        None => (line, ""),
    };
    match verb.to_ascii_uppercase().as_str() {
        "HELO" => hello(arg, "HELO hostname").map(Command::Helo),
        "EHLO" => hello(arg, "EHLO hostname").map(Command::Ehlo),
        "MAIL" => mail(arg),
        "RCPT" => rcpt(arg),
        "DATA" => no_arg(arg, "DATA", Command::Data),
        "RSET" => no_arg(arg, "RSET", Command::Rset),
        "NOOP" => Ok(Command::Noop),
        "QUIT" => Ok(Command::Quit),
        "VRFY" if arg.is_empty() => Err(CommandError::Syntax("VRFY address")),
        "VRFY" => Ok(Command::Vrfy(arg.to_string())),
        "EXPN" if arg.is_empty() => Err(CommandError::Syntax("EXPN mailing-list")),
        "EXPN" => Ok(Command::Expn(arg.to_string())),
        "HELP" => Ok(Command::Help),
        "STARTTLS" => no_arg(arg, "STARTTLS", Command::StartTls),
        "AUTH" => auth(arg),
        _ => Err(CommandError::Unrecognized),
    }
}

fn auth(arg: &str) -> Result<Command, CommandError> {
    let mut words = arg.split(' ').filter(|w| !w.is_empty());
    let mechanism = match words.next() {
        Some(m) => m.to_ascii_uppercase(),
        None => return Err(CommandError::Syntax("AUTH mechanism")),
    };
    let initial = words.next().map(|w| Secret(w.to_string()));
    if words.next().is_some() {
        return Err(CommandError::Syntax("AUTH mechanism"));
    }
    Ok(Command::Auth { mechanism, initial })
}

fn no_arg(arg: &str, usage: &'static str, cmd: Command) -> Result<Command, CommandError> {
    if arg.is_empty() {
        Ok(cmd)
    } else {
        Err(CommandError::Syntax(usage))
    }
}

/// HELO/EHLO argument: anything printable (Postfix is as lenient), since it only ends up
/// in the `Received:` header; control characters are refused so they cannot.
fn hello(arg: &str, usage: &'static str) -> Result<String, CommandError> {
    if arg.is_empty() || arg.chars().any(char::is_control) {
        return Err(CommandError::Syntax(usage));
    }
    Ok(arg.to_string())
}

/// Strips `keyword:` (case-insensitive) from the start of `arg`.
fn strip_keyword<'a>(arg: &'a str, keyword: &str) -> Option<&'a str> {
    let head = arg.get(..keyword.len())?;
    head.eq_ignore_ascii_case(keyword)
        .then(|| &arg[keyword.len()..])
}

fn mail(arg: &str) -> Result<Command, CommandError> {
    const USAGE: &str = "MAIL FROM:<address>";
    let rest = strip_keyword(arg, "FROM:").ok_or(CommandError::Syntax(USAGE))?;
    let (from, rest) = parse_path(rest).map_err(|_| CommandError::BadSender)?;
    let mut params = MailParams::default();
    for (key, value) in esmtp_params(rest, USAGE)? {
        match (key.to_ascii_uppercase().as_str(), value) {
            ("SIZE", Some(v)) => {
                if params.size.is_some() || v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(CommandError::BadParameter("message size"));
                }
                params.size = Some(v.parse().unwrap_or(u64::MAX));
            }
            ("BODY", Some(v)) => {
                let body = match v.to_ascii_uppercase().as_str() {
                    "7BIT" => Body::SevenBit,
                    "8BITMIME" => Body::EightBitMime,
                    _ => return Err(CommandError::BadParameter("BODY keyword")),
                };
                if params.body.replace(body).is_some() {
                    return Err(CommandError::BadParameter("BODY keyword"));
                }
            }
            ("SMTPUTF8", None) => {
                if std::mem::replace(&mut params.smtputf8, true) {
                    return Err(CommandError::BadParameter("SMTPUTF8"));
                }
            }
            ("RET", Some(v)) => {
                let v = v.to_ascii_uppercase();
                if !(v == "FULL" || v == "HDRS") || params.ret.replace(v).is_some() {
                    return Err(CommandError::BadParameter("RET parameter"));
                }
            }
            ("ENVID", Some(v)) => {
                // RFC 3461 §4.4: at most 100 characters of xtext.
                if !is_xtext(v) || v.len() > 100 || params.envid.replace(v.into()).is_some() {
                    return Err(CommandError::BadParameter("ENVID parameter"));
                }
            }
            ("SIZE" | "BODY" | "RET" | "ENVID", None) | ("SMTPUTF8", Some(_)) => {
                return Err(CommandError::Syntax(USAGE));
            }
            _ => return Err(CommandError::UnknownParameter(key.to_string())),
        }
    }
    Ok(Command::Mail { from, params })
}

fn rcpt(arg: &str) -> Result<Command, CommandError> {
    const USAGE: &str = "RCPT TO:<address>";
    let rest = strip_keyword(arg, "TO:").ok_or(CommandError::Syntax(USAGE))?;
    let (to, rest) = parse_path(rest).map_err(|_| CommandError::BadRecipient)?;
    let to = to.ok_or(CommandError::BadRecipient)?;
    let mut params = RcptParams::default();
    for (key, value) in esmtp_params(rest, USAGE)? {
        match (key.to_ascii_uppercase().as_str(), value) {
            ("NOTIFY", Some(v)) => {
                let v = v.to_ascii_uppercase();
                if !valid_notify(&v) || params.notify.replace(v).is_some() {
                    return Err(CommandError::BadParameter("NOTIFY parameter"));
                }
            }
            ("ORCPT", Some(v)) => {
                if !valid_orcpt(v) || params.orcpt.replace(v.into()).is_some() {
                    return Err(CommandError::BadParameter("ORCPT parameter"));
                }
            }
            ("NOTIFY" | "ORCPT", None) => return Err(CommandError::Syntax(USAGE)),
            _ => return Err(CommandError::UnknownParameter(key.to_string())),
        }
    }
    Ok(Command::Rcpt { to, params })
}

/// Splits `rest` into `KEY[=VALUE]` words. `rest` must be empty or start with a blank.
fn esmtp_params<'a>(
    rest: &'a str, usage: &'static str,
) -> Result<Vec<(&'a str, Option<&'a str>)>, CommandError> {
    if !rest.is_empty() && !rest.starts_with([' ', '\t']) {
        return Err(CommandError::Syntax(usage));
    }
    rest.split([' ', '\t'])
        .filter(|w| !w.is_empty())
        .map(|w| {
            let (key, value) = match w.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (w, None),
            };
            let key_ok =
                !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
            if key_ok {
                Ok((key, value))
            } else {
                Err(CommandError::Syntax(usage))
            }
        })
        .collect()
}

/// RFC 3461 §4: `NEVER` alone, or a non-empty set of SUCCESS, FAILURE, DELAY.
fn valid_notify(v: &str) -> bool {
    if v == "NEVER" {
        return true;
    }
    let words: Vec<&str> = v.split(',').collect();
    words
        .iter()
        .all(|w| matches!(*w, "SUCCESS" | "FAILURE" | "DELAY"))
        && (1..words.len()).all(|i| !words[..i].contains(&words[i]))
}

/// RFC 3461 §4.2: `addr-type ";" xtext`, addr-type an atom.
fn valid_orcpt(v: &str) -> bool {
    match v.split_once(';') {
        Some((ty, addr)) => {
            !ty.is_empty()
                && ty.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !addr.is_empty()
                && is_xtext(addr)
        }
        None => false,
    }
}

/// RFC 3461 §4 xtext: printable ASCII except `+` and `=`, with `+XX` upper-hex escapes.
pub fn is_xtext(v: &str) -> bool {
    let b = v.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                let hex = |c: u8| c.is_ascii_digit() || (b'A'..=b'F').contains(&c);
                if i + 2 >= b.len() || !hex(b[i + 1]) || !hex(b[i + 2]) {
                    return false;
                }
                i += 3;
            }
            b'!'..=b'~' if b[i] != b'=' => i += 1,
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Command, CommandError> {
        parse_command(s.as_bytes())
    }

    fn mail_params(s: &str) -> MailParams {
        match p(s).unwrap() {
            Command::Mail { params, .. } => params,
            other => panic!("not MAIL: {other:?}"),
        }
    }

    fn rcpt_params(s: &str) -> RcptParams {
        match p(s).unwrap() {
            Command::Rcpt { params, .. } => params,
            other => panic!("not RCPT: {other:?}"),
        }
    }

    #[test]
    fn starttls_and_auth() {
        assert_eq!(p("starttls"), Ok(Command::StartTls));
        assert_eq!(p("STARTTLS x"), Err(CommandError::Syntax("STARTTLS")));
        assert_eq!(
            p("auth plain AGFAYgBj"),
            Ok(Command::Auth {
                mechanism: "PLAIN".into(),
                initial: Some(Secret("AGFAYgBj".into()))
            })
        );
        assert_eq!(
            p("AUTH LOGIN"),
            Ok(Command::Auth {
                mechanism: "LOGIN".into(),
                initial: None
            })
        );
        assert_eq!(p("AUTH"), Err(CommandError::Syntax("AUTH mechanism")));
        assert_eq!(
            p("AUTH PLAIN a b"),
            Err(CommandError::Syntax("AUTH mechanism"))
        );
        // The initial response never shows in Debug output.
        let shown = format!("{:?}", p("AUTH PLAIN AGFAYgBj").unwrap());
        assert!(!shown.contains("AGFAYgBj"), "{shown}");
    }

    #[test]
    fn simple_verbs_any_case() {
        assert_eq!(
            p("helo client.example"),
            Ok(Command::Helo("client.example".into()))
        );
        assert_eq!(
            p("EHLO [192.0.2.1]"),
            Ok(Command::Ehlo("[192.0.2.1]".into()))
        );
        assert_eq!(p("data"), Ok(Command::Data));
        assert_eq!(p("RSET"), Ok(Command::Rset));
        assert_eq!(p("NOOP hello"), Ok(Command::Noop));
        assert_eq!(p("QUIT"), Ok(Command::Quit));
        assert_eq!(p("QUIT  "), Ok(Command::Quit));
        assert_eq!(p("VRFY bob"), Ok(Command::Vrfy("bob".into())));
        assert_eq!(p("EXPN staff"), Ok(Command::Expn("staff".into())));
        assert_eq!(p("HELP"), Ok(Command::Help));
        assert_eq!(p("HELP MAIL"), Ok(Command::Help));
    }

    #[test]
    fn verb_errors() {
        for (line, error) in [
            ("", CommandError::Unrecognized),
            ("FOO", CommandError::Unrecognized),
            ("MAILFROM:<a@b>", CommandError::Unrecognized),
            ("HELO", CommandError::Syntax("HELO hostname")),
            ("EHLO", CommandError::Syntax("EHLO hostname")),
            ("EHLO a\u{7}b", CommandError::Syntax("EHLO hostname")),
            ("DATA x", CommandError::Syntax("DATA")),
            ("RSET x", CommandError::Syntax("RSET")),
            ("VRFY", CommandError::Syntax("VRFY address")),
            ("EXPN", CommandError::Syntax("EXPN mailing-list")),
        ] {
            assert_eq!(p(line), Err(error), "{line:?}");
        }
        assert_eq!(parse_command(b"NOOP \xff"), Err(CommandError::NotUtf8));
    }

    #[test]
    fn mail_from_forms() {
        assert_eq!(
            p("MAIL FROM:<>"),
            Ok(Command::Mail {
                from: None,
                params: MailParams::default()
            })
        );
        let Ok(Command::Mail {
            from: Some(path), ..
        }) = p("mail from: <A@B.example>")
        else {
            panic!()
        };
        assert_eq!(path.domain.as_deref(), Some("b.example"));
        assert!(p("MAIL FROM:a@b.example").is_ok());
        assert_eq!(
            p("MAIL TO:<a@b>"),
            Err(CommandError::Syntax("MAIL FROM:<address>"))
        );
        assert_eq!(p("MAIL"), Err(CommandError::Syntax("MAIL FROM:<address>")));
        assert_eq!(p("MAIL FROM:<a@b"), Err(CommandError::BadSender));
        assert_eq!(
            p("MAIL FROM:<a@b>x"),
            Err(CommandError::Syntax("MAIL FROM:<address>"))
        );
    }

    #[test]
    fn mail_parameters() {
        let m =
            mail_params("MAIL FROM:<a@b> SIZE=1000 body=8bitmime SMTPUTF8 RET=hdrs ENVID=QQ+2B1");
        assert_eq!(
            m,
            MailParams {
                size: Some(1000),
                body: Some(Body::EightBitMime),
                smtputf8: true,
                ret: Some("HDRS".into()),
                envid: Some("QQ+2B1".into()),
            }
        );
        assert_eq!(
            mail_params("MAIL FROM:<> BODY=7BIT").body,
            Some(Body::SevenBit)
        );
        assert_eq!(
            mail_params("MAIL FROM:<> RET=FULL").ret.as_deref(),
            Some("FULL")
        );
        assert_eq!(
            mail_params("MAIL FROM:<> SIZE=99999999999999999999999").size,
            Some(u64::MAX)
        );
    }

    #[test]
    fn mail_parameter_errors() {
        let bad = |s: &str| p(s).unwrap_err();
        assert_eq!(
            bad("MAIL FROM:<> SIZE=x"),
            CommandError::BadParameter("message size")
        );
        assert_eq!(
            bad("MAIL FROM:<> SIZE="),
            CommandError::BadParameter("message size")
        );
        assert_eq!(
            bad("MAIL FROM:<> SIZE=1 SIZE=2"),
            CommandError::BadParameter("message size")
        );
        assert_eq!(
            bad("MAIL FROM:<> SIZE"),
            CommandError::Syntax("MAIL FROM:<address>")
        );
        assert_eq!(
            bad("MAIL FROM:<> BODY=BINARYMIME"),
            CommandError::BadParameter("BODY keyword")
        );
        assert_eq!(
            bad("MAIL FROM:<> SMTPUTF8=yes"),
            CommandError::Syntax("MAIL FROM:<address>")
        );
        assert_eq!(
            bad("MAIL FROM:<> RET=ALL"),
            CommandError::BadParameter("RET parameter")
        );
        assert_eq!(
            bad("MAIL FROM:<> ENVID=a=b"),
            CommandError::BadParameter("ENVID parameter")
        );
        assert_eq!(
            bad("MAIL FROM:<> ENVID=a+2"),
            CommandError::BadParameter("ENVID parameter")
        );
        assert_eq!(
            bad("MAIL FROM:<> ENVID=a+zz"),
            CommandError::BadParameter("ENVID parameter")
        );
        assert_eq!(
            bad("MAIL FROM:<> AUTH=<>"),
            CommandError::UnknownParameter("AUTH".into())
        );
        assert_eq!(
            bad("MAIL FROM:<> XFOO"),
            CommandError::UnknownParameter("XFOO".into())
        );
        assert_eq!(
            bad("MAIL FROM:<> =x"),
            CommandError::Syntax("MAIL FROM:<address>")
        );
    }

    #[test]
    fn rcpt_forms_and_parameters() {
        let Ok(Command::Rcpt { to, params }) = p("RCPT TO:<bob@local.example>") else {
            panic!()
        };
        assert_eq!(to.local_part, "bob");
        assert_eq!(params, RcptParams::default());
        assert_eq!(p("RCPT TO:<>"), Err(CommandError::BadRecipient));
        assert_eq!(p("RCPT TO:<a b@c>"), Err(CommandError::BadRecipient));
        assert_eq!(
            p("RCPT FROM:<a@b>"),
            Err(CommandError::Syntax("RCPT TO:<address>"))
        );
        let r = rcpt_params("RCPT TO:<a@b> NOTIFY=success,delay ORCPT=rfc822;a+40b");
        assert_eq!(r.notify.as_deref(), Some("SUCCESS,DELAY"));
        assert_eq!(r.orcpt.as_deref(), Some("rfc822;a+40b"));
        assert_eq!(
            rcpt_params("RCPT TO:<a@b> NOTIFY=NEVER").notify.as_deref(),
            Some("NEVER")
        );
        assert_eq!(
            rcpt_params("RCPT TO:<a@b> NOTIFY=FAILURE")
                .notify
                .as_deref(),
            Some("FAILURE")
        );
    }

    #[test]
    fn rcpt_parameter_errors() {
        let bad = |s: &str| p(s).unwrap_err();
        let notify = CommandError::BadParameter("NOTIFY parameter");
        assert_eq!(bad("RCPT TO:<a@b> NOTIFY=NEVER,SUCCESS"), notify);
        assert_eq!(bad("RCPT TO:<a@b> NOTIFY=SUCCESS,SUCCESS"), notify);
        assert_eq!(bad("RCPT TO:<a@b> NOTIFY="), notify);
        assert_eq!(bad("RCPT TO:<a@b> NOTIFY=SOMETIMES"), notify);
        assert_eq!(
            bad("RCPT TO:<a@b> NOTIFY"),
            CommandError::Syntax("RCPT TO:<address>")
        );
        let orcpt = CommandError::BadParameter("ORCPT parameter");
        assert_eq!(bad("RCPT TO:<a@b> ORCPT=a@b"), orcpt);
        assert_eq!(bad("RCPT TO:<a@b> ORCPT=rfc822;"), orcpt);
        assert_eq!(bad("RCPT TO:<a@b> ORCPT=;a"), orcpt);
        assert_eq!(
            bad("RCPT TO:<a@b> FOO=1"),
            CommandError::UnknownParameter("FOO".into())
        );
    }

    #[test]
    fn xtext() {
        assert!(is_xtext("abc+2B+3D"));
        assert!(is_xtext(""));
        assert!(!is_xtext("a+2"));
        assert!(!is_xtext("a+"));
        assert!(!is_xtext("a+2b"));
        assert!(!is_xtext("a b"));
        assert!(!is_xtext("é"));
    }

    #[test]
    fn error_replies() {
        for (error, wire) in [
            (
                CommandError::Unrecognized,
                "500 5.5.2 Error: command not recognized\r\n",
            ),
            (
                CommandError::NotUtf8,
                "500 5.5.2 Error: bad UTF-8 syntax\r\n",
            ),
            (CommandError::Syntax("DATA"), "501 5.5.4 Syntax: DATA\r\n"),
            (
                CommandError::BadSender,
                "501 5.1.7 Bad sender address syntax\r\n",
            ),
            (
                CommandError::BadRecipient,
                "501 5.1.3 Bad recipient address syntax\r\n",
            ),
            (
                CommandError::UnknownParameter("X".into()),
                "555 5.5.4 Unsupported option: X\r\n",
            ),
            (
                CommandError::BadParameter("RET parameter"),
                "501 5.5.4 Bad RET parameter syntax\r\n",
            ),
        ] {
            assert_eq!(error.reply().to_string(), wire);
        }
    }
}
