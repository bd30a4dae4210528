//! Chat templates rendered the way Hugging Face transformers renders them.
//!
//! transformers compiles `chat_template` with jinja2 (`trim_blocks=True`, `lstrip_blocks=True`,
//! the `loopcontrols` extension), adds the globals `raise_exception` and `strftime_now`, replaces
//! the `tojson` filter with a plain `json.dumps(..., ensure_ascii=False)`, and renders with
//! `messages`, `tools`, `documents`, `add_generation_prompt` and the special tokens
//! (`bos_token`, `eos_token`, ...). This module does the same with minijinja: Python string and
//! dict methods come from `minijinja_contrib::pycompat`, values print as Python's `str()` would
//! (`None`, `True`, `1.0`, `['a', 'b']`), and `{% generation %}` blocks (transformers' assistant
//! mask extension) render their body.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::sync::Arc;

use minijinja::value::{Enumerator, Kwargs, Object, ObjectRepr, Value, ValueKind};
use minijinja::{Environment, ErrorKind};

use crate::{Error, Result};

const TEMPLATE_NAME: &str = "chat_template";

/// A compiled chat template. Compilation errors are kept and reported when the template is used,
/// so that a tokenizer with an unusual template still loads.
pub(crate) struct ChatTemplate {
    source: String,
    env: std::result::Result<Environment<'static>, String>,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source_len", &self.source.len())
            .field("compiled", &self.env.is_ok())
            .finish()
    }
}

/// The error `raise_exception(msg)` attaches to the minijinja error, so that the caller gets
/// the template's own message back.
#[derive(Debug)]
struct Raised(String);

impl fmt::Display for Raised {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

impl ChatTemplate {
    pub(crate) fn new(source: String) -> ChatTemplate {
        let env = build_env(&source);
        ChatTemplate { source, env }
    }

    pub(crate) fn source(&self) -> &str {
        &self.source
    }

    /// Renders with `context` as the template's globals (`messages`, `add_generation_prompt`,
    /// special tokens, ...).
    pub(crate) fn render(&self, context: BTreeMap<String, Value>) -> Result<String> {
        let env = self
            .env
            .as_ref()
            .map_err(|e| Error::Template(format!("the chat template does not compile: {e}")))?;
        let tmpl = env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| Error::Template(e.to_string()))?;
        tmpl.render(Value::from_iter(context))
            .map_err(|e| Error::Template(describe_render_error(&e)))
    }
}

fn describe_render_error(err: &minijinja::Error) -> String {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(raised) = e.downcast_ref::<Raised>() {
            return raised.0.clone();
        }
        cur = e.source();
    }
    err.to_string()
}

fn build_env(source: &str) -> std::result::Result<Environment<'static>, String> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    minijinja_contrib::add_to_environment(&mut env);
    env.set_formatter(python_formatter);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_filter("tojson", tojson);
    env.add_template_owned(TEMPLATE_NAME, rewrite_generation_tags(source))
        .map_err(|e| e.to_string())?;
    Ok(env)
}

fn raise_exception(msg: Value) -> std::result::Result<Value, minijinja::Error> {
    let msg = match msg.as_str() {
        Some(s) => s.to_string(),
        None => msg.to_string(),
    };
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg.clone()).with_source(Raised(msg)))
}

fn strftime_now(fmt: String) -> std::result::Result<Value, minijinja::Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    Ok(Value::from(strftime_utc(&fmt, secs)))
}

/// `{% generation %}` ... `{% endgeneration %}` (transformers' `AssistantTracker`) renders its
/// body unchanged; minijinja does not know the tag, so it becomes an always-true `if`, which
/// keeps the whitespace control of the original tags.
fn rewrite_generation_tags(src: &str) -> String {
    if !src.contains("generation") {
        return src.to_string();
    }
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(pos) = rest.find("{%") {
        out.push_str(&rest[..pos]);
        let tag = &rest[pos..];
        let Some(end) = tag.find("%}") else {
            out.push_str(tag);
            return out;
        };
        let whole = &tag[..end + 2];
        let mut inner = &whole[2..whole.len() - 2];
        let open = if inner.starts_with('-') || inner.starts_with('+') {
            let c = &inner[..1];
            inner = &inner[1..];
            c
        } else {
            ""
        };
        let close = if inner.ends_with('-') || inner.ends_with('+') {
            let c = &inner[inner.len() - 1..];
            inner = &inner[..inner.len() - 1];
            c
        } else {
            ""
        };
        match inner.trim() {
            "generation" => {
                let _ = write!(out, "{{%{open} if true {close}%}}");
            }
            "endgeneration" => {
                let _ = write!(out, "{{%{open} endif {close}%}}");
            }
            _ => out.push_str(whole),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

// ---------------------------------------------------------------------------------------------
// Values: an insertion-ordered map (Python dicts keep their order), Python-style printing.

/// A map that keeps insertion order, as a Python dict does (minijinja's own maps sort keys).
#[derive(Debug)]
pub(crate) struct OrderedMap(pub(crate) Vec<(Value, Value)>);

impl Object for OrderedMap {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Values(self.0.iter().map(|(k, _)| k.clone()).collect())
    }

    fn enumerator_len(self: &Arc<Self>) -> Option<usize> {
        Some(self.0.len())
    }
}

/// A JSON value as a template value, objects keeping their key order.
pub(crate) fn json_to_value(v: &serde_json::Value) -> Value {
    match v {
        serde_json::Value::Null => Value::from(()),
        serde_json::Value::Bool(b) => Value::from(*b),
        serde_json::Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                Value::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        serde_json::Value::String(s) => Value::from(s.as_str()),
        serde_json::Value::Array(a) => Value::from(a.iter().map(json_to_value).collect::<Vec<_>>()),
        serde_json::Value::Object(m) => Value::from_object(OrderedMap(
            m.iter()
                .map(|(k, v)| (Value::from(k.as_str()), json_to_value(v)))
                .collect(),
        )),
    }
}

/// Prints values as jinja2 does (`str(value)` in Python); strings and everything else as
/// minijinja does.
fn python_formatter(
    out: &mut minijinja::Output,
    state: &minijinja::State,
    value: &Value,
) -> std::result::Result<(), minijinja::Error> {
    match value.kind() {
        ValueKind::None | ValueKind::Bool | ValueKind::Seq | ValueKind::Map => {
            let mut s = String::new();
            py_repr(value, &mut s)?;
            out.write_str(&s)?;
            Ok(())
        }
        ValueKind::Number if !value.is_integer() => {
            let f = f64::try_from(value.clone()).unwrap_or(f64::NAN);
            out.write_str(&py_float_repr(f))?;
            Ok(())
        }
        _ => minijinja::escape_formatter(out, state, value),
    }
}

/// Python's `repr()` of a value (used for `str()` of containers).
fn py_repr(value: &Value, out: &mut String) -> std::result::Result<(), minijinja::Error> {
    match value.kind() {
        ValueKind::Undefined => out.push_str(""),
        ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number => {
            if value.is_integer() {
                out.push_str(&value.to_string());
            } else {
                out.push_str(&py_float_repr(
                    f64::try_from(value.clone()).unwrap_or(f64::NAN),
                ));
            }
        }
        ValueKind::String => py_str_repr(value.as_str().unwrap_or(""), out),
        ValueKind::Seq => {
            out.push('[');
            for (i, item) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(&item, out)?;
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            for (i, key) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr(&key, out)?;
                out.push_str(": ");
                py_repr(&value.get_item(&key)?, out)?;
            }
            out.push('}');
        }
        _ => out.push_str(&value.to_string()),
    }
    Ok(())
}

fn py_str_repr(s: &str, out: &mut String) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// Python's `repr(float)`: the shortest round-tripping digits, fixed notation for exponents in
/// `-4..16`, scientific (`1e+16`) otherwise, and always a `.0` on integral values.
pub(crate) fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf".into() } else { "-inf".into() };
    }
    // Rust's `{:e}` gives the shortest round-tripping digits too: "-1.2345e-5", "1e16", "0e0".
    let sci = format!("{f:e}");
    // `{:e}` always has an integer exponent; fall back to its own text if that ever changes.
    let Some((mant, exp)) = sci.split_once('e') else {
        return sci;
    };
    let Ok(exp) = exp.parse::<i32>() else {
        return sci;
    };
    let (sign, mant) = match mant.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mant),
    };
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let n = digits.len() as i32;
        if exp >= 0 {
            let int_len = exp + 1;
            if n <= int_len {
                format!("{sign}{digits}{}.0", "0".repeat((int_len - n) as usize))
            } else {
                let (a, b) = digits.split_at(int_len as usize);
                format!("{sign}{a}.{b}")
            }
        } else {
            format!("{sign}0.{}{digits}", "0".repeat((-exp - 1) as usize))
        }
    } else {
        let (a, b) = digits.split_at(1);
        let frac = if b.is_empty() {
            String::new()
        } else {
            format!(".{b}")
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{a}{frac}e{esign}{:02}", exp.abs())
    }
}

// ---------------------------------------------------------------------------------------------
// tojson: Python's json.dumps(x, ensure_ascii=False, indent=None, separators=None,
// sort_keys=False), the filter transformers installs.

struct JsonOpts {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

fn tojson(
    value: &Value,
    indent: Option<Value>,
    kwargs: Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let indent = match kwargs.get::<Option<Value>>("indent")? {
        Some(v) => Some(v),
        None => indent,
    };
    let separators: Option<Value> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;

    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => {
            if let Some(s) = v.as_str() {
                Some(s.to_string())
            } else if let Some(n) = v.as_i64() {
                Some(" ".repeat(n.max(0) as usize))
            } else {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                ));
            }
        }
    };
    let (item_sep, key_sep) = match separators {
        Some(s) if !s.is_none() && !s.is_undefined() => {
            let parts: Vec<Value> = s.try_iter()?.collect();
            match (
                parts.first().and_then(|v| v.as_str()),
                parts.get(1).and_then(|v| v.as_str()),
            ) {
                (Some(a), Some(b)) if parts.len() == 2 => (a.to_string(), b.to_string()),
                _ => {
                    return Err(minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be two strings",
                    ))
                }
            }
        }
        _ => {
            if indent.is_some() {
                (",".to_string(), ": ".to_string())
            } else {
                (", ".to_string(), ": ".to_string())
            }
        }
    };
    let opts = JsonOpts {
        ensure_ascii: ensure_ascii.unwrap_or(false),
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    py_json(value, &opts, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn json_newline(opts: &JsonOpts, depth: usize, out: &mut String) {
    if let Some(ind) = &opts.indent {
        out.push('\n');
        for _ in 0..depth {
            out.push_str(ind);
        }
    }
}

fn py_json(
    value: &Value,
    opts: &JsonOpts,
    depth: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if value.is_integer() {
                out.push_str(&value.to_string());
            } else {
                let f = f64::try_from(value.clone()).unwrap_or(f64::NAN);
                if f.is_nan() {
                    out.push_str("NaN");
                } else if f.is_infinite() {
                    out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
                } else {
                    out.push_str(&py_float_repr(f));
                }
            }
        }
        ValueKind::String => json_str(value.as_str().unwrap_or(""), opts.ensure_ascii, out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                json_newline(opts, depth + 1, out);
                py_json(item, opts, depth + 1, out)?;
            }
            json_newline(opts, depth, out);
            out.push(']');
        }
        ValueKind::Map => {
            let mut entries: Vec<(String, Value)> = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                let k = match key.kind() {
                    ValueKind::String => key.as_str().unwrap_or("").to_string(),
                    ValueKind::None => "null".to_string(),
                    ValueKind::Bool => if key.is_true() { "true" } else { "false" }.to_string(),
                    ValueKind::Number => {
                        let mut s = String::new();
                        py_json(&key, opts, depth, &mut s)?;
                        s
                    }
                    _ => {
                        return Err(minijinja::Error::new(
                            ErrorKind::InvalidOperation,
                            format!(
                                "tojson: keys must be str, int, float, bool or None, not {}",
                                key.kind()
                            ),
                        ))
                    }
                };
                entries.push((k, item));
            }
            if opts.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            if entries.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, (k, v)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                json_newline(opts, depth + 1, out);
                json_str(k, opts.ensure_ascii, out);
                out.push_str(&opts.key_sep);
                py_json(v, opts, depth + 1, out)?;
            }
            json_newline(opts, depth, out);
            out.push('}');
        }
        other => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: a value of kind {other} is not JSON serializable"),
            ))
        }
    }
    Ok(())
}

/// A JSON string as Python's json module writes it.
fn json_str(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{:04x}", unit);
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

// ---------------------------------------------------------------------------------------------
// strftime (UTC; Python's datetime.now() would use local time).

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    // Howard Hinnant's algorithm.
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

/// `time.strftime(fmt)` for a UTC timestamp, with the common C directives and glibc's `%-d`
/// style (no padding) flag.
pub(crate) fn strftime_utc(fmt: &str, secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (sod / 3600, (sod / 60) % 60, sod % 60);
    let wd = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday; 0 = Monday
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[(m - 1) as usize] + d as i64 + if m > 2 && is_leap(y) { 1 } else { 0 };
    let h12 = if hh % 12 == 0 { 12 } else { hh % 12 };

    let mut out = String::new();
    let mut chars = fmt.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut pad = true;
        let mut spec = chars.next();
        if spec == Some('-') {
            pad = false;
            spec = chars.next();
        }
        let num = |v: i64, w: usize| {
            if pad {
                format!("{v:0w$}")
            } else {
                v.to_string()
            }
        };
        match spec {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&num(y.rem_euclid(100), 2)),
            Some('m') => out.push_str(&num(m as i64, 2)),
            Some('d') => out.push_str(&num(d as i64, 2)),
            Some('e') => out.push_str(&if pad {
                format!("{d:>2}")
            } else {
                d.to_string()
            }),
            Some('H') => out.push_str(&num(hh, 2)),
            Some('I') => out.push_str(&num(h12, 2)),
            Some('M') => out.push_str(&num(mm, 2)),
            Some('S') => out.push_str(&num(ss, 2)),
            Some('j') => out.push_str(&num(yday, 3)),
            Some('p') => out.push_str(if hh < 12 { "AM" } else { "PM" }),
            Some('B') => out.push_str(MONTHS[(m - 1) as usize]),
            Some('b') | Some('h') => out.push_str(&MONTHS[(m - 1) as usize][..3]),
            Some('A') => out.push_str(DAYS[wd]),
            Some('a') => out.push_str(&DAYS[wd][..3]),
            Some('u') => out.push_str(&(wd + 1).to_string()),
            Some('w') => out.push_str(&((wd + 1) % 7).to_string()),
            Some('F') => out.push_str(&format!("{y}-{m:02}-{d:02}")),
            Some('T') => out.push_str(&format!("{hh:02}:{mm:02}:{ss:02}")),
            Some('R') => out.push_str(&format!("{hh:02}:{mm:02}")),
            Some('D') => out.push_str(&format!("{m:02}/{d:02}/{:02}", y.rem_euclid(100))),
            Some('Z') => out.push_str("UTC"),
            Some('z') => out.push_str("+0000"),
            Some('s') => out.push_str(&secs.to_string()),
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                if !pad {
                    out.push('-');
                }
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(src: &str, ctx: serde_json::Value) -> Result<String> {
        let t = ChatTemplate::new(src.to_string());
        let map = ctx
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), json_to_value(v)))
            .collect();
        t.render(map)
    }

    #[test]
    fn python_float_repr() {
        for (f, s) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (1e15, "1000000000000000.0"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (123.456, "123.456"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
        ] {
            assert_eq!(py_float_repr(f), s, "{f}");
        }
    }

    #[test]
    fn strftime_known_dates() {
        // 2024-11-29T10:04:05Z = 1732874645
        assert_eq!(
            strftime_utc("%Y-%m-%d %H:%M:%S", 1_732_874_645),
            "2024-11-29 10:04:05"
        );
        assert_eq!(strftime_utc("%d %b %Y", 1_732_874_645), "29 Nov 2024");
        assert_eq!(
            strftime_utc("%A %B %-d, %j", 1_732_874_645),
            "Friday November 29, 334"
        );
        assert_eq!(strftime_utc("%a %y %%", 0), "Thu 70 %");
        assert_eq!(strftime_utc("%Y-%m-%d", 951_782_400), "2000-02-29");
    }

    #[test]
    fn python_semantics() {
        let out = render(
            "{{ none }}|{{ true }}|{{ 1.0 }}|{{ [1, 'a', none] }}|{{ {'k': false} }}|{{ 'a,b'.split(',') }}|{{ '  x '.strip() }}",
            serde_json::json!({}),
        )
        .unwrap();
        assert_eq!(
            out,
            "None|True|1.0|[1, 'a', None]|{'k': False}|['a', 'b']|x"
        );
    }

    #[test]
    fn tojson_like_python() {
        // Keys in alphabetical order, so that the result does not depend on serde_json's
        // preserve_order feature.
        let ctx = serde_json::json!({"x": {"b": [1, 2.5, null, true], "name": "f", "s": "é<\"\n"}});
        assert_eq!(
            render("{{ x | tojson }}", ctx.clone()).unwrap(),
            r#"{"b": [1, 2.5, null, true], "name": "f", "s": "é<\"\n"}"#
        );
        assert_eq!(
            render(
                "{{ x | tojson(sort_keys=true, separators=[',', ':']) }}",
                ctx.clone()
            )
            .unwrap(),
            r#"{"b":[1,2.5,null,true],"name":"f","s":"é<\"\n"}"#
        );
        assert_eq!(
            render("{{ x.b | tojson(indent=2) }}", ctx.clone()).unwrap(),
            "[\n  1,\n  2.5,\n  null,\n  true\n]"
        );
        assert_eq!(
            render("{{ x.s | tojson(ensure_ascii=true) }}", ctx).unwrap(),
            "\"\\u00e9<\\\"\\n\""
        );
    }

    #[test]
    fn trim_and_lstrip_blocks() {
        let src = "{% for m in messages %}\n  {% if m %}\n{{ m }}\n  {% endif %}\n{% endfor %}\n";
        assert_eq!(
            render(src, serde_json::json!({"messages": ["a", "b"]})).unwrap(),
            "a\nb\n"
        );
    }

    #[test]
    fn generation_tag_renders_body() {
        let src =
            "{% for m in messages %}{%- generation -%} [{{ m }}] {%- endgeneration %}{% endfor %}";
        assert_eq!(
            render(src, serde_json::json!({"messages": ["a", "b"]})).unwrap(),
            "[a][b]"
        );
    }

    #[test]
    fn raise_exception_message() {
        let err = render(
            "{% if x %}{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}",
            serde_json::json!({"x": true}),
        )
        .unwrap_err();
        match err {
            Error::Template(msg) => {
                assert_eq!(msg, "Conversation roles must alternate user/assistant")
            }
            other => panic!("expected a Template error, got {other:?}"),
        }
    }

    #[test]
    fn syntax_error_is_reported_on_use() {
        let err = render("{% for %}", serde_json::json!({})).unwrap_err();
        assert!(matches!(err, Error::Template(_)), "{err:?}");
    }
}
