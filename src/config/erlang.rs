//! Reads ErlMail's own Erlang term files (the `.app` and sys.config shapes): the terms
//! such files hold (atoms, quoted atoms, integers, floats, characters, strings, binaries
//! of one string, tuples and lists; `%` comments, any mix of tabs and spaces) and where
//! in them ErlMail's settings list stands. `parse.rs` turns text into [`Term`]s; `de.rs`
//! lets serde read a term, so the keys are applied by the same code as YAML.
//!
//! Every error carries the line and column of the token that caused it; columns count
//! bytes, so a tab is one column. It does not evaluate Erlang (no operators, records,
//! maps or funs) and reads nothing but the text it is given.

mod de;
mod parse;
#[cfg(test)]
mod tests;

use std::fmt;

pub use de::{DeError, TermDe};
pub use parse::parse_document;

/// A 1-based line and column (columns count bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    /// Line, from 1.
    pub line: usize,
    /// Column in bytes, from 1.
    pub column: usize,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

impl From<erl_tokenize::Position> for Pos {
    fn from(p: erl_tokenize::Position) -> Self {
        Pos {
            line: p.line().get(),
            column: p.column().get(),
        }
    }
}

/// An error in an Erlang term file, at the token that caused it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TermError {
    /// Where the offending token starts.
    pub pos: Pos,
    /// What is wrong, without the position.
    pub message: String,
}

impl TermError {
    pub(super) fn new(pos: Pos, message: impl Into<String>) -> Self {
        TermError {
            pos,
            message: message.into(),
        }
    }
}

/// The shape of a parsed term.
#[derive(Debug, Clone, PartialEq)]
pub enum TermKind {
    /// `foo` or `'Foo bar'`.
    Atom(String),
    /// An integer (also `$c` characters and negative numbers).
    Int(i128),
    /// A float.
    Float(f64),
    /// `"..."` (adjacent strings joined) or `<<"...">>`.
    Str(String),
    /// `{...}`.
    Tuple(Vec<Term>),
    /// `[...]`.
    List(Vec<Term>),
}

/// A parsed term and where it starts.
#[derive(Debug, Clone, PartialEq)]
pub struct Term {
    /// What the term is.
    pub kind: TermKind,
    /// Its first token.
    pub pos: Pos,
}

impl Term {
    /// How the term is named in messages.
    pub fn describe(&self) -> String {
        match &self.kind {
            TermKind::Atom(a) => format!("atom `{a}`"),
            TermKind::Int(i) => format!("integer {i}"),
            TermKind::Float(x) => format!("float {x}"),
            TermKind::Str(s) => format!("string {s:?}"),
            TermKind::Tuple(_) => "a tuple".into(),
            TermKind::List(_) => "a list".into(),
        }
    }
}

/// The ErlMail settings lists a document holds: the `env` list of an `.app` file, or the
/// `erlmail` section of a sys.config (other applications' sections are skipped).
pub fn erlmail_env(doc: &Term) -> Result<Option<&Term>, TermError> {
    let shape = "expected {application, erlmail, [...]}. or [{erlmail, [...]}, ...].";
    match &doc.kind {
        TermKind::Tuple(items) => {
            let [tag, name, props] = items.as_slice() else {
                return Err(TermError::new(doc.pos, shape));
            };
            if tag.kind != TermKind::Atom("application".into()) {
                return Err(TermError::new(
                    tag.pos,
                    format!("{shape} (found {})", tag.describe()),
                ));
            }
            if name.kind != TermKind::Atom("erlmail".into()) {
                return Err(TermError::new(
                    name.pos,
                    format!(
                        "this is the application file of {}, not erlmail",
                        name.describe()
                    ),
                ));
            }
            let TermKind::List(props) = &props.kind else {
                return Err(TermError::new(
                    props.pos,
                    format!(
                        "expected the list of application properties, found {}",
                        props.describe()
                    ),
                ));
            };
            let mut env = None;
            for prop in props {
                let (key, value) = pair(prop)?;
                if key.kind == TermKind::Atom("env".into()) {
                    if env.is_some() {
                        return Err(TermError::new(key.pos, "duplicate key `env`"));
                    }
                    env = Some(list(value, "the env list")?);
                }
            }
            Ok(env)
        }
        TermKind::List(sections) => {
            let mut found = None;
            for section in sections {
                if let TermKind::Str(s) = &section.kind {
                    return Err(TermError::new(
                        section.pos,
                        format!("included config files ({s:?}) are not supported: merge them into this file"),
                    ));
                }
                let (app, settings) = pair(section)?;
                let TermKind::Atom(name) = &app.kind else {
                    return Err(TermError::new(
                        app.pos,
                        format!("expected an application name, found {}", app.describe()),
                    ));
                };
                if name == "erlmail" {
                    if found.is_some() {
                        return Err(TermError::new(app.pos, "duplicate section `erlmail`"));
                    }
                    found = Some(list(settings, "the erlmail settings list")?);
                }
            }
            Ok(found)
        }
        _ => Err(TermError::new(
            doc.pos,
            format!("{shape} (found {})", doc.describe()),
        )),
    }
}

pub(super) fn pair(t: &Term) -> Result<(&Term, &Term), TermError> {
    match &t.kind {
        TermKind::Tuple(items) if items.len() == 2 => Ok((&items[0], &items[1])),
        _ => Err(TermError::new(
            t.pos,
            format!("expected a {{Key, Value}} tuple, found {}", t.describe()),
        )),
    }
}

fn list<'t>(t: &'t Term, what: &str) -> Result<&'t Term, TermError> {
    match &t.kind {
        TermKind::List(_) => Ok(t),
        TermKind::Str(s) if s.is_empty() => Ok(t),
        _ => Err(TermError::new(
            t.pos,
            format!("expected {what}, found {}", t.describe()),
        )),
    }
}
