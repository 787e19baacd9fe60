//! The `rlvr` command: runs Rhai experiment scripts, a REPL, the reference, benchmarks.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use rlvr::script::{self, render_text, Session, StdOutput};

/// rlvr-lab: reinforcement learning with verifiable rewards, from Rhai scripts.
#[derive(Parser)]
#[command(name = "rlvr", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a .rhai script.
    Run {
        /// The script file.
        script: PathBuf,
        /// A parameter for the script, `key=value`; the script reads it as `params.key`.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// An interactive session: each line is evaluated in one persistent scope.
    Repl,
    /// Print the Markdown reference of every script function.
    Doc {
        /// Write it to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Measure a capability and print its figures as one JSON line.
    Bench {
        #[command(subcommand)]
        which: Bench,
    },
}

#[derive(Subcommand)]
enum Bench {
    /// Load the full MMLU, CMMLU and MMLU-Pro test splits into Items tables.
    Load {
        /// Folder holding the full `mmlu/`, `cmmlu/` and `mmlu_pro/` in their published
        /// layouts (see data/README.md).
        #[arg(long)]
        data: PathBuf,
    },
    /// Time a model: prefill, batched greedy decoding, or one LoRA forward+backward step.
    Model {
        /// The model: a Hugging Face directory or a .gguf file.
        #[arg(long)]
        model: PathBuf,
        /// JSON file with the token ids to use (`prompt_256`, `prompt_16`).
        #[arg(long)]
        ids: PathBuf,
        /// What to time.
        #[arg(long, value_enum)]
        task: rlvr::bench::ModelTask,
        /// Rows in the batch (decode, lora).
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// New tokens per row (decode).
        #[arg(long, default_value_t = 128)]
        tokens: usize,
    },
    /// Time GRPO steps on MedQA sample questions with the study's prompt and rewards: the
    /// step split into generation, scoring and training, and the peak memory.
    Grpo {
        /// The model: a Hugging Face directory or a .gguf file.
        #[arg(long)]
        model: PathBuf,
        /// Its tokenizer.json (default: beside the model).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// A MedQA folder; the first --prompts questions of its test split are used.
        #[arg(long, default_value = "data/samples/medqa")]
        data: PathBuf,
        /// Completions per prompt (G).
        #[arg(long, default_value_t = 4)]
        group: usize,
        /// Prompts per step.
        #[arg(long, default_value_t = 2)]
        prompts: usize,
        /// New tokens at most per completion.
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// LoRA rank (alpha = 2 × rank, on every linear layer).
        #[arg(long, default_value_t = 16)]
        rank: usize,
        /// Steps to time.
        #[arg(long, default_value_t = 1)]
        steps: usize,
    },
}

fn main() -> ExitCode {
    set_table_format();
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Tables print at most 30 rows and 60 characters a cell unless the user set otherwise.
fn set_table_format() {
    for (key, value) in [
        ("POLARS_FMT_MAX_ROWS", "30"),
        ("POLARS_FMT_STR_LEN", "60"),
        ("POLARS_FMT_MAX_COLS", "14"),
    ] {
        if std::env::var_os(key).is_none() {
            std::env::set_var(key, value);
        }
    }
}

fn dispatch(command: Command) -> Result<ExitCode> {
    match command {
        Command::Run { script, set } => run(&script, &set),
        Command::Repl => repl(),
        Command::Doc { out } => {
            let text = script::doc::reference();
            match out {
                Some(path) => std::fs::write(&path, text)
                    .with_context(|| format!("writing {}", path.display()))?,
                None => print!("{text}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            which: Bench::Load { data },
        } => {
            let report = rlvr::bench::load(&data)?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            which:
                Bench::Model {
                    model,
                    ids,
                    task,
                    batch,
                    tokens,
                },
        } => {
            let report = rlvr::bench::model(&model, &ids, task, batch, tokens)?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            which:
                Bench::Grpo {
                    model,
                    tokenizer,
                    data,
                    group,
                    prompts,
                    max_tokens,
                    rank,
                    steps,
                },
        } => {
            let report = rlvr::bench::grpo(&rlvr::bench::GrpoBench {
                model,
                tokenizer,
                data,
                group,
                prompts,
                max_tokens,
                rank,
                steps,
            })?;
            println!("{}", serde_json::to_string(&report)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn run(path: &Path, set: &[String]) -> Result<ExitCode> {
    let pairs = set
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .with_context(|| format!("--set expects key=value, got `{kv}`"))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut session = Session::new(terminal_output()?, script::params_map(pairs));
    match session.run_file(path) {
        Ok(_) => Ok(ExitCode::SUCCESS),
        Err(err) => {
            eprintln!("error: {err}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Standard output whose cancellation flag Ctrl-C sets: the first Ctrl-C stops the running
/// work (which keeps what it has done), a second one ends the process.
fn terminal_output() -> Result<Arc<StdOutput>> {
    let output = Arc::new(StdOutput::default());
    let cancel = output.cancel.clone();
    ctrlc::set_handler(move || {
        if cancel.is_cancelled() {
            std::process::exit(130);
        }
        eprintln!("\ninterrupted: stopping at the next checkpoint (Ctrl-C again to quit now)");
        cancel.cancel();
    })
    .context("could not install the Ctrl-C handler")?;
    Ok(output)
}

fn repl() -> Result<ExitCode> {
    let output = terminal_output()?;
    let mut session = Session::new(output.clone(), rhai::Map::new());
    let mut editor = rustyline::DefaultEditor::new()?;
    let history = rlvr::paths::rlvr_home().join("repl_history.txt");
    let _ = editor.load_history(&history);
    println!(
        "rlvr {} — Rhai REPL. Ctrl-D quits; `rlvr doc` lists the functions.",
        env!("CARGO_PKG_VERSION")
    );
    let mut buffer = String::new();
    let mut cell = 0;
    loop {
        let prompt = if buffer.is_empty() {
            "rlvr> "
        } else {
            "  ... "
        };
        let line = match editor.readline(prompt) {
            Ok(line) => line,
            Err(rustyline::error::ReadlineError::Interrupted) => {
                buffer.clear();
                continue;
            }
            Err(rustyline::error::ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        };
        buffer.push_str(&line);
        buffer.push('\n');
        if script::is_incomplete(session.engine(), &buffer) {
            continue;
        }
        let _ = editor.add_history_entry(buffer.trim_end());
        cell += 1;
        output.cancel.reset();
        match session.eval(&format!("<repl {cell}>"), &buffer) {
            Ok(value) if !value.is_unit() => println!("{}", render_text(&value)),
            Ok(_) => {}
            Err(err) => eprintln!("error: {err}"),
        }
        buffer.clear();
    }
    if let Some(dir) = history.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = editor.save_history(&history);
    Ok(ExitCode::SUCCESS)
}

/// mimalloc: loading a dataset allocates and frees hundreds of thousands of small strings,
/// which glibc's allocator handles several times slower.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
