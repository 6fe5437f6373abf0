//! Training and serving agree: on tiny decoders that carry SmolLM2's and
//! Qwen2.5's real tokenizers (the fetched GGUFs), the training forward pass
//! gives the serving decoder's logits with the same adapter, a fresh
//! adapter changes nothing, merged equals unmerged, a seed fixes the loss
//! curve, a bad loss stops the run, and a resume refuses another config.

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use recap_engine::models::adapter::{Adapter, Target};
use recap_engine::models::decoder::DenseDecoder;
use recap_train::model::{Dropout, LoraSpec, Pass, TrainModel};
use recap_train::optim::Decay;
use recap_train::testing::write_tiny_gguf;
use recap_train::trainer::{
    self, RunOptions, RunPaths, Tokenized, TrainConfig, TrainError, ValScores,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use recap_train::testing::models_dir;

/// A tiny model of `arch` with the tokenizer of the fetched real model.
fn tiny(dir: &Path, arch: &str) -> PathBuf {
    let real = match arch {
        "llama" => "SmolLM2-135M-Instruct.Q4_1.gguf",
        _ => "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    };
    let out = dir.join(format!("tiny-{arch}.gguf"));
    write_tiny_gguf(&models_dir().join(real), &out, arch, 7).expect("tiny gguf");
    out
}

fn spec(r: usize) -> LoraSpec {
    LoraSpec {
        r,
        alpha: 2.0 * r as f64,
        dropout: 0.0,
        targets: Target::ALL.to_vec(),
        layers: None,
    }
}

fn train_model(path: &Path, spec: &LoraSpec, seed: u64) -> TrainModel {
    let mut f = std::fs::File::open(path).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    TrainModel::from_gguf(&ct, &mut f, &Device::Cpu, spec, seed).unwrap()
}

fn decoder(path: &Path) -> DenseDecoder {
    let mut f = std::fs::File::open(path).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    DenseDecoder::from_gguf(&ct, &mut f, &Device::Cpu).unwrap()
}

/// Gives every B a nonzero value, so that the adapter does something.
fn perturb(model: &TrainModel, seed: u64) {
    for (i, (_, b)) in model.lora.values().enumerate() {
        let n = b.as_tensor().elem_count();
        let v: Vec<f32> = (0..n)
            .map(|j| {
                (((j as u64 * 2654435761 + seed + i as u64 * 97) % 1000) as f32 / 1000.0 - 0.5)
                    * 0.4
            })
            .collect();
        b.set(&Tensor::from_vec(v, b.as_tensor().shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
}

fn ids() -> Vec<u32> {
    (0..40u32).map(|i| (i * 7919 + 13) % 3000).collect()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn greedy(d: &mut DenseDecoder, prompt: &[u32], n: usize) -> Vec<u32> {
    d.clear_kv_cache();
    let mut out = Vec::new();
    let mut pos = 0;
    let mut input = prompt.to_vec();
    for _ in 0..n {
        let x = Tensor::new(input.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = values(&d.forward(&x, pos).unwrap());
        pos += input.len();
        let next = logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as u32)
            .unwrap();
        out.push(next);
        input = vec![next];
    }
    out
}

// The training forward pass with an adapter gives the serving decoder's
// logits with the same adapter saved and loaded in PEFT's layout: the
// q/k row permutation of llama GGUFs, the scale, the biases of qwen2 and
// the rotary embeddings agree.
#[test]
fn training_and_serving_compute_the_same_logits_with_an_adapter() {
    let dir = tempfile::tempdir().unwrap();
    for arch in ["llama", "qwen2"] {
        let path = tiny(dir.path(), arch);
        let model = train_model(&path, &spec(4), 3);
        perturb(&model, 5);
        let ids = ids();
        let ours = model
            .logits(&ids, ids.len() - 1, &mut Dropout::new(0.0, 0))
            .unwrap();
        let adapter_dir = dir.path().join(format!("adapter-{arch}"));
        model
            .adapter()
            .unwrap()
            .save(&adapter_dir, &model.layout)
            .unwrap();
        let mut served = decoder(&path);
        let adapter = Adapter::load(&adapter_dir, &served.layout().unwrap()).unwrap();
        served.apply_adapter(&adapter, false).unwrap();
        let x = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let theirs = served.forward(&x, 0).unwrap();
        // The serving decoder keeps keys and values in f16 on CPU: the base
        // model alone differs by that rounding, and the adapter adds no
        // more than its share.
        let fresh = train_model(&path, &spec(4), 3)
            .logits(&ids, ids.len() - 1, &mut Dropout::new(0.0, 0))
            .unwrap();
        let base = values(&decoder(&path).forward(&x, 0).unwrap());
        let worst = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
                .fold(0f32, f32::max)
        };
        let rounding = worst(&values(&fresh), &base);
        let (a, b) = (values(&ours), values(&theirs));
        assert_eq!(a.len(), b.len(), "{arch}");
        let diff = worst(&a, &b);
        let moved = worst(&base, &b);
        eprintln!("{arch}: f16 cache rounding {rounding}, with the adapter {diff}, the adapter's effect {moved}");
        assert!(
            rounding < 5e-3,
            "{arch}: the base models differ by {rounding}"
        );
        assert!(
            diff < 3.0 * rounding + 1e-4,
            "{arch}: logits differ by {diff} (base {rounding})"
        );
        assert!(
            moved > 30.0 * diff,
            "{arch}: the adapter moved the logits by only {moved}"
        );
    }
}

// A fresh adapter (B = 0, as PEFT initializes it) gives the base model's
// logits exactly, so its greedy tokens too; merged and unmerged adapters
// give the same greedy tokens.
#[test]
fn a_fresh_adapter_is_the_base_and_merged_equals_unmerged() {
    let dir = tempfile::tempdir().unwrap();
    for arch in ["llama", "qwen2"] {
        let path = tiny(dir.path(), arch);
        let model = train_model(&path, &spec(4), 3);
        let fresh = model.adapter().unwrap();
        let mut base = decoder(&path);
        let mut adapted = decoder(&path);
        adapted.apply_adapter(&fresh, false).unwrap();
        let x = Tensor::new(ids().as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        assert_eq!(
            values(&base.forward(&x, 0).unwrap()),
            values(&adapted.forward(&x, 0).unwrap()),
            "{arch}"
        );
        assert_eq!(
            greedy(&mut base, &ids(), 12),
            greedy(&mut adapted, &ids(), 12)
        );

        perturb(&model, 11);
        let trained = model.adapter().unwrap();
        let mut unmerged = decoder(&path);
        unmerged.apply_adapter(&trained, false).unwrap();
        let mut merged = decoder(&path);
        merged.apply_adapter(&trained, true).unwrap();
        let a = greedy(&mut unmerged, &ids(), 16);
        assert_eq!(a, greedy(&mut merged, &ids(), 16), "{arch}");
        assert_ne!(
            a,
            greedy(&mut base, &ids(), 16),
            "{arch}: the adapter changed nothing"
        );
    }
}

// A run can start from a saved adapter: its weights come back exactly
// (the same loss), and one of another rank, scale or set of adapted
// projections is refused, naming what differs.
#[test]
fn a_run_starts_from_a_saved_adapter_of_its_own_shape() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny(dir.path(), "llama");
    let trained = train_model(&path, &spec(2), 1);
    perturb(&trained, 5);
    let adir = dir.path().join("adapter");
    trained
        .adapter()
        .unwrap()
        .save(&adir, &trained.layout)
        .unwrap();
    let saved = Adapter::load(&adir, &trained.layout).unwrap();

    let next = train_model(&path, &spec(2), 9);
    let loss = |m: &TrainModel| {
        let mut dropout = Dropout::new(0.0, 1);
        m.loss(&ids(), 30, &mut dropout)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    assert_ne!(loss(&next), loss(&trained), "the two starts already agree");
    next.start_from(&saved).unwrap();
    assert_eq!(loss(&next), loss(&trained));
    for ((name, a), (_, b)) in next.vars().iter().zip(trained.vars().iter()) {
        assert_eq!(values(a.as_tensor()), values(b.as_tensor()), "{name}");
    }

    let refused = |s: LoraSpec| match train_model(&path, &s, 1).start_from(&saved) {
        Ok(()) => panic!("an adapter of another shape was taken"),
        Err(e) => e.to_string(),
    };
    let e = refused(spec(4));
    assert!(e.contains("rank: the adapter's is 2, this run's 4"), "{e}");
    let e = refused(LoraSpec {
        alpha: 1.0,
        ..spec(2)
    });
    assert!(
        e.contains("scale (alpha / rank): the adapter's is 2, this run's 0.5")
            && !e.contains("rank:"),
        "{e}"
    );
    let e = refused(LoraSpec {
        layers: Some(vec![0]),
        ..spec(2)
    });
    assert!(
        e.contains("layer 1 q_proj is adapted in the adapter, not here"),
        "{e}"
    );
    let e = refused(LoraSpec {
        targets: vec![Target::Q, Target::V, Target::Down, Target::Up],
        ..spec(2)
    });
    assert!(
        e.contains("k_proj is adapted in the adapter, not here"),
        "{e}"
    );
}

fn examples(n: usize) -> Vec<Tokenized> {
    (0..n)
        .map(|i| {
            let ids: Vec<u32> = (0..30u32)
                .map(|j| (j * 31 + i as u32 * 101) % 2000 + 1)
                .collect();
            Tokenized {
                id: format!("ex{i}"),
                ids,
                target_start: 20,
            }
        })
        .collect()
}

fn config(seed: u64, lr: f64) -> TrainConfig {
    TrainConfig {
        base_model: "tiny".into(),
        base_sha256: "0".repeat(64),
        prompt_order: "task_first".into(),
        lora: LoraSpec {
            dropout: 0.1,
            ..spec(4)
        },
        lr,
        min_lr: 0.0,
        warmup_steps: 2,
        decay: Decay::Cosine,
        epochs: 2,
        grad_accum: 2,
        max_grad_norm: 1.0,
        weight_decay: 0.01,
        max_seq_len: 64,
        seed,
        data: vec![],
        max_examples: None,
        max_target_copy: None,
        init_adapter: None,
    }
}

fn no_val(_: &Path, epoch: usize) -> Result<ValScores, String> {
    Ok(ValScores::none(epoch))
}

fn run(
    path: &Path,
    out: &Path,
    cfg: &TrainConfig,
    resume: bool,
    stop_after: Option<usize>,
) -> Result<Option<trainer::TrainReport>, TrainError> {
    let model = train_model(path, &cfg.lora, cfg.seed);
    trainer::train(
        &model,
        &examples(6),
        BTreeMap::new(),
        cfg,
        &RunPaths {
            out: out.to_path_buf(),
        },
        RunOptions {
            checkpoint_every: 1,
            resume,
            stop_after,
        },
        &mut no_val,
    )
}

fn losses(report: &trainer::TrainReport) -> Vec<f64> {
    report.steps.iter().map(|s| s.loss).collect()
}

// The same seed and data give the same loss curve, bit for bit; another
// seed another one. The loss falls on data seen twice.
#[test]
fn a_seed_fixes_the_loss_curve() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny(dir.path(), "llama");
    let curve = |out: &str, seed: u64| -> Vec<f64> {
        losses(
            &run(
                &path,
                &dir.path().join(out),
                &config(seed, 5e-3),
                false,
                None,
            )
            .unwrap()
            .unwrap(),
        )
    };
    let a = curve("a", 1);
    assert_eq!(a.len(), 6, "2 epochs of 3 steps");
    assert_eq!(a, curve("b", 1));
    assert_ne!(a, curve("c", 2));
    let first: f64 = a[..3].iter().sum();
    let second: f64 = a[3..].iter().sum();
    assert!(second < first, "epoch 2 {second} vs epoch 1 {first}");
    let report = std::fs::read_to_string(dir.path().join("a/train.json")).unwrap();
    assert!(report.contains("\"grad_norm\""), "{report}");
    assert!(dir.path().join("a/loss.svg").exists());
    assert!(dir
        .path()
        .join("a/adapter/adapter_model.safetensors")
        .exists());
    assert!(dir.path().join("a/epoch-2/adapter_config.json").exists());
}

// A run stopped after 4 of its 6 steps (checkpointed, as a kill leaves
// the last checkpoint) and resumed gives the uninterrupted run's curve;
// a resume with another config is refused, naming the keys.
#[test]
fn a_resume_continues_the_curve_and_refuses_another_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny(dir.path(), "llama");
    let cfg = config(1, 5e-3);
    let whole = run(&path, &dir.path().join("whole"), &cfg, false, None)
        .unwrap()
        .unwrap();
    let cut = dir.path().join("cut");
    assert!(run(&path, &cut, &cfg, false, Some(4)).unwrap().is_none());
    assert!(!cut.join("train.json").exists());
    let other = TrainConfig {
        lr: 1e-3,
        epochs: 3,
        ..cfg.clone()
    };
    let e = run(&path, &cut, &other, true, None)
        .expect_err("refused")
        .to_string();
    assert!(e.contains("epochs, lr") && !e.contains("seed"), "{e}");
    let resumed = run(&path, &cut, &cfg, true, None).unwrap().unwrap();
    assert_eq!(resumed.resumed_from_step, Some(4));
    assert_eq!(losses(&resumed), losses(&whole));
    let (a, b) = (
        std::fs::read(cut.join("adapter/adapter_model.safetensors")).unwrap(),
        std::fs::read(dir.path().join("whole/adapter/adapter_model.safetensors")).unwrap(),
    );
    assert!(
        a == b,
        "the resumed run's adapter is the uninterrupted run's"
    );
}

// A loss that turns infinite stops the run with the last good checkpoint
// named, and leaves that checkpoint in place.
#[test]
fn a_diverging_loss_stops_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny(dir.path(), "llama");
    let cfg = TrainConfig {
        max_grad_norm: 0.0,
        warmup_steps: 0,
        ..config(1, 1e12)
    };
    let out = dir.path().join("run");
    let e = run(&path, &out, &cfg, false, None)
        .expect_err("diverged")
        .to_string();
    assert!(
        e.contains("the loss is") && e.contains("checkpoints"),
        "{e}"
    );
    assert!(out.join("checkpoints/latest").exists(), "{e}");
    assert!(
        !out.join("train.json").exists(),
        "no report of a failed run"
    );
}

// A served adapter is checked against its base: trained on another GGUF
// (sha256), for another prompt order, or not the file the catalog pins,
// it is refused, naming both sides; the right one loads.
#[test]
fn an_adapter_for_another_base_is_refused() {
    use recap_engine::models::adapter::RecapAdapterInfo;
    use recap_engine::models::llm::{sha256_file, AdapterOptions, GgufModel, GgufOptions};
    let dir = tempfile::tempdir().unwrap();
    let base = tiny(dir.path(), "llama");
    let other = dir.path().join("other.gguf");
    write_tiny_gguf(
        &models_dir().join("SmolLM2-135M-Instruct.Q4_1.gguf"),
        &other,
        "llama",
        8,
    )
    .unwrap();
    let model = train_model(&base, &spec(2), 1);
    let mut adapter = model.adapter().unwrap();
    let base_sha = sha256_file(&base).unwrap();
    adapter.info = Some(RecapAdapterInfo {
        base_sha256: base_sha.clone(),
        base_model: Some("tiny".into()),
        prompt_order: Some("task_first".into()),
    });
    let adir = dir.path().join("adapter");
    adapter.save(&adir, &model.layout).unwrap();
    let file_sha = sha256_file(&adir.join("adapter_model.safetensors")).unwrap();
    let opts = |sha: &str, transcript_first: bool| GgufOptions {
        id: "tiny-lora".into(),
        sha256: None,
        device: Device::Cpu,
        max_context: 1024,
        transcript_first,
        adapter: Some(AdapterOptions {
            dir: adir.clone(),
            sha256: Some(sha.to_string()),
            merge: false,
        }),
    };
    let err = |path: &Path, o: GgufOptions| match GgufModel::load(path, &o) {
        Ok(_) => panic!("loaded"),
        Err(e) => e.to_string(),
    };
    assert!(GgufModel::load(&base, &opts(&file_sha, false)).is_ok());
    let e = err(&other, opts(&file_sha, false));
    let other_sha = sha256_file(&other).unwrap();
    assert!(e.contains(&base_sha) && e.contains(&other_sha), "{e}");
    let e = err(&base, opts(&file_sha, true));
    assert!(
        e.contains("task_first") && e.contains("transcript_first"),
        "{e}"
    );
    let e = err(&base, opts(&"0".repeat(64), false));
    assert!(e.contains(&file_sha) && e.contains(&"0".repeat(64)), "{e}");
}

// The hand-written pass and candle's autograd, over recap's fused ops or
// over plain candle ops, give the same loss and adapter gradients: with
// and without dropout (the same masks), with every layer or one adapted,
// in one attention block and in several (150 tokens: blocks of 64).
// The speed benchmark compares the three on these equal terms.
#[test]
fn every_pass_gives_the_same_loss_and_gradients() {
    let dir = tempfile::tempdir().unwrap();
    for arch in ["llama", "qwen2"] {
        let path = tiny(dir.path(), arch);
        let long: Vec<u32> = (0..150u32).map(|i| (i * 7919 + 13) % 3000).collect();
        for (dropout, layers, ids) in [
            (0.0, None, ids()),
            (0.25, Some(vec![1]), ids()),
            (0.1, None, long),
        ] {
            let mut s = spec(4);
            s.dropout = dropout;
            s.layers = layers.clone();
            let mut model = train_model(&path, &s, 3);
            perturb(&model, 5);
            let target_start = ids.len() * 3 / 4;
            let mut run = |pass: Pass| {
                model.pass = pass;
                let mut grads = model.zero_grads();
                // Twice: the buffers add up, as over a batch.
                let mut loss = 0.0;
                for _ in 0..2 {
                    let mut masks = Dropout::new(dropout, 11);
                    loss = model
                        .loss_and_grads(&ids, target_start, &mut masks, 0.5, &mut grads)
                        .unwrap();
                }
                (loss, grads)
            };
            let (loss, grads) = run(Pass::Autograd);
            let norm: f32 = grads.iter().flatten().map(|g| g * g).sum();
            assert!(norm > 1e-6, "{arch}: the gradients are zero");
            for pass in [Pass::HandWritten, Pass::PlainCandle] {
                let (l, g) = run(pass);
                let what = format!(
                    "{arch} {pass:?} dropout {dropout} layers {layers:?} {} tokens",
                    ids.len()
                );
                assert!(
                    (l - loss).abs() < 1e-5 * (1.0 + loss.abs()),
                    "{what}: {l} vs {loss}"
                );
                assert_eq!(g.len(), grads.len());
                // Each tensor against its own scale: small gradients get
                // no absolute slack.
                for (i, (x, y)) in g.iter().zip(&grads).enumerate() {
                    let scale = y.iter().fold(0f32, |m, v| m.max(v.abs()));
                    assert!(scale > 0.0, "{what}: tensor {i} has no gradient");
                    for (a, b) in x.iter().zip(y) {
                        assert!(
                            (a - b).abs() <= 2e-4 * scale,
                            "{what}: tensor {i}: gradient {a} vs {b} (scale {scale})"
                        );
                    }
                }
            }
        }
    }
}
