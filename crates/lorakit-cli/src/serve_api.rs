//! OpenAI's request and response JSON for `lorakit serve`: typed reads of the request fields
//! (every error names the field), and the response / chunk / error bodies.

use serde_json::{json, Map, Value};

/// An error answer: HTTP status + OpenAI's `{"error": {message, type, param, code}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: None,
            code: None,
        }
    }

    /// 400 about one request field.
    pub fn field(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            message: message.into(),
            param: Some(param.to_string()),
            code: None,
        }
    }

    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn kind(&self) -> &'static str {
        match self.status {
            401 => "authentication_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            500 => "internal_error",
            503 => "service_unavailable",
            _ => "invalid_request_error",
        }
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind(),
            "param": self.param,
            "code": self.code,
        }})
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// The JSON type of a value, for error messages.
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The body as a JSON object.
pub fn parse_object(body: &[u8]) -> ApiResult<Map<String, Value>> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(400, format!("the request body is not valid JSON: {e}")).code("invalid_json")
    })?;
    match v {
        Value::Object(m) => Ok(m),
        other => Err(ApiError::new(
            400,
            format!(
                "the request body must be a JSON object, got {}",
                type_name(&other)
            ),
        )),
    }
}

/// A field that is absent or null reads as None.
fn present<'a>(o: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    o.get(key).filter(|v| !v.is_null())
}

pub fn req_str<'a>(o: &'a Map<String, Value>, key: &str) -> ApiResult<&'a str> {
    match present(o, key) {
        None => Err(ApiError::field(key, format!("'{key}' is required"))),
        Some(Value::String(s)) => Ok(s),
        Some(v) => Err(ApiError::field(
            key,
            format!("'{key}' must be a string, got {}", type_name(v)),
        )),
    }
}

pub fn opt_bool(o: &Map<String, Value>, key: &str) -> ApiResult<Option<bool>> {
    match present(o, key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(ApiError::field(
            key,
            format!("'{key}' must be a boolean, got {}", type_name(v)),
        )),
    }
}

/// A finite number within [lo, hi].
pub fn opt_num(o: &Map<String, Value>, key: &str, lo: f64, hi: f64) -> ApiResult<Option<f64>> {
    match present(o, key) {
        None => Ok(None),
        Some(Value::Number(n)) => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            if x.is_finite() && x >= lo && x <= hi {
                Ok(Some(x))
            } else {
                Err(ApiError::field(
                    key,
                    format!("'{key}' must be between {lo} and {hi}, got {n}"),
                ))
            }
        }
        Some(v) => Err(ApiError::field(
            key,
            format!("'{key}' must be a number, got {}", type_name(v)),
        )),
    }
}

/// An integer within [lo, hi].
pub fn opt_int(o: &Map<String, Value>, key: &str, lo: i64, hi: i64) -> ApiResult<Option<i64>> {
    match present(o, key) {
        None => Ok(None),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(x) if x >= lo && x <= hi => Ok(Some(x)),
            Some(_) => Err(ApiError::field(
                key,
                format!("'{key}' must be between {lo} and {hi}, got {n}"),
            )),
            None => Err(ApiError::field(
                key,
                format!("'{key}' must be an integer, got {n}"),
            )),
        },
        Some(v) => Err(ApiError::field(
            key,
            format!("'{key}' must be an integer, got {}", type_name(v)),
        )),
    }
}

/// `stop`: a string or an array of up to 4 strings.
pub fn stop_strings(o: &Map<String, Value>) -> ApiResult<Vec<String>> {
    match present(o, "stop") {
        None => Ok(vec![]),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) => {
            if a.len() > 4 {
                return Err(ApiError::field(
                    "stop",
                    format!("'stop' takes at most 4 strings, got {}", a.len()),
                ));
            }
            a.iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(s.clone()),
                    v => Err(ApiError::field(
                        "stop",
                        format!("'stop[{i}]' must be a string, got {}", type_name(v)),
                    )),
                })
                .collect()
        }
        Some(v) => Err(ApiError::field(
            "stop",
            format!(
                "'stop' must be a string or an array of strings, got {}",
                type_name(v)
            ),
        )),
    }
}

/// Settings shared by both endpoints.
#[derive(Debug, Clone)]
pub struct Common {
    pub model: String,
    pub max_tokens: Option<usize>,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// vLLM's extension: keep generating after the end-of-sequence token.
    pub ignore_eos: bool,
}

/// Reads the fields both endpoints share; `max_tokens_keys` in order of preference.
pub fn common(o: &Map<String, Value>, max_tokens_keys: &[&str]) -> ApiResult<Common> {
    let model = req_str(o, "model")?.to_string();
    let mut max_tokens = None;
    for key in max_tokens_keys {
        if let Some(m) = opt_int(o, key, 1, u32::MAX as i64)? {
            max_tokens = Some(m as usize);
            break;
        }
    }
    if let Some(n) = opt_int(o, "n", 1, i64::MAX)? {
        if n != 1 {
            return Err(ApiError::field("n", format!("'n' must be 1, got {n}")));
        }
    }
    let include_usage = match present(o, "stream_options") {
        None => false,
        Some(Value::Object(so)) => opt_bool(so, "include_usage")
            .map_err(|e| ApiError::field("stream_options.include_usage", e.message))?
            .unwrap_or(false),
        Some(v) => {
            return Err(ApiError::field(
                "stream_options",
                format!("'stream_options' must be an object, got {}", type_name(v)),
            ))
        }
    };
    let top_p = opt_num(o, "top_p", 0.0, 1.0)?.unwrap_or(1.0);
    if top_p == 0.0 {
        return Err(ApiError::field("top_p", "'top_p' must be greater than 0"));
    }
    Ok(Common {
        model,
        max_tokens,
        temperature: opt_num(o, "temperature", 0.0, 2.0)?.unwrap_or(1.0) as f32,
        top_p: top_p as f32,
        seed: opt_int(o, "seed", i64::MIN, i64::MAX)?.map(|s| s as u64),
        stop: stop_strings(o)?,
        stream: opt_bool(o, "stream")?.unwrap_or(false),
        include_usage,
        ignore_eos: opt_bool(o, "ignore_eos")?.unwrap_or(false),
    })
}

/// A completion's prompt: text, or token ids.
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

/// `prompt`: a string, an array of one string, an array of token ids, or an array of one such
/// array (several prompts in one request are not supported).
pub fn prompt(o: &Map<String, Value>) -> ApiResult<Prompt> {
    let bad = |what: String| ApiError::field("prompt", what);
    let ids = |a: &[Value]| -> ApiResult<Vec<u32>> {
        a.iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_u64()
                    .filter(|&x| x <= u32::MAX as u64)
                    .map(|x| x as u32)
                    .ok_or_else(|| {
                        bad(format!("'prompt[{i}]' must be a token id (an integer ≥ 0)"))
                    })
            })
            .collect()
    };
    match present(o, "prompt") {
        None => Err(bad("'prompt' is required".into())),
        Some(Value::String(s)) => Ok(Prompt::Text(s.clone())),
        Some(Value::Array(a)) => match a.as_slice() {
            [] => Err(bad("'prompt' is an empty array".into())),
            [Value::String(s)] => Ok(Prompt::Text(s.clone())),
            [Value::Array(inner)] => Ok(Prompt::Ids(ids(inner)?)),
            [Value::String(_), ..] | [Value::Array(_), ..] => Err(bad(format!(
                "'prompt' holds {} prompts; this server takes one per request",
                a.len()
            ))),
            _ => Ok(Prompt::Ids(ids(a)?)),
        },
        Some(v) => Err(bad(format!(
            "'prompt' must be a string or an array, got {}",
            type_name(v)
        ))),
    }
}

/// `messages` as (role, content) pairs; content is a string, null, or an array of text parts.
pub fn messages(o: &Map<String, Value>) -> ApiResult<Vec<(String, String)>> {
    let list = match present(o, "messages") {
        None => return Err(ApiError::field("messages", "'messages' is required")),
        Some(Value::Array(a)) if a.is_empty() => {
            return Err(ApiError::field("messages", "'messages' is an empty array"))
        }
        Some(Value::Array(a)) => a,
        Some(v) => {
            return Err(ApiError::field(
                "messages",
                format!("'messages' must be an array, got {}", type_name(v)),
            ))
        }
    };
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let p = format!("messages[{i}]");
            let Value::Object(m) = m else {
                return Err(ApiError::field(
                    &p,
                    format!("'{p}' must be an object, got {}", type_name(m)),
                ));
            };
            let role = match m.get("role") {
                Some(Value::String(r)) => r.clone(),
                Some(v) => {
                    return Err(ApiError::field(
                        &format!("{p}.role"),
                        format!("'{p}.role' must be a string, got {}", type_name(v)),
                    ))
                }
                None => {
                    return Err(ApiError::field(
                        &format!("{p}.role"),
                        format!("'{p}.role' is required"),
                    ))
                }
            };
            let content = match m.get("content") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for (j, part) in parts.iter().enumerate() {
                        match (part.get("type"), part.get("text")) {
                            (Some(Value::String(t)), Some(Value::String(s))) if t == "text" => {
                                text.push_str(s)
                            }
                            _ => {
                                return Err(ApiError::field(
                                    &format!("{p}.content[{j}]"),
                                    format!(
                                        "'{p}.content[{j}]' must be {{\"type\": \"text\", \"text\": ...}} (only text is supported)"
                                    ),
                                ))
                            }
                        }
                    }
                    text
                }
                Some(v) => {
                    return Err(ApiError::field(
                        &format!("{p}.content"),
                        format!(
                            "'{p}.content' must be a string or an array of parts, got {}",
                            type_name(v)
                        ),
                    ))
                }
            };
            Ok((role, content))
        })
        .collect()
}

/// `usage`.
pub fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(s: &str) -> Map<String, Value> {
        parse_object(s.as_bytes()).unwrap()
    }

    #[test]
    fn field_errors_name_the_field() {
        let e = parse_object(b"{\"model\": ").unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.message.contains("not valid JSON"), "{}", e.message);
        assert!(parse_object(b"[1]")
            .unwrap_err()
            .message
            .contains("an array"));
        let e = common(&obj(r#"{"model": 3}"#), &["max_tokens"]).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("model"));
        assert!(e.message.contains("must be a string, got a number"));
        let e = common(
            &obj(r#"{"model": "m", "temperature": "hot"}"#),
            &["max_tokens"],
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"));
        let e = common(
            &obj(r#"{"model": "m", "max_tokens": 1.5}"#),
            &["max_tokens"],
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        let e = common(&obj(r#"{"model": "m", "max_tokens": 0}"#), &["max_tokens"]).unwrap_err();
        assert!(e.message.contains("between 1"), "{}", e.message);
        let e = common(&obj(r#"{"model": "m", "stop": [1]}"#), &["max_tokens"]).unwrap_err();
        assert_eq!(e.message, "'stop[0]' must be a string, got a number");
        let e = common(&obj(r#"{"model": "m", "n": 2}"#), &["max_tokens"]).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("n"));
        let e = messages(&obj(r#"{"messages": [{"role": "user", "content": 5}]}"#)).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].content"));
        let e = messages(&obj(r#"{"messages": [{"content": "hi"}]}"#)).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
        let e = prompt(&obj(r#"{"prompt": [1, -2]}"#)).err().unwrap();
        assert!(e.message.contains("prompt[1]"));
        let e = prompt(&obj(r#"{"prompt": ["a", "b"]}"#)).err().unwrap();
        assert!(e.message.contains("2 prompts"));
    }

    #[test]
    fn well_formed_fields_read_as_given() {
        let c = common(
            &obj(
                r#"{"model": "m", "max_completion_tokens": 7, "temperature": 0, "stop": "x",
                     "seed": -1, "stream": true, "stream_options": {"include_usage": true}}"#,
            ),
            &["max_completion_tokens", "max_tokens"],
        )
        .unwrap();
        assert_eq!(c.max_tokens, Some(7));
        assert_eq!((c.temperature, c.top_p), (0.0, 1.0));
        assert_eq!(c.stop, vec!["x".to_string()]);
        assert_eq!(c.seed, Some(u64::MAX));
        assert!(c.stream && c.include_usage && !c.ignore_eos);
        let m = messages(&obj(
            r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}"#,
        ))
        .unwrap();
        assert_eq!(m, vec![("user".to_string(), "ab".to_string())]);
        assert!(
            matches!(prompt(&obj(r#"{"prompt": [[1, 2]]}"#)), Ok(Prompt::Ids(v)) if v == [1, 2])
        );
    }
}
