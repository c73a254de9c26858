//! The shape of the house, read from the source: no import circles between modules, and
//! the pure layers (`protocol`, `session`, `queue`) reach for no runtime, socket, file or
//! store. Reads `src/` as text; a module is a file (`foo.rs`, `foo/bar.rs`). A parent's use
//! of its own children (declaring them, re-exporting from them) is not an edge: the child
//! is part of the parent. Code after a file's `#[cfg(test)]` and files named `tests.rs` are
//! tests and are left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every module of the crate, by path (`["actors", "queue"]`), with its code (comments,
/// strings and tests stripped).
fn modules() -> BTreeMap<Vec<String>, String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    let mut modules = BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(&src).unwrap().with_extension("");
        let mut path: Vec<String> = rel
            .iter()
            .map(|c| c.to_string_lossy().into_owned())
            .collect();
        if path.last().is_some_and(|l| l == "tests") {
            continue;
        }
        if path == ["lib"] || path == ["main"] {
            path.clear();
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let code = strip(&text);
        let code = match code.find("#[cfg(test)]") {
            Some(at) => code[..at].to_string(),
            None => code,
        };
        modules
            .entry(path)
            .or_insert_with(String::new)
            .push_str(&code);
    }
    modules
}

/// The code without comments, string and char literals (so that prose naming a module
/// is no edge).
fn strip(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i..].starts_with(b"/*") {
            i += 2;
            while i < b.len() && !b[i..].starts_with(b"*/") {
                i += 1;
            }
            i += 2;
        } else if b[i] == b'"' || (b[i] == b'r' && matches!(b.get(i + 1), Some(b'"' | b'#'))) {
            // A string, raw or not: skip to its end.
            let mut hashes = 0;
            if b[i] == b'r' {
                i += 1;
                while b[i] == b'#' {
                    hashes += 1;
                    i += 1;
                }
            }
            i += 1;
            while i < b.len() {
                if hashes == 0 && b[i] == b'\\' {
                    i += 2;
                    continue;
                }
                if b[i] == b'"'
                    && b[i + 1..]
                        .iter()
                        .take(hashes)
                        .filter(|&&c| c == b'#')
                        .count()
                        == hashes
                {
                    i += 1 + hashes;
                    break;
                }
                i += 1;
            }
            out.push_str("\"\"");
        } else if b[i] == b'\'' && b.get(i + 2) == Some(&b'\'') {
            i += 3;
        } else if b[i] == b'\'' && b.get(i + 1) == Some(&b'\\') {
            i += 2;
            while i < b.len() && b[i] != b'\'' {
                i += 1;
            }
            i += 1;
        } else {
            let start = i;
            i += 1;
            while i < b.len() && !matches!(b[i], b'/' | b'"' | b'\'' | b'r') {
                i += 1;
            }
            out.push_str(&text[start..i]);
        }
    }
    out
}

/// The paths a module names: every `crate::…`/`super::…` path in its code, and every leaf
/// of its `use` trees, each as written (`["super", "store", "StoreMsg"]`).
fn named_paths(code: &str) -> Vec<Vec<String>> {
    let tokens = tokenize(code);
    let mut paths = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        if tokens[i] == "use" {
            let end = tokens[i..]
                .iter()
                .position(|t| t == ";")
                .map_or(tokens.len(), |p| i + p);
            flatten_use(&tokens[i + 1..end], &mut Vec::new(), &mut paths);
            i = end;
        } else if (tokens[i] == "crate" || tokens[i] == "super")
            && (i == 0 || tokens[i - 1] != "::")
            && tokens.get(i + 1).is_some_and(|t| t == "::")
        {
            let mut path = vec![tokens[i].clone()];
            let mut j = i + 1;
            while tokens.get(j).is_some_and(|t| t == "::")
                && tokens.get(j + 1).is_some_and(|t| is_ident(t))
            {
                path.push(tokens[j + 1].clone());
                j += 2;
            }
            paths.push(path);
            i = j;
        } else {
            i += 1;
        }
    }
    paths
}

fn is_ident(t: &str) -> bool {
    t.chars()
        .next()
        .is_some_and(|c| c.is_alphanumeric() || c == '_')
}

fn tokenize(code: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut chars = code.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_alphanumeric() || c == '_' {
            let mut word = c.to_string();
            while let Some(&n) = chars.peek() {
                if n.is_alphanumeric() || n == '_' {
                    word.push(n);
                    chars.next();
                } else {
                    break;
                }
            }
            tokens.push(word);
        } else if c == ':' && chars.peek() == Some(&':') {
            chars.next();
            tokens.push("::".into());
        } else if !c.is_whitespace() {
            tokens.push(c.to_string());
        }
    }
    tokens
}

fn flatten_use(tokens: &[String], prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    // Split at top-level commas.
    let mut depth = 0;
    let mut start = 0;
    for (k, t) in tokens.iter().enumerate() {
        match t.as_str() {
            "{" => depth += 1,
            "}" => depth -= 1,
            "," if depth == 0 => {
                flatten_one(&tokens[start..k], prefix, out);
                start = k + 1;
            }
            _ => {}
        }
    }
    flatten_one(&tokens[start..], prefix, out);
}

fn flatten_one(tokens: &[String], prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    let mut pushed = 0;
    let mut k = 0;
    while k < tokens.len() {
        let t = &tokens[k];
        if t == "{" {
            let close = tokens.len() - 1 - tokens.iter().rev().position(|t| t == "}").unwrap();
            flatten_use(&tokens[k + 1..close], prefix, out);
            prefix.truncate(prefix.len() - pushed);
            return;
        } else if t == "as" {
            break;
        } else if t != "::" && is_ident(t) && t != "pub" && t != "self" {
            prefix.push(t.clone());
            pushed += 1;
        }
        k += 1;
    }
    if pushed > 0 || tokens.iter().any(|t| t == "self") {
        out.push(prefix.clone());
    }
    prefix.truncate(prefix.len() - pushed);
}

/// The module a path names, resolved from `from`: the longest prefix that is a module.
fn resolve(
    from: &[String], path: &[String], modules: &BTreeMap<Vec<String>, String>,
) -> Option<Vec<String>> {
    let mut base: Vec<String> = match path.first().map(String::as_str) {
        Some("crate") => Vec::new(),
        Some("super") => from.to_vec(),
        _ => return None,
    };
    let mut rest = &path[1..];
    if path[0] == "super" {
        base.pop();
        while rest.first().is_some_and(|s| s == "super") {
            base.pop();
            rest = &rest[1..];
        }
    }
    let mut found = base.clone();
    for part in rest {
        base.push(part.clone());
        if modules.contains_key(&base) {
            found = base.clone();
        } else {
            break;
        }
    }
    Some(found)
}

fn edges(modules: &BTreeMap<Vec<String>, String>) -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let mut graph: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (module, code) in modules {
        let entry = graph.entry(module.clone()).or_default();
        for path in named_paths(code) {
            let Some(target) = resolve(module, &path, modules) else {
                continue;
            };
            // Itself, or one of its own children: part of the module, not an edge.
            if target.starts_with(module) {
                continue;
            }
            entry.insert(target);
        }
    }
    graph
}

fn name(m: &[String]) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("/")
    }
}

/// Strongly connected components with more than one module (Tarjan).
fn circles(graph: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Vec<Vec<String>> {
    struct Walk<'a> {
        graph: &'a BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        index: BTreeMap<&'a Vec<String>, usize>,
        low: BTreeMap<&'a Vec<String>, usize>,
        stack: Vec<&'a Vec<String>>,
        on_stack: BTreeSet<&'a Vec<String>>,
        found: Vec<Vec<String>>,
    }
    impl<'a> Walk<'a> {
        fn visit(&mut self, v: &'a Vec<String>) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.graph.get(v).into_iter().flatten() {
                let Some((w, _)) = self.graph.get_key_value(w) else {
                    continue;
                };
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let low = self.low[w].min(self.low[v]);
                    self.low.insert(v, low);
                } else if self.on_stack.contains(w) {
                    let low = self.index[w].min(self.low[v]);
                    self.low.insert(v, low);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                loop {
                    let w = self.stack.pop().unwrap();
                    self.on_stack.remove(w);
                    component.push(name(w));
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.found.push(component);
                }
            }
        }
    }
    let mut walk = Walk {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !walk.index.contains_key(v) {
            walk.visit(v);
        }
    }
    walk.found
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let modules = modules();
    let graph = edges(&modules);
    let found = circles(&graph);
    let mut report = String::new();
    for circle in &found {
        report.push_str(&format!("\n  circle: {}", circle.join(" <-> ")));
        for a in circle {
            for b in circle {
                let (ma, mb): (Vec<String>, Vec<String>) = (
                    a.split('/').map(String::from).collect(),
                    b.split('/').map(String::from).collect(),
                );
                if graph.get(&ma).is_some_and(|e| e.contains(&mb)) {
                    report.push_str(&format!("\n    {a} -> {b}"));
                }
            }
        }
    }
    assert!(found.is_empty(), "import circles between modules:{report}");
}

#[test]
fn the_pure_layers_touch_no_runtime_socket_file_or_store() {
    let forbidden = [
        "tokio",
        "ractor",
        "sqlx",
        "std::fs",
        "std::net::Tcp",
        "crate::actors",
        "crate::net",
        "crate::store",
        "crate::outbound",
    ];
    let mut found = Vec::new();
    for (module, code) in modules() {
        if !matches!(
            module.first().map(String::as_str),
            Some("protocol" | "session" | "queue")
        ) {
            continue;
        }
        let flat: String = code.split_whitespace().collect::<Vec<_>>().join(" ");
        for word in forbidden {
            if flat.contains(word) {
                found.push(format!("{} names {word}", name(&module)));
            }
        }
    }
    assert!(found.is_empty(), "pure layers reaching out: {found:#?}");
}

#[test]
fn the_reader_finds_a_circle_it_is_shown() {
    // The checker itself: two sibling modules naming each other are a circle, a parent
    // naming its child is not.
    let mut modules = BTreeMap::new();
    modules.insert(vec![], String::new());
    modules.insert(vec!["a".to_string()], "use crate::b::X;".to_string());
    modules.insert(
        vec!["b".to_string()],
        "fn f() { super::a::y(); }".to_string(),
    );
    modules.insert(vec!["c".to_string()], "pub use d::Z;".to_string());
    modules.insert(
        vec!["c".to_string(), "d".to_string()],
        "use super::{W, e::V};".to_string(),
    );
    modules.insert(
        vec!["c".to_string(), "e".to_string()],
        "use crate::c::W;".to_string(),
    );
    let found = circles(&edges(&modules));
    assert_eq!(found, vec![vec!["a".to_string(), "b".to_string()]]);
    assert!(strip("// crate::x::y\nlet s = \"crate::z::w\";")
        .find("crate")
        .is_none());
}
