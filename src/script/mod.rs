//! The Rhai engine shared by every front end (`rlvr run`, `rlvr repl`, the Jupyter kernel):
//! one file per API area registers thin bindings over the library, a [`Session`] keeps a
//! persistent scope, and script errors name the file, line and column.

mod complete;
mod convert;
mod data_api;
pub mod doc;
#[cfg(feature = "http")]
mod endpoint_api;
mod eval_api;
mod model_api;
mod notebook_api;
mod output;
mod report_api;
mod sft_api;
mod train_api;

use std::path::Path;
use std::sync::Arc;

use rhai::{Dynamic, Engine, EvalAltResult, Map, ParseError, ParseErrorType, Position, Scope, AST};

pub use complete::{Candidate, Completeness, Completion, Kind};
pub use output::{render_text, shown, Output, Shown, StdOutput};

/// One area of the script surface: a title and introduction for `rlvr doc`, and the function
/// that registers its functions into an engine.
pub struct Area {
    /// Heading in the reference.
    pub title: &'static str,
    /// A paragraph introducing the area.
    pub intro: &'static str,
    /// Registers the area's types and functions.
    pub register: fn(&mut Engine, &Arc<dyn Output>),
}

/// Every area of the script surface, in reference order.
pub const AREAS: &[Area] = &[
    output::AREA,
    data_api::AREA,
    model_api::AREA,
    train_api::AREA,
    notebook_api::AREA,
    report_api::AREA,
    #[cfg(feature = "http")]
    endpoint_api::AREA,
    eval_api::AREA,
];

/// Builds the engine with every area registered; `print`, `debug` and `display` go to
/// `output`.
pub fn engine(output: Arc<dyn Output>) -> Engine {
    let mut engine = Engine::new();
    engine.set_max_expr_depths(256, 256);
    for area in AREAS {
        (area.register)(&mut engine, &output);
    }
    // Ctrl-C and Jupyter interrupts stop any script, even `loop {}`, between two operations.
    let cancel = output.cancel();
    engine.on_progress(move |_| cancel.is_cancelled().then(|| Dynamic::from("interrupted")));
    let printer = output.clone();
    engine.on_print(move |text| printer.print(text));
    let debugger = output;
    engine.on_debug(move |text, source, pos| {
        let place = match (source, pos.line()) {
            (Some(src), Some(line)) => format!("{src}:{line}: "),
            (None, Some(line)) => format!("line {line}: "),
            _ => String::new(),
        };
        debugger.debug(&format!("{place}{text}"));
    });
    engine
}

/// Parses `--set key=value` pairs into the `params` map: each value is read as a Rhai
/// literal (number, bool, string in quotes, array, map) when it is one, else kept as text.
pub fn params_map<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Map {
    let literal = Engine::new_raw();
    pairs
        .into_iter()
        .map(|(key, value)| {
            let parsed = literal
                .eval_expression::<Dynamic>(value)
                .unwrap_or_else(|_| Dynamic::from(value.to_string()));
            (key.into(), parsed)
        })
        .collect()
}

/// A script failure, with where it happened.
#[derive(Debug, Clone, PartialEq)]
pub struct ScriptError {
    /// The script's name (its path, or `<cell N>`).
    pub source: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// What went wrong.
    pub message: String,
    /// The offending line of the script, when known.
    pub snippet: Option<String>,
    /// True when the script was stopped by an interrupt rather than failing.
    pub interrupted: bool,
}

impl std::fmt::Display for ScriptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.source)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(col) = self.column {
                write!(f, ":{col}")?;
            }
        }
        write!(f, ": {}", self.message)?;
        if let (Some(line), Some(snippet)) = (self.line, &self.snippet) {
            let gutter = line.to_string();
            write!(f, "\n {gutter} | {snippet}")?;
            if let Some(col) = self.column {
                let pad = " ".repeat(gutter.len());
                let caret = " ".repeat(col.saturating_sub(1));
                write!(f, "\n {pad} | {caret}^")?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ScriptError {}

impl ScriptError {
    fn at(source: &str, code: &str, pos: Position, message: String) -> Self {
        let snippet = pos
            .line()
            .and_then(|l| code.lines().nth(l - 1))
            .map(str::to_string);
        ScriptError {
            source: source.to_string(),
            line: pos.line(),
            column: pos.position(),
            message,
            snippet,
            interrupted: false,
        }
    }

    fn from_parse(source: &str, code: &str, err: ParseError) -> Self {
        ScriptError::at(source, code, err.1, err.0.to_string())
    }

    fn from_eval(source: &str, code: &str, err: EvalAltResult) -> Self {
        let interrupted = matches!(err, EvalAltResult::ErrorTerminated(..));
        let (message, pos) = innermost(err);
        ScriptError {
            interrupted,
            ..ScriptError::at(source, code, pos, message)
        }
    }
}

/// The message and position of the innermost error of a chain of calls (an error inside a
/// script function points at the line inside the function).
fn innermost(err: EvalAltResult) -> (String, Position) {
    match err {
        EvalAltResult::ErrorInFunctionCall(name, _, inner, outer) => {
            let (message, pos) = innermost(*inner);
            let message = format!("in `{name}`: {message}");
            if pos.is_none() {
                (message, outer)
            } else {
                (message, pos)
            }
        }
        EvalAltResult::ErrorTerminated(..) => ("interrupted".to_string(), Position::NONE),
        mut other => {
            let pos = other.take_position();
            (other.to_string(), pos)
        }
    }
}

/// True when `code` fails to parse only because it ends too early (an open brace, bracket,
/// or string), so a front end should read more lines.
pub fn is_incomplete(engine: &Engine, code: &str) -> bool {
    match engine.compile(code) {
        Ok(_) => false,
        Err(err) => {
            matches!(
                *err.0,
                ParseErrorType::UnexpectedEOF | ParseErrorType::MissingToken(..)
            ) && err.1.line().is_none_or(|l| l >= code.lines().count())
        }
    }
}

/// An engine with a persistent scope and the functions defined so far: successive
/// evaluations (REPL lines, notebook cells) see each other's variables and functions.
pub struct Session {
    engine: Engine,
    scope: Scope<'static>,
    functions: AST,
}

impl Session {
    /// A session over an engine writing to `output`, with `params` as a constant map.
    pub fn new(output: Arc<dyn Output>, params: Map) -> Self {
        let mut scope = Scope::new();
        scope.push_constant("params", params);
        Session {
            engine: engine(output),
            scope,
            functions: AST::empty(),
        }
    }

    /// The session's engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The session's variables.
    pub fn scope(&self) -> &Scope<'static> {
        &self.scope
    }

    /// Evaluates `code` (named `source` in errors) and returns the value of its last
    /// statement.
    pub fn eval(&mut self, source: &str, code: &str) -> Result<Dynamic, ScriptError> {
        let mut ast = self
            .engine
            .compile_with_scope(&self.scope, code)
            .map_err(|e| ScriptError::from_parse(source, code, e))?;
        ast.set_source(source);
        self.functions += ast.clone_functions_only();
        let runnable = self.functions.merge(&ast);
        self.engine
            .eval_ast_with_scope::<Dynamic>(&mut self.scope, &runnable)
            .map_err(|e| ScriptError::from_eval(source, code, *e))
    }

    /// `value` ready to show, with the text its type's `to_debug` gives where only the
    /// engine knows it (see [`described`](output::described)).
    pub fn described(&self, value: Dynamic) -> Dynamic {
        output::described(value, |v| {
            let to_debug = rhai::FnPtr::new("to_debug").ok()?;
            let text = to_debug.call::<rhai::ImmutableString>(&self.engine, &AST::empty(), (v,));
            text.ok().map(|t| t.to_string())
        })
    }

    /// Runs the script file at `path`.
    pub fn run_file(&mut self, path: &Path) -> Result<Dynamic, ScriptError> {
        let name = path.display().to_string();
        let code = std::fs::read_to_string(path).map_err(|e| ScriptError {
            source: name.clone(),
            line: None,
            column: None,
            message: format!("cannot read the script: {e}"),
            snippet: None,
            interrupted: false,
        })?;
        self.eval(&name, &code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Session {
        Session::new(Arc::new(StdOutput::default()), Map::new())
    }

    /// Keeps the text of every displayed value.
    #[derive(Default)]
    struct Shows(std::sync::Mutex<Vec<String>>);

    impl Output for Shows {
        fn print(&self, _text: &str) {}
        fn display(&self, value: &Dynamic) {
            self.0.lock().unwrap().push(render_text(value));
        }
        fn cancel(&self) -> crate::progress::Cancel {
            crate::progress::Cancel::new()
        }
    }

    #[test]
    fn values_of_the_surfaces_own_types_show_as_their_own_text() {
        let out = Arc::new(Shows::default());
        let mut s = Session::new(out.clone(), Map::new());
        let ep = "Endpoint(tiny at http://127.0.0.1:9/v1)";
        let value = s
            .eval(
                "<1>",
                r#"let ep = endpoint("http://127.0.0.1:9/v1", "tiny"); ep"#,
            )
            .unwrap();
        assert_eq!(
            render_text(&value),
            "rlvr::endpoint::Endpoint",
            "Rhai's own text"
        );
        assert!(matches!(shown(&s.described(value)), Shown::Text(t) if t == ep));
        let bar = s.eval("<2>", r#"progress(2, "bar")"#).unwrap();
        assert_eq!(render_text(&s.described(bar)), "ProgressBar");
        let nested = s.eval("<3>", "[ep, #{ a: 1 }]").unwrap();
        assert_eq!(
            render_text(&s.described(nested)),
            format!(r#"[{ep}, #{{"a": 1}}]"#)
        );
        for plain in ["[1, 2]", r#"#{ a: [1], b: "x" }"#, "42", r#""text""#] {
            let value = s.eval("<3>", plain).unwrap();
            assert_eq!(
                render_text(&s.described(value.clone())),
                render_text(&value)
            );
        }
        let _ = s
            .eval(
                "<4>",
                r#"display(ep); display([ep]); display("text"); display(1.5)"#,
            )
            .unwrap();
        let shows = out.0.lock().unwrap().clone();
        assert_eq!(shows, [ep, &format!("[{ep}]"), "text", "1.5"]);
    }

    #[test]
    fn variables_and_functions_persist_across_evaluations() {
        let mut s = session();
        let _ = s.eval("<1>", "let x = 40; fn add(a) { a + 2 }").unwrap();
        let v = s.eval("<2>", "add(x)").unwrap();
        assert_eq!(v.as_int().unwrap(), 42);
    }

    #[test]
    fn errors_name_source_line_and_column() {
        let mut s = session();
        let err = s
            .eval("demo.rhai", "let a = 1;\nlet b = a + undefined_var;\n")
            .unwrap_err();
        assert_eq!((err.line, err.column), (Some(2), Some(13)));
        let text = err.to_string();
        assert!(text.starts_with("demo.rhai:2:13: "), "{text}");
        assert!(text.contains("let b = a + undefined_var;"), "{text}");
    }

    #[test]
    fn errors_inside_functions_point_inside_the_function() {
        let mut s = session();
        let err = s
            .eval("f.rhai", "fn f() {\n  throw \"boom\";\n}\nf();")
            .unwrap_err();
        assert_eq!(err.line, Some(2));
        assert!(err.message.contains("boom"));
    }

    #[test]
    fn params_parse_literals_and_keep_text() {
        let p = params_map([
            ("n", "32"),
            ("lr", "1e-5"),
            ("pool", "data/x.jsonl"),
            ("on", "true"),
        ]);
        assert_eq!(p["n"].as_int().unwrap(), 32);
        assert!((p["lr"].as_float().unwrap() - 1e-5).abs() < 1e-12);
        assert_eq!(p["pool"].clone().into_string().unwrap(), "data/x.jsonl");
        assert!(p["on"].as_bool().unwrap());
    }

    #[test]
    fn incomplete_input_is_recognised() {
        let s = session();
        assert!(is_incomplete(s.engine(), "fn f() {"));
        assert!(is_incomplete(s.engine(), "let x = [1, 2,"));
        assert!(!is_incomplete(s.engine(), "let x = 1;"));
        assert!(!is_incomplete(s.engine(), "let x = ;"));
    }
}
