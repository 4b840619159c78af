//! Parity with labml's PyTorch code: replays a recorded fixture (format of
//! `shared/fixtures/README.md`) through this implementation and compares every tensor.
//!
//! Errors are measured as `max |ours - theirs|` and relative to the recorded tensor's largest
//! magnitude; forward values must agree to [`FORWARD_TOL`], gradients to [`GRAD_TOL`].
//! Discrete outputs (routes, counts, drops) must agree exactly.

use std::fmt;

use anyhow::{Context, Result, bail};
use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor, TensorData};
use rand::SeedableRng;
use serde_json::Value;

use crate::model::ModelConfig;
use crate::model::loss::Losses;
use crate::model::{SwitchTransformer, Trace};
use crate::optim::{LabmlAdam, Noam, ParamGrads};
use crate::routing::{RoutePlan, RoutingOptions, RoutingRng, capacity};
use crate::store::{HostTensor, TensorFile, host_f32};
use crate::model::switch::{HostStats, SwitchFeedForward, SwitchStats};
use crate::interop::weights::{
    Source, StateDict, model_from_state_dict, model_state_dict, switch_from_state_dict,
    switch_state_dict,
};

/// Forward tolerance, relative to the recorded tensor's largest magnitude.
pub const FORWARD_TOL: f64 = 1e-4;
/// Gradient tolerance, relative to the recorded tensor's largest magnitude.
pub const GRAD_TOL: f64 = 1e-3;
/// Magnitudes below this count as zero when scaling errors: a tensor that is analytically zero
/// (the gradient of the attention key bias: softmax ignores a constant added to a row) holds
/// only rounding noise in both implementations, and is compared absolutely.
pub const ZERO_FLOOR: f64 = 1e-6;

/// What a fixture records, recognised from its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FixtureKind {
    /// `SwitchFeedForward` without token dropping: exact outputs and gradients.
    SwitchFeedForward,
    /// `SwitchFeedForward` with dropping: invariants, plus one recorded drop set replayed.
    SwitchFeedForwardDrop,
    /// The whole `AutoregressiveModel`: logits, activations, losses, gradients.
    Model,
    /// Noam + labml Adam + global-norm clipping over several steps.
    Optimizer,
}

impl FixtureKind {
    pub fn detect(f: &TensorFile) -> Result<Self> {
        if f.contains("step1.lr") {
            Ok(Self::Optimizer)
        } else if f.contains("input_ids") {
            Ok(Self::Model)
        } else if f.contains("run.dropped_mask") {
            Ok(Self::SwitchFeedForwardDrop)
        } else if f.contains("param.switch.weight") {
            Ok(Self::SwitchFeedForward)
        } else {
            bail!(
                "not a recognised fixture: expected `step1.lr` (optimizer), `input_ids` (model), \
                 `run.dropped_mask` (switch with dropping) or `param.switch.weight` (switch)"
            )
        }
    }
}

/// One compared tensor, or one checked invariant.
#[derive(Debug, Clone)]
pub struct Row {
    pub name: String,
    pub max_abs: f64,
    pub max_rel: f64,
    pub tol: f64,
    pub pass: bool,
    /// For invariants and exact checks: what was checked.
    pub note: String,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub kind: FixtureKind,
    pub rows: Vec<Row>,
}

impl Report {
    pub fn passed(&self) -> bool {
        !self.rows.is_empty() && self.rows.iter().all(|r| r.pass)
    }

    /// Largest relative error among rows whose name starts with `prefix`.
    pub fn worst(&self, prefix: &str) -> Option<&Row> {
        self.rows
            .iter()
            .filter(|r| r.name.starts_with(prefix) && r.note.is_empty())
            .max_by(|a, b| a.max_rel.total_cmp(&b.max_rel))
    }

    fn compare(&mut self, name: &str, ours: &[f32], theirs: &HostTensor, tol: f64) {
        let expected = theirs.to_f64();
        if ours.len() != expected.len() {
            self.check(
                name,
                false,
                format!("size {} vs recorded {:?}", ours.len(), theirs.shape),
            );
            return;
        }
        let scale = expected.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let max_abs = ours
            .iter()
            .zip(&expected)
            .fold(0.0f64, |m, (&a, &b)| m.max((a as f64 - b).abs()));
        let max_rel = max_abs / scale.max(ZERO_FLOOR);
        self.rows.push(Row {
            name: name.to_string(),
            max_abs,
            max_rel,
            tol,
            pass: max_rel <= tol && max_abs.is_finite(),
            note: String::new(),
        });
    }

    fn exact(&mut self, name: &str, ours: &[i64], theirs: &[i64]) {
        let mismatches = if ours.len() == theirs.len() {
            ours.iter().zip(theirs).filter(|(a, b)| a != b).count()
        } else {
            usize::MAX
        };
        let note = if mismatches == 0 {
            "exact".to_string()
        } else if mismatches == usize::MAX {
            format!("length {} vs {}", ours.len(), theirs.len())
        } else {
            format!("{mismatches} of {} differ", theirs.len())
        };
        self.check(name, mismatches == 0, note);
    }

    fn check(&mut self, name: &str, pass: bool, note: String) {
        self.rows.push(Row {
            name: name.to_string(),
            max_abs: 0.0,
            max_rel: 0.0,
            tol: 0.0,
            pass,
            note,
        });
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "fixture kind: {:?}", self.kind)?;
        writeln!(
            f,
            "{:<64} {:>11} {:>11} {:>8}  result",
            "tensor", "max abs", "max rel", "tol"
        )?;
        for r in &self.rows {
            let status = if r.pass { "ok" } else { "FAIL" };
            if r.note.is_empty() {
                writeln!(
                    f,
                    "{:<64} {:>11.3e} {:>11.3e} {:>8.0e}  {status}",
                    r.name, r.max_abs, r.max_rel, r.tol
                )?;
            } else {
                writeln!(f, "{:<64} {:>32}  {status} ({})", r.name, "", r.note)?;
            }
        }
        write!(f, "parity: {}", if self.passed() { "PASS" } else { "FAIL" })
    }
}

/// Runs the fixture in `file` on `device` (autodiff is enabled on it as needed).
pub fn run(file: &TensorFile, device: &Device) -> Result<Report> {
    let kind = FixtureKind::detect(file)?;
    let mut report = Report {
        kind,
        rows: Vec::new(),
    };
    let device = device.clone().autodiff();
    match kind {
        FixtureKind::SwitchFeedForward => switch_exact(file, &device, &mut report)?,
        FixtureKind::SwitchFeedForwardDrop => switch_drop(file, &device, &mut report)?,
        FixtureKind::Model => model(file, &device, &mut report)?,
        FixtureKind::Optimizer => optimizer(file, &device, &mut report)?,
    }
    Ok(report)
}

// ---------------------------------------------------------------------------------------------

fn meta_usize(meta: &Value, key: &str) -> Result<usize> {
    meta.get(key)
        .and_then(Value::as_u64)
        .map(|v| v as usize)
        .with_context(|| format!("fixture metadata has no integer `{key}`"))
}

fn meta_f64(meta: &Value, key: &str) -> Result<f64> {
    meta.get(key)
        .and_then(Value::as_f64)
        .with_context(|| format!("fixture metadata has no number `{key}`"))
}

fn meta_bool(meta: &Value, key: &str) -> Result<bool> {
    meta.get(key)
        .and_then(Value::as_bool)
        .with_context(|| format!("fixture metadata has no boolean `{key}`"))
}

fn switch_config(meta: &Value) -> Result<ModelConfig> {
    Ok(ModelConfig {
        n_vocab: 1,
        d_model: meta_usize(meta, "d_model")?,
        heads: 1,
        d_ff: meta_usize(meta, "d_ff")?,
        n_layers: 1,
        n_experts: meta_usize(meta, "n_experts")?,
        capacity_factor: meta_f64(meta, "capacity_factor")?,
        drop_tokens: meta_bool(meta, "drop_tokens")?,
        is_scale_prob: meta_bool(meta, "is_scale_prob")?,
        ..Default::default()
    })
}

fn as_i64(v: &[usize]) -> Vec<i64> {
    v.iter().map(|&x| x as i64).collect()
}

/// Reorders batch-major rows (`b * seq + s`) to labml's sequence-major order (`s * batch + b`).
fn to_seq_major(data: &[f32], batch: usize, seq: usize) -> Vec<f32> {
    let inner = data.len() / (batch * seq);
    let mut out = Vec::with_capacity(data.len());
    for s in 0..seq {
        for b in 0..batch {
            let r = b * seq + s;
            out.extend_from_slice(&data[r * inner..(r + 1) * inner]);
        }
    }
    out
}

fn to_seq_major_idx(data: &[usize], batch: usize, seq: usize) -> Vec<i64> {
    let f: Vec<f32> = data.iter().map(|&x| x as f32).collect();
    to_seq_major(&f, batch, seq)
        .into_iter()
        .map(|x| x as i64)
        .collect()
}

fn leaf(t: &HostTensor, device: &Device) -> Result<Tensor<2>> {
    let [s, b, d] = <[usize; 3]>::try_from(t.shape.as_slice())
        .map_err(|_| anyhow::anyhow!("input `x` must be [seq, batch, d], got {:?}", t.shape))?;
    Ok(Tensor::from_data(TensorData::new(t.to_f32(), [s * b, d]), device).require_grad())
}

fn compare_grads(report: &mut Report, ours: &StateDict, file: &TensorFile, prefix: &str) {
    for (name, theirs) in file.with_prefix(prefix) {
        if name == "x" {
            continue;
        }
        match ours.get(&name) {
            Some(t) => report.compare(&format!("{prefix}{name}"), &t.to_f32(), &theirs, GRAD_TOL),
            None => report.check(
                &format!("{prefix}{name}"),
                false,
                "no gradient reached this parameter".into(),
            ),
        }
    }
}

/// `sum(out * g)`, backward, and the gradient comparisons under `prefix` (`grad.` / `run.grad.`).
fn switch_backward(
    sff: &SwitchFeedForward,
    x: &Tensor<2>,
    out: Tensor<2>,
    file: &TensorFile,
    device: &Device,
    report: &mut Report,
    prefix: &str,
) -> Result<()> {
    let g = file.get("g")?;
    let g = Tensor::<2>::from_data(TensorData::new(g.to_f32(), out.dims()), device);
    let grads = (out * g).sum().backward();
    let gx = x.grad(&grads).context("no gradient reached the input x")?;
    report.compare(
        &format!("{prefix}x"),
        &host_f32(gx),
        file.get(&format!("{prefix}x"))?,
        GRAD_TOL,
    );
    compare_grads(
        report,
        &switch_state_dict(sff, Source::Grads(&grads)),
        file,
        prefix,
    );
    Ok(())
}

/// Routing tensors every switch fixture records.
fn compare_routing(
    report: &mut Report,
    file: &TensorFile,
    probs: &[f32],
    plan: &RoutePlan,
    route_prob_sum: Tensor<1>,
) -> Result<()> {
    let n_experts = plan.n_experts;
    report.compare("route_prob", probs, file.get("route_prob")?, FORWARD_TOL);
    let pmax: Vec<f32> = plan
        .routes
        .iter()
        .enumerate()
        .map(|(t, &e)| probs[t * n_experts + e])
        .collect();
    report.compare(
        "route_prob_max",
        &pmax,
        file.get("route_prob_max")?,
        FORWARD_TOL,
    );
    report.compare(
        "route_prob_sum",
        &host_f32(route_prob_sum),
        file.get("route_prob_sum")?,
        FORWARD_TOL,
    );
    report.exact(
        "routes",
        &as_i64(&plan.routes),
        &file.get("routes")?.to_i64(),
    );
    report.exact(
        "counts",
        &as_i64(&plan.counts),
        &file.get("counts")?.to_i64(),
    );
    Ok(())
}

fn switch_exact(file: &TensorFile, device: &Device, report: &mut Report) -> Result<()> {
    let meta = file.meta_json()?;
    let config = switch_config(&meta)?;
    if config.drop_tokens {
        bail!(
            "this switch fixture drops tokens but records no drop set (`run.dropped_mask`): \
             which tokens drop is random, so its outputs cannot be compared exactly"
        );
    }
    let sff = switch_from_state_dict(&config, &file.with_prefix("param."), device)?;
    let x = leaf(file.get("x")?, device)?;
    let out = sff.forward(x.clone(), &mut RoutingRng::seed_from_u64(0));
    report.compare(
        "out",
        &host_f32(out.out.clone()),
        file.get("out")?,
        FORWARD_TOL,
    );
    let probs = host_f32(sff.router.forward(x.clone()));
    let host = out.stats.host();
    let plan = RoutePlan::from_decisions(
        host.routes.clone(),
        vec![false; host.routes.len()],
        config.n_experts,
        1,
        0,
    );
    compare_routing(
        report,
        file,
        &probs,
        &plan,
        out.stats.route_prob_sum.clone(),
    )?;
    report.exact(
        "n_dropped",
        &[host.n_dropped as i64],
        &file.get("n_dropped")?.to_i64(),
    );
    switch_backward(&sff, &x, out.out, file, device, report, "grad.")
}

fn switch_drop(file: &TensorFile, device: &Device, report: &mut Report) -> Result<()> {
    let meta = file.meta_json()?;
    let config = switch_config(&meta)?;
    let sff = switch_from_state_dict(&config, &file.with_prefix("param."), device)?;
    let x = leaf(file.get("x")?, device)?;
    let route_prob = sff.router.forward(x.clone());
    let probs = host_f32(route_prob.clone());
    let n_tokens = probs.len() / config.n_experts;
    let cap = capacity(config.capacity_factor, n_tokens, config.n_experts);

    // 1. Our own random drop set: invariants.
    let plan = RoutePlan::new(
        &probs,
        config.n_experts,
        &RoutingOptions::labml(config.capacity_factor, true),
        &mut RoutingRng::seed_from_u64(0),
    );
    let out = sff.dispatch(
        x.clone(),
        route_prob.clone(),
        &plan,
        &mut RoutingRng::seed_from_u64(0),
    );
    compare_routing(
        report,
        file,
        &probs,
        &plan,
        out.stats.route_prob_sum.clone(),
    )?;
    report.exact("capacity", &[cap as i64], &file.get("capacity")?.to_i64());
    report.exact(
        "expected_n_dropped",
        &[plan.n_dropped() as i64],
        &file.get("expected_n_dropped")?.to_i64(),
    );
    let kept = plan.kept_counts();
    let kept_ok = (0..config.n_experts).all(|e| kept[e] == plan.counts[e].min(cap));
    report.check(
        "invariant: kept per expert = min(count, capacity)",
        kept_ok,
        format!("kept {kept:?}, counts {:?}, capacity {cap}", plan.counts),
    );
    let under_ok = plan
        .routes
        .iter()
        .zip(&plan.dropped)
        .all(|(&e, &d)| !d || plan.counts[e] > cap);
    report.check(
        "invariant: experts within capacity drop nothing",
        under_ok,
        String::new()
            + if under_ok {
                "none dropped"
            } else {
                "a token was dropped"
            },
    );
    // Each output row equals the recorded kept or dropped row, matching our decision.
    let ours = host_f32(out.out);
    let if_kept = file.get("out_if_kept")?.to_f32();
    let if_dropped = file.get("out_if_dropped")?.to_f32();
    let d = config.d_model;
    let scale = if_kept
        .iter()
        .chain(&if_dropped)
        .fold(0f32, |m, v| m.max(v.abs())) as f64;
    let mut worst = 0.0f64;
    for t in 0..n_tokens {
        let expected = if plan.dropped[t] {
            &if_dropped
        } else {
            &if_kept
        };
        for i in t * d..(t + 1) * d {
            worst = worst.max((ours[i] - expected[i]).abs() as f64);
        }
    }
    report.rows.push(Row {
        name: "out rows = out_if_kept / out_if_dropped (own drop set)".into(),
        max_abs: worst,
        max_rel: worst / scale,
        tol: FORWARD_TOL,
        pass: worst / scale <= FORWARD_TOL,
        note: String::new(),
    });
    // Drop frequency over many seeds: (count - capacity) / count for over-capacity experts.
    let runs = 4000;
    let mut freq = vec![0.0f64; n_tokens];
    for seed in 0..runs {
        let p = RoutePlan::new(
            &probs,
            config.n_experts,
            &RoutingOptions::labml(config.capacity_factor, true),
            &mut RoutingRng::seed_from_u64(seed),
        );
        for (f, &dropped) in freq.iter_mut().zip(&p.dropped) {
            *f += dropped as u8 as f64 / runs as f64;
        }
    }
    let expected_freq: Vec<f64> = plan
        .routes
        .iter()
        .map(|&e| {
            let c = plan.counts[e];
            if c > cap {
                (c - cap) as f64 / c as f64
            } else {
                0.0
            }
        })
        .collect();
    let dev = freq
        .iter()
        .zip(&expected_freq)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
    let labml_dev = file
        .get("empirical_drop_freq")?
        .to_f64()
        .iter()
        .zip(&expected_freq)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
    report.check(
        "invariant: drop frequency = (count - capacity) / count",
        dev < 0.05,
        format!("max deviation {dev:.3} over {runs} seeds (labml's 64 runs: {labml_dev:.3})"),
    );

    // 2. The recorded drop set replayed: exact outputs and gradients.
    let dropped: Vec<bool> = file
        .get("run.dropped_mask")?
        .to_i64()
        .iter()
        .map(|&m| m != 0)
        .collect();
    let recorded =
        RoutePlan::from_decisions(plan.routes.clone(), dropped, config.n_experts, 1, cap);
    let out = sff.dispatch(
        x.clone(),
        route_prob,
        &recorded,
        &mut RoutingRng::seed_from_u64(0),
    );
    report.compare(
        "run.out",
        &host_f32(out.out.clone()),
        file.get("run.out")?,
        FORWARD_TOL,
    );
    report.exact(
        "run.n_dropped",
        &[out.stats.host().n_dropped as i64],
        &file.get("run.n_dropped")?.to_i64(),
    );
    switch_backward(&sff, &x, out.out, file, device, report, "run.grad.")
}

fn model_config(meta: &Value) -> Result<ModelConfig> {
    Ok(ModelConfig {
        n_vocab: meta_usize(meta, "n_vocab")?,
        d_model: meta_usize(meta, "d_model")?,
        heads: meta_usize(meta, "heads")?,
        d_ff: meta_usize(meta, "d_ff")?,
        n_layers: meta_usize(meta, "n_layers")?,
        n_experts: meta_usize(meta, "n_experts")?,
        capacity_factor: meta_f64(meta, "capacity_factor")?,
        drop_tokens: meta_bool(meta, "drop_tokens")?,
        is_scale_prob: meta_bool(meta, "is_scale_prob")?,
        ..Default::default()
    })
}

/// `[seq, batch]` ids from the fixture as a batch-major `[batch, seq]` tensor.
fn ids_batch_major(t: &HostTensor, device: &Device) -> Result<Tensor<2, burn::tensor::Int>> {
    let [s, b] = <[usize; 2]>::try_from(t.shape.as_slice())
        .map_err(|_| anyhow::anyhow!("token ids must be [seq, batch], got {:?}", t.shape))?;
    let v = t.to_i64();
    let mut out = vec![0i64; s * b];
    for si in 0..s {
        for bi in 0..b {
            out[bi * s + si] = v[si * b + bi];
        }
    }
    Ok(Tensor::from_data(TensorData::new(out, [b, s]), device))
}

fn model(file: &TensorFile, device: &Device, report: &mut Report) -> Result<()> {
    let meta = file.meta_json()?;
    let c = model_config(&meta)?;
    if c.drop_tokens {
        bail!(
            "this model fixture drops tokens: which tokens drop is random, so its outputs \
             cannot be compared exactly (record it with drop_tokens=false)"
        );
    }
    let lb_coef = meta_f64(&meta, "lb_coef").unwrap_or(0.01);
    let m: SwitchTransformer = model_from_state_dict(&c, &file.with_prefix("param."), device)?;
    let ids = ids_batch_major(file.get("input_ids")?, device)?;
    let targets = ids_batch_major(file.get("target_ids")?, device)?;
    let [b, s] = ids.dims();
    let mut trace = Trace::new();
    let out = m.forward_traced(ids, &mut RoutingRng::seed_from_u64(0), Some(&mut trace));

    let seq_major = |t: &HostTensor| to_seq_major(&t.to_f32(), b, s);
    report.compare(
        "logits",
        &to_seq_major(&host_f32(out.logits.clone()), b, s),
        file.get("logits")?,
        FORWARD_TOL,
    );
    for (name, ours) in &trace {
        let key = format!("act.{name}");
        if file.contains(&key) {
            report.compare(&key, &seq_major(ours), file.get(&key)?, FORWARD_TOL);
        }
    }
    let stats: Vec<HostStats> = out.stats.iter().map(SwitchStats::host).collect();
    for (l, st) in stats.iter().enumerate() {
        let key = format!("act.layers.{l}.routes");
        if file.contains(&key) {
            report.exact(
                &key,
                &to_seq_major_idx(&st.routes, b, s),
                &file.get(&key)?.to_i64(),
            );
        }
    }
    let cat = |f: &dyn Fn(usize) -> Vec<f32>| -> Vec<f32> { (0..c.n_layers).flat_map(f).collect() };
    let (stats, sums) = (&stats, &out.stats);
    report.compare(
        "counts",
        &cat(&|l| stats[l].counts.clone()),
        file.get("counts")?,
        FORWARD_TOL,
    );
    report.compare(
        "route_prob_sum",
        &cat(&|l| host_f32(sums[l].route_prob_sum.clone())),
        file.get("route_prob_sum")?,
        FORWARD_TOL,
    );
    report.compare(
        "route_prob_max",
        &cat(&|l| to_seq_major(&stats[l].route_prob_max, b, s)),
        file.get("route_prob_max")?,
        FORWARD_TOL,
    );
    let tokens = (b * s) as f32;
    report.compare(
        "route_frac",
        &cat(&|l| stats[l].counts.iter().map(|c| c / tokens).collect()),
        file.get("route_frac")?,
        FORWARD_TOL,
    );
    report.compare(
        "route_prob_mean",
        &cat(&|l| {
            host_f32(sums[l].route_prob_sum.clone())
                .iter()
                .map(|p| p / tokens)
                .collect()
        }),
        file.get("route_prob_mean")?,
        FORWARD_TOL,
    );
    let dropped: Vec<i64> = stats.iter().map(|st| st.n_dropped as i64).collect();
    report.exact("n_dropped", &dropped, &file.get("n_dropped")?.to_i64());

    let losses = Losses::new(out.logits, targets, &out.stats, lb_coef, 0.0);
    report.compare(
        "ce_loss",
        &host_f32(losses.ce.clone()),
        file.get("ce_loss")?,
        FORWARD_TOL,
    );
    report.compare(
        "lb_loss",
        &host_f32(losses.lb.clone()),
        file.get("lb_loss")?,
        FORWARD_TOL,
    );
    report.compare(
        "total_loss",
        &host_f32(losses.total.clone()),
        file.get("total_loss")?,
        FORWARD_TOL,
    );
    let grads = losses.total.backward();
    compare_grads(
        report,
        &model_state_dict(&m, Source::Grads(&grads)),
        file,
        "grad.",
    );
    let norm = ParamGrads::from_gradients(&m, grads).global_norm();
    report.compare(
        "grad_total_norm",
        &[norm as f32],
        file.get("grad_total_norm")?,
        GRAD_TOL,
    );
    Ok(())
}

/// Parameters of the optimizer fixture, flattened (Adam is elementwise).
#[derive(Module, Debug)]
struct FlatParams {
    params: Vec<Param<Tensor<1>>>,
}

fn optimizer(file: &TensorFile, device: &Device, report: &mut Report) -> Result<()> {
    let meta = file.meta_json()?;
    let noam = Noam {
        lr: meta_f64(&meta, "lr")?,
        warmup: meta_usize(&meta, "warmup")? as u64,
        d_model: meta_usize(&meta, "d_model")?,
    };
    let betas = meta
        .get("betas")
        .and_then(Value::as_array)
        .context("fixture metadata has no `betas`")?;
    let mut adam = LabmlAdam::new(
        betas[0].as_f64().context("betas[0]")?,
        betas[1].as_f64().context("betas[1]")?,
        meta_f64(&meta, "eps")?,
    );
    let n_steps = meta_usize(&meta, "n_steps")?;
    let max_norm = meta_f64(&meta, "max_norm")?;
    let names: Vec<String> = file
        .tensors
        .keys()
        .filter_map(|k| k.strip_suffix(".init").map(str::to_string))
        .collect();
    let mut module = FlatParams {
        params: names
            .iter()
            .map(|n| {
                let t = file.get(&format!("{n}.init"))?;
                Ok(Param::from_data(
                    TensorData::new(t.to_f32(), [t.numel()]),
                    device,
                ))
            })
            .collect::<Result<_>>()?,
    };
    for step in 1..=n_steps {
        let mut grads = ParamGrads::default();
        for (n, p) in names.iter().zip(&module.params) {
            let g = file.get(&format!("step{step}.raw_grad.{n}"))?;
            grads.insert(
                p.id,
                Tensor::from_data(TensorData::new(g.to_f32(), [g.numel()]), device),
            );
        }
        let norm = grads.clip_global_norm(max_norm);
        report.compare(
            &format!("step{step}.total_norm"),
            &[norm as f32],
            file.get(&format!("step{step}.total_norm"))?,
            FORWARD_TOL,
        );
        for (n, p) in names.iter().zip(&module.params) {
            let key = format!("step{step}.clipped_grad.{n}");
            let g = host_f32(grads.get(&p.id).expect("inserted above").clone());
            report.compare(&key, &g, file.get(&key)?, FORWARD_TOL);
        }
        let lr = noam.lr(step as u64);
        let expected_lr = file.get(&format!("step{step}.lr"))?.to_f64()[0];
        let lr_err = (lr - expected_lr).abs();
        report.rows.push(Row {
            name: format!("step{step}.lr"),
            max_abs: lr_err,
            max_rel: lr_err / expected_lr.abs(),
            tol: 1e-12,
            pass: lr_err / expected_lr.abs() <= 1e-12,
            note: String::new(),
        });
        module = adam.step(module, &grads, lr);
        for (n, p) in names.iter().zip(&module.params) {
            let key = format!("step{step}.{n}");
            report.compare(&key, &host_f32(p.val()), file.get(&key)?, FORWARD_TOL);
        }
    }
    Ok(())
}
