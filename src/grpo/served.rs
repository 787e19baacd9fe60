//! GRPO rollouts sampled by a serving engine that holds adapters of the policy (vLLM,
//! SGLang's vLLM-compatible routes, or `rlvr serve --enable-lora` in another process):
//! each published version is saved as a PEFT folder and loaded into the server by name, a
//! background thread samples submitted steps, and each taken step's log-probabilities are
//! compared with the trainer's own ([`Mismatch`]).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::endpoint::{Endpoint, EndpointError, TokenRequest, TokenSample};
use crate::model::generate::{Completion, Finish, Sampling};
use crate::model::lm::LanguageModel;
use crate::progress::{Cancel, Job, Silent};

use super::rollout::{Rollouts, Sampled};
use super::GrpoError;

/// The log-probability mismatch of one step's served rollouts: the server's log-probability
/// of each sampled token against the trainer's own when the step trains (both under the
/// model's distribution, temperature 1). With `max_staleness` s > 0 it holds the policy's
/// change over s steps as well as the engines' difference.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mismatch {
    /// 1-based step.
    pub step: usize,
    /// Mean of |server − trainer| over the sampled tokens.
    pub mean_abs: f64,
    /// The largest |server − trainer|.
    pub max_abs: f64,
    /// Tokens compared.
    pub tokens: usize,
}

/// What the background sampler is asked to do, in order.
enum Command {
    /// Load a PEFT folder into the server under a name.
    Load { name: String, dir: PathBuf },
    /// Sample a step's requests with a loaded adapter.
    Sample {
        step: usize,
        name: String,
        requests: Vec<TokenRequest>,
    },
    /// Unload an adapter.
    Unload { name: String },
}

/// What the background sampler answers.
enum Event {
    /// A step's samples and the seconds they took.
    Sampled {
        step: usize,
        samples: Vec<TokenSample>,
        seconds: f64,
    },
    /// A step's sampling was stopped.
    Cancelled,
    /// The server failed.
    Failed(EndpointError),
}

/// The thread that talks to the server, one command after the other, while the trainer
/// trains.
struct Worker {
    commands: Sender<Command>,
    events: Receiver<Event>,
    stop: Cancel,
    thread: JoinHandle<()>,
}

impl Worker {
    /// Starts the thread; it records in `loaded` the adapters the server holds.
    fn start(endpoint: Endpoint, loaded: Arc<Mutex<Vec<String>>>) -> Self {
        let (commands, inbox) = channel::<Command>();
        let (outbox, events) = channel();
        let stop = Cancel::new();
        let job = Job {
            progress: Arc::new(Silent),
            cancel: stop.clone(),
        };
        let thread = std::thread::spawn(move || {
            for command in inbox {
                if job.cancel.is_cancelled() {
                    break;
                }
                let event = match command {
                    Command::Load { name, dir } => {
                        match endpoint.load_lora_adapter(&name, &dir, true) {
                            Ok(()) => {
                                let mut loaded = loaded.lock().expect("loaded adapters");
                                if !loaded.contains(&name) {
                                    loaded.push(name);
                                }
                                continue;
                            }
                            Err(e) => Event::Failed(e),
                        }
                    }
                    Command::Unload { name } => match endpoint.unload_lora_adapter(&name) {
                        Ok(()) => {
                            loaded
                                .lock()
                                .expect("loaded adapters")
                                .retain(|n| *n != name);
                            continue;
                        }
                        Err(e) => Event::Failed(e),
                    },
                    Command::Sample {
                        step,
                        name,
                        requests,
                    } => {
                        let started = Instant::now();
                        let mut samples = Vec::with_capacity(requests.len());
                        let mut failure = None;
                        for result in endpoint.sample_tokens(&name, &requests, &job) {
                            match result {
                                Ok(sample) => samples.push(sample),
                                Err(e) => {
                                    failure = Some(e);
                                    break;
                                }
                            }
                        }
                        match failure {
                            None => Event::Sampled {
                                step,
                                samples,
                                seconds: started.elapsed().as_secs_f64(),
                            },
                            Some(EndpointError::Cancelled) => Event::Cancelled,
                            Some(e) => Event::Failed(e),
                        }
                    }
                };
                let failed = !matches!(event, Event::Sampled { .. });
                if outbox.send(event).is_err() || failed {
                    break;
                }
            }
        });
        Worker {
            commands,
            events,
            stop,
            thread,
        }
    }

    /// Stops the sampling in flight and waits for the thread.
    fn stop(self) {
        self.stop.cancel();
        drop(self.commands);
        let _ = self.thread.join();
    }
}

/// Sampling on a server: each published version of the policy's adapter is written in
/// PEFT's format under `dir` and loaded into the server as `<prefix>-step<n>` through
/// vLLM's `/v1/load_lora_adapter` (and unloaded through `/v1/unload_lora_adapter` once no
/// submitted step uses it), and every prompt is sampled there by token ids with the
/// adapter's name as the model, each generated token's id and log-probability returned.
/// Loading, sampling and unloading run in order on a background thread, so sampling ahead
/// (`max_staleness` > 0) overlaps the trainer's updates. The server must read `dir` (the
/// same machine, or a shared file system).
pub struct Served {
    endpoint: Endpoint,
    dir: PathBuf,
    prefix: String,
    /// The adapters the server holds, by name (kept by the background thread).
    loaded: Arc<Mutex<Vec<String>>>,
    worker: Option<Worker>,
    /// The prompts of the steps submitted and not yet taken.
    prompts: HashMap<usize, Vec<Vec<u32>>>,
    /// Samples that arrived before their step was taken.
    arrived: HashMap<usize, (Vec<TokenSample>, f64)>,
    /// Each step's measured mismatch, in order.
    pub mismatch: Vec<Mismatch>,
    /// Each step (1-based) and the adapter that sampled it, in the order submitted.
    pub sampled_by: Vec<(usize, String)>,
}

impl Served {
    /// Rollouts from `endpoint`'s server, adapters written under `dir` and named
    /// `<prefix>-step<n>`.
    pub fn new(endpoint: Endpoint, dir: PathBuf, prefix: &str) -> Self {
        Served {
            endpoint,
            dir,
            prefix: prefix.to_string(),
            loaded: Arc::default(),
            worker: None,
            prompts: HashMap::new(),
            arrived: HashMap::new(),
            mismatch: vec![],
            sampled_by: vec![],
        }
    }

    /// The server's name of the policy after `version` steps.
    pub fn adapter_name(&self, version: usize) -> String {
        format!("{}-step{version}", self.prefix)
    }

    /// Stops the background sampling and unloads every adapter still loaded from the
    /// server (called when training ends).
    pub fn finish(&mut self) -> Result<(), GrpoError> {
        self.stop();
        let loaded = std::mem::take(&mut *self.loaded.lock().expect("loaded adapters"));
        for name in loaded {
            self.endpoint.unload_lora_adapter(&name).map_err(served)?;
        }
        Ok(())
    }

    fn send(&mut self, command: Command) -> Result<(), GrpoError> {
        let (endpoint, loaded) = (&self.endpoint, &self.loaded);
        let worker = self
            .worker
            .get_or_insert_with(|| Worker::start(endpoint.clone(), loaded.clone()));
        worker
            .commands
            .send(command)
            .map_err(|_| GrpoError::Setup("rollout server: the sampler has stopped".into()))
    }
}

fn served(e: EndpointError) -> GrpoError {
    GrpoError::Setup(format!("rollout server: {e}"))
}

impl Rollouts for Served {
    fn sampled_elsewhere(&self) -> bool {
        true
    }

    fn publish(&mut self, policy: &LanguageModel, version: usize) -> Result<(), GrpoError> {
        let name = self.adapter_name(version);
        let dir = self.dir.join(&name);
        let mut copy = policy.clone();
        copy.save_adapter(&dir)?;
        let dir = dir.canonicalize().unwrap_or(dir);
        self.send(Command::Load { name, dir })
    }

    fn submit(
        &mut self,
        step: usize,
        version: usize,
        prompts: Vec<Vec<u32>>,
        requests: Vec<Sampling>,
    ) -> Result<(), GrpoError> {
        self.prompts.insert(step, prompts.clone());
        let requests = prompts
            .into_iter()
            .zip(requests)
            .map(|(prompt, s)| TokenRequest {
                prompt,
                max_tokens: s.max_tokens,
                temperature: s.temperature,
                top_p: s.top_p,
                top_k: s.top_k,
                min_p: s.min_p,
                seed: s.seed,
                stop: s.stop_strings,
            })
            .collect();
        let name = self.adapter_name(version);
        self.sampled_by.push((step + 1, name.clone()));
        self.send(Command::Sample {
            step,
            name,
            requests,
        })
    }

    fn take(
        &mut self,
        policy: &LanguageModel,
        step: usize,
        job: &Job,
    ) -> Result<Option<Sampled>, GrpoError> {
        let (samples, seconds) = loop {
            if let Some(done) = self.arrived.remove(&step) {
                break done;
            }
            let Some(worker) = &self.worker else {
                return Err(GrpoError::Setup(format!(
                    "step {} was taken before it was submitted",
                    step + 1
                )));
            };
            if job.cancel.is_cancelled() {
                worker.stop.cancel();
                return Ok(None);
            }
            match worker.events.recv_timeout(Duration::from_millis(50)) {
                Ok(Event::Sampled {
                    step: done,
                    samples,
                    seconds,
                }) => {
                    self.arrived.insert(done, (samples, seconds));
                }
                Ok(Event::Cancelled) => return Ok(None),
                Ok(Event::Failed(e)) => return Err(served(e)),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(GrpoError::Setup(
                        "rollout server: the sampler stopped before the step was sampled".into(),
                    ))
                }
            }
        };
        let prompts = self.prompts.remove(&step).unwrap_or_default();

        // the trainer's own log-probabilities of the same tokens, against the server's
        let pairs: Vec<(&[u32], &[u32])> = prompts
            .iter()
            .zip(&samples)
            .map(|(p, s)| (p.as_slice(), s.ids.as_slice()))
            .collect();
        let local: Vec<Vec<f32>> = crate::model::linear::no_grad(|| {
            let logprobs = policy.model.pair_logprobs(&pairs, true, 1.0)?;
            crate::model::Result::Ok(logprobs.to_vec2::<f32>()?)
        })?;
        let (mut sum, mut max, mut tokens) = (0.0, 0.0f64, 0);
        for (sample, row) in samples.iter().zip(&local) {
            for (served, trainer) in sample.logprobs.iter().zip(row) {
                let d = (served - *trainer as f64).abs();
                sum += d;
                max = max.max(d);
                tokens += 1;
            }
        }
        self.mismatch.push(Mismatch {
            step: step + 1,
            mean_abs: if tokens > 0 { sum / tokens as f64 } else { 0.0 },
            max_abs: max,
            tokens,
        });

        // the completions keep the sampler's log-probabilities, as local sampling does
        let completions = samples
            .into_iter()
            .map(|s| Completion {
                logprobs: s.logprobs.iter().map(|&v| v as f32).collect(),
                finish: if s.finish == "stop" {
                    Finish::Stop
                } else {
                    Finish::Length
                },
                ids: s.ids,
            })
            .collect();
        Ok(Some(Sampled {
            completions,
            seconds,
        }))
    }

    fn retire(&mut self, version: usize) -> Result<(), GrpoError> {
        let name = self.adapter_name(version);
        self.send(Command::Unload { name })
    }

    fn stop(&mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop();
        }
        self.arrived.clear();
        self.prompts.clear();
    }
}
