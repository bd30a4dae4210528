//! Serving one base model with many LoRA adapters: continuous batching across adapters.
//!
//! The HTTP face lives in the CLI (`lorakit serve`); this module is the part that touches the
//! model. Requests are queued ([`Scheduler::submit`]) and one model thread runs them in steps
//! ([`step::forward_rows`]): one pass over each base weight for every token row of the step,
//! plus per-adapter products, each row computed exactly as a one-token decode alone (see
//! `model/rows.rs` for how that is kept):
//! - every decoding request advances one token per step;
//! - a new request's prompt is prefilled in chunks of at most `prefill_chunk` tokens, one chunk
//!   per step beside the decodes, so a long prompt does not stall the running requests; its
//!   first token is sampled from the logits of its last chunk. The chunking does not change a
//!   bit: [`Decoder::prefill`], what `lorakit generate` runs, computes the same rows;
//! - requests join between steps (when a slot is free) and leave as soon as they finish, are
//!   cancelled (the client went away: [`Sink::is_closed`]) or fail.
//!
//! A model with bf16 or GGUF-block weights has no chunk-invariant prefill ([`Decoder::all_f32`]):
//! its prompts are prefilled whole with [`Decoder::forward`] when they join, as `generate` does.
//!
//! Each request has its own KV cache for prompt + max_tokens positions; `max_batch` running
//! requests bound the KV memory ([`kv_bytes_per_position`]).

/// The batched step lives with the model (`generate` prefills through it too).
pub use crate::model::rows as step;

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::generate::{Sampler, SamplingParams};
use crate::lora::peft::Adapter;
use crate::lora::{LoraWeights, ModuleId};
use crate::model::config::Config;
use crate::model::decoder::{Decoder, KvCache, Logits};
use crate::tokenize::{StreamDecoder, Tokenizer};

/// A loaded adapter as the server holds it: shared by the requests that use it, so unloading
/// it only stops new requests.
#[derive(Debug)]
pub struct ServeAdapter {
    pub name: String,
    pub path: PathBuf,
    pub adapter: Adapter,
}

impl ServeAdapter {
    /// Loads a PEFT adapter directory and checks it against the model's config (its modules
    /// and their shapes: an adapter for another base is refused here).
    pub fn load(name: &str, path: &Path, config: &Config) -> Result<ServeAdapter> {
        let adapter = Adapter::load(path, config)?;
        Ok(ServeAdapter {
            name: name.to_string(),
            path: path.to_path_buf(),
            adapter,
        })
    }

    /// The adapter's weights for module `id`, if it adapts it.
    pub fn module(&self, id: ModuleId) -> Option<&LoraWeights> {
        self.adapter.modules.get(&id)
    }
}

/// The adapters a server offers by name; shared between the HTTP side and the model thread.
#[derive(Debug, Default)]
pub struct Registry {
    adapters: RwLock<BTreeMap<String, Arc<ServeAdapter>>>,
}

impl Registry {
    pub fn get(&self, name: &str) -> Option<Arc<ServeAdapter>> {
        self.adapters.read().ok()?.get(name).cloned()
    }

    /// Names in order.
    pub fn names(&self) -> Vec<String> {
        self.adapters
            .read()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Adds an adapter; an error if the name is taken.
    pub fn insert(&self, a: ServeAdapter) -> Result<()> {
        let mut m = self
            .adapters
            .write()
            .map_err(|_| Error::Invalid("adapter registry poisoned".into()))?;
        if m.contains_key(&a.name) {
            return Err(Error::Invalid(format!(
                "an adapter named '{}' is already loaded",
                a.name
            )));
        }
        m.insert(a.name.clone(), Arc::new(a));
        Ok(())
    }

    /// Removes an adapter; false if there was none of that name.
    pub fn remove(&self, name: &str) -> bool {
        self.adapters
            .write()
            .map(|mut m| m.remove(name).is_some())
            .unwrap_or(false)
    }
}

/// Bytes of KV cache one position of one sequence takes (keys and values of every layer).
pub fn kv_bytes_per_position(c: &Config) -> usize {
    2 * c.num_layers * c.num_kv_heads * c.head_dim * std::mem::size_of::<f32>()
}

/// Bytes of KV cache a request of `prompt_len` tokens and `max_tokens` reserves.
pub fn kv_bytes_for(c: &Config, prompt_len: usize, max_tokens: usize) -> usize {
    (prompt_len + max_tokens).min(c.max_position_embeddings) * kv_bytes_per_position(c)
}

/// Bytes of the buffers one step allocates for `rows` token rows (decodes + prefill chunk)
/// of which `logit_rows` produce logits: activations, products' transposed outputs, logits;
/// an upper bound (each product's transposed output counted at the widest layer).
pub fn step_scratch_bytes(c: &Config, rows: usize, logit_rows: usize) -> usize {
    let (h, q, kv, inter) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
    let widest = (q + 2 * kv).max(2 * inter).max(h);
    let per_row = 5 * h + 2 * q + 2 * kv + 3 * inter + (q + 2 * kv).max(2 * inter) + widest;
    (rows * per_row + 2 * logit_rows * c.vocab_size) * std::mem::size_of::<f32>()
}

/// Why a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence id or a stop string.
    Stop,
    /// max_tokens, or the context is full.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What the model thread tells a request's client.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Newly generated text (never empty).
    Text(String),
    Done {
        finish_reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// The request failed or was cancelled (shutdown); nothing more follows.
    Error(String),
}

/// Where a request's events go (the HTTP side's channel).
pub trait Sink: Send {
    /// False once the receiver is gone.
    fn send(&mut self, ev: Event) -> bool;
    /// True once the receiver is gone (the client disconnected): the request is dropped.
    fn is_closed(&self) -> bool;
}

/// One generation request: the prompt's ids, the adapter (None = base) and sampling settings.
/// `params.stop_ids` are the end-of-sequence ids; `stop` are OpenAI's stop strings.
pub struct Request {
    pub prompt: Vec<u32>,
    pub adapter: Option<Arc<ServeAdapter>>,
    pub params: SamplingParams,
    pub stop: Vec<String>,
    pub sink: Box<dyn Sink>,
}

/// Why [`Scheduler::submit`] refused a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitError {
    /// `max_queue` requests are already waiting.
    QueueFull,
    /// The server is shutting down (or its model thread has stopped).
    ShuttingDown,
}

enum Msg {
    Request(Box<Request>),
    /// Stop taking requests; let running ones finish until the deadline, then cancel them.
    Shutdown(Instant),
}

#[derive(Debug, Clone)]
pub struct SchedulerOptions {
    /// Requests decoded together at most.
    pub max_batch: usize,
    /// Requests waiting for a slot at most; more get [`SubmitError::QueueFull`].
    pub max_queue: usize,
    /// Prompt tokens prefilled per step, beside the decodes (at least 1): bounds how long new
    /// prompts hold up the running requests. (bf16 / GGUF-block models: prompts are prefilled
    /// whole when they join, this many tokens of prompts at most per step, at least one.)
    pub prefill_chunk: usize,
    /// Bytes of KV cache the running requests may reserve together (each reserves prompt +
    /// max_tokens positions when it joins); a request waits until its reservation fits. None:
    /// no limit beyond `max_batch`. A request larger than the whole budget should be refused
    /// before it is submitted ([`kv_bytes_for`]); alone in the batch it still runs.
    pub kv_budget_bytes: Option<usize>,
}

impl Default for SchedulerOptions {
    fn default() -> Self {
        SchedulerOptions {
            max_batch: 16,
            max_queue: 64,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            kv_budget_bytes: None,
        }
    }
}

/// Prompt tokens per prefill chunk unless told otherwise. A step with a chunk costs each running
/// request the chunk's prefill time on top of its decode step: for SmolLM2-135M on 2 busy cores
/// about 6–8 ms per prompt token (a 101-token prompt: 0.6–1 s), so up to 1 s for 128 — the gap
/// a running stream sees at worst while a prompt arrives, against a whole long prompt's prefill
/// unchunked — while each weight pass is still shared by 128 rows.
pub const DEFAULT_PREFILL_CHUNK: usize = 128;

/// The handle to the model thread.
pub struct Scheduler {
    tx: mpsc::Sender<Msg>,
    queued: Arc<AtomicUsize>,
    max_queue: usize,
    closing: AtomicBool,
    running: Arc<AtomicUsize>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Scheduler {
    /// Starts the model thread. It owns the model (adapters are attached to it for prefills).
    pub fn start(
        model: Decoder,
        tokenizer: Arc<Tokenizer>,
        opts: SchedulerOptions,
    ) -> Result<Scheduler> {
        let (tx, rx) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let running = Arc::new(AtomicUsize::new(0));
        let (q, r) = (queued.clone(), running.clone());
        let max_queue = opts.max_queue;
        let thread = std::thread::Builder::new()
            .name("lorakit-model".into())
            .spawn(move || run(model, &tokenizer, rx, q, r, opts))
            .map_err(|e| Error::Invalid(format!("cannot start the model thread: {e}")))?;
        Ok(Scheduler {
            tx,
            queued,
            max_queue,
            closing: AtomicBool::new(false),
            running,
            thread: std::sync::Mutex::new(Some(thread)),
        })
    }

    /// Queues a request, or refuses it when the queue is full or the server is closing.
    pub fn submit(&self, req: Request) -> std::result::Result<(), SubmitError> {
        if self.closing.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        // Reserve a queue place first so concurrent submits cannot overshoot max_queue.
        if self.queued.fetch_add(1, Ordering::SeqCst) >= self.max_queue {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull);
        }
        self.tx.send(Msg::Request(Box::new(req))).map_err(|_| {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            SubmitError::ShuttingDown
        })
    }

    /// Requests waiting for a batch slot.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }

    /// Requests in the running batch.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// Refuses new requests from now on, answers the waiting ones with an error, and lets the
    /// running ones finish for up to `grace`, then cancels what is left; the model thread then
    /// ends ([`Scheduler::join`] waits for it).
    pub fn begin_shutdown(&self, grace: Duration) {
        if !self.closing.swap(true, Ordering::SeqCst) {
            let _ = self.tx.send(Msg::Shutdown(Instant::now() + grace));
        }
    }

    /// Waits for the model thread to end (after [`Scheduler::begin_shutdown`]).
    pub fn join(&self) {
        let t = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = t {
            let _ = t.join();
        }
    }
}

/// A request in the running batch.
struct Active<'t> {
    adapter: Option<Arc<ServeAdapter>>,
    /// The prompt; `cache.len` of its tokens are prefilled (all of them once it decodes).
    prompt: Vec<u32>,
    cache: KvCache,
    sampler: Sampler,
    params: SamplingParams,
    capacity: usize,
    /// The last sampled token: the input of the next step.
    next: u32,
    generated: usize,
    prompt_tokens: usize,
    decoder: StreamDecoder<'t>,
    stop: StopFilter,
    sink: Box<dyn Sink>,
}

/// OpenAI's stop strings over the generated text: text that might be the start of a stop
/// string is held back until it is clear it is not.
#[derive(Debug, Default)]
pub struct StopFilter {
    stop: Vec<String>,
    text: String,
    /// Bytes of `text` already handed out.
    sent: usize,
}

impl StopFilter {
    pub fn new(stop: Vec<String>) -> Self {
        StopFilter {
            stop: stop.into_iter().filter(|s| !s.is_empty()).collect(),
            ..Default::default()
        }
    }

    /// Adds a token's text; returns what can be sent now and whether a stop string was hit
    /// (the text is cut before it, the stop string itself is not sent).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        self.text.push_str(piece);
        // Held-back text never contains a whole stop string, so the earliest match is new.
        if let Some(at) = self
            .stop
            .iter()
            .filter_map(|s| self.text.find(s.as_str()))
            .min()
        {
            let out = self.text[self.sent..at.max(self.sent)].to_string();
            self.text.truncate(at.max(self.sent));
            self.sent = self.text.len();
            return (out, true);
        }
        // Hold back the longest end of the text that is a proper prefix of some stop string.
        let mut hold = 0;
        for s in &self.stop {
            for (i, _) in s.char_indices().skip(1) {
                if i > hold && self.text.ends_with(&s[..i]) {
                    hold = i;
                }
            }
        }
        let safe = (self.text.len() - hold).max(self.sent);
        let out = self.text[self.sent..safe].to_string();
        self.sent = safe;
        (out, false)
    }

    /// Generation ended without a stop string: `tail` (the detokeniser's last bytes) and
    /// everything held back.
    pub fn finish(&mut self, tail: &str) -> String {
        self.text.push_str(tail);
        let out = self.text[self.sent..].to_string();
        self.sent = self.text.len();
        out
    }
}

fn run(
    mut model: Decoder,
    tok: &Tokenizer,
    rx: mpsc::Receiver<Msg>,
    queued: Arc<AtomicUsize>,
    running: Arc<AtomicUsize>,
    opts: SchedulerOptions,
) {
    let mut waiting: VecDeque<Box<Request>> = VecDeque::new();
    let mut active: Vec<Active<'_>> = Vec::new();
    let mut deadline: Option<Instant> = None;
    let max_batch = opts.max_batch.max(1);
    let prefill_chunk = opts.prefill_chunk.max(1);
    // f32 models prefill in chunks inside the steps; others whole, when a request joins.
    let chunked = model.all_f32();
    loop {
        running.store(active.len(), Ordering::SeqCst);
        // Take in what arrived; block only when there is nothing to do.
        let mut incoming = Vec::new();
        if active.is_empty() && waiting.is_empty() {
            if deadline.is_some() {
                running.store(0, Ordering::SeqCst);
                return;
            }
            match rx.recv() {
                Ok(m) => incoming.push(m),
                Err(_) => return,
            }
        }
        incoming.extend(rx.try_iter());
        for m in incoming {
            match m {
                Msg::Request(r) => waiting.push_back(r),
                Msg::Shutdown(d) => deadline = Some(d),
            }
        }
        if deadline.is_some() {
            for mut r in waiting.drain(..) {
                queued.fetch_sub(1, Ordering::SeqCst);
                r.sink
                    .send(Event::Error("the server is shutting down".into()));
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            for mut a in active.drain(..) {
                a.sink.send(Event::Error(
                    "the server shut down before this request finished".into(),
                ));
            }
            running.store(0, Ordering::SeqCst);
            return;
        }

        // Admit waiting requests into free slots: chunked (f32 models) they only get their
        // cache here and are prefilled chunk by chunk in the steps; otherwise each is prefilled
        // whole now.
        let mut prefilled = 0;
        let mut reserved: usize = active
            .iter()
            .map(|a| a.capacity * kv_bytes_per_position(&model.config))
            .sum();
        while active.len() < max_batch && (chunked || prefilled == 0 || prefilled < prefill_chunk) {
            let Some(front) = waiting.front() else {
                break;
            };
            let need = kv_bytes_for(
                &model.config,
                front.prompt.len(),
                front.params.max_new_tokens,
            );
            if opts
                .kv_budget_bytes
                .is_some_and(|b| !active.is_empty() && reserved + need > b)
            {
                break;
            }
            reserved += need;
            let Some(req) = waiting.pop_front() else {
                break;
            };
            queued.fetch_sub(1, Ordering::SeqCst);
            if req.sink.is_closed() {
                continue;
            }
            prefilled += req.prompt.len();
            if let Some(a) = admit(&mut model, tok, *req, !chunked) {
                active.push(a);
            }
        }

        // Drop the requests whose clients went away.
        active.retain(|a| !a.sink.is_closed());
        if active.is_empty() {
            continue;
        }

        // One step: a token for every decoding request, and the next prompt chunks (up to
        // `prefill_chunk` tokens, oldest request first) of the prefilling ones.
        let mut budget = prefill_chunk;
        // Per request: the tokens it runs in this step (0: none) and whether it samples.
        let plan: Vec<(usize, bool)> = active
            .iter()
            .map(|a| {
                let left = a.prompt.len().saturating_sub(a.cache.len);
                if left == 0 {
                    (1, true)
                } else {
                    let take = left.min(budget);
                    budget -= take;
                    (take, take == left)
                }
            })
            .collect();
        let logits = {
            let mut seqs: Vec<step::SeqChunk<'_>> = active
                .iter_mut()
                .zip(&plan)
                .filter(|(_, &(t, _))| t > 0)
                .map(|(a, &(t, sample))| {
                    let at = a.cache.len;
                    step::SeqChunk {
                        tokens: if at < a.prompt.len() {
                            &a.prompt[at..at + t]
                        } else {
                            std::slice::from_ref(&a.next)
                        },
                        cache: &mut a.cache,
                        adapter: a.adapter.as_deref().map(|s| &s.adapter),
                        logits: sample,
                    }
                })
                .collect();
            step::forward_rows(&model, &mut seqs)
        };
        let logits = match logits {
            Ok(l) => l,
            Err(e) => {
                for mut a in active.drain(..) {
                    a.sink.send(Event::Error(format!("the model failed: {e}")));
                }
                continue;
            }
        };
        let vocab = model.config.vocab_size;
        let mut i = 0;
        // One plan entry per request, in order (the plan was built from `active`).
        let mut samples = plan.iter().map(|&(_, sample)| sample);
        active.retain_mut(|a| {
            if !samples.next().unwrap_or(false) {
                return true;
            }
            let row = &logits[i * vocab..(i + 1) * vocab];
            i += 1;
            advance(a, row)
        });
    }
}

/// Makes a request a running one: its cache, and with `whole` its prefill alone (its adapter
/// attached to the model for this one call, as `lorakit generate --adapter` runs it) and its
/// first token; None if it failed or is already finished. Without `whole` the steps prefill it.
fn admit<'t>(
    model: &mut Decoder,
    tok: &'t Tokenizer,
    mut req: Request,
    whole: bool,
) -> Option<Active<'t>> {
    let ctx = model.config.max_position_embeddings;
    let fail = |sink: &mut Box<dyn Sink>, msg: String| {
        sink.send(Event::Error(msg));
    };
    if req.prompt.is_empty() || req.prompt.len() >= ctx {
        fail(
            &mut req.sink,
            format!(
                "the prompt has {} tokens; the model's context is {ctx}",
                req.prompt.len()
            ),
        );
        return None;
    }
    // As generate(): room for the prompt and max_tokens, at most the context.
    let capacity = (req.prompt.len() + req.params.max_new_tokens).min(ctx);
    if !whole {
        let cache = match model.new_cache(capacity) {
            Ok(c) => c,
            Err(e) => {
                fail(&mut req.sink, format!("the model failed: {e}"));
                return None;
            }
        };
        return Some(Active {
            adapter: req.adapter,
            cache,
            sampler: Sampler::new(req.params.clone()),
            params: req.params,
            capacity,
            next: 0,
            generated: 0,
            prompt_tokens: req.prompt.len(),
            decoder: StreamDecoder::new(tok, &req.prompt),
            stop: StopFilter::new(req.stop),
            sink: req.sink,
            prompt: req.prompt,
        });
    }
    let prefill = (|| -> Result<(KvCache, Vec<f32>)> {
        let mut cache = model.new_cache(capacity)?;
        if let Some(a) = &req.adapter {
            model.attach_adapter(&a.adapter, 1.0)?;
        }
        let out = model.forward(&req.prompt, &mut cache, Logits::Last);
        model.detach_adapters();
        Ok((cache, out?))
    })();
    let (cache, logits) = match prefill {
        Ok(v) => v,
        Err(e) => {
            fail(&mut req.sink, format!("the model failed: {e}"));
            return None;
        }
    };
    let mut a = Active {
        adapter: req.adapter,
        cache,
        prompt: req.prompt.clone(),
        sampler: Sampler::new(req.params.clone()),
        params: req.params,
        capacity,
        next: 0,
        generated: 0,
        prompt_tokens: req.prompt.len(),
        decoder: StreamDecoder::new(tok, &req.prompt),
        stop: StopFilter::new(req.stop),
        sink: req.sink,
    };
    advance(&mut a, &logits).then_some(a)
}

/// Samples the next token of `a` from its logits [vocab] and sends its text; false when the
/// request is finished (or its client is gone). The stop rules are generate()'s: a stop id,
/// max_tokens, or a full cache; and OpenAI's stop strings.
fn advance(a: &mut Active<'_>, logits: &[f32]) -> bool {
    let next = a.sampler.sample(logits);
    a.generated += 1;
    let done = |a: &mut Active<'_>, reason: FinishReason| {
        let tail = a.decoder.flush().unwrap_or_default();
        let rest = a.stop.finish(&tail);
        if !rest.is_empty() {
            a.sink.send(Event::Text(rest));
        }
        a.sink.send(Event::Done {
            finish_reason: reason,
            prompt_tokens: a.prompt_tokens,
            completion_tokens: a.generated,
        });
        false
    };
    if a.params.stop_ids.contains(&next) {
        return done(a, FinishReason::Stop);
    }
    let piece = match a.decoder.push(next) {
        Ok(p) => p,
        Err(e) => {
            a.sink
                .send(Event::Error(format!("decoding token {next}: {e}")));
            return false;
        }
    };
    let (out, stopped) = a.stop.push(&piece);
    if !out.is_empty() && !a.sink.send(Event::Text(out)) {
        return false;
    }
    if stopped {
        a.sink.send(Event::Done {
            finish_reason: FinishReason::Stop,
            prompt_tokens: a.prompt_tokens,
            completion_tokens: a.generated,
        });
        return false;
    }
    if a.generated >= a.params.max_new_tokens || a.cache.len >= a.capacity {
        return done(a, FinishReason::Length);
    }
    a.next = next;
    true
}

#[cfg(test)]
mod tests {
    use super::StopFilter;

    fn run(stop: &[&str], pieces: &[&str]) -> (Vec<String>, bool, String) {
        let mut f = StopFilter::new(stop.iter().map(|s| s.to_string()).collect());
        let mut outs = Vec::new();
        for p in pieces {
            let (o, hit) = f.push(p);
            outs.push(o);
            if hit {
                return (outs, true, String::new());
            }
        }
        (outs, false, f.finish(""))
    }

    #[test]
    fn stop_strings_cut_the_text_and_hold_back_possible_starts() {
        // A stop string split over tokens: "\n\n" arrives as "\n" + "\nB".
        let (outs, hit, _) = run(&["\n\n"], &["Hello", " world\n", "\nBye"]);
        assert!(hit);
        assert_eq!(outs.concat(), "Hello world");
        assert_eq!(
            outs[1], " world",
            "the newline is held back until it is clear"
        );
        // A held-back start that turns out not to be a stop string is sent later.
        let (outs, hit, rest) = run(&["STOP"], &["a ST", "ay"]);
        assert!(!hit);
        assert_eq!(outs, vec!["a ".to_string(), "STay".to_string()]);
        assert_eq!(rest, "");
        // Held back at the end of generation: sent by finish.
        let (outs, hit, rest) = run(&["STOP"], &["a ST"]);
        assert!(!hit);
        assert_eq!((outs.concat(), rest), ("a ".to_string(), "ST".to_string()));
        // The earliest of several stop strings wins; multi-byte text is cut on boundaries.
        let (outs, hit, _) = run(&["é!", "b"], &["xé", "!ab"]);
        assert!(hit);
        assert_eq!(outs.concat(), "x");
        // No stop strings: everything passes at once.
        let (outs, hit, _) = run(&[], &["a", "b"]);
        assert!(!hit);
        assert_eq!(outs, vec!["a".to_string(), "b".to_string()]);
    }
}
