//! Tests against the Hugging Face transformers fixtures (tests/fixtures/tokenizer, smollm2).

use super::*;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");

fn fixture_path(rel: &str) -> PathBuf {
    Path::new(FIXTURES).join(rel)
}

fn fixture_json(rel: &str) -> serde_json::Value {
    let p = fixture_path(rel);
    serde_json::from_slice(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn smollm2() -> Tokenizer {
    Tokenizer::from_hf_dir(&fixture_path("smollm2")).unwrap()
}

/// A unique scratch directory (no tempfile crate in the library's dependencies).
fn scratch_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lorakit-tokenize-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Every case of tokenizer_cases.json and chat_template_cases.json; returns the failures.
fn check_all_fixtures(tok: &Tokenizer, label: &str) -> (usize, Vec<String>) {
    let mut failures = Vec::new();
    let mut checks = 0;
    let cases = fixture_json("tokenizer/tokenizer_cases.json");
    let cases = cases["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 45);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want = ids(&case["ids"]);
        match tok.encode(text, true) {
            Ok(got) if got == want => {}
            Ok(got) => failures.push(format!(
                "{label}: encode({text:?}) = {got:?}, want {want:?}"
            )),
            Err(e) => failures.push(format!("{label}: encode({text:?}) failed: {e}")),
        }
        if case["ids_equal_without_add_special_tokens"].as_bool() == Some(true) {
            match tok.encode(text, false) {
                Ok(got) if got == want => {}
                other => failures.push(format!(
                    "{label}: encode({text:?}, false) = {other:?}, want {want:?}"
                )),
            }
        }
        for (skip, key) in [(false, "decoded"), (true, "decoded_skip_special_tokens")] {
            let want_text = case[key].as_str().unwrap();
            match tok.decode(&want, skip) {
                Ok(got) if got == want_text => {}
                other => failures.push(format!(
                    "{label}: decode({want:?}, skip={skip}) = {other:?}, want {want_text:?}"
                )),
            }
        }
        checks += 4;
    }

    let chats = fixture_json("tokenizer/chat_template_cases.json");
    for name in [
        "main",
        "extra_user_only_default_system",
        "extra_multi_turn_no_generation_prompt",
    ] {
        let c = &chats[name];
        let messages: Vec<ChatMessage> = serde_json::from_value(c["messages"].clone()).unwrap();
        let agp = c["add_generation_prompt"].as_bool().unwrap();
        let want_text = c["text"].as_str().unwrap();
        match tok.apply_chat_template(&messages, agp) {
            Ok(text) => {
                if text != want_text {
                    failures.push(format!(
                        "{label}: chat {name}: text {text:?}, want {want_text:?}"
                    ));
                }
                let want_ids = ids(&c["ids"]);
                match tok.encode(&text, true) {
                    Ok(got) if got == want_ids => {}
                    other => failures.push(format!(
                        "{label}: chat {name}: ids {other:?}, want {want_ids:?}"
                    )),
                }
            }
            Err(e) => failures.push(format!("{label}: chat {name}: {e}")),
        }
        checks += 2;
    }
    (checks, failures)
}

#[test]
fn hf_dir_matches_every_fixture() {
    let tok = smollm2();
    let (checks, failures) = check_all_fixtures(&tok, "tokenizer.json");
    assert!(
        failures.is_empty(),
        "{} of {checks} checks failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(checks, 45 * 4 + 3 * 2);
}

#[test]
fn hf_dir_special_tokens_and_template() {
    let tok = smollm2();
    let meta = fixture_json("tokenizer/tokenizer_cases.json");
    assert_eq!(
        tok.bos_id(),
        Some(meta["bos_token_id"].as_u64().unwrap() as u32)
    );
    assert_eq!(
        tok.eos_ids()[0],
        meta["eos_token_id"].as_u64().unwrap() as u32
    );
    assert!(
        tok.eos_ids().contains(&0),
        "<|endoftext|> ends generation too: {:?}",
        tok.eos_ids()
    );
    assert_eq!(tok.pad_id(), Some(2));
    assert_eq!(tok.unk_id(), Some(0));
    assert!(!tok.adds_bos());
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.id_to_token(905).as_deref(), Some("Ġworld"));
    assert!(tok.is_special(2) && !tok.is_special(905));
    let src = std::fs::read_to_string(fixture_path("smollm2/chat_template.jinja")).unwrap();
    assert_eq!(tok.chat_template(), Some(src.as_str()));
    let d = tok.describe();
    for want in [
        "BPE byte-level",
        "49152",
        "<|im_start|>",
        "<|im_end|>",
        "17 special tokens",
    ] {
        assert!(d.contains(want), "describe() = {d:?} lacks {want:?}");
    }
    assert!(!d.contains('\n'));
}

#[test]
fn tokenizer_is_send_sync_clone() {
    fn check<T: Send + Sync + Clone>() {}
    check::<Tokenizer>();
    let tok = smollm2();
    let copy = tok.clone();
    let m = [ChatMessage::new("user", "Hi!")];
    assert_eq!(
        copy.apply_chat_template(&m, true).unwrap(),
        tok.apply_chat_template(&m, true).unwrap()
    );
}

#[test]
fn decode_rejects_out_of_vocabulary_ids() {
    let err = smollm2().decode(&[1, 49152], false).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("49152") && msg.contains("vocabulary"), "{msg}");
}

/// The `GgufTokenizerSpec` that the SmolLM2 GGUF holds, rebuilt from the fixture tokenizer.json
/// (transformers' conversion of that GGUF: same tokens, merges and control tokens), so that the
/// GGUF path is checked even without the GGUF file.
fn spec_from_fixture_tokenizer_json() -> GgufTokenizerSpec {
    let tj = fixture_json("smollm2/tokenizer.json");
    let vocab = tj["model"]["vocab"].as_object().unwrap();
    let mut tokens = vec![String::new(); vocab.len()];
    for (t, id) in vocab {
        tokens[id.as_u64().unwrap() as usize] = t.clone();
    }
    let mut types = vec![TOKEN_TYPE_NORMAL; tokens.len()];
    for a in tj["added_tokens"].as_array().unwrap() {
        types[a["id"].as_u64().unwrap() as usize] = TOKEN_TYPE_CONTROL;
    }
    let merges = tj["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| format!("{} {}", m[0].as_str().unwrap(), m[1].as_str().unwrap()))
        .collect();
    GgufTokenizerSpec {
        model: "gpt2".into(),
        pre: Some("smollm".into()),
        tokens,
        token_types: Some(types),
        scores: None,
        merges: Some(merges),
        bos_id: Some(1),
        eos_id: Some(2),
        unk_id: Some(0),
        pad_id: Some(2),
        add_bos: Some(false),
        add_space_prefix: Some(false),
        chat_template: Some(
            std::fs::read_to_string(fixture_path("smollm2/chat_template.jinja")).unwrap(),
        ),
    }
}

#[test]
fn gguf_spec_equivalent_matches_every_fixture() {
    let tok = Tokenizer::from_gguf_spec(
        spec_from_fixture_tokenizer_json(),
        Path::new("smollm2.gguf"),
    )
    .unwrap();
    let (checks, failures) = check_all_fixtures(&tok, "gguf-spec");
    assert!(
        failures.is_empty(),
        "{} of {checks} checks failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_ids()[0], 2);
    assert!(!tok.adds_bos());
    assert!(
        tok.describe().contains("BPE byte-level"),
        "{}",
        tok.describe()
    );
}

/// Every `pre` family builds, and agrees with the GPT-2 regex on text where they cannot differ.
#[test]
fn gguf_pre_tokenizer_families_build() {
    for pre in [
        "default",
        "gpt-2",
        "smollm",
        "llama-bpe",
        "qwen2",
        "something-new",
    ] {
        let mut spec = spec_from_fixture_tokenizer_json();
        spec.pre = Some(pre.into());
        let tok = Tokenizer::from_gguf_spec(spec, Path::new("x.gguf"))
            .unwrap_or_else(|e| panic!("{pre}: {e}"));
        assert_eq!(
            tok.encode("Hello world", false).unwrap(),
            vec![19556, 905],
            "{pre}"
        );
        assert_eq!(
            tok.encode("<|im_start|>user", false).unwrap(),
            vec![1, 4093],
            "{pre}"
        );
        if pre == "something-new" {
            assert!(
                tok.describe().contains("something-new"),
                "{}",
                tok.describe()
            );
        }
    }
}

#[test]
fn gguf_unknown_model_is_named() {
    let spec = GgufTokenizerSpec {
        model: "bert".into(),
        tokens: vec!["a".into(), "b".into()],
        ..Default::default()
    };
    let err = Tokenizer::from_gguf_spec(spec, Path::new("m.gguf")).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("'bert'") && msg.contains("m.gguf") && msg.contains("tokenizer.ggml.model"),
        "{msg}"
    );
}

#[test]
fn gguf_gpt2_with_empty_merges_builds() {
    let spec = GgufTokenizerSpec {
        model: "gpt2".into(),
        tokens: ["a", "b", "c", "d"].map(String::from).to_vec(),
        merges: Some(vec![]),
        ..Default::default()
    };
    let tok = Tokenizer::from_gguf_spec(spec, Path::new("t.gguf")).unwrap();
    assert_eq!(tok.vocab_size(), 4);
    assert_eq!(tok.encode("abd", true).unwrap(), vec![0, 1, 3]);
}

/// A small SentencePiece-style vocabulary: `<unk> <s> </s>`, the 256 byte tokens and a few
/// pieces with scores; no merges (derived from the scores).
fn tiny_spm_spec() -> GgufTokenizerSpec {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![TOKEN_TYPE_UNKNOWN, TOKEN_TYPE_CONTROL, TOKEN_TYPE_CONTROL];
    let mut scores = vec![0.0f32, 0.0, 0.0];
    for b in 0..256 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(TOKEN_TYPE_BYTE);
        scores.push(0.0);
    }
    let pieces = [
        "▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "he", "ll", "llo", "▁he", "▁hello", "▁w",
        "or", "▁wor", "▁world", "ld",
    ];
    for (i, p) in pieces.iter().enumerate() {
        tokens.push((*p).into());
        types.push(TOKEN_TYPE_NORMAL);
        scores.push(-(i as f32));
    }
    GgufTokenizerSpec {
        model: "llama".into(),
        pre: Some("default".into()),
        tokens,
        token_types: Some(types),
        scores: Some(scores),
        merges: None,
        bos_id: Some(1),
        eos_id: Some(2),
        unk_id: Some(0),
        pad_id: None,
        add_bos: None,
        add_space_prefix: None,
        chat_template: None,
    }
}

#[test]
fn gguf_llama_sentencepiece_bpe() {
    let tok = Tokenizer::from_gguf_spec(tiny_spm_spec(), Path::new("spm.gguf")).unwrap();
    let id = |t: &str| tok.token_to_id(t).unwrap();
    assert!(tok.adds_bos());
    assert!(
        tok.describe().contains("SentencePiece-BPE"),
        "{}",
        tok.describe()
    );
    // BOS, then "▁hello" "▁world" (a space prefix is added).
    assert_eq!(
        tok.encode("hello world", true).unwrap(),
        vec![1, id("▁hello"), id("▁world")]
    );
    assert_eq!(
        tok.decode(&tok.encode("hello world", true).unwrap(), true)
            .unwrap(),
        "hello world"
    );
    // Characters outside the vocabulary fall back to their UTF-8 bytes.
    let e = tok.encode("hé", false).unwrap();
    assert_eq!(e, vec![id("▁h"), id("<0xC3>"), id("<0xA9>")]);
    assert_eq!(tok.decode(&e, false).unwrap(), "hé");
    // Special-token text is parsed as the token.
    assert_eq!(tok.encode("</s>", false).unwrap(), vec![2]);
    assert_eq!(
        tok.decode(&[1, id("▁hello"), 2], false).unwrap(),
        "<s> hello</s>"
    );
    assert_eq!(tok.decode(&[1, id("▁hello"), 2], true).unwrap(), "hello");
    assert!(tok.chat_template().is_none());
    let err = tok
        .apply_chat_template(&[ChatMessage::new("user", "hi")], true)
        .unwrap_err();
    assert!(matches!(err, Error::Template(_)), "{err:?}");
}

#[test]
fn gguf_llama_without_space_prefix() {
    let mut spec = tiny_spm_spec();
    spec.add_space_prefix = Some(false);
    spec.add_bos = Some(false);
    let tok = Tokenizer::from_gguf_spec(spec, Path::new("spm.gguf")).unwrap();
    let id = |t: &str| tok.token_to_id(t).unwrap();
    assert!(!tok.adds_bos());
    assert_eq!(
        tok.encode("hello", true).unwrap(),
        vec![id("he"), id("llo")]
    );
    assert_eq!(tok.decode(&[id("▁hello")], false).unwrap(), " hello");
}

#[test]
fn stream_decoder_emits_whole_characters() {
    let tok = smollm2();
    let cases = fixture_json("tokenizer/tokenizer_cases.json");
    for case in cases["cases"].as_array().unwrap() {
        let all = ids(&case["ids"]);
        for split in [0, all.len() / 2] {
            let (prompt, generated) = all.split_at(split);
            let mut s = StreamDecoder::new(&tok, prompt);
            let mut out = String::new();
            for &id in generated {
                let piece = s.push(id).unwrap();
                assert!(
                    !piece.contains('\u{FFFD}'),
                    "{piece:?} in {:?}",
                    case["text"]
                );
                out += &piece;
            }
            out += &s.flush().unwrap();
            let full = tok.decode(&all, false).unwrap();
            // A prompt that ends inside a character decodes to U+FFFD there; the stream then
            // emits the whole character.
            let head = tok.decode(prompt, false).unwrap();
            let head = head.trim_end_matches('\u{FFFD}');
            assert_eq!(
                format!("{head}{out}"),
                full,
                "stream of {:?} split at {split}",
                case["text"]
            );
        }
    }
}

#[test]
fn stream_decoder_sentencepiece_spaces_and_bytes() {
    let tok = Tokenizer::from_gguf_spec(tiny_spm_spec(), Path::new("spm.gguf")).unwrap();
    let prompt = tok.encode("hello", true).unwrap();
    let gen = tok.encode("world hé", false).unwrap();
    let mut s = StreamDecoder::new(&tok, &prompt);
    let pieces: Vec<String> = gen.iter().map(|&id| s.push(id).unwrap()).collect();
    assert_eq!(pieces.concat(), " world hé");
    // The two bytes of "é" come out together.
    assert_eq!(pieces.last().unwrap(), "é");
    assert_eq!(pieces[pieces.len() - 2], "");
}

#[test]
fn tokenizer_json_that_does_not_parse_is_named() {
    let d = scratch_dir("badjson");
    std::fs::write(d.join("tokenizer.json"), "{ this is not json").unwrap();
    let err = Tokenizer::from_hf_dir(&d).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Format { .. }), "{err:?}");
    assert!(
        msg.contains(&d.join("tokenizer.json").display().to_string()),
        "{msg}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn missing_tokenizer_json_names_the_path() {
    let d = scratch_dir("missing");
    let err = Tokenizer::from_hf_dir(&d).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(
        msg.contains(&d.join("tokenizer.json").display().to_string()),
        "{msg}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn bad_tokenizer_config_is_named() {
    let d = scratch_dir("badcfg");
    std::fs::copy(
        fixture_path("smollm2/tokenizer.json"),
        d.join("tokenizer.json"),
    )
    .unwrap();
    std::fs::write(
        d.join("tokenizer_config.json"),
        r#"{"eos_token": "<|no_such_token|>"}"#,
    )
    .unwrap();
    let msg = Tokenizer::from_hf_dir(&d).unwrap_err().to_string();
    assert!(
        msg.contains("tokenizer_config.json") && msg.contains("eos_token"),
        "{msg}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn chat_template_from_tokenizer_config_and_raise_exception() {
    let d = scratch_dir("raise");
    std::fs::copy(
        fixture_path("smollm2/tokenizer.json"),
        d.join("tokenizer.json"),
    )
    .unwrap();
    let template = "{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}\
                    {{ raise_exception('System message must be first, got ' + m['role'] + ' later') }}\
                    {% endif %}{{ bos_token + m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}\
                    {% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}";
    let cfg = serde_json::json!({
        "bos_token": {"content": "<|im_start|>", "special": true},
        "eos_token": "<|im_end|>",
        "chat_template": template,
    });
    std::fs::write(d.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let tok = Tokenizer::from_hf_dir(&d).unwrap();
    assert_eq!(tok.chat_template(), Some(template));
    let ok = tok
        .apply_chat_template(
            &[
                ChatMessage::new("system", "S"),
                ChatMessage::new("user", "U"),
            ],
            true,
        )
        .unwrap();
    assert_eq!(
        ok,
        "<|im_start|>system: S<|im_end|><|im_start|>user: U<|im_end|>assistant:"
    );
    let err = tok
        .apply_chat_template(
            &[
                ChatMessage::new("user", "U"),
                ChatMessage::new("system", "S"),
            ],
            false,
        )
        .unwrap_err();
    match err {
        Error::Template(msg) => assert_eq!(msg, "System message must be first, got system later"),
        other => panic!("expected Error::Template, got {other:?}"),
    }
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn chat_template_list_form_and_json_messages() {
    let d = scratch_dir("list");
    std::fs::copy(
        fixture_path("smollm2/tokenizer.json"),
        d.join("tokenizer.json"),
    )
    .unwrap();
    let cfg = serde_json::json!({
        "eos_token": "<|im_end|>",
        "chat_template": [
            {"name": "tool_use", "template": "tools"},
            {"name": "default", "template": "{% for m in messages %}{{ m.items() | list }}{{ m | tojson }}{% endfor %}{{ tools }}|{{ flag }}"},
        ],
    });
    std::fs::write(d.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    let tok = Tokenizer::from_hf_dir(&d).unwrap();
    let out = tok
        .apply_chat_template(&[ChatMessage::new("user", "hé \"x\"")], false)
        .unwrap();
    assert_eq!(
        out,
        r#"[['role', 'user'], ['content', 'hé "x"']]{"role": "user", "content": "hé \"x\""}None|"#
    );
    let mut extra = serde_json::Map::new();
    extra.insert("flag".into(), serde_json::json!(true));
    let msgs = serde_json::json!([{"role": "user", "content": "a", "tool_calls": []}]);
    let out = tok.apply_chat_template_json(&msgs, false, &extra).unwrap();
    // JSON objects keep their key order when serde_json has its preserve_order feature (as in
    // this workspace); without it, serde_json holds them sorted.
    let preserves = serde_json::json!({"b": 0, "a": 0})
        .as_object()
        .unwrap()
        .keys()
        .next()
        .map(String::as_str)
        == Some("b");
    let want = if preserves {
        r#"[['role', 'user'], ['content', 'a'], ['tool_calls', []]]{"role": "user", "content": "a", "tool_calls": []}None|True"#
    } else {
        r#"[['content', 'a'], ['role', 'user'], ['tool_calls', []]]{"content": "a", "role": "user", "tool_calls": []}None|True"#
    };
    assert_eq!(out, want);
    let _ = std::fs::remove_dir_all(&d);
}

/// A small Gemma-style vocabulary: control `<pad> <eos> <bos> <unk>`, user-defined runs of
/// spaces and newlines, the byte tokens, and pieces whose scores contradict their file order.
fn tiny_gemma_spec() -> GgufTokenizerSpec {
    let mut tokens: Vec<String> = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>"]
        .map(String::from)
        .to_vec();
    let mut types = vec![TOKEN_TYPE_CONTROL; 5];
    for t in ["  ", "   ", "\n", "\n\n"] {
        tokens.push(t.into());
        types.push(TOKEN_TYPE_USER_DEFINED);
    }
    for b in 0..256 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(TOKEN_TYPE_BYTE);
    }
    for p in ["▁", "a", "b", "c", "ab", "bc", "▁a", "▁ab"] {
        tokens.push(p.into());
        types.push(TOKEN_TYPE_NORMAL);
    }
    // Scores that would put "bc" before "ab": Gemma's merge order is the file order instead.
    let scores = (0..tokens.len())
        .map(|i| if tokens[i] == "bc" { 0.0 } else { -1000.0 })
        .collect();
    GgufTokenizerSpec {
        model: "llama".into(),
        pre: Some("default".into()),
        tokens,
        token_types: Some(types),
        scores: Some(scores),
        bos_id: Some(2),
        eos_id: Some(1),
        unk_id: Some(3),
        pad_id: Some(0),
        add_bos: Some(true),
        // transformers does not consult it for Gemma: no prefix space either way.
        add_space_prefix: Some(true),
        ..Default::default()
    }
}

#[test]
fn gguf_gemma_vocabulary_builds_like_transformers() {
    let tok = Tokenizer::from_gguf_spec_for(tiny_gemma_spec(), Some("gemma3"), Path::new("g.gguf"))
        .unwrap();
    let id = |t: &str| tok.token_to_id(t).unwrap();
    assert!(
        tok.describe().contains("gemma3 vocabulary"),
        "{}",
        tok.describe()
    );
    assert!(tok.adds_bos());
    // File order: "ab" merges before "bc"; no space prefix.
    assert_eq!(tok.encode("abc", true).unwrap(), vec![2, id("ab"), id("c")]);
    // "  " is respelled "▁▁" (id 5); the user-defined original is not an added token.
    assert_eq!(id("▁▁"), 5);
    assert_eq!(id("▁▁▁"), 6);
    assert_eq!(tok.token_to_id("  "), None);
    assert_eq!(
        tok.encode("a  ab", false).unwrap(),
        vec![id("a"), 5, id("ab")]
    );
    assert_eq!(tok.encode(" ab", false).unwrap(), vec![id("▁ab")]);
    // User-defined "\n\n" is matched whole; control tokens are special.
    assert_eq!(
        tok.encode("<start_of_turn>a\n\n\nb", false).unwrap(),
        vec![4, id("a"), 8, 7, id("b")]
    );
    assert!(tok.is_special(4) && !tok.is_special(8));
    // Byte fallback, and decode without stripping a leading space.
    let e = tok.encode(" é", false).unwrap();
    assert_eq!(e, vec![id("▁"), id("<0xC3>"), id("<0xA9>")]);
    assert_eq!(tok.decode(&e, false).unwrap(), " é");
    assert_eq!(
        tok.decode(&[2, 5, id("ab"), 1], false).unwrap(),
        "<bos>  ab<eos>"
    );
    assert_eq!(tok.decode(&[2, 5, id("ab"), 1], true).unwrap(), "  ab");

    // Without the architecture the same metadata is a plain SentencePiece vocabulary (space
    // prefix, merges by score), which differs.
    let plain = Tokenizer::from_gguf_spec(tiny_gemma_spec(), Path::new("g.gguf")).unwrap();
    assert_ne!(
        plain.encode("abc", true).unwrap(),
        vec![2, id("ab"), id("c")]
    );
}

#[test]
fn gguf_file_without_tokenizer_is_named() {
    let path = fixture_path("../data/gguf/fixture.gguf");
    let f = crate::io::gguf::GgufFile::open(&path).unwrap();
    let msg = Tokenizer::from_gguf(&f).unwrap_err().to_string();
    assert!(
        msg.contains("fixture.gguf") && msg.contains("tokenizer.ggml.tokens"),
        "{msg}"
    );
}
