//! Where a script's output goes: `print`, `debug` and `display` reach an [`Output`], which
//! the CLI writes to the terminal and the Jupyter kernel turns into messages.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use polars::prelude::DataFrame;
use rhai::{Dynamic, Engine, FuncRegistration, ImmutableString, NativeCallContext};

use super::Area;
use crate::progress::{Cancel, Progress, Silent, Terminal};
use crate::report::{Plot, RunRecord};

/// Receives what a script shows.
pub trait Output: Send + Sync {
    /// Text from `print`.
    fn print(&self, text: &str);
    /// Text from `debug` (the Jupyter kernel sends it to stderr).
    fn debug(&self, text: &str) {
        self.print(text);
    }
    /// Long text to read apart from the output, such as `help`'s (a pager in Jupyter).
    fn page(&self, text: &str) {
        self.print(text);
    }
    /// Clears what the current cell has shown so far (`clear_output()` in Jupyter); with
    /// `wait`, only once new output arrives.
    fn clear(&self, _wait: bool) {}
    /// A value from `display`, to be shown as richly as the front end can.
    fn display(&self, value: &Dynamic);
    /// Where long work started by the script reports progress.
    fn progress(&self) -> Arc<dyn Progress> {
        Arc::new(Silent)
    }
    /// The flag that stops the script and its long work (Ctrl-C, a Jupyter interrupt).
    fn cancel(&self) -> Cancel;
}

/// Writes everything to standard output, tables as text; progress goes to standard error
/// (a bar on a terminal, plain lines otherwise, nothing when quiet). Under `rlvr run`,
/// `display(plot)` saves the plot into the run folder and prints its path.
pub struct StdOutput {
    /// Set by Ctrl-C.
    pub cancel: Cancel,
    terminal: Option<Arc<Terminal>>,
    plots: AtomicUsize,
}

impl Default for StdOutput {
    fn default() -> Self {
        StdOutput::new(false)
    }
}

impl StdOutput {
    /// Output to the terminal; `quiet` shows no progress.
    pub fn new(quiet: bool) -> Self {
        StdOutput {
            cancel: Cancel::new(),
            terminal: (!quiet).then(|| Arc::new(Terminal::stderr())),
            plots: AtomicUsize::new(0),
        }
    }

    /// Prints a line without tearing a progress bar that is on screen.
    fn println(&self, text: &str) {
        match &self.terminal {
            Some(terminal) => terminal.suspend(|| println!("{text}")),
            None => println!("{text}"),
        }
    }
}

impl Output for StdOutput {
    fn cancel(&self) -> Cancel {
        self.cancel.clone()
    }

    fn progress(&self) -> Arc<dyn Progress> {
        match &self.terminal {
            Some(terminal) => terminal.clone(),
            None => Arc::new(Silent),
        }
    }

    fn print(&self, text: &str) {
        self.println(text);
    }

    fn display(&self, value: &Dynamic) {
        if let (Some(plot), Some(run)) = (value.clone().try_cast::<Plot>(), RunRecord::active()) {
            let n = self.plots.fetch_add(1, Ordering::Relaxed) + 1;
            let path = run.dir().join(format!("plot-{n}.png"));
            match plot.save(&path) {
                Ok(()) => self.println(&format!("plot saved to {}", path.display())),
                Err(e) => self.println(&format!("plot not saved: {}: {e}", path.display())),
            }
            return;
        }
        self.println(&render_text(value));
    }
}

/// What a value is, for a front end that shows each kind its own way.
pub enum Shown {
    /// The unit value `()`: nothing to show.
    Nothing,
    /// A table.
    Table(DataFrame),
    /// A chart.
    Plot(Plot),
    /// Anything else, as text (strings in quotes, so `"1"` and `1` differ).
    Text(String),
}

/// The text a value's type gives through its `to_debug`, kept for [`shown`] and
/// [`render_text`] to show as it is.
#[derive(Debug, Clone)]
pub struct Described(pub String);

/// `value` ready to show: a value of one of the script surface's own types other than a
/// table or a plot (a model, a training run, an endpoint, …), or an array or map that may
/// hold one, becomes [`Described`] by the `to_debug` of its type, which only the engine
/// knows (`to_debug` is given the value and answers its text); any other value is
/// returned as it is.
pub fn described(value: Dynamic, to_debug: impl FnOnce(Dynamic) -> Option<String>) -> Dynamic {
    let own_type = value.is_variant()
        && !value.is::<DataFrame>()
        && !value.is::<Plot>()
        && !value.is::<Described>();
    let needs_engine = own_type || value.is_array() || value.is_map();
    match needs_engine.then(|| to_debug(value.clone())).flatten() {
        Some(text) => Dynamic::from(Described(text)),
        None => value,
    }
}

/// Sorts a script value into what a front end shows.
pub fn shown(value: &Dynamic) -> Shown {
    if value.is_unit() {
        Shown::Nothing
    } else if let Some(df) = value.clone().try_cast::<DataFrame>() {
        Shown::Table(df)
    } else if let Some(plot) = value.clone().try_cast::<Plot>() {
        Shown::Plot(plot)
    } else if let Some(Described(text)) = value.clone().try_cast::<Described>() {
        Shown::Text(text)
    } else if value.is_string() {
        Shown::Text(format!("{value:?}"))
    } else {
        Shown::Text(render_text(value))
    }
}

/// A value as plain text: a DataFrame as a table with its shape, a plot as its size,
/// anything else as `print` would show it.
pub fn render_text(value: &Dynamic) -> String {
    if let Some(df) = value.clone().try_cast::<DataFrame>() {
        return format!("{df}");
    }
    if let Some(plot) = value.clone().try_cast::<Plot>() {
        let (w, h) = plot.dimensions();
        return format!("<plot {w}×{h} px; plot.save(\"name.png\") or .svg writes it>");
    }
    if let Some(Described(text)) = value.clone().try_cast::<Described>() {
        return text;
    }
    value.to_string()
}

/// The output area of the reference.
pub const AREA: Area = Area {
    title: "Output",
    intro: "`print(x)` writes text; `display(x)` shows a value as richly as the front end \
            can (tables as tables, plots as pictures in Jupyter).",
    register,
};

fn register(engine: &mut Engine, output: &Arc<dyn Output>) {
    let out = output.clone();
    FuncRegistration::new("display")
        .in_global_namespace()
        .with_params_info(["value: Dynamic"])
        .with_comments([
            "/// Shows a value: a DataFrame as a table, a plot as a picture, \
                         anything else as text.",
        ])
        .register_into_engine(engine, move |ctx: NativeCallContext, value: Dynamic| {
            out.display(&described(value, |v| {
                let text = ctx.call_native_fn::<ImmutableString>("to_debug", (v,));
                text.ok().map(|t| t.to_string())
            }))
        });
}
