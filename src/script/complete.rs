//! Completion and inspection for front ends (the Jupyter kernel's Tab and Shift-Tab, `help`):
//! the names a session knows — functions from the engine's metadata, functions defined in
//! earlier cells, variables, keywords — and each function's signatures and doc comments.
//! Cursor positions are counted in characters (Unicode code points), as Jupyter counts them.

use rhai::{Engine, AST};
use serde::Deserialize;

use super::doc::readable;
use super::Session;

/// What a name is, for a front end that labels completions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A function (registered or defined in the session).
    Function,
    /// A variable of the session's scope.
    Variable,
    /// A language keyword.
    Keyword,
}

/// One completion candidate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The text that replaces the word being typed.
    pub text: String,
    /// What it names.
    pub kind: Kind,
}

/// The candidates for the word ending at the cursor, and the span (in characters) they
/// replace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// Candidates, sorted and without repeats.
    pub candidates: Vec<Candidate>,
    /// Where the word being completed starts.
    pub start: usize,
    /// Where it ends (the cursor).
    pub end: usize,
}

/// Whether code is ready to run, for a console deciding between running it and reading
/// another line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completeness {
    /// It parses.
    Complete,
    /// It ends too early (an open brace, bracket or string): read more.
    Incomplete,
    /// It fails to parse for another reason; running it shows the error.
    Invalid,
}

/// Words of the language offered as completions (not functions in the metadata).
const KEYWORDS: &[&str] = &[
    "let",
    "const",
    "fn",
    "if",
    "else",
    "while",
    "loop",
    "for",
    "in",
    "do",
    "until",
    "return",
    "throw",
    "try",
    "catch",
    "switch",
    "break",
    "continue",
    "import",
    "export",
    "as",
    "private",
    "true",
    "false",
    "this",
    "global",
    "print",
    "debug",
    "type_of",
    "eval",
    "Fn",
    "call",
    "curry",
    "is_def_var",
    "is_def_fn",
    "is_shared",
];

#[derive(Deserialize)]
struct Metadata {
    #[serde(default)]
    functions: Vec<Function>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Function {
    name: String,
    #[serde(default)]
    params: Vec<Param>,
    signature: String,
    #[serde(default)]
    doc_comments: Vec<String>,
}

#[derive(Deserialize)]
struct Param {
    #[serde(rename = "type", default)]
    typ: Option<String>,
}

/// Every function the engine knows, with `ast`'s script functions, standard library included.
fn functions(engine: &Engine, ast: &AST) -> Vec<Function> {
    let json = engine
        .gen_fn_metadata_with_ast_to_json(ast, true)
        .expect("function metadata serialises");
    let metadata: Metadata = serde_json::from_str(&json).expect("metadata is valid JSON");
    metadata
        .functions
        .into_iter()
        .filter(|f| is_identifier(&f.name))
        .collect()
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_alphabetic() || c == '_') && chars.all(is_word_char)
}

fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The type a script sees for a metadata parameter type (`&mut ImmutableString` → `string`).
fn script_type(rust_type: &str) -> String {
    let t = rust_type
        .trim_start_matches("&mut ")
        .trim_start_matches('&')
        .trim();
    match t {
        "ImmutableString" | "String" | "str" => "string",
        "INT" | "i64" => "i64",
        "FLOAT" | "f64" => "f64",
        "Array" => "array",
        "Map" => "map",
        "Blob" => "blob",
        "bool" => "bool",
        "char" => "char",
        other => other.rsplit("::").next().unwrap_or(other),
    }
    .to_string()
}

/// The byte offset of the `chars`-th character of `text` (its length when past the end).
fn byte_offset(text: &str, chars: usize) -> usize {
    text.char_indices()
        .nth(chars)
        .map_or(text.len(), |(i, _)| i)
}

/// The start (byte offset) of the identifier that ends at byte `end`.
fn word_start(text: &str, end: usize) -> usize {
    text[..end]
        .char_indices()
        .rev()
        .take_while(|&(_, c)| is_word_char(c))
        .last()
        .map_or(end, |(i, _)| i)
}

impl Session {
    /// Whether `code` parses, ends too early, or is wrong.
    pub fn completeness(&self, code: &str) -> Completeness {
        if super::is_incomplete(&self.engine, code) {
            Completeness::Incomplete
        } else if self.engine.compile_with_scope(&self.scope, code).is_ok() {
            Completeness::Complete
        } else {
            Completeness::Invalid
        }
    }

    /// Completions for the word ending at character `cursor` of `code`: after a dot, the
    /// functions callable as methods (those taking the receiver's type first, when the
    /// receiver is a known variable); elsewhere functions, variables and keywords.
    pub fn complete(&self, code: &str, cursor: usize) -> Completion {
        let end = byte_offset(code, cursor);
        let start = word_start(code, end);
        let prefix = &code[start..end];
        let before = code[..start].trim_end_matches([' ', '\t']);
        let mut candidates: Vec<Candidate> = Vec::new();
        let functions = functions(&self.engine, &self.functions);
        if let Some(receiver_end) = before.strip_suffix('.') {
            let receiver = &receiver_end[word_start(receiver_end, receiver_end.len())..];
            let receiver_type = self
                .scope
                .get_value::<rhai::Dynamic>(receiver)
                .map(|v| v.type_name().rsplit("::").next().unwrap_or("").to_string());
            let methods: Vec<&Function> = functions
                .iter()
                .filter(|f| !f.params.is_empty() && f.name.starts_with(prefix))
                .collect();
            let typed: Vec<&&Function> = methods
                .iter()
                .filter(|f| {
                    let first = f.params[0].typ.as_deref().map(script_type);
                    receiver_type.is_some()
                        && (first == receiver_type || first.as_deref() == Some("Dynamic"))
                })
                .collect();
            let chosen: Vec<&Function> = if typed.is_empty() {
                methods
            } else {
                typed.into_iter().copied().collect()
            };
            candidates.extend(chosen.into_iter().map(|f| Candidate {
                text: f.name.clone(),
                kind: Kind::Function,
            }));
        } else {
            candidates.extend(
                functions
                    .iter()
                    .filter(|f| f.name.starts_with(prefix))
                    .map(|f| Candidate {
                        text: f.name.clone(),
                        kind: Kind::Function,
                    }),
            );
            candidates.extend(
                self.scope
                    .iter_raw()
                    .map(|(name, _, _)| name)
                    .filter(|name| name.starts_with(prefix))
                    .map(|name| Candidate {
                        text: name.to_string(),
                        kind: Kind::Variable,
                    }),
            );
            candidates.extend(KEYWORDS.iter().filter(|k| k.starts_with(prefix)).map(|k| {
                Candidate {
                    text: k.to_string(),
                    kind: Kind::Keyword,
                }
            }));
        }
        candidates.sort_by(|a, b| a.text.cmp(&b.text));
        candidates.dedup_by(|a, b| a.text == b.text);
        Completion {
            candidates,
            start: code[..start].chars().count(),
            end: cursor,
        }
    }

    /// What is known about the name at character `cursor` of `code` (or, between a call's
    /// parentheses, the function being called): a variable's type and value, a function's
    /// signatures and doc comments. `None` when the name is unknown.
    pub fn inspect(&self, code: &str, cursor: usize) -> Option<String> {
        let name = name_at(code, byte_offset(code, cursor))?;
        if let Some((_, _, value)) = self.scope.iter_raw().find(|(n, _, _)| *n == name) {
            let mut text = super::render_text(value);
            if text.chars().count() > 2000 {
                text = text.chars().take(2000).collect::<String>() + "…";
            }
            return Some(format!("{name}: {}\n{text}", value.type_name()));
        }
        describe(&self.engine, &self.functions, &name)
    }
}

/// The identifier around byte `at`, else the name of the innermost call whose parentheses
/// hold `at`.
fn name_at(code: &str, at: usize) -> Option<String> {
    let end = at
        + code[at..]
            .find(|c: char| !is_word_char(c))
            .unwrap_or(code.len() - at);
    let start = word_start(code, end);
    if start < end {
        return Some(code[start..end].to_string());
    }
    let mut depth = 0usize;
    for (i, c) in code[..at].char_indices().rev() {
        match c {
            ')' => depth += 1,
            '(' if depth > 0 => depth -= 1,
            '(' => {
                let name_end = code[..i].trim_end().len();
                let name_start = word_start(code, name_end);
                return (name_start < name_end).then(|| code[name_start..name_end].to_string());
            }
            _ => {}
        }
    }
    None
}

/// Every signature of the function `name` with its doc comment, as text; `None` when no
/// function has that name.
pub fn describe(engine: &Engine, ast: &AST, name: &str) -> Option<String> {
    let mut found: Vec<Function> = functions(engine, ast)
        .into_iter()
        .filter(|f| f.name == name)
        .collect();
    if found.is_empty() {
        return None;
    }
    found.sort_by(|a, b| a.signature.cmp(&b.signature));
    found.dedup_by(|a, b| a.signature == b.signature);
    let sections: Vec<String> = found
        .iter()
        .map(|f| {
            let doc: Vec<&str> = f
                .doc_comments
                .iter()
                .flat_map(|c| c.lines())
                .map(|l| {
                    l.trim()
                        .trim_start_matches("///")
                        .trim_start_matches("/**")
                        .trim_end_matches("*/")
                        .trim()
                })
                .collect();
            let doc = doc.join("\n");
            let doc = doc.trim();
            if doc.is_empty() {
                readable(&f.signature)
            } else {
                format!("{}\n{doc}", readable(&f.signature))
            }
        })
        .collect();
    Some(sections.join("\n\n"))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::script::StdOutput;

    fn session() -> Session {
        Session::new(Arc::new(StdOutput::default()), rhai::Map::new())
    }

    fn texts(c: &Completion) -> Vec<&str> {
        c.candidates.iter().map(|c| c.text.as_str()).collect()
    }

    #[test]
    fn completes_functions_keywords_and_variables() {
        let mut s = session();
        let _ = s
            .eval("<1>", "let kept_too = 1; fn kept_fn(x) { x }")
            .unwrap();
        let c = s.complete("let y = pri", 11);
        assert!(texts(&c).contains(&"print"), "{:?}", texts(&c));
        assert_eq!((c.start, c.end), (8, 11));
        let c = s.complete("kept", 4);
        assert!(texts(&c).contains(&"kept_too") && texts(&c).contains(&"kept_fn"));
        let c = s.complete("lo", 2);
        assert!(texts(&c).contains(&"load") && texts(&c).contains(&"loop"));
    }

    #[test]
    fn completes_methods_after_a_dot_by_receiver_type() {
        let mut s = session();
        let c = s.complete("let s = \"abc\"; s.to_up", 22);
        assert!(texts(&c).contains(&"to_upper"), "{:?}", texts(&c));
        assert_eq!(c.start, 17);
        let _ = s.eval("<1>", "let t = \"text\";").unwrap();
        let c = s.complete("t.", 2);
        assert!(texts(&c).contains(&"to_upper"));
        assert!(!texts(&c).contains(&"sql"), "a string has no sql method");
    }

    #[test]
    fn cursor_counts_characters_not_bytes() {
        let s = session();
        let c = s.complete("let é = pri", 11);
        assert_eq!((c.start, c.end), (8, 11));
        assert!(texts(&c).contains(&"print"));
    }

    #[test]
    fn completeness_tells_complete_incomplete_and_invalid() {
        let s = session();
        for code in [
            "let x = 1;",
            "print(\"hello, world\")",
            "fn f(a) { a * 2 }",
            "6*7",
        ] {
            assert_eq!(s.completeness(code), Completeness::Complete, "{code}");
        }
        for code in [
            "fn f() {",
            "let v = [1, 2,",
            "if true {\n    print(1);",
            "let m = #{ a: 1,",
        ] {
            assert_eq!(s.completeness(code), Completeness::Incomplete, "{code}");
        }
        for code in ["let = 5;", "1 +* 2", "}"] {
            assert_eq!(s.completeness(code), Completeness::Invalid, "{code}");
        }
    }

    #[test]
    fn inspect_shows_signature_and_doc() {
        let mut s = session();
        let text = s.inspect("x.head(", 7).expect("head is known");
        assert!(
            text.contains("head(table: DataFrame, n: int) -> DataFrame"),
            "{text}"
        );
        assert!(text.contains("The first `n` rows."), "{text}");
        assert!(s.inspect("to_upper", 8).is_some());
        assert!(s.inspect("no_such_name_anywhere_42", 5).is_none());
        let _ = s.eval("<1>", "let answer = 42;").unwrap();
        assert!(s.inspect("answer", 3).unwrap().contains("42"));
    }
}
