//! The Erlang term parser: `erl_tokenize` tokens in, a [`Term`] tree out, every error at
//! the token that caused it. Nesting is capped so a hostile file cannot overflow the stack.

use erl_tokenize::{ErrorKind, Symbol, TokenKind, TokenValue};

use super::{Pos, Term, TermError, TermKind};

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
        &mut self, close: Symbol, what: &str, open: Pos, depth: usize,
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
    token: erl_tokenize::Token, src: &str, pos: Pos, text: &str,
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
