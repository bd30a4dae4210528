//! Writing a model as an HF directory (`config.json`, `model.safetensors`, tokenizer files)
//! that `lorakit` and transformers both load. Used by `lorakit merge`.

use std::path::Path;

use serde_json::json;

use crate::error::{Error, Result};
use crate::io::atomic::write_atomic;
use crate::io::output::OutputDir;
use crate::io::safetensors_file::write_f32_safetensors;
use crate::model::arch::{self, Slot};
use crate::model::config::{Arch, Config};
use crate::model::decoder::Decoder;
use crate::model::load::{transpose, LoadedModel, ModelSource};
use crate::tokenize::Tokenizer;

impl LoadedModel {
    /// Writes the model (adapters merged or detached first) as an HF directory into the checked
    /// output `dir`, with the tokenizer: from an HF directory its tokenizer files are copied as
    /// they are; from a GGUF file they are written from the tokenizer its metadata describes.
    pub fn save_hf_dir(&self, dir: &OutputDir) -> Result<()> {
        match (&self.source, self.tokenizer_opt()) {
            (ModelSource::HfDir { dir: src, .. }, _) => {
                save_hf_dir_copying(&self.model, dir, Some(src.as_path()))
            }
            (ModelSource::Gguf { .. }, Some(tok)) => save_hf_dir(&self.model, tok, dir),
            (ModelSource::Gguf { .. }, None) => save_hf_dir_copying(&self.model, dir, None),
        }
    }
}

/// HF `config.json` for a [`Config`]: the one the model was loaded from (its dtype set to
/// float32, what `save_hf_dir` writes), or, for a model from GGUF, one built from the config.
pub fn hf_config_json(c: &Config) -> Result<serde_json::Value> {
    if let Some(v) = &c.hf_json {
        let mut v = v.clone();
        for key in ["torch_dtype", "dtype"] {
            if v.get(key).is_some() {
                v[key] = json!("float32");
            }
        }
        return Ok(v);
    }
    arch::hf_config_out(c)
}

/// (HF name, shape, data).
type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// Every tensor of `model` under its HF name, f32, in the HF layout (GPT-2's Conv1D weights
/// back as [in, out]).
fn hf_tensors(model: &Decoder) -> Result<Vec<NamedTensor>> {
    let c = &model.config;
    let names = arch::model_names(c.arch);
    let h = c.hidden_size;
    let mut tensors: Vec<NamedTensor> = vec![(
        names.embed.into(),
        vec![c.vocab_size, h],
        model.embed_tokens.to_f32().into_owned(),
    )];
    if let (Some(w), Some(name)) = (&model.wpe, names.positions) {
        tensors.push((name.into(), vec![w.len() / h, h], w.clone()));
    }
    let table = arch::weights(c.arch);
    for (i, layer) in model.layers.iter().enumerate() {
        for (slot, n) in &layer.norms {
            let Some((hf, _)) = table.names(Slot::Norm(*slot)) else {
                return Err(Error::Invalid(format!("no HF name for the {slot:?} norm")));
            };
            let base = format!("{}.{i}.{hf}", names.layers);
            tensors.push((
                format!("{base}.weight"),
                vec![n.weight.len()],
                n.weight.clone(),
            ));
            if let Some(b) = &n.bias {
                tensors.push((format!("{base}.bias"), vec![b.len()], b.clone()));
            }
        }
        for kind in layer.kinds() {
            let Some(lin) = layer.linear(kind) else {
                continue;
            };
            let path = c.adapter_kind(kind).path(i);
            let (out, inp) = (lin.out_features, lin.in_features);
            let (shape, w) = if names.conv1d {
                (vec![inp, out], transpose(&lin.weight_f32(), out, inp))
            } else {
                (vec![out, inp], lin.weight_f32().into_owned())
            };
            tensors.push((format!("{path}.weight"), shape, w));
            if let Some(b) = &lin.bias {
                tensors.push((format!("{path}.bias"), vec![out], b.clone()));
            }
        }
    }
    let final_norm = names.final_norm;
    tensors.push((format!("{final_norm}.weight"), vec![h], model.norm.clone()));
    if let Some(b) = &model.norm_bias {
        tensors.push((format!("{final_norm}.bias"), vec![h], b.clone()));
    }
    if let Some(head) = &model.lm_head {
        tensors.push((
            names.head.into(),
            vec![head.out_features, head.in_features],
            head.weight_f32().into_owned(),
        ));
    }
    Ok(tensors)
}

/// The files beside the weights that [`save_hf_dir_copying`] copies from the source directory
/// when it has them: the tokenizer (fast and slow forms), its special tokens, the chat template
/// and the generation defaults, byte for byte as transformers wrote them.
pub const TOKENIZER_FILES: [&str; 8] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
];

/// Writes `model` (adapters merged or detached first) as an HF directory of an HF source:
/// `config.json` and `model.safetensors`, plus those of [`TOKENIZER_FILES`] that
/// `tokenizer_from` holds, copied as they are, into the checked output `dir` (replacing only
/// lorakit's files there; complete or not at all).
pub fn save_hf_dir_copying(
    model: &Decoder,
    dir: &OutputDir,
    tokenizer_from: Option<&Path>,
) -> Result<()> {
    if model.has_adapters() {
        return Err(Error::Invalid(
            "save_hf_dir: merge or detach the adapters first".into(),
        ));
    }
    dir.write_whole(|tmp| {
        write_f32_safetensors(&tmp.join("model.safetensors"), hf_tensors(model)?)?;
        let cfg = match model.config.arch {
            Arch::Gpt2 => arch::gpt2::hf_config_out(&model.config),
            _ => hf_config_json(&model.config)?,
        };
        let text = serde_json::to_string_pretty(&cfg)
            .map_err(|e| Error::format(tmp.join("config.json"), e.to_string()))?;
        write_atomic(&tmp.join("config.json"), text.as_bytes())?;
        for name in TOKENIZER_FILES {
            let Some(src) = tokenizer_from.map(|d| d.join(name)).filter(|p| p.is_file()) else {
                continue;
            };
            std::fs::copy(&src, tmp.join(name)).map_err(|e| Error::io(&src, e))?;
        }
        Ok(())
    })
}

/// Writes `model` (adapters must be merged or detached first) and its tokenizer (written from
/// the loaded one: a GGUF source has no tokenizer files) into the checked output `dir` as an HF
/// directory, replacing only lorakit's files there
/// ([`OutputDir::write_whole`]: the directory appears complete or not at all).
pub fn save_hf_dir(model: &Decoder, tokenizer: &Tokenizer, dir: &OutputDir) -> Result<()> {
    if model.has_adapters() {
        return Err(Error::Invalid(
            "save_hf_dir: merge or detach the adapters first".into(),
        ));
    }
    dir.write_whole(|tmp| write_contents(model, tokenizer, tmp))
}

fn write_contents(model: &Decoder, tokenizer: &Tokenizer, tmp: &Path) -> Result<()> {
    let c = &model.config;
    let cfg = serde_json::to_string_pretty(&hf_config_json(c)?).unwrap_or_default();
    write_atomic(&tmp.join("config.json"), cfg.as_bytes())?;
    let gen = json!({ "bos_token_id": c.bos_token_id, "eos_token_id": tokenizer.eos_id(), "pad_token_id": tokenizer.pad_id() });
    write_atomic(
        &tmp.join("generation_config.json"),
        serde_json::to_string_pretty(&gen)
            .unwrap_or_default()
            .as_bytes(),
    )?;

    write_f32_safetensors(&tmp.join("model.safetensors"), hf_tensors(model)?)?;

    // Tokenizer files.
    let tok_json = tokenizer
        .hf()
        .to_string(false)
        .map_err(|e| Error::Tokenizer(e.to_string()))?;
    write_atomic(&tmp.join("tokenizer.json"), tok_json.as_bytes())?;
    let tok_cfg = json!({
        "bos_token": tokenizer.bos_token(),
        "eos_token": tokenizer.eos_token(),
        "pad_token": tokenizer.pad_id().and_then(|id| tokenizer.id_to_token(id)),
        "unk_token": tokenizer.unk_id().and_then(|id| tokenizer.id_to_token(id)),
        "model_max_length": c.max_position_embeddings,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    write_atomic(
        &tmp.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tok_cfg)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    if let Some(t) = tokenizer.chat_template() {
        write_atomic(&tmp.join("chat_template.jinja"), t.as_bytes())?;
    }
    Ok(())
}
