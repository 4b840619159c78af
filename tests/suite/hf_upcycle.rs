//! `switch upcycle --model`: a dense Hugging Face T5 (tests/data/hf-upcycle/t5-tiny, made by
//! tools/hf_upcycle_fixtures.py with transformers 5.24.0) into a Switch Transformers model.
//! With a zero router it computes the dense model's outputs as transformers recorded them;
//! with the paper's router it computes what transformers computes on the same upcycled file.

use std::path::{Path, PathBuf};

use switch_transformer::hf::checkpoint::SaveDtype;
use switch_transformer::hf::upcycle::{Router, UpcycleOptions, upcycle};
use switch_transformer::hf::{HfSwitchTransformer, parity};
use switch_transformer::store::TensorFile;

use crate::common::{self, switch};

fn t5() -> PathBuf {
    common::manifest_dir().join("tests/data/hf-upcycle/t5-tiny")
}

fn options(experts: usize, router: Router) -> UpcycleOptions {
    UpcycleOptions {
        experts,
        encoder_sparse: None,
        decoder_sparse: None,
        expert_capacity: 64,
        router,
        seed: 0,
        dtype: SaveDtype::F32,
    }
}

/// Replays `expected` (a recording of transformers' outputs) against the model in `dir`.
fn replay(dir: &Path, expected: &str) -> switch_transformer::interop::parity::Report {
    std::fs::copy(t5().join(expected), dir.join("expected.safetensors")).unwrap();
    parity::run(dir, &burn::tensor::Device::default()).unwrap()
}

/// The done-when of sparse upcycling: with a zero router (gate exactly 1/N, every `wo` times N)
/// and no token dropped, the Switch model's encoder output, logits and greedy tokens are the
/// dense T5's as transformers computed them (parity's tolerances: 1e-4 relative, tokens exact).
#[test]
fn a_zero_router_keeps_the_dense_function() {
    let tmp = common::temp_dir("hf-upcycle-zero");
    let out = tmp.join("switch");
    let (ok, text) = switch(&[
        "upcycle",
        "--model",
        t5().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--experts",
        "4",
        "--router",
        "zero",
    ]);
    assert!(ok, "{text}");
    assert!(
        text.contains("encoder blocks [1, 3] and decoder blocks [1]"),
        "{text}"
    );
    let report = replay(&out, "expected.safetensors");
    assert!(report.passed(), "{report}");
    // The tokenizer and generation defaults travel with the weights.
    for f in ["tokenizer.json", "generation_config.json", "config.json"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    // The paper's router does change the function: the same recording fails.
    let paper = tmp.join("paper");
    upcycle(&t5(), &paper, &options(4, Router::Paper)).unwrap();
    assert!(!replay(&paper, "expected.safetensors").passed());
}

/// transformers loaded the paper-router upcycle (seed 0, 4 experts) and recorded its outputs
/// (tools/hf_upcycle_fixtures.py --check): ours on the same upcycle agree, so the file is
/// what transformers reads and the draw is the same on every machine.
#[test]
fn transformers_computes_what_we_compute_on_the_upcycled_model() {
    let out = common::temp_dir("hf-upcycle-paper").join("switch");
    upcycle(&t5(), &out, &options(4, Router::Paper)).unwrap();
    let report = replay(&out, "upcycled-paper-expected.safetensors");
    assert!(report.passed(), "{report}");
}

/// Every expert is the dense FFN (`wo` times N), the router the paper's truncated normal, every
/// other tensor unchanged; the config says where the experts are.
#[test]
fn experts_are_copies_and_the_rest_is_unchanged() {
    let out = common::temp_dir("hf-upcycle-copies").join("switch");
    let n = 3;
    let made = upcycle(&t5(), &out, &options(n, Router::Paper)).unwrap();
    assert_eq!(made.sparse, (vec![1, 3], vec![1]));
    let dense = TensorFile::read(&t5().join("model.safetensors")).unwrap();
    let sparse = TensorFile::read(&out.join("model.safetensors")).unwrap();
    let get = |f: &TensorFile, name: &str| f.get(name).unwrap().to_f32();
    let mut experts = 0;
    for (name, t) in dense.with_prefix("") {
        let Some((block, rest)) = name.split_once(".DenseReluDense.") else {
            assert_eq!(get(&sparse, &name), t.to_f32(), "{name}");
            continue;
        };
        let is_sparse = ["encoder.block.1", "encoder.block.3", "decoder.block.1"]
            .iter()
            .any(|b| block.starts_with(&format!("{b}.")));
        if !is_sparse {
            assert_eq!(get(&sparse, &format!("{block}.mlp.{rest}")), t.to_f32());
            continue;
        }
        let k = if rest == "wo.weight" { n as f32 } else { 1.0 };
        let want: Vec<f32> = t.to_f32().iter().map(|v| v * k).collect();
        for e in 0..n {
            assert_eq!(
                get(&sparse, &format!("{block}.mlp.experts.expert_{e}.{rest}")),
                want
            );
            experts += 1;
        }
        let router = sparse
            .get(&format!("{block}.mlp.router.classifier.weight"))
            .unwrap();
        assert_eq!(router.shape, vec![n, 16]);
        let bound = 2.0 * (0.1f32 / 16.0).sqrt();
        let r = router.to_f32();
        assert!(r.iter().all(|v| v.abs() <= bound) && r.iter().any(|&v| v != 0.0));
    }
    assert_eq!(experts, 3 * 2 * n);
    let model = HfSwitchTransformer::load(&out, &burn::tensor::Device::default()).unwrap();
    assert_eq!(
        (model.config.num_experts, model.config.expert_capacity),
        (n, 64)
    );
    assert_eq!(
        made.params.1 - made.params.0,
        3 * (n - 1) * 2 * 16 * 24 + 3 * n * 16
    );
}

/// What cannot be upcycled is refused with the reason, and nothing is written or overwritten.
#[test]
fn what_cannot_be_upcycled_is_refused() {
    let tmp = common::temp_dir("hf-upcycle-refused");
    let copy = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| -> PathBuf {
        let dir = tmp.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for e in std::fs::read_dir(t5()).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
        }
        let path = dir.join("config.json");
        let mut c: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        edit(&mut c);
        std::fs::write(&path, c.to_string()).unwrap();
        dir
    };
    let gated = copy("gated", &|c| c["feed_forward_proj"] = "gated-gelu".into());
    let untied = copy("untied", &|c| c["tie_word_embeddings"] = false.into());
    let switch_model = common::manifest_dir().join("tests/data/hf/tiny");
    let out = tmp.join("out");
    let up = |model: &Path, extra: &[&str]| -> String {
        let mut args = vec![
            "upcycle",
            "--model",
            model.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let (ok, text) = switch(&args);
        assert!(!ok, "{args:?} succeeded:\n{text}");
        text
    };
    for (model, extra, want) in [
        (gated.as_path(), &[][..], "gated FFNs"),
        (untied.as_path(), &[], "tie_word_embeddings is false"),
        (
            switch_model.as_path(),
            &[],
            "already a Switch Transformers model",
        ),
        (
            t5().as_path(),
            &["--experts", "1"],
            "--experts must be at least 2",
        ),
        (
            t5().as_path(),
            &["--encoder-sparse", "5"],
            "--encoder-sparse 5",
        ),
        (
            t5().as_path(),
            &["--decoder-sparse", "0"],
            "--decoder-sparse 0",
        ),
        (
            t5().as_path(),
            &["--expert-capacity", "0"],
            "--expert-capacity",
        ),
    ] {
        let text = up(model, extra);
        assert!(text.contains(want), "{extra:?}: want `{want}` in:\n{text}");
        assert!(!out.exists(), "{extra:?} left {}", out.display());
    }
    let (ok, text) = switch(&["upcycle", "--model", t5().to_str().unwrap()]);
    assert!(!ok && text.contains("--out"), "{text}");
    // An existing model folder is never overwritten.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("config.json"), "{}").unwrap();
    let text = up(&t5(), &[]);
    assert!(text.contains("already exists"), "{text}");
    assert_eq!(
        std::fs::read_to_string(out.join("config.json")).unwrap(),
        "{}"
    );
}
