//! An Ollama `Modelfile` for a base model and an adapter: `FROM`, `ADAPTER`, the chat template as
//! an Ollama (Go `text/template`) `TEMPLATE`, the template's default system prompt as `SYSTEM`,
//! and `PARAMETER stop` for each end-of-turn token.
//!
//! Ollama cannot run a Jinja template, so the model's own template is measured instead of
//! translated: it is rendered on probe conversations, and each role's text around a message's
//! content, the default system prompt (what the template writes when a conversation has none)
//! and the generation prompt are cut out of the renderings. The Go template writes exactly those
//! pieces. Before it is accepted, the pieces must reproduce the Jinja rendering of conversations
//! they were not cut from (a system turn, several turns, no generation prompt); templates they do
//! not reproduce (ones that merge the system prompt into the first user turn, print dates, or
//! treat the last turn differently) are refused with the first conversation that differs.
//! That chat-only template covers what `ollama run` sends; tool calls are not described.

use std::path::Path;

use super::{ChatMessage, Tokenizer};
use crate::error::{Error, Result};

/// Each role's text before and after a message's content.
#[derive(Debug, Clone, PartialEq)]
struct Turn {
    before: String,
    after: String,
}

/// The pieces a chat template is made of, as far as chat goes.
#[derive(Debug, Clone, PartialEq)]
struct ChatPieces {
    /// Text at the very start of every conversation (a BOS the template writes).
    start: String,
    /// Written before the first message when the conversation has no system message.
    default_system: String,
    system: Turn,
    user: Turn,
    assistant: Turn,
    /// The generation prompt (`add_generation_prompt`).
    generation: String,
}

fn msg(role: &str, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: content.into(),
    }
}

/// The content markers of the probes: unlikely in any template.
const PROBE: [&str; 3] = [
    "\u{1}PROBE-A\u{1}",
    "\u{1}PROBE-B\u{1}",
    "\u{1}PROBE-C\u{1}",
];

/// `text` split around `marker`, which must occur once.
fn around<'a>(text: &'a str, marker: &str) -> Option<(&'a str, &'a str)> {
    let i = text.find(marker)?;
    let rest = &text[i + marker.len()..];
    (!rest.contains(marker)).then(|| (&text[..i], rest))
}

impl ChatPieces {
    /// Cuts the pieces out of renderings of probe conversations.
    fn measure(tok: &Tokenizer) -> Result<ChatPieces> {
        let render = |m: &[ChatMessage], gen: bool| tok.apply_chat_template(m, gen);
        let cannot = |why: &str| {
            Error::Template(format!(
                "cannot describe the chat template of {} for Ollama: {why}",
                tok.source.display()
            ))
        };
        let [a, b, c] = PROBE;
        let strip = |text: &str, prefix: &str, what: &str| -> Result<String> {
            text.strip_prefix(prefix)
                .map(str::to_owned)
                .ok_or_else(|| cannot(&format!("{what} does not extend the shorter conversation")))
        };
        let turn_of = |text: &str, content: &str, what: &str| -> Result<Turn> {
            let (before, after) = around(text, content).ok_or_else(|| cannot(what))?;
            Ok(Turn {
                before: before.into(),
                after: after.into(),
            })
        };
        // Conversations that extend one another: each longer one's extra text is one turn.
        let u = render(&[msg("user", b)], false)?;
        let ua = render(&[msg("user", b), msg("assistant", c)], false)?;
        let uau = render(
            &[msg("user", b), msg("assistant", c), msg("user", a)],
            false,
        )?;
        let assistant = turn_of(
            &strip(&ua, &u, "an assistant turn")?,
            c,
            "an assistant message",
        )?;
        let user = turn_of(&strip(&uau, &ua, "a user turn")?, a, "a user message")?;
        let generation = strip(
            &render(&[msg("user", b)], true)?,
            &u,
            "the generation prompt",
        )?;
        // The user turn ends both [user] and [system, user]; what precedes it is the start and
        // then the default system prompt or the system turn.
        let user_b = format!("{}{b}{}", user.before, user.after);
        let su = render(&[msg("system", a), msg("user", b)], false)?;
        let with_system = su
            .strip_suffix(user_b.as_str())
            .ok_or_else(|| cannot("a system turn"))?;
        let without = u
            .strip_suffix(user_b.as_str())
            .ok_or_else(|| cannot("the first user turn"))?;
        // The start is a BOS the template writes once, if any (not a token every turn opens
        // with, such as ChatML's <|im_start|>, which SmolLM2 also names its BOS).
        let start = match tok.bos_token() {
            Some(bos)
                if with_system.starts_with(bos)
                    && without.starts_with(bos)
                    && !user.before.starts_with(bos) =>
            {
                bos
            }
            _ => "",
        };
        let system = turn_of(&with_system[start.len()..], a, "a system message")?;
        let default_system = &without[start.len()..];
        let pieces = ChatPieces {
            start: start.into(),
            default_system: default_system.into(),
            system,
            user,
            assistant,
            generation,
        };
        pieces.check(tok)?;
        Ok(pieces)
    }

    /// What the Go template writes for `messages`.
    fn render(&self, messages: &[ChatMessage], gen: bool) -> String {
        let mut s = self.start.clone();
        for (i, m) in messages.iter().enumerate() {
            if i == 0 && m.role != "system" {
                s += &self.default_system;
            }
            let turn = match m.role.as_str() {
                "system" => &self.system,
                "user" => &self.user,
                _ => &self.assistant,
            };
            s += &turn.before;
            s += &m.content;
            s += &turn.after;
        }
        if gen {
            s += &self.generation;
        }
        s
    }

    /// The pieces reproduce the Jinja template on conversations they were not measured on.
    fn check(&self, tok: &Tokenizer) -> Result<()> {
        let conversations: [(&[ChatMessage], bool); 4] = [
            (
                &[
                    msg("system", "Be brief."),
                    msg("user", "Hi"),
                    msg("assistant", "Hello."),
                    msg("user", "Name a colour.\nOne word."),
                ],
                true,
            ),
            (
                &[
                    msg("user", "2+2?"),
                    msg("assistant", "4"),
                    msg("user", "3+3?"),
                ],
                true,
            ),
            (&[msg("user", "ünïcödé 😀"), msg("assistant", "ok")], false),
            (&[msg("system", "S"), msg("user", "U")], true),
        ];
        for (messages, gen) in conversations {
            let want = tok.apply_chat_template(messages, gen)?;
            let ours = self.render(messages, gen);
            if ours != want {
                return Err(Error::Template(format!(
                    "cannot describe the chat template of {} for Ollama: for {:?} it writes {want:?}, turn-by-turn pieces give {ours:?}",
                    tok.source.display(),
                    messages.iter().map(|m| (&m.role, &m.content)).collect::<Vec<_>>(),
                )));
            }
        }
        Ok(())
    }

    /// The Ollama TEMPLATE (Go text/template over `.Messages`), without the default system
    /// prompt, which the Modelfile's SYSTEM gives (Ollama adds it as the first message of a
    /// conversation that has none).
    fn go_template(&self, tokenizer_adds_bos: bool) -> String {
        // Ollama tokenises the prompt with the model's BOS rule: a BOS the template writes and
        // the tokenizer adds would be doubled.
        let start = if tokenizer_adds_bos {
            ""
        } else {
            self.start.as_str()
        };
        let turn = |t: &Turn| format!("{}{{{{ .Content }}}}{}", t.before, t.after);
        format!(
            "{}{{{{- range .Messages }}}}{{{{ if eq .Role \"system\" }}}}{}{{{{ else if eq .Role \"user\" }}}}{}{{{{ else }}}}{}{{{{ end }}}}{{{{ end }}}}{}",
            start,
            turn(&self.system),
            turn(&self.user),
            turn(&self.assistant),
            self.generation
        )
    }
}

/// A Modelfile string literal: Ollama reads `"""…"""` verbatim.
fn quoted(s: &str) -> Result<String> {
    if s.contains("\"\"\"") {
        return Err(Error::Template(format!(
            "{s:?} contains \"\"\", which a Modelfile cannot quote"
        )));
    }
    Ok(format!("\"\"\"{s}\"\"\""))
}

/// The Modelfile for base `from` with `adapter` (paths as Ollama should read them) and the chat
/// conventions of `tok`.
pub fn modelfile(from: &Path, adapter: Option<&Path>, tok: &Tokenizer) -> Result<String> {
    let mut s = format!("FROM {}\n", from.display());
    if let Some(a) = adapter {
        s += &format!("ADAPTER {}\n", a.display());
    }
    if tok.chat_template().is_none() {
        // A base model: prompts go to the model as they are.
        s += "# The model has no chat template: prompts are passed as they are.\n";
        s += "TEMPLATE \"\"\"{{ .Prompt }}\"\"\"\n";
        return Ok(s);
    }
    let pieces = ChatPieces::measure(tok)?;
    s += &format!(
        "TEMPLATE {}\n",
        quoted(&pieces.go_template(tok.adds_bos()))?
    );
    if !pieces.default_system.is_empty() {
        // The default system prompt as Ollama's SYSTEM: only its content, the system turn
        // writes the rest.
        let content = pieces
            .default_system
            .strip_prefix(pieces.system.before.as_str())
            .and_then(|r| r.strip_suffix(pieces.system.after.as_str()))
            .ok_or_else(|| {
                Error::Template(format!(
                    "cannot describe the chat template of {} for Ollama: the text it writes without a system message ({:?}) is not a system turn",
                    tok.source.display(),
                    pieces.default_system
                ))
            })?;
        s += &format!("SYSTEM {}\n", quoted(content)?);
    }
    for &id in tok.eos_ids() {
        if let Some(t) = tok.id_to_token(id) {
            s += &format!(
                "PARAMETER stop {}\n",
                serde_json::to_string(&t).unwrap_or(t)
            );
        }
    }
    Ok(s)
}
