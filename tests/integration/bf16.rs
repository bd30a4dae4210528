//! The bf16 path (`--precision bf16`: weights and activations rounded to bf16 for the
//! frozen-weight products, f32 accumulation) against the same references as the f32 path,
//! with tolerances that bf16's 8-bit mantissa explains: each product carries a relative
//! rounding error of ~2⁻⁸ per operand, so logits of magnitude ~20–40 move by tenths.

use lorakit::lora::peft::Adapter;
use lorakit::model::decoder_train::{Activations, Dropout, LoraGrads};
use lorakit::model::linear::Weight;
use lorakit::model::Precision;
use lorakit::train::loss::{lm_head_loss, target_positions};

use crate::common::*;

/// Max |logit diff| vs the fixture and the share of positions whose argmax agrees, where the
/// reference's top-1/top-2 gap is clear of the bf16 error.
fn bf16_vs_fixture(
    logits: &[f32],
    vocab: usize,
    want: &LogitsRecord,
    gap: f32,
) -> (f32, usize, usize) {
    let rows = logits.len() / vocab;
    let mut max_diff = 0.0f32;
    let (mut agree, mut checked) = (0, 0);
    for r in 0..rows {
        let row = &logits[r * vocab..(r + 1) * vocab];
        let sv = vocab / 16;
        for (j, b) in want.strided[r * sv..(r + 1) * sv].iter().enumerate() {
            max_diff = max_diff.max((row[j * 16] - b).abs());
        }
        if want.top2gap[r] > gap {
            checked += 1;
            agree += (lorakit::engine::ops::argmax(row) as i64 == want.argmax[r]) as usize;
        }
    }
    (max_diff, agree, checked)
}

#[test]
fn bf16_smollm2_logits_stay_close_to_transformers_fp32() {
    let mut model = real_model().model.clone();
    model.set_precision(Precision::Bf16).unwrap();
    let meta = read_json("smollm2/meta.json");
    for record in ["plain", "chat"] {
        let ids = ids_of(&meta["prompts"][record]["ids"]);
        let want = logits_record("smollm2/logits_base.safetensors", record);
        let logits = model.logits(&ids).unwrap();
        let (max_diff, agree, checked) =
            bf16_vs_fixture(&logits, model.config.vocab_size, &want, 1.0);
        eprintln!("bf16 smollm2 {record}: max |logit diff| {max_diff:.3}, argmax agrees at {agree}/{checked} clear positions");
        // Logits reach ±38; 0.02 relative of that is what bf16 rounding of 30 layers gives.
        assert!(max_diff < 0.75, "{record}: {max_diff}");
        assert_eq!(
            agree, checked,
            "{record}: argmax where the reference gap exceeds 1.0"
        );
    }
}

#[test]
fn bf16_gradients_stay_close_to_the_float64_reference() {
    let m = tiny_llama();
    let mut model = m.model.clone();
    model.set_precision(Precision::Bf16).unwrap();
    let adapter = Adapter::load(&fixture("tiny-llama/lora-a-r4-qv"), &model.config).unwrap();
    let batch = lorakit::io::safetensors_file::SafetensorsFile::open(&fixture(
        "tiny-llama/lora-a-r4-qv/grad/batch.safetensors",
    ))
    .unwrap();
    let (ids, shape) = batch.tensor_i64("input_ids").unwrap();
    let (labels, _) = batch.tensor_i64("labels").unwrap();
    let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
    let (b, t) = (shape[0], shape[1]);
    let mut acts = Activations::default();
    model
        .train_forward(&ids, b, t, Some(&adapter), Dropout::NONE, &mut acts)
        .unwrap();
    let targets = target_positions(&labels, b, t);
    let n = targets.len() as f64;
    let mut dx = vec![0.0f32; b * t * model.config.hidden_size];
    let loss = lm_head_loss(&model, &acts.x_final, &targets, 0.0, n, Some(&mut dx)) / n;
    let mut grads = LoraGrads::zeros_like(&adapter);
    model
        .train_backward(&mut dx, &acts, &adapter, Dropout::NONE, &mut grads)
        .unwrap();
    let meta = read_json("tiny-llama/lora-a-r4-qv/grad/grad_meta.json");
    let want_loss = meta["loss"].as_f64().unwrap();
    eprintln!("bf16 loss {loss} vs f64 {want_loss}");
    assert!((loss - want_loss).abs() / want_loss < 1e-2);
    let want = lorakit::io::safetensors_file::SafetensorsFile::open(&fixture(
        "tiny-llama/lora-a-r4-qv/grad/grads.safetensors",
    ))
    .unwrap();
    for (id, (da, db)) in &grads.modules {
        for (key, got) in [
            (lorakit::lora::peft::key_a(id), da),
            (lorakit::lora::peft::key_b(id), db),
        ] {
            let (w, _) = want.tensor_f32(&key).unwrap();
            let diff: f64 = got
                .iter()
                .zip(&w)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            let norm: f64 = w.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().sqrt();
            eprintln!("bf16 {key}: relative Frobenius error {:.2e}", diff / norm);
            // Random N(0,1) embeddings make this tiny model's activations large; bf16's
            // 2⁻⁸ relative rounding then shows up at the percent level in the gradients.
            assert!(diff / norm < 2e-2, "{key}: {}", diff / norm);
        }
    }
}

/// f32 → bf16 (nearest even; a bf16 subnormal flushed to a zero of its sign, as the kernels
/// read them) → f32: the values a bf16 weight holds, written out independently of the library.
fn bf16_round(v: f32) -> f32 {
    let b = v.to_bits();
    let r = (b + 0x7fff + ((b >> 16) & 1)) & 0xffff_0000;
    if r & 0x7f80_0000 == 0 {
        f32::from_bits(r & 0x8000_0000)
    } else {
        f32::from_bits(r)
    }
}

/// The packing's size: panels of 64 output columns, pairs of the input dimension, 2 bytes each.
fn packed_bytes(out: usize, inp: usize) -> usize {
    out.div_ceil(64) * 64 * inp.div_ceil(2) * 2 * 2
}

#[test]
fn bf16_model_holds_no_f32_copy_of_its_frozen_weights() {
    let f32_model = &tiny_llama().model;
    let mut model = f32_model.clone();
    model.set_precision(Precision::Bf16).unwrap();
    let mut saved = 0;
    for (layer, base) in model.layers.iter().zip(&f32_model.layers) {
        for kind in layer.kinds() {
            let (lin, f) = (layer.linear(kind).unwrap(), base.linear(kind).unwrap());
            let (out, inp) = (lin.out_features, lin.in_features);
            assert!(matches!(lin.weight, Weight::Bf16(_)), "{kind:?} keeps f32");
            assert_eq!(lin.weight_bytes(), packed_bytes(out, inp), "{kind:?}");
            saved += f.weight_bytes() - lin.weight_bytes();
            // Unpacked on demand: the weight rounded to bf16, bit for bit.
            for (got, w) in lin.weight_f32().iter().zip(f.weight_f32().iter()) {
                assert_eq!(got.to_bits(), bf16_round(*w).to_bits(), "{kind:?}");
            }
        }
    }
    let c = &model.config;
    let head = model.lm_head.as_ref().expect("tiny-llama's head is untied");
    assert!(matches!(head.weight, Weight::Bf16(_)));
    saved += 4 * c.vocab_size * c.hidden_size - packed_bytes(c.vocab_size, c.hidden_size);
    // Everything else (the embedding for its lookups, the norms) stays f32.
    assert_eq!(model.weight_bytes(), f32_model.weight_bytes() - saved);
    assert_eq!(model.embedding_f32(), f32_model.embedding_f32());
}

/// After a bf16 training step, merging and saving write the bf16 weights plus the trained
/// adapter's delta, computed here in f64 from the adapter's tensors; the other weights are
/// the bf16 ones.
#[test]
fn bf16_training_then_merge_and_save_give_the_bf16_weights_plus_the_delta() {
    let f32_model = &tiny_llama().model;
    let mut model = f32_model.clone();
    model.set_precision(Precision::Bf16).unwrap();
    let mut adapter = Adapter::load(&fixture("tiny-llama/lora-a-r4-qv"), &model.config).unwrap();
    let (b, t) = (2, 16);
    let ids: Vec<u32> = (0..b * t).map(|i| (i * 7919 % 4000) as u32).collect();
    let labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let mut acts = Activations::default();
    model
        .train_forward(&ids, b, t, Some(&adapter), Dropout::NONE, &mut acts)
        .unwrap();
    let targets = target_positions(&labels, b, t);
    let n = targets.len() as f64;
    let mut dx = vec![0.0f32; b * t * model.config.hidden_size];
    lm_head_loss(&model, &acts.x_final, &targets, 0.0, n, Some(&mut dx));
    let mut grads = LoraGrads::zeros_like(&adapter);
    model
        .train_backward(&mut dx, &acts, &adapter, Dropout::NONE, &mut grads)
        .unwrap();
    for (id, w) in adapter.modules.iter_mut() {
        let (da, db) = &grads.modules[id];
        assert!(da.iter().chain(db).any(|g| *g != 0.0), "{}", id.path());
        w.a.iter_mut().zip(da).for_each(|(v, g)| *v -= 0.5 * g);
        w.b.iter_mut().zip(db).for_each(|(v, g)| *v -= 0.5 * g);
    }
    model.attach_adapter(&adapter, 1.0).unwrap();
    model.merge_adapters().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("merged");
    let out = lorakit::io::output::prepare_output_dir(&dir, "merge", &[], false).unwrap();
    lorakit::model::save::save_hf_dir_copying(&model, &out, None).unwrap();
    let file = lorakit::io::safetensors_file::SafetensorsFile::open(&dir.join("model.safetensors"))
        .unwrap();
    for (i, base) in f32_model.layers.iter().enumerate() {
        for kind in base.kinds() {
            let f = base.linear(kind).unwrap();
            let (out, inp) = (f.out_features, f.in_features);
            let id = lorakit::lora::ModuleId {
                layer: i,
                kind: model.config.adapter_kind(kind),
            };
            let (got, _) = file.tensor_f32(&format!("{}.weight", id.path())).unwrap();
            let w0 = f.weight_f32();
            match adapter.modules.get(&id) {
                None => {
                    for (g, w) in got.iter().zip(w0.iter()) {
                        assert_eq!(g.to_bits(), bf16_round(*w).to_bits(), "{}", id.path());
                    }
                }
                Some(l) => {
                    let mut moved = 0.0f64;
                    for o in 0..out {
                        for c in 0..inp {
                            let delta: f64 = (0..l.r)
                                .map(|k| l.b[o * l.r + k] as f64 * l.a[k * inp + c] as f64)
                                .sum::<f64>()
                                * l.scale as f64;
                            let want = bf16_round(w0[o * inp + c]) as f64 + delta;
                            let g = got[o * inp + c] as f64;
                            assert!(
                                (g - want).abs() <= 1e-6 * (1.0 + want.abs()),
                                "{} [{o}, {c}]: {g} vs {want}",
                                id.path()
                            );
                            moved = moved.max(delta.abs());
                        }
                    }
                    assert!(
                        moved > 1e-4,
                        "{}: the delta is too small to test",
                        id.path()
                    );
                }
            }
        }
    }
}

/// SmolLM2's head is tied to its embedding: in bf16 the embedding is held as the head's
/// packing plus the bits that packing rounded away, and gives back the f32 values bit for
/// bit (lookups, saving) at 4⅛ bytes a value (packing, low halves, carry bits) where the f32
/// embedding and a head packing took 6; the layers take 2.
#[test]
fn bf16_tied_embedding_stays_exact_beside_the_head_packing() {
    let f32_model = &real_model().model;
    assert!(f32_model.lm_head.is_none(), "SmolLM2's head is tied");
    let mut model = f32_model.clone();
    model.set_precision(Precision::Bf16).unwrap();
    assert!(
        model.embed_tokens.to_f32().is_empty(),
        "an f32 copy of the embedding is kept"
    );
    let back = model.embedding_f32();
    let original = f32_model.embedding_f32();
    assert_eq!(back.len(), original.len());
    let same = back
        .iter()
        .zip(original.iter())
        .all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(same, "the embedding's values changed");
    let (f, b) = (f32_model.weight_bytes(), model.weight_bytes());
    eprintln!("SmolLM2 weights: {f} bytes in f32, {b} in bf16");
    let c = &model.config;
    let embed = c.vocab_size * c.hidden_size;
    let layers = f - 4 * embed;
    // The embedding is the file's Q8_0 blocks beside the head's packing (34 bytes per 32
    // values in the file, 36 here with an f32 scale), not the 2⅛ bytes a value of the bits the
    // packing rounds away; the norms stay f32 (a few KB over the layers' half).
    let want = layers / 2 + embed * 2 + embed / 32 * 36;
    assert!(
        b >= want && b < want + layers / 100,
        "{b} bytes, {want} expected"
    );
    // Back to f32: the embedding as it was.
    model.set_precision(Precision::F32).unwrap();
    assert!(
        matches!(model.embed_tokens, Weight::F32(_)),
        "back in f32, the embedding is f32 again"
    );
    let (now, original) = (model.embed_tokens.to_f32(), f32_model.embedding_f32());
    assert_eq!(now.len(), original.len());
    assert!(now
        .iter()
        .zip(original.iter())
        .all(|(a, b)| a.to_bits() == b.to_bits()));
}
