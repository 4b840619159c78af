//! Replays of the Switch-layer fixtures: the layer alone, with and without dropping, forward
//! and backward.

use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Tensor, TensorData};
use rand::SeedableRng;

use super::*;
use crate::interop::weights::{Source, switch_from_state_dict, switch_state_dict};
use crate::model::switch::SwitchFeedForward;
use crate::routing::{RoutePlan, RoutingOptions, RoutingRng, capacity};
use crate::store::{TensorFile, host_f32};

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

pub(super) fn switch_exact(file: &TensorFile, device: &Device, report: &mut Report) -> Result<()> {
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

pub(super) fn switch_drop(file: &TensorFile, device: &Device, report: &mut Report) -> Result<()> {
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
