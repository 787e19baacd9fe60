//! Script bindings for working interactively: `help` (a function's signatures and doc),
//! `clear_output`, and `progress`, a bar a script advances itself (in Jupyter, one display
//! updated in place).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rhai::{Engine, FuncRegistration, NativeCallContext, AST};

use super::complete::describe;
use super::convert::{count, error, RhaiResult};
use super::{Area, Output};
use crate::progress::Progress;

/// The interactive area of the reference.
pub const AREA: Area = Area {
    title: "Help and progress",
    intro: "`help(\"name\")` shows a function's signatures and doc (a pager in Jupyter), \
            `help()` lists every function. \
            `progress(total, label)` makes a bar that `tick()` advances, reported where long \
            jobs report theirs (in Jupyter, one output updated in place). `clear_output()` \
            clears the cell's output in Jupyter.",
    register,
};

/// A progress bar driven by a script: `let bar = progress(10, "files"); bar.tick();`.
#[derive(Clone)]
pub struct ProgressBar {
    progress: Arc<dyn Progress>,
    done: Arc<AtomicU64>,
}

impl ProgressBar {
    fn advance(&self, by: u64) {
        let done = self.done.fetch_add(by, Ordering::SeqCst) + by;
        self.progress.update(done, "");
    }
}

/// The names of every function, area by area.
fn overview() -> String {
    let output: Arc<dyn Output> = Arc::new(super::StdOutput::default());
    let mut text = String::from("Functions by area; help(\"name\") shows one.\n");
    for area in super::AREAS {
        let mut engine = Engine::new_raw();
        (area.register)(&mut engine, &output);
        let mut names: Vec<String> = engine
            .gen_fn_signatures(false)
            .into_iter()
            .filter_map(|s| s.split('(').next().map(str::to_string))
            .filter(|n| !n.starts_with("to_") && !n.is_empty())
            .collect();
        names.sort();
        names.dedup();
        text.push_str(&format!("\n{}: {}\n", area.title, names.join(", ")));
    }
    text
}

fn register(engine: &mut Engine, output: &Arc<dyn Output>) {
    engine.register_type_with_name::<ProgressBar>("ProgressBar");

    let out = output.clone();
    FuncRegistration::new("help")
        .in_global_namespace()
        .with_params_info(["name: &str"])
        .with_comments(["/// Shows the signatures and doc of the functions called `name`."])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext, name: &str| -> RhaiResult<()> {
                let text = describe(ctx.engine(), &AST::empty(), name)
                    .ok_or_else(|| error(format!("help: no function is called `{name}`")))?;
                out.page(&text);
                Ok(())
            },
        );

    let out = output.clone();
    FuncRegistration::new("help")
        .in_global_namespace()
        .with_comments(["/// Lists every function, by area; `help(\"name\")` shows one."])
        .register_into_engine(engine, move || out.page(&overview()));

    let out = output.clone();
    FuncRegistration::new("clear_output")
        .in_global_namespace()
        .with_comments(["/// Clears the output the cell has shown so far (Jupyter)."])
        .register_into_engine(engine, move || out.clear(false));

    let out = output.clone();
    FuncRegistration::new("progress")
        .in_global_namespace()
        .with_params_info(["total: int", "label: &str", "ProgressBar"])
        .with_comments([
            "/// A progress bar of `total` steps named `label`; `tick()` advances it and \
             `finish()` ends it.",
        ])
        .register_into_engine(
            engine,
            move |total: i64, label: &str| -> RhaiResult<ProgressBar> {
                let total = count(total, "total")? as u64;
                let progress = out.progress();
                progress.start(label, total);
                Ok(ProgressBar {
                    progress,
                    done: Arc::new(AtomicU64::new(0)),
                })
            },
        );

    FuncRegistration::new("tick")
        .in_global_namespace()
        .with_params_info(["bar: &mut ProgressBar"])
        .with_comments(["/// Advances the bar by one step."])
        .register_into_engine(engine, |bar: &mut ProgressBar| bar.advance(1));

    FuncRegistration::new("tick")
        .in_global_namespace()
        .with_params_info(["bar: &mut ProgressBar", "steps: int"])
        .with_comments(["/// Advances the bar by `steps` steps."])
        .register_into_engine(
            engine,
            |bar: &mut ProgressBar, steps: i64| -> RhaiResult<()> {
                bar.advance(count(steps, "steps")? as u64);
                Ok(())
            },
        );

    FuncRegistration::new("finish")
        .in_global_namespace()
        .with_params_info(["bar: &mut ProgressBar"])
        .with_comments(["/// Ends the bar."])
        .register_into_engine(engine, |bar: &mut ProgressBar| bar.progress.finish(""));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::Cancel;
    use crate::script::Session;
    use rhai::Dynamic;
    use std::sync::Mutex;

    /// Records everything a script shows.
    #[derive(Default)]
    struct Recorder {
        events: Arc<Mutex<Vec<String>>>,
    }

    struct RecordedBar(Arc<Mutex<Vec<String>>>);

    impl Progress for RecordedBar {
        fn start(&self, label: &str, total: u64) {
            self.0
                .lock()
                .unwrap()
                .push(format!("start {label} {total}"));
        }
        fn update(&self, done: u64, _message: &str) {
            self.0.lock().unwrap().push(format!("update {done}"));
        }
        fn finish(&self, _message: &str) {
            self.0.lock().unwrap().push("finish".into());
        }
    }

    impl Output for Recorder {
        fn print(&self, text: &str) {
            self.events.lock().unwrap().push(format!("print {text}"));
        }
        fn page(&self, text: &str) {
            self.events.lock().unwrap().push(format!("page {text}"));
        }
        fn clear(&self, wait: bool) {
            self.events.lock().unwrap().push(format!("clear {wait}"));
        }
        fn display(&self, _value: &Dynamic) {}
        fn progress(&self) -> Arc<dyn Progress> {
            Arc::new(RecordedBar(self.events.clone()))
        }
        fn cancel(&self) -> Cancel {
            Cancel::new()
        }
    }

    #[test]
    fn help_pages_a_functions_doc_and_rejects_unknown_names() {
        let out = Arc::new(Recorder::default());
        let mut s = Session::new(out.clone(), rhai::Map::new());
        let _ = s.eval("<1>", "help(\"sample\")").unwrap();
        let events = out.events.lock().unwrap().clone();
        assert!(
            events[0].starts_with("page sample(table: DataFrame"),
            "{events:?}"
        );
        let err = s.eval("<2>", "help(\"nope\")").unwrap_err();
        assert!(
            err.message.contains("no function is called `nope`"),
            "{err}"
        );
        let _ = s.eval("<3>", "help()").unwrap();
        let events = out.events.lock().unwrap().clone();
        let overview = &events[1];
        assert!(
            overview.contains("Datasets and tables: ") && overview.contains("sample"),
            "{overview}"
        );
        assert!(
            overview.contains("Help and progress: ") && overview.contains("tick"),
            "{overview}"
        );
    }

    #[test]
    fn progress_bar_reports_start_ticks_and_finish() {
        let out = Arc::new(Recorder::default());
        let mut s = Session::new(out.clone(), rhai::Map::new());
        let _ = s.eval(
            "<1>",
            "let bar = progress(3, \"demo\"); bar.tick(); bar.tick(2); bar.finish(); clear_output();",
        )
        .unwrap();
        let events = out.events.lock().unwrap().clone();
        assert_eq!(
            events,
            [
                "start demo 3",
                "update 1",
                "update 3",
                "finish",
                "clear false"
            ]
        );
    }
}
