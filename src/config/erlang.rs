//! Reads ErlMail's own Erlang term files (the `.app` and sys.config shapes).
//!
//! This module owns a small parser for the Erlang terms such files hold (atoms, quoted
//! atoms, integers, floats, characters, strings, binaries of one string, tuples and
//! lists; `%` comments and any mix of tabs and spaces), built on the `erl_tokenize`
//! scanner, and a serde `Deserializer` over the parsed terms so the keys are applied by the
//! same code as YAML (`apply.rs`). Every error carries the line and column of the token
//! that caused it; columns count bytes, so a tab is one column. It does not evaluate Erlang
//! (no operators, records, maps or funs) and reads nothing but the text it is given.

use std::fmt;

use erl_tokenize::{ErrorKind, Symbol, TokenKind, TokenValue};
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Unexpected, Visitor};

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
    fn new(pos: Pos, message: impl Into<String>) -> Self {
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

/// One lexical token with its text.
struct Tok<'s> {
    kind: TokenKind,
    start: Pos,
    end: Pos,
    text: &'s str,
    token: erl_tokenize::Token,
}

/// Deepest nesting accepted, so a hostile file cannot overflow the stack.
const MAX_DEPTH: usize = 64;

/// Parses a file holding exactly one term followed by the final `.`.
pub fn parse_document(src: &str) -> Result<Term, TermError> {
    let toks = tokenize(src)?;
    let mut p = Parser {
        src,
        toks,
        i: 0,
        eof: Pos { line: 1, column: 1 },
    };
    p.eof = p.toks.last().map_or(Pos { line: 1, column: 1 }, |t| t.end);
    if p.toks.is_empty() {
        return Err(TermError::new(
            p.eof,
            "empty file: expected an ErlMail term such as [{erlmail, [...]}].",
        ));
    }
    let term = p.term(0)?;
    match p.next() {
        None => {
            return Err(TermError::new(
                p.eof,
                "missing the final `.` after the term",
            ))
        }
        Some(t) if t.kind == TokenKind::Symbol(Symbol::Dot) => {}
        Some(t) if is_close(t.kind) => {
            return Err(TermError::new(
                t.start,
                format!("unbalanced `{}`: nothing is open to close", t.text),
            ))
        }
        Some(t) => {
            return Err(TermError::new(
                t.start,
                format!("expected the final `.` after the term, found `{}`", t.text),
            ))
        }
    }
    if let Some(t) = p.next() {
        return Err(TermError::new(
            t.start,
            format!("unexpected `{}` after the final `.`", t.text),
        ));
    }
    Ok(term)
}

fn is_close(kind: TokenKind) -> bool {
    matches!(
        kind,
        TokenKind::Symbol(Symbol::CloseBrace | Symbol::CloseSquare | Symbol::DoubleRightAngle)
    )
}

fn tokenize(src: &str) -> Result<Vec<Tok<'_>>, TermError> {
    let mut toks = Vec::new();
    let mut pos = erl_tokenize::Position::new();
    loop {
        match erl_tokenize::scan_token(src, pos) {
            Ok(None) => return Ok(toks),
            Ok(Some(token)) => {
                pos = token.end();
                if token.kind().is_lexical() {
                    toks.push(Tok {
                        kind: token.kind(),
                        start: token.start().into(),
                        end: token.end().into(),
                        text: token.text(src),
                        token,
                    });
                }
            }
            Err(e) => {
                let at = src
                    .get(e.position.offset()..)
                    .and_then(|s| s.chars().next());
                let message = match (e.kind, at) {
                    (ErrorKind::NoClosingQuotation, Some('"')) => {
                        "unterminated string: no closing `\"`".to_string()
                    }
                    (ErrorKind::NoClosingQuotation, Some('\'')) => {
                        "unterminated quoted atom: no closing `'`".to_string()
                    }
                    (kind, Some(c)) => format!("{kind} at `{c}`"),
                    (kind, None) => kind.to_string(),
                };
                return Err(TermError::new(e.position.into(), message));
            }
        }
    }
}

struct Parser<'s> {
    src: &'s str,
    toks: Vec<Tok<'s>>,
    i: usize,
    /// Just past the last token: where "missing ..." errors point.
    eof: Pos,
}

impl<'s> Parser<'s> {
    fn next(&mut self) -> Option<&Tok<'s>> {
        let t = self.toks.get(self.i);
        if t.is_some() {
            self.i += 1;
        }
        t
    }

    fn peek_kind(&self) -> Option<TokenKind> {
        self.toks.get(self.i).map(|t| t.kind)
    }

    fn term(&mut self, depth: usize) -> Result<Term, TermError> {
        let eof = self.eof;
        let src = self.src;
        let Some(t) = self.next() else {
            return Err(TermError::new(
                eof,
                "unexpected end of file: expected a term",
            ));
        };
        let (pos, kind, text, token) = (t.start, t.kind, t.text, t.token);
        if depth >= MAX_DEPTH {
            return Err(TermError::new(pos, "terms nested too deeply"));
        }
        let value = |k| Term { kind: k, pos };
        match kind {
            TokenKind::Atom => match token.value(src) {
                TokenValue::Atom(a) => Ok(value(TermKind::Atom(a.into_owned()))),
                _ => Err(TermError::new(pos, format!("bad atom `{text}`"))),
            },
            TokenKind::Integer | TokenKind::Char | TokenKind::Float => {
                number(token, src, pos, text).map(value)
            }
            TokenKind::String => {
                let mut s = string_value(token, src);
                // Erlang joins adjacent string literals: "a" "b" is "ab".
                while self.peek_kind() == Some(TokenKind::String) {
                    if let Some(next) = self.next() {
                        s.push_str(&string_value(next.token, src));
                    }
                }
                Ok(value(TermKind::Str(s)))
            }
            TokenKind::Symbol(Symbol::Hyphen | Symbol::Plus) => {
                let negative = kind == TokenKind::Symbol(Symbol::Hyphen);
                match self.next() {
                    Some(n)
                        if matches!(
                            n.kind,
                            TokenKind::Integer | TokenKind::Char | TokenKind::Float
                        ) =>
                    {
                        let v = number(n.token, src, n.start, n.text)?;
                        Ok(value(match v {
                            TermKind::Int(i) if negative => TermKind::Int(-i),
                            TermKind::Float(x) if negative => TermKind::Float(-x),
                            other => other,
                        }))
                    }
                    _ => Err(TermError::new(
                        pos,
                        format!("`{text}` must be followed by a number"),
                    )),
                }
            }
            TokenKind::Symbol(Symbol::OpenBrace) => self
                .elements(Symbol::CloseBrace, "tuple", pos, depth)
                .map(|v| value(TermKind::Tuple(v))),
            TokenKind::Symbol(Symbol::OpenSquare) => self
                .elements(Symbol::CloseSquare, "list", pos, depth)
                .map(|v| value(TermKind::List(v))),
            TokenKind::Symbol(Symbol::DoubleLeftAngle) => self.binary(pos).map(value),
            TokenKind::Variable => Err(TermError::new(
                pos,
                format!(
                    "bad atom `{text}`: a name starting with an upper-case letter or `_` is a \
                     variable; quote it ('{text}') to make an atom"
                ),
            )),
            TokenKind::Keyword(_) => Err(TermError::new(
                pos,
                format!("bad atom `{text}`: a reserved word; quote it ('{text}') to make an atom"),
            )),
            TokenKind::Symbol(Symbol::Dot) => {
                Err(TermError::new(pos, "unexpected `.`: expected a term"))
            }
            _ if is_close(kind) => Err(TermError::new(
                pos,
                format!("unexpected `{text}`: expected a term"),
            )),
            _ => Err(TermError::new(
                pos,
                format!(
                    "unexpected `{text}`: expected a term (atom, number, string, tuple or list)"
                ),
            )),
        }
    }

    /// The elements of a tuple or list after its opening token at `open`.
    fn elements(
        &mut self,
        close: Symbol,
        what: &str,
        open: Pos,
        depth: usize,
    ) -> Result<Vec<Term>, TermError> {
        let mut items = Vec::new();
        let opener = if close == Symbol::CloseBrace {
            "{"
        } else {
            "["
        };
        let closer = if close == Symbol::CloseBrace {
            "}"
        } else {
            "]"
        };
        if self.peek_kind() == Some(TokenKind::Symbol(close)) {
            self.i += 1;
            return Ok(items);
        }
        loop {
            items.push(self.term(depth + 1)?);
            let eof = self.eof;
            let Some(t) = self.next() else {
                return Err(TermError::new(
                    eof,
                    format!(
                        "unbalanced `{opener}`: the {what} opened at {open} is never closed \
                         (missing `{closer}`)"
                    ),
                ));
            };
            match t.kind {
                TokenKind::Symbol(Symbol::Comma) => continue,
                TokenKind::Symbol(s) if s == close => return Ok(items),
                TokenKind::Symbol(Symbol::VerticalBar) if close == Symbol::CloseSquare => {
                    return Err(TermError::new(
                        t.start,
                        "improper list tails (`|`) are not supported",
                    ))
                }
                TokenKind::Symbol(Symbol::Dot) => {
                    return Err(TermError::new(
                        t.start,
                        format!(
                            "unbalanced `{opener}`: the {what} opened at {open} is not closed \
                             before `.` (missing `{closer}`)"
                        ),
                    ))
                }
                k if is_close(k) => {
                    return Err(TermError::new(
                        t.start,
                        format!(
                            "unbalanced `{}`: the {what} opened at {open} must be closed with \
                             `{closer}`",
                            t.text
                        ),
                    ))
                }
                _ => {
                    return Err(TermError::new(
                        t.start,
                        format!(
                            "expected `,` or `{closer}` in the {what} opened at {open}, found `{}`",
                            t.text
                        ),
                    ))
                }
            }
        }
    }

    /// `<<>>` or `<<"text">>`, read as a string.
    fn binary(&mut self, open: Pos) -> Result<TermKind, TermError> {
        let src = self.src;
        let mut s = String::new();
        loop {
            let eof = self.eof;
            let Some(t) = self.next() else {
                return Err(TermError::new(
                    eof,
                    format!("unbalanced `<<` opened at {open}"),
                ));
            };
            match t.kind {
                TokenKind::Symbol(Symbol::DoubleRightAngle) => return Ok(TermKind::Str(s)),
                TokenKind::String => s.push_str(&string_value(t.token, src)),
                _ => {
                    return Err(TermError::new(
                        t.start,
                        "only binaries of one string (<<\"text\">>) are supported",
                    ))
                }
            }
        }
    }
}

fn string_value(token: erl_tokenize::Token, src: &str) -> String {
    match token.value(src) {
        TokenValue::String(s) => s.into_owned(),
        _ => String::new(),
    }
}

fn number(
    token: erl_tokenize::Token,
    src: &str,
    pos: Pos,
    text: &str,
) -> Result<TermKind, TermError> {
    match token.value(src) {
        TokenValue::Integer(Some(i)) => Ok(TermKind::Int(i128::from(i))),
        TokenValue::Integer(None) => Err(TermError::new(
            pos,
            format!("integer `{text}` is too large"),
        )),
        TokenValue::Char(c) => Ok(TermKind::Int(i128::from(u32::from(c)))),
        TokenValue::Float(x) => Ok(TermKind::Float(x)),
        _ => Err(TermError::new(pos, format!("bad number `{text}`"))),
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

fn pair(t: &Term) -> Result<(&Term, &Term), TermError> {
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

/// A serde error that remembers the first (innermost) term it was raised in.
#[derive(Debug)]
pub struct DeError {
    /// Position of the term the error belongs to, once known.
    pub pos: Option<Pos>,
    /// The message.
    pub message: String,
}

impl DeError {
    fn at(mut self, pos: Pos) -> Self {
        if self.pos.is_none() {
            self.pos = Some(pos);
        }
        self
    }
}

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError {
            pos: None,
            message: msg.to_string(),
        }
    }
}

/// Serde's view of a term: atoms `true`/`false` are booleans, `undefined` is "none",
/// other atoms and strings are strings, lists of character codes are strings when a
/// string is wanted, tuples and lists are sequences, and a list of `{Key, Value}` tuples
/// is a map.
pub struct TermDe<'t>(pub &'t Term);

impl TermDe<'_> {
    fn unexpected(&self) -> Unexpected<'_> {
        match &self.0.kind {
            TermKind::Atom(a) => Unexpected::Other(a.as_str()),
            TermKind::Int(i) => match i64::try_from(*i) {
                Ok(v) => Unexpected::Signed(v),
                Err(_) => Unexpected::Other("a large integer"),
            },
            TermKind::Float(x) => Unexpected::Float(*x),
            TermKind::Str(s) => Unexpected::Str(s),
            TermKind::Tuple(_) => Unexpected::Other("a tuple"),
            TermKind::List(_) => Unexpected::Seq,
        }
    }

    fn invalid<'de, V: Visitor<'de>>(&self, v: &V) -> DeError {
        let e: DeError = de::Error::invalid_type(self.unexpected(), v);
        // serde prints atoms as bare words; name them so the message is clear.
        let e = match &self.0.kind {
            TermKind::Atom(a) => DeError {
                pos: None,
                message: e.message.replacen(a, &format!("atom `{a}`"), 1),
            },
            _ => e,
        };
        e.at(self.0.pos)
    }

    fn int<'de, V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        match self.0.kind {
            TermKind::Int(i) => {
                if let Ok(u) = u64::try_from(i) {
                    v.visit_u64(u)
                } else if let Ok(s) = i64::try_from(i) {
                    v.visit_i64(s)
                } else {
                    Err(de::Error::custom(format!("integer {i} is out of range")))
                }
            }
            _ => Err(self.invalid(&v)),
        }
        .map_err(|e| e.at(self.0.pos))
    }
}

fn char_list(items: &[Term]) -> Option<String> {
    items
        .iter()
        .map(|t| match t.kind {
            TermKind::Int(i) => u32::try_from(i).ok().and_then(char::from_u32),
            _ => None,
        })
        .collect()
}

impl<'de> Deserializer<'de> for TermDe<'_> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        let pos = self.0.pos;
        match &self.0.kind {
            TermKind::Atom(a) if a == "true" => v.visit_bool(true),
            TermKind::Atom(a) if a == "false" => v.visit_bool(false),
            TermKind::Atom(a) => v.visit_str(a),
            TermKind::Int(_) => return self.int(v),
            TermKind::Float(x) => v.visit_f64(*x),
            TermKind::Str(s) => v.visit_str(s),
            TermKind::Tuple(items) | TermKind::List(items) => v.visit_seq(SeqDe(items.iter())),
        }
        .map_err(|e| e.at(pos))
    }

    fn deserialize_bool<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        match &self.0.kind {
            TermKind::Atom(a) if a == "true" => v.visit_bool(true),
            TermKind::Atom(a) if a == "false" => v.visit_bool(false),
            _ => Err(self.invalid(&v)),
        }
        .map_err(|e| e.at(self.0.pos))
    }

    fn deserialize_str<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        match &self.0.kind {
            TermKind::Atom(a) => v.visit_str(a),
            TermKind::Str(s) => v.visit_str(s),
            TermKind::List(items) => match char_list(items) {
                Some(s) => v.visit_string(s),
                None => Err(self.invalid(&v)),
            },
            _ => Err(self.invalid(&v)),
        }
        .map_err(|e| e.at(self.0.pos))
    }

    fn deserialize_string<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        self.deserialize_str(v)
    }

    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        let pos = self.0.pos;
        match &self.0.kind {
            TermKind::Atom(a) if a == "undefined" => v.visit_none(),
            _ => v.visit_some(self),
        }
        .map_err(|e| e.at(pos))
    }

    fn deserialize_seq<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        match &self.0.kind {
            TermKind::Tuple(items) | TermKind::List(items) => v.visit_seq(SeqDe(items.iter())),
            TermKind::Str(s) if s.is_empty() => v.visit_seq(SeqDe([].iter())),
            _ => Err(self.invalid(&v)),
        }
        .map_err(|e| e.at(self.0.pos))
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, v: V) -> Result<V::Value, DeError> {
        self.deserialize_seq(v)
    }

    fn deserialize_map<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        match &self.0.kind {
            TermKind::List(items) => v.visit_map(MapDe {
                items: items.iter(),
                value: None,
                key: None,
            }),
            TermKind::Str(s) if s.is_empty() => v.visit_map(MapDe {
                items: [].iter(),
                value: None,
                key: None,
            }),
            _ => Err(self.invalid(&v)),
        }
        .map_err(|e| e.at(self.0.pos))
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        v.visit_unit()
    }

    fn deserialize_u8<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        self.int(v)
    }
    fn deserialize_u16<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        self.int(v)
    }
    fn deserialize_u32<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        self.int(v)
    }
    fn deserialize_u64<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        self.int(v)
    }
    fn deserialize_i8<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        self.int(v)
    }
    fn deserialize_i16<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        self.int(v)
    }
    fn deserialize_i32<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        self.int(v)
    }
    fn deserialize_i64<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        self.int(v)
    }

    serde::forward_to_deserialize_any! {
        i128 u128 f32 f64 char bytes byte_buf unit unit_struct newtype_struct
        tuple_struct struct enum identifier
    }
}

struct SeqDe<'t>(std::slice::Iter<'t, Term>);

impl<'de> SeqAccess<'de> for SeqDe<'_> {
    type Error = DeError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, DeError> {
        match self.0.next() {
            Some(t) => seed.deserialize(TermDe(t)).map(Some),
            None => Ok(None),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.0.len())
    }
}

/// A list of `{Key, Value}` tuples read as a map.
struct MapDe<'t> {
    items: std::slice::Iter<'t, Term>,
    value: Option<&'t Term>,
    /// The current key, when it is a name, to prefix value errors with.
    key: Option<String>,
}

impl<'de> MapAccess<'de> for MapDe<'_> {
    type Error = DeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        let Some(item) = self.items.next() else {
            return Ok(None);
        };
        let (key, value) = pair(item).map_err(|e| DeError {
            pos: Some(e.pos),
            message: e.message,
        })?;
        self.value = Some(value);
        self.key = match &key.kind {
            TermKind::Atom(a) | TermKind::Str(a) => Some(a.clone()),
            _ => None,
        };
        seed.deserialize(TermDe(key)).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, DeError> {
        let Some(value) = self.value.take() else {
            return Err(de::Error::custom("value requested before its key"));
        };
        seed.deserialize(TermDe(value)).map_err(|mut e| {
            if let Some(k) = &self.key {
                e.message = format!("{k}: {}", e.message);
            }
            e
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(src: &str) -> Term {
        parse_document(src).unwrap()
    }

    fn err(src: &str) -> TermError {
        parse_document(src).unwrap_err()
    }

    fn atom(a: &str, line: usize, column: usize) -> Term {
        Term {
            kind: TermKind::Atom(a.into()),
            pos: Pos { line, column },
        }
    }

    #[test]
    fn parses_scalars_and_nesting() {
        let t = parse("{a, 'B c', -5, $a, 16#ff, \"x\" \"y\", <<\"bin\">>, [1, 2], {}, 1.5}.");
        let TermKind::Tuple(items) = t.kind else {
            panic!("not a tuple")
        };
        let kinds: Vec<_> = items.iter().map(|t| t.kind.clone()).collect();
        assert_eq!(
            kinds,
            vec![
                TermKind::Atom("a".into()),
                TermKind::Atom("B c".into()),
                TermKind::Int(-5),
                TermKind::Int(97),
                TermKind::Int(255),
                TermKind::Str("xy".into()),
                TermKind::Str("bin".into()),
                TermKind::List(vec![
                    Term {
                        kind: TermKind::Int(1),
                        pos: Pos {
                            line: 1,
                            column: 48
                        }
                    },
                    Term {
                        kind: TermKind::Int(2),
                        pos: Pos {
                            line: 1,
                            column: 51
                        }
                    },
                ]),
                TermKind::Tuple(vec![]),
                TermKind::Float(1.5),
            ]
        );
        assert_eq!(items[0], atom("a", 1, 2));
    }

    #[test]
    fn comments_and_tabs_keep_positions() {
        let t = parse("%% header\n[\t{erlmail,\t[]} % trailing\n].\n");
        let TermKind::List(items) = t.kind else {
            panic!("not a list")
        };
        assert_eq!(items[0].pos, Pos { line: 2, column: 3 });
    }

    #[test]
    fn lexical_errors_point_at_the_token() {
        assert_eq!(
            err("{a, \"abc}.\n"),
            TermError::new(
                Pos { line: 1, column: 5 },
                "unterminated string: no closing `\"`"
            )
        );
        assert_eq!(
            err("{a, 'abc}.").message,
            "unterminated quoted atom: no closing `'`"
        );
    }

    #[test]
    fn structural_errors() {
        let e = err("{a, b}");
        assert_eq!(
            (e.pos, e.message.as_str()),
            (
                Pos { line: 1, column: 7 },
                "missing the final `.` after the term"
            )
        );
        let e = err("{a, b.");
        assert_eq!(e.pos, Pos { line: 1, column: 6 });
        assert!(e.message.contains("unbalanced `{`"), "{}", e.message);
        let e = err("{a, b}}.");
        assert_eq!(e.pos, Pos { line: 1, column: 7 });
        assert!(e.message.contains("unbalanced `}`"));
        let e = err("{a, b]).");
        assert_eq!(e.pos, Pos { line: 1, column: 6 });
        let e = err("{a, b}. c");
        assert_eq!(e.pos, Pos { line: 1, column: 9 });
        assert!(e.message.contains("after the final `.`"));
        let e = err("{a, B}.");
        assert_eq!(e.pos, Pos { line: 1, column: 5 });
        assert!(e.message.starts_with("bad atom `B`"));
        let e = err("{a, end}.");
        assert!(e.message.contains("reserved word"));
        assert_eq!(
            err("[1|2].").message,
            "improper list tails (`|`) are not supported"
        );
        assert_eq!(
            err("").message,
            "empty file: expected an ErlMail term such as [{erlmail, [...]}]."
        );
        assert_eq!(err("% only a comment\n").pos, Pos { line: 1, column: 1 });
        assert!(err("{a, #{}}.").message.contains("unexpected `#`"));
        assert!(err("{a, [").message.contains("expected a term"));
        let deep = "[".repeat(200) + &"]".repeat(200) + ".";
        assert_eq!(err(&deep).message, "terms nested too deeply");
    }

    #[test]
    fn finds_env_in_both_shapes() {
        let app = parse("{application, erlmail, [{vsn, \"1\"}, {env, [{a, 1}]}]}.");
        assert_eq!(
            erlmail_env(&app).unwrap().unwrap().pos,
            Pos {
                line: 1,
                column: 43
            }
        );
        let sys = parse("[{kernel, []}, {erlmail, [{a, 1}]}].");
        assert_eq!(
            erlmail_env(&sys).unwrap().unwrap().pos,
            Pos {
                line: 1,
                column: 26
            }
        );
        let none = parse("[{kernel, []}].");
        assert_eq!(erlmail_env(&none).unwrap(), None);
        let other = parse("{application, other, []}.");
        assert!(erlmail_env(&other)
            .unwrap_err()
            .message
            .contains("not erlmail"));
        let twice = parse("[{erlmail, []}, {erlmail, []}].");
        assert_eq!(
            erlmail_env(&twice).unwrap_err().pos,
            Pos {
                line: 1,
                column: 18
            }
        );
        let include = parse("[\"other.config\"].");
        assert!(erlmail_env(&include)
            .unwrap_err()
            .message
            .contains("included"));
    }
}
