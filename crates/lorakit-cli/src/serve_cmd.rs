//! `lorakit serve`: an OpenAI-compatible HTTP server for one base model and many LoRA adapters
//! (tokio + axum). The HTTP side parses and answers; the model runs on its own thread
//! (`lorakit::serve::Scheduler`, continuous batching across adapters).

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

use axum::extract::{Request as HttpRequest, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use clap::Args;
use lorakit::generate::SamplingParams;
use lorakit::serve::{
    kv_bytes_for, kv_bytes_per_position, step_scratch_bytes, Event, Registry, Request, Scheduler,
    SchedulerOptions, ServeAdapter, Sink, SubmitError,
};
use lorakit::tokenize::{ChatMessage, Tokenizer};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::serve_api::{self as api, ApiError, ApiResult};

#[derive(Args)]
pub struct ServeArgs {
    /// A .gguf file or an HF model directory [default: the fetched SmolLM2-135M-Instruct]
    #[arg(long)]
    model: Option<PathBuf>,
    /// A PEFT adapter offered as model NAME: NAME=DIR (repeatable).
    #[arg(long)]
    adapter: Vec<String>,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// 0 picks a free port (the address is printed at start).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on every /v1 request.
    #[arg(long)]
    api_key: Option<String>,
    /// Requests decoded together at most.
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Requests not yet in the batch at most (at least 1); more are answered 429.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// MiB of KV cache the running requests may reserve together (each reserves its prompt +
    /// max_tokens positions); requests wait for room, and one that alone needs more is refused.
    #[arg(long, default_value_t = 2048)]
    kv_budget_mib: usize,
    /// Prompt tokens prefilled per step beside the running decodes (at least 1): a long prompt
    /// runs in chunks of this many tokens, each step also giving every running request its next
    /// token, so it does not stall them. Smaller: steadier time between tokens while prompts
    /// arrive; larger: prompts finish prefilling sooner. Outputs do not depend on it.
    #[arg(long, default_value_t = lorakit::serve::DEFAULT_PREFILL_CHUNK)]
    prefill_chunk: usize,
    /// The base model's name in `model` fields [default: the model file's name without extension].
    #[arg(long)]
    served_model_name: Option<String>,
    /// Seconds running requests get to finish after SIGTERM / Ctrl-C before they are cancelled.
    #[arg(long, default_value_t = 10)]
    shutdown_grace: u64,
}

/// Largest request body read (a longer one is answered 413).
const BODY_LIMIT: usize = 4 << 20;

struct App {
    sched: Scheduler,
    registry: Registry,
    tok: Arc<Tokenizer>,
    config: lorakit::model::Config,
    base_name: String,
    api_key: Option<String>,
    created: u64,
    kv_budget_bytes: usize,
}

pub fn cmd_serve(a: ServeArgs) -> Result<()> {
    if a.max_batch == 0 || a.max_queue == 0 {
        // Every request passes through the queue on its way into the batch.
        bail!("--max-batch and --max-queue must be at least 1");
    }
    if a.prefill_chunk == 0 {
        bail!("--prefill-chunk must be at least 1");
    }
    let path = crate::resolve_model(a.model.clone())?;
    let (model, tok) = crate::open_model(Some(path.clone()))?.into_parts();
    let tok = tok.with_context(|| {
        format!(
            "{}: the model has no tokenizer.json; serve needs one to read prompts",
            path.display()
        )
    })?;
    let base_name = match &a.served_model_name {
        Some(n) => n.clone(),
        None => path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "base".into()),
    };
    let registry = Registry::default();
    for spec in &a.adapter {
        let Some((name, dir)) = spec.split_once('=') else {
            bail!("--adapter {spec}: expected NAME=DIR");
        };
        if name.is_empty() || name == base_name {
            bail!("--adapter {spec}: the name must be non-empty and differ from the base model's ('{base_name}')");
        }
        let ad = ServeAdapter::load(name, &PathBuf::from(dir), &model.config)
            .with_context(|| format!("cannot load adapter {dir}"))?;
        registry.insert(ad)?;
    }
    let config = model.config.clone();
    let kv = kv_bytes_per_position(&config);
    let tok = Arc::new(tok);
    let sched = Scheduler::start(
        model,
        tok.clone(),
        SchedulerOptions {
            max_batch: a.max_batch,
            max_queue: a.max_queue,
            kv_budget_bytes: Some(a.kv_budget_mib << 20),
            prefill_chunk: a.prefill_chunk,
        },
    )?;
    let app = Arc::new(App {
        sched,
        registry,
        tok,
        config,
        base_name,
        api_key: a.api_key.clone(),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        kv_budget_bytes: a.kv_budget_mib << 20,
    });
    eprintln!(
        "lorakit serve: model '{}' ({}), adapters: {}",
        app.base_name,
        path.display(),
        match app.registry.names() {
            n if n.is_empty() => "none".to_string(),
            n => n.join(", "),
        }
    );
    eprintln!(
        "KV cache budget: {} MiB (--kv-budget-mib) = {} positions of {:.1} KiB, over at most {} running requests; queue {}",
        a.kv_budget_mib,
        (a.kv_budget_mib << 20) / kv,
        kv as f64 / 1024.0,
        a.max_batch,
        a.max_queue
    );

    // What the process may hold: what it holds now (model, adapters given at start, tokenizer,
    // runtime) + the KV budget + one step's buffers (max_batch decodes + a prefill chunk).
    if let Some(now) = resident_bytes() {
        let kv_budget = a.kv_budget_mib << 20;
        let scratch = step_scratch_bytes(&app.config, a.max_batch + a.prefill_chunk, a.max_batch);
        let mib = |b: usize| b.div_ceil(1 << 20);
        eprintln!(
            "memory budget: {} MiB resident after loading + {} MiB KV cache budget + {} MiB step buffers = {} MiB",
            mib(now),
            mib(kv_budget),
            mib(scratch),
            mib(now) + mib(kv_budget) + mib(scratch)
        );
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let grace = Duration::from_secs(a.shutdown_grace);
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", a.host, a.port))?;
        eprintln!("listening on http://{}", listener.local_addr()?);
        let router = router(app.clone());
        let shutdown_app = app.clone();
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                shutdown_signal().await;
                eprintln!("shutting down: finishing running requests (at most {grace:?})");
                shutdown_app.sched.begin_shutdown(grace);
            })
            .await?;
        anyhow::Ok(())
    })?;
    app.sched.begin_shutdown(grace);
    app.sched.join();
    eprintln!("stopped");
    Ok(())
}

/// This process's resident memory (Linux: VmRSS of /proc/self/status).
fn resident_bytes() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn router(app: Arc<App>) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(list_models))
        .route("/v1/load_lora_adapter", post(load_adapter))
        .route("/v1/unload_lora_adapter", post(unload_adapter))
        .route_layer(axum::middleware::from_fn_with_state(app.clone(), auth));
    Router::new()
        .route("/health", get(health))
        .merge(v1)
        .fallback(|| async { error_response(ApiError::new(404, "no such endpoint")) })
        .with_state(app)
}

fn error_response(e: ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, axum::Json(e.body())).into_response()
}

fn json_response(v: Value) -> Response {
    axum::Json(v).into_response()
}

async fn auth(State(app): State<Arc<App>>, req: HttpRequest, next: Next) -> Response {
    if let Some(key) = &app.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            return error_response(
                ApiError::new(
                    401,
                    "missing or wrong API key: send the header Authorization: Bearer <key>",
                )
                .code("invalid_api_key"),
            );
        }
    }
    next.run(req).await
}

async fn health(State(app): State<Arc<App>>) -> Response {
    let body = json!({
        "status": if app.sched.is_closing() { "shutting_down" } else { "ok" },
        "running": app.sched.running(),
        "queued": app.sched.queued(),
    });
    let status = if app.sched.is_closing() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (status, axum::Json(body)).into_response()
}

async fn read_body(req: HttpRequest) -> ApiResult<serde_json::Map<String, Value>> {
    let bytes = axum::body::to_bytes(req.into_body(), BODY_LIMIT)
        .await
        .map_err(|_| {
            ApiError::new(
                413,
                format!(
                    "the request body is larger than {BODY_LIMIT} bytes (or could not be read)"
                ),
            )
        })?;
    api::parse_object(&bytes)
}

async fn list_models(State(app): State<Arc<App>>) -> Response {
    let mut data = vec![json!({
        "id": app.base_name, "object": "model", "created": app.created,
        "owned_by": "lorakit", "root": app.base_name, "parent": null,
    })];
    for name in app.registry.names() {
        let path = app
            .registry
            .get(&name)
            .map(|a| a.path.display().to_string())
            .unwrap_or_default();
        data.push(json!({
            "id": name, "object": "model", "created": app.created,
            "owned_by": "lorakit", "root": path, "parent": app.base_name,
        }));
    }
    json_response(json!({"object": "list", "data": data}))
}

async fn load_adapter(State(app): State<Arc<App>>, req: HttpRequest) -> Response {
    let r = async {
        let o = read_body(req).await?;
        let name = api::req_str(&o, "lora_name")?.to_string();
        let path = PathBuf::from(api::req_str(&o, "lora_path")?);
        if name.is_empty() || name == app.base_name || app.registry.get(&name).is_some() {
            return Err(ApiError::field(
                "lora_name",
                format!("the name '{name}' is empty, the base model's or already loaded"),
            ));
        }
        let config = app.config.clone();
        let n = name.clone();
        let loaded = tokio::task::spawn_blocking(move || ServeAdapter::load(&n, &path, &config))
            .await
            .map_err(|e| ApiError::new(500, format!("loading the adapter failed: {e}")))?;
        let ad = loaded.map_err(|e| {
            ApiError::field("lora_path", format!("cannot load adapter '{name}': {e}"))
        })?;
        app.registry
            .insert(ad)
            .map_err(|e| ApiError::field("lora_name", e.to_string()))?;
        Ok(format!(
            "Success: LoRA adapter '{name}' added successfully."
        ))
    }
    .await;
    match r {
        Ok(msg) => msg.into_response(),
        Err(e) => error_response(e),
    }
}

async fn unload_adapter(State(app): State<Arc<App>>, req: HttpRequest) -> Response {
    let r = async {
        let o = read_body(req).await?;
        let name = api::req_str(&o, "lora_name")?.to_string();
        if !app.registry.remove(&name) {
            return Err(
                ApiError::new(404, format!("no adapter named '{name}' is loaded"))
                    .code("model_not_found"),
            );
        }
        Ok(format!(
            "Success: LoRA adapter '{name}' removed successfully."
        ))
    }
    .await;
    match r {
        Ok(msg) => msg.into_response(),
        Err(e) => error_response(e),
    }
}

/// The channel end the model thread writes a request's events to.
struct ChannelSink(UnboundedSender<Event>);

impl Sink for ChannelSink {
    fn send(&mut self, ev: Event) -> bool {
        self.0.send(ev).is_ok()
    }
    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Endpoint {
    Chat,
    Completion,
}

/// A validated request, ready for the scheduler.
struct Prepared {
    common: api::Common,
    prompt: Vec<u32>,
    adapter: Option<Arc<ServeAdapter>>,
    max_tokens: usize,
}

fn prepare(app: &App, o: &serde_json::Map<String, Value>, ep: Endpoint) -> ApiResult<Prepared> {
    let keys: &[&str] = match ep {
        Endpoint::Chat => &["max_completion_tokens", "max_tokens"],
        Endpoint::Completion => &["max_tokens"],
    };
    let common = api::common(o, keys)?;
    let adapter = if common.model == app.base_name {
        None
    } else {
        Some(app.registry.get(&common.model).ok_or_else(|| {
            ApiError {
                status: 404,
                message: format!(
                    "The model '{}' does not exist (GET /v1/models lists the base model and its adapters)",
                    common.model
                ),
                param: Some("model".into()),
                code: Some("model_not_found"),
            }
        })?)
    };
    let (prompt, param) = match ep {
        Endpoint::Chat => {
            let msgs: Vec<ChatMessage> = api::messages(o)?
                .into_iter()
                .map(|(role, content)| ChatMessage { role, content })
                .collect();
            // As `lorakit generate --chat`: the template's text, encoded without added tokens.
            let text = app.tok.apply_chat_template(&msgs, true).map_err(|e| {
                ApiError::field(
                    "messages",
                    format!("the chat template refused the messages: {e}"),
                )
            })?;
            let ids = app
                .tok
                .encode(&text, false)
                .map_err(|e| ApiError::field("messages", e.to_string()))?;
            (ids, "messages")
        }
        Endpoint::Completion => {
            let ids = match api::prompt(o)? {
                // As `lorakit generate --prompt`: with the tokenizer's special tokens.
                api::Prompt::Text(t) => {
                    if t.is_empty() {
                        return Err(ApiError::field("prompt", "'prompt' is empty"));
                    }
                    app.tok
                        .encode(&t, true)
                        .map_err(|e| ApiError::field("prompt", e.to_string()))?
                }
                api::Prompt::Ids(ids) => {
                    let vocab = app.config.vocab_size;
                    if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                        return Err(ApiError::field(
                            "prompt",
                            format!("token id {bad} is outside the vocabulary of {vocab} tokens"),
                        ));
                    }
                    ids
                }
            };
            (ids, "prompt")
        }
    };
    if prompt.is_empty() {
        return Err(ApiError::field(param, format!("'{param}' gives no tokens")));
    }
    let ctx = app.config.max_position_embeddings;
    if prompt.len() >= ctx {
        return Err(ApiError::field(
            param,
            format!(
                "This model's maximum context length is {ctx} tokens; the {param} have {} tokens.",
                prompt.len()
            ),
        )
        .code("context_length_exceeded"));
    }
    let max_tokens = match (common.max_tokens, ep) {
        (Some(m), _) => m,
        (None, Endpoint::Completion) => 16,
        (None, Endpoint::Chat) => ctx - prompt.len(),
    };
    if prompt.len() + max_tokens > ctx {
        return Err(ApiError::field(
            keys[0],
            format!(
                "This model's maximum context length is {ctx} tokens. However, you requested {} tokens ({} in the {param}, {max_tokens} for the completion).",
                prompt.len() + max_tokens,
                prompt.len()
            ),
        )
        .code("context_length_exceeded"));
    }
    let need = kv_bytes_for(&app.config, prompt.len(), max_tokens);
    if need > app.kv_budget_bytes {
        return Err(ApiError::field(
            keys[0],
            format!(
                "{} prompt tokens + {max_tokens} max tokens need {} MiB of KV cache; the server's budget is {} MiB (--kv-budget-mib)",
                prompt.len(),
                need.div_ceil(1 << 20),
                app.kv_budget_bytes >> 20
            ),
        ));
    }
    Ok(Prepared {
        common,
        prompt,
        adapter,
        max_tokens,
    })
}

/// Validates, queues and answers one generation request (whole or streamed).
async fn generate_request(app: Arc<App>, req: HttpRequest, ep: Endpoint) -> Response {
    let o = match read_body(req).await {
        Ok(o) => o,
        Err(e) => return error_response(e),
    };
    let p = match prepare(&app, &o, ep) {
        Ok(p) => p,
        Err(e) => return error_response(e),
    };
    let seed = p.common.seed.unwrap_or_else(rand::random);
    let params = SamplingParams {
        temperature: p.common.temperature,
        top_p: p.common.top_p,
        top_k: 0,
        seed,
        max_new_tokens: p.max_tokens,
        stop_ids: if p.common.ignore_eos {
            vec![]
        } else {
            app.tok.eos_ids().to_vec()
        },
    };
    let (tx, rx) = unbounded_channel();
    let submitted = app.sched.submit(Request {
        prompt: p.prompt,
        adapter: p.adapter,
        params,
        stop: p.common.stop.clone(),
        sink: Box::new(ChannelSink(tx)),
    });
    match submitted {
        Ok(()) => {}
        Err(SubmitError::QueueFull) => {
            return error_response(
                ApiError::new(429, "the server's queue is full (--max-queue); retry later")
                    .code("queue_full"),
            )
        }
        Err(SubmitError::ShuttingDown) => {
            return error_response(ApiError::new(503, "the server is shutting down"))
        }
    }
    let meta = Meta {
        id: format!(
            "{}-{:016x}",
            if ep == Endpoint::Chat {
                "chatcmpl"
            } else {
                "cmpl"
            },
            rand::random::<u64>()
        ),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        model: p.common.model.clone(),
        ep,
    };
    if p.common.stream {
        stream_response(meta, rx, p.common.include_usage)
    } else {
        whole_response(meta, rx).await
    }
}

async fn chat_completions(State(app): State<Arc<App>>, req: HttpRequest) -> Response {
    generate_request(app, req, Endpoint::Chat).await
}

async fn completions(State(app): State<Arc<App>>, req: HttpRequest) -> Response {
    generate_request(app, req, Endpoint::Completion).await
}

struct Meta {
    id: String,
    created: u64,
    model: String,
    ep: Endpoint,
}

impl Meta {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.ep, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    /// A streamed chunk carrying `text` (None: the role-only first chat chunk or the last one).
    fn chunk(&self, text: Option<&str>, role: bool, finish: Option<&str>) -> Value {
        let choice = match self.ep {
            Endpoint::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), json!("assistant"));
                }
                if let Some(t) = text {
                    delta.insert("content".into(), json!(t));
                }
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Endpoint::Completion => {
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish})
            }
        };
        json!({"id": self.id, "object": self.object(true), "created": self.created,
               "model": self.model, "choices": [choice]})
    }
}

/// Waits for the whole answer.
async fn whole_response(meta: Meta, mut rx: UnboundedReceiver<Event>) -> Response {
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Text(t) => text.push_str(&t),
            Event::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            } => {
                let choice = match meta.ep {
                    Endpoint::Chat => json!({"index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": null, "finish_reason": finish_reason.as_str()}),
                    Endpoint::Completion => json!({"index": 0, "text": text,
                        "logprobs": null, "finish_reason": finish_reason.as_str()}),
                };
                return json_response(json!({
                    "id": meta.id, "object": meta.object(false), "created": meta.created,
                    "model": meta.model, "choices": [choice],
                    "usage": api::usage(prompt_tokens, completion_tokens),
                }));
            }
            Event::Error(m) => return error_response(event_error(m)),
        }
    }
    error_response(ApiError::new(
        500,
        "the model thread stopped before answering",
    ))
}

/// A failure the model thread reports: shutting down is 503, anything else 500.
fn event_error(m: String) -> ApiError {
    if m.contains("shut") {
        ApiError::new(503, m)
    } else {
        ApiError::new(500, m)
    }
}

/// Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. Dropping the
/// stream (the client went away) drops the receiver, which cancels the request.
fn stream_response(meta: Meta, rx: UnboundedReceiver<Event>, include_usage: bool) -> Response {
    let data = |v: &Value| SseEvent::default().data(v.to_string());
    // The first chat chunk carries the role, as OpenAI's does.
    let first = (meta.ep == Endpoint::Chat).then(|| data(&meta.chunk(Some(""), true, None)));
    let state = (rx, meta, false);
    let events = futures_util::stream::unfold(state, move |(mut rx, meta, done)| async move {
        if done {
            return None;
        }
        let out: Vec<SseEvent> = match rx.recv().await {
            Some(Event::Text(t)) => vec![data(&meta.chunk(Some(&t), false, None))],
            Some(Event::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            }) => {
                let usage = api::usage(prompt_tokens, completion_tokens);
                let mut last = meta.chunk(None, false, Some(finish_reason.as_str()));
                last["usage"] = usage.clone();
                let mut v = vec![data(&last)];
                if include_usage {
                    v.push(data(&json!({"id": meta.id, "object": meta.object(true),
                        "created": meta.created, "model": meta.model, "choices": [], "usage": usage})));
                }
                v.push(SseEvent::default().data("[DONE]"));
                return Some((v, (rx, meta, true)));
            }
            Some(Event::Error(m)) => vec![
                data(&event_error(m).body()),
                SseEvent::default().data("[DONE]"),
            ],
            None => vec![
                data(&ApiError::new(500, "the model thread stopped before answering").body()),
                SseEvent::default().data("[DONE]"),
            ],
        };
        let finished = out.len() > 1;
        Some((out, (rx, meta, finished)))
    });
    use futures_util::StreamExt;
    let events = futures_util::stream::iter(first.into_iter().map(|e| vec![e]))
        .chain(events)
        .flat_map(|v| futures_util::stream::iter(v.into_iter().map(Ok::<_, Infallible>)));
    let mut resp = Sse::new(events).into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}
