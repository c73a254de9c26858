//! The term parser and the settings-list finder, on byte-exact positions.

use super::*;

fn parse(src: &str) -> Term {
    parse_document(src).unwrap()
}

fn err(src: &str) -> TermError {
    parse_document(src).unwrap_err()
}

fn at(line: usize, column: usize) -> Pos {
    Pos { line, column }
}

fn atom(a: &str, line: usize, column: usize) -> Term {
    Term {
        kind: TermKind::Atom(a.into()),
        pos: at(line, column),
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
                    pos: at(1, 48)
                },
                Term {
                    kind: TermKind::Int(2),
                    pos: at(1, 51)
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
    assert_eq!(items[0].pos, at(2, 3));
}

#[test]
fn lexical_errors_point_at_the_token() {
    assert_eq!(
        err("{a, \"abc}.\n"),
        TermError::new(at(1, 5), "unterminated string: no closing `\"`")
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
        (at(1, 7), "missing the final `.` after the term")
    );
    let e = err("{a, b.");
    assert_eq!(e.pos, at(1, 6));
    assert!(e.message.contains("unbalanced `{`"), "{}", e.message);
    let e = err("{a, b}}.");
    assert_eq!(e.pos, at(1, 7));
    assert!(e.message.contains("unbalanced `}`"));
    let e = err("{a, b]).");
    assert_eq!(e.pos, at(1, 6));
    let e = err("{a, b}. c");
    assert_eq!(e.pos, at(1, 9));
    assert!(e.message.contains("after the final `.`"));
    let e = err("{a, B}.");
    assert_eq!(e.pos, at(1, 5));
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
    assert_eq!(err("% only a comment\n").pos, at(1, 1));
    assert!(err("{a, #{}}.").message.contains("unexpected `#`"));
    assert!(err("{a, [").message.contains("expected a term"));
    let deep = "[".repeat(200) + &"]".repeat(200) + ".";
    assert_eq!(err(&deep).message, "terms nested too deeply");
}

#[test]
fn finds_env_in_both_shapes() {
    let app = parse("{application, erlmail, [{vsn, \"1\"}, {env, [{a, 1}]}]}.");
    assert_eq!(erlmail_env(&app).unwrap().unwrap().pos, at(1, 43));
    let sys = parse("[{kernel, []}, {erlmail, [{a, 1}]}].");
    assert_eq!(erlmail_env(&sys).unwrap().unwrap().pos, at(1, 26));
    let none = parse("[{kernel, []}].");
    assert_eq!(erlmail_env(&none).unwrap(), None);
    let other = parse("{application, other, []}.");
    assert!(erlmail_env(&other)
        .unwrap_err()
        .message
        .contains("not erlmail"));
    let twice = parse("[{erlmail, []}, {erlmail, []}].");
    assert_eq!(erlmail_env(&twice).unwrap_err().pos, at(1, 18));
    let include = parse("[\"other.config\"].");
    assert!(erlmail_env(&include)
        .unwrap_err()
        .message
        .contains("included"));
}
