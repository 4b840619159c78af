//! Training across ranks: the trainer's distributed path with ranks as threads of this process
//! (`distributed::Threads`), and, with the `mpi` feature, real `mpirun -np 2` jobs of the
//! `switch` binary.

use crate::common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use switch_transformer::data::TextData;
use switch_transformer::distributed::{Collective, Threads};
use switch_transformer::train::placement::{GradSync, Placement};
use switch_transformer::train::{Event, Finish, RunConfig, Trainer};

/// A tiny configuration whose ranks route the whole batch together. Its learning rate warms up
/// over 100 steps: with the tiny configuration's 4 steps, rounding differences between one
/// batch and two halves (1e-9 at the first step) grow to 2e-5 by step 9.
fn config(steps: u64) -> RunConfig {
    let mut c = common::tiny_run_config();
    c.set(&format!("train.steps={steps}")).unwrap();
    c.set("train.warmup=100").unwrap();
    c.set("train.checkpoint_interval=1000").unwrap();
    c.set("train.eval_interval=1000").unwrap();
    c.train.global_routing = true;
    c
}

fn placement(world: Option<Arc<dyn Collective>>) -> Placement {
    Placement {
        devices: vec![common::test_device()],
        grad_sync: GradSync::Broadcast,
        world,
    }
}

/// The training losses of `run`'s metrics, in step order.
fn losses(run: &Path) -> Vec<f64> {
    metric(run, |m| match m {
        switch_transformer::train::MetricsLine::Train(t) => Some(t.train_loss),
        _ => None,
    })
}

/// The validation losses of `run`'s metrics, in step order.
fn valid_losses(run: &Path) -> Vec<f64> {
    metric(run, |m| match m {
        switch_transformer::train::MetricsLine::Valid(v) => Some(v.valid_loss),
        _ => None,
    })
}

/// `pick` of each line of `run`'s metrics that has it, in order.
fn metric(
    run: &Path,
    pick: impl Fn(switch_transformer::train::MetricsLine) -> Option<f64>,
) -> Vec<f64> {
    switch_transformer::train::RunDir::new(run)
        .read_metrics()
        .unwrap()
        .into_iter()
        .filter_map(pick)
        .collect()
}

fn assert_close(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: {a:?} vs {b:?}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5 * x.abs().max(1.0),
            "{what}: step {}: {x} vs {y}",
            i + 1
        );
    }
}

/// `f(rank's world)` on `n` ranks, each a thread; the results in rank order.
fn on_ranks<R: Send>(n: usize, f: impl Fn(Arc<dyn Collective>) -> R + Sync) -> Vec<R> {
    let worlds = Threads::group(n, Duration::from_secs(120));
    std::thread::scope(|scope| {
        let f = &f;
        let running: Vec<_> = worlds
            .into_iter()
            .map(|w| scope.spawn(move || f(Arc::new(w))))
            .collect();
        running.into_iter().map(|r| r.join().unwrap()).collect()
    })
}

/// A new run of `c` in `run` on `n` ranks (1: one process, no ranks), stopped after
/// `stop_after` steps if given.
fn train_on_ranks(n: usize, c: &RunConfig, text: &Path, run: &Path, stop_after: Option<u64>) {
    let data = || TextData::load(text, c.train.seq_len + 1).unwrap();
    let go = |trainer: &mut Trainer| {
        let stop = AtomicBool::new(false);
        trainer
            .run(&stop, &mut |e| {
                if let Event::Step(s) = e
                    && Some(s.step) == stop_after
                {
                    stop.store(true, Ordering::SeqCst);
                }
            })
            .unwrap()
    };
    if n == 1 {
        go(&mut Trainer::create(c.clone(), data(), run, placement(None)).unwrap());
        return;
    }
    on_ranks(n, |world| {
        let mut c = c.clone();
        c.train.replicas = n;
        let mut t = Trainer::create(c, data(), run, placement(Some(world))).unwrap();
        go(&mut t)
    });
}

/// Resumes `run` on `n` ranks (1: one process) to its end.
fn resume_on_ranks(n: usize, text: &Path, run: &Path) -> Vec<Finish> {
    let seq = switch_transformer::train::RunDir::new(run)
        .read_config()
        .unwrap()
        .train
        .seq_len;
    let data = || TextData::load(text, seq + 1).unwrap();
    let go = |placement: Placement| {
        Trainer::resume(run, data(), placement)
            .unwrap()
            .run(&AtomicBool::new(false), &mut |_| {})
            .unwrap()
    };
    if n == 1 {
        return vec![go(placement(None))];
    }
    on_ranks(n, |world| go(placement(Some(world))))
}

fn setup(name: &str) -> (PathBuf, PathBuf) {
    let tmp = common::temp_dir(name);
    let text = common::training_text(&tmp);
    (tmp, text)
}

/// An agreed start: one rank's failure reaches every rank with its message, in one exchange;
/// when every rank succeeds each keeps its own value.
#[test]
fn one_rank_s_failure_to_start_reaches_every_rank() {
    use switch_transformer::distributed::agree;
    let results = on_ranks(3, |w| {
        let mine = if w.rank() == 1 {
            Err(anyhow::anyhow!("no data on rank 1"))
        } else {
            Ok(w.rank())
        };
        agree(Some(w.as_ref()), "starting", mine).map_err(|e| format!("{e:#}"))
    });
    assert_eq!(results[1], Err("no data on rank 1".to_string()));
    for r in [0, 2] {
        let e = results[r].clone().unwrap_err();
        assert!(
            e.contains("rank 1") && e.contains("no data on rank 1"),
            "{e}"
        );
    }
    let results = on_ranks(2, |w| {
        agree(Some(w.as_ref()), "starting", Ok(w.rank())).unwrap()
    });
    assert_eq!(results, [0, 1]);
}

#[test]
fn two_ranks_take_the_steps_of_one_process() {
    let (tmp, text) = setup("dist-same");
    let c = config(20);
    train_on_ranks(1, &c, &text, &tmp.join("one"), None);
    train_on_ranks(2, &c, &text, &tmp.join("two"), None);
    let (one, two) = (losses(&tmp.join("one")), losses(&tmp.join("two")));
    assert_eq!(one.len(), 20);
    assert_close(&one, &two, "2 ranks vs one process");
    // Rank 0 alone wrote the run: one set of metrics lines, one checkpoint at the end.
    let steps: Vec<u64> =
        switch_transformer::train::checkpoint::list(&tmp.join("two").join("checkpoints"))
            .into_iter()
            .map(|(s, _)| s)
            .collect();
    assert_eq!(steps, [20]);
    let saved = RunConfig::from_toml_file(&tmp.join("two").join("config.toml")).unwrap();
    assert_eq!(saved.train.replicas, 2);
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn checkpoints_resume_on_another_number_of_ranks() {
    let (tmp, text) = setup("dist-resume");
    let c = config(10);
    train_on_ranks(1, &c, &text, &tmp.join("straight"), None);
    let straight = losses(&tmp.join("straight"));
    // Started on 2 ranks, stopped after step 4 (every rank stops there, rank 0 checkpoints),
    // resumed in one process.
    let a = tmp.join("two-then-one");
    train_on_ranks(2, &c, &text, &a, Some(4));
    assert_eq!(losses(&a).len(), 4);
    assert_eq!(resume_on_ranks(1, &text, &a), [Finish::Completed]);
    assert_close(&straight, &losses(&a), "2 ranks, then one process");
    // Started in one process, resumed on 2 ranks.
    let b = tmp.join("one-then-two");
    train_on_ranks(1, &c, &text, &b, Some(4));
    assert_eq!(
        resume_on_ranks(2, &text, &b),
        [Finish::Completed, Finish::Completed]
    );
    assert_close(&straight, &losses(&b), "one process, then 2 ranks");
    let saved = RunConfig::from_toml_file(&b.join("config.toml")).unwrap();
    assert_eq!(saved.train.replicas, 2, "the resumed run records its ranks");
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn ranks_whose_weights_differ_are_stopped_naming_the_step() {
    let (tmp, text) = setup("dist-differ");
    let run = tmp.join("run");
    let errors = on_ranks(2, |world| {
        let mut c = config(4);
        c.train.replicas = 2;
        // Rank 1 initialises from another seed: not the same model.
        c.train.seed += world.rank() as u64;
        let data = TextData::load(&text, c.train.seq_len + 1).unwrap();
        let mut t = Trainer::create(c, data, &run, placement(Some(world))).unwrap();
        t.run(&AtomicBool::new(false), &mut |_| {})
            .unwrap_err()
            .to_string()
    });
    for e in errors {
        assert!(
            e.contains("step 0") && e.contains("parameters differ"),
            "{e}"
        );
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn the_bench_times_the_exchanges_and_every_rank_s_memory() {
    use switch_transformer::tools::bench::{BenchConfig, bench_train};
    let c = common::tiny_run_config();
    let bench = BenchConfig {
        model: c.model.clone(),
        batch_size: 4,
        seq_len: 16,
        warmup: 1,
        steps: 3,
        threads: 1,
        device: "cpu".into(),
        replicas: 2,
        global_routing: true,
        expert_parallel: false,
    };
    let results = on_ranks(2, |world| {
        bench_train(&bench, placement(Some(world))).unwrap()
    });
    for r in &results {
        assert_eq!(r.ranks, 2);
        assert!(r.exchange_ms_median > 0.0, "{}", r.exchange_ms_median);
        assert!(r.exchange_ms_median < r.ms_per_step_median);
        assert_eq!(r.peak_rss_mb_ranks.len(), 2);
        assert!(!r.exchanges.contains_key("tokens to their experts"));
    }
    // Expert-parallel: the tokens travel, the experts' gradients do not.
    let sharded = BenchConfig {
        expert_parallel: true,
        ..bench.clone()
    };
    let sharded = on_ranks(2, |world| {
        bench_train(&sharded, placement(Some(world))).unwrap()
    });
    let bytes = |r: &switch_transformer::tools::bench::TrainBench, name: &str| {
        r.exchanges.get(name).map_or(0.0, |e| e.bytes_median)
    };
    for (dp, ep) in results.iter().zip(&sharded) {
        assert!(
            bytes(ep, "tokens to their experts") > 0.0,
            "{:?}",
            ep.exchanges
        );
        assert!(bytes(ep, "expert outputs back to their tokens") > 0.0);
        // The all-reduce leaves out every expert's gradient (4 experts x 4,192 values in each
        // of the 2 layers, f32) and their 8 presence flags.
        let (d, e) = (bytes(dp, "gradients"), bytes(ep, "gradients"));
        let expert_bytes = (4 * (4 * (32 * 64 + 64 + 64 * 32 + 32) * 2 + 8)) as f64;
        assert_eq!(d - e, expert_bytes, "{d} vs {e}");
    }
}

/// A rank's world whose `occurrence`-th exchange named `what` fails, as an exchange with a rank
/// that died would; every other exchange goes through the threads' world.
struct FailingExchange {
    inner: Threads,
    what: &'static str,
    occurrence: usize,
    seen: std::sync::atomic::AtomicUsize,
}

impl FailingExchange {
    fn check(&self, what: &str) -> anyhow::Result<()> {
        if what == self.what && self.seen.fetch_add(1, Ordering::SeqCst) + 1 == self.occurrence {
            anyhow::bail!(
                "{what}: rank {}'s peer is gone (injected)",
                self.inner.rank()
            );
        }
        Ok(())
    }
}

impl Collective for FailingExchange {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn all_reduce_sum(&self, what: &str, values: &mut [f32]) -> anyhow::Result<()> {
        self.check(what)?;
        self.inner.all_reduce_sum(what, values)
    }
    fn all_reduce_sum_f64(&self, what: &str, values: &mut [f64]) -> anyhow::Result<()> {
        self.check(what)?;
        self.inner.all_reduce_sum_f64(what, values)
    }
    fn all_gather(&self, what: &str, mine: &[f32]) -> anyhow::Result<Vec<f32>> {
        self.check(what)?;
        self.inner.all_gather(what, mine)
    }
    fn broadcast(&self, what: &str, root: usize, bytes: &mut Vec<u8>) -> anyhow::Result<()> {
        self.check(what)?;
        self.inner.broadcast(what, root, bytes)
    }
    fn gather(&self, what: &str, root: usize, mine: &[f32]) -> anyhow::Result<Option<Vec<f32>>> {
        self.check(what)?;
        self.inner.gather(what, root, mine)
    }
    fn all_to_all_v(
        &self,
        what: &str,
        send: &[f32],
        send_counts: &[usize],
        recv_counts: &[usize],
    ) -> anyhow::Result<Vec<f32>> {
        self.check(what)?;
        self.inner
            .all_to_all_v(what, send, send_counts, recv_counts)
    }
    fn set_step(&self, step: u64) {
        self.inner.set_step(step)
    }
    fn exchange_tally(
        &self,
    ) -> std::collections::BTreeMap<String, switch_transformer::distributed::Tally> {
        self.inner.exchange_tally()
    }
    fn in_process(&self) -> bool {
        true
    }
}

/// An exchange that fails inside the forward or the backward pass (the routing decision, the
/// tokens' trip to their experts and the gradients' trip back) ends the run on every rank with
/// the exchange's message: an error from `run`, not a panic.
#[test]
fn an_exchange_that_fails_inside_a_pass_ends_the_run_with_its_message() {
    let tmp = common::temp_dir("exchange-fault");
    let text = common::training_text(&tmp);
    let sharded_alone = {
        let mut c = expert_parallel(4);
        c.train.global_routing = false;
        c
    };
    // 2 Switch layers: the forward pass sends tokens to their experts twice, so the third
    // time is the backward pass of the second layer's return trip.
    let cases = [
        ("routing probabilities", 1, config(4)),
        ("routing plan", 1, config(4)),
        ("kept assignments per expert", 2, sharded_alone),
        ("tokens to their experts", 1, expert_parallel(4)),
        ("tokens to their experts", 3, expert_parallel(4)),
        ("expert outputs back to their tokens", 1, expert_parallel(4)),
    ];
    for (i, (what, occurrence, c)) in cases.into_iter().enumerate() {
        let run = tmp.join(format!("run-{i}"));
        let errors = std::thread::scope(|scope| {
            let running: Vec<_> = Threads::group(2, Duration::from_secs(60))
                .into_iter()
                .map(|inner| {
                    let world: Arc<dyn Collective> = Arc::new(FailingExchange {
                        inner,
                        what,
                        occurrence,
                        seen: Default::default(),
                    });
                    let (mut c, run, text) = (c.clone(), &run, &text);
                    scope.spawn(move || {
                        c.train.replicas = 2;
                        let data = TextData::load(text, c.train.seq_len + 1).unwrap();
                        let mut t = Trainer::create(c, data, run, placement(Some(world))).unwrap();
                        t.run(&AtomicBool::new(false), &mut |_| {})
                            .map(|_| ())
                            .map_err(|e| format!("{e:#}"))
                    })
                })
                .collect();
            running
                .into_iter()
                .map(|r| r.join().expect("a rank panicked"))
                .collect::<Vec<_>>()
        });
        for (rank, e) in errors.into_iter().enumerate() {
            let e = e.expect_err("the run went on after a failed exchange");
            assert!(
                e.contains(&format!("{what}: rank {rank}'s peer is gone (injected)")),
                "{what} #{occurrence}, rank {rank}: {e}"
            );
        }
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// Auxiliary-loss-free balancing across ranks: every rank updates its experts' biases from the
/// job's load (the step's routing statistics, summed over the ranks), so all ranks hold the same
/// biases, whether they route together or each its own tokens, with replicated or sharded
/// experts; the biases move, and the checkpoint holds them.
#[test]
fn expert_biases_are_the_same_on_every_rank() {
    let tmp = common::temp_dir("bias-ranks");
    let text = common::training_text(&tmp);
    for (i, (global, sharded)) in [(true, false), (false, false), (true, true), (false, true)]
        .into_iter()
        .enumerate()
    {
        let mut c = if sharded {
            expert_parallel(4)
        } else {
            config(4)
        };
        c.train.global_routing = global;
        c.set("model.balance=bias").unwrap();
        c.set("model.bias_rate=0.01").unwrap();
        let run = tmp.join(format!("run-{i}"));
        let biases = on_ranks(2, |world| {
            let mut c = c.clone();
            c.train.replicas = 2;
            let data = TextData::load(&text, c.train.seq_len + 1).unwrap();
            let mut t = Trainer::create(c, data, &run, placement(Some(world))).unwrap();
            t.run(&AtomicBool::new(false), &mut |_| {}).unwrap();
            t.model()
                .layers
                .iter()
                .filter_map(|b| b.switch())
                .map(|s| {
                    s.expert_bias
                        .as_ref()
                        .expect("balance = bias")
                        .values
                        .clone()
                })
                .collect::<Vec<_>>()
        });
        let what = format!("global routing {global}, sharded experts {sharded}");
        assert_eq!(biases[0], biases[1], "{what}");
        assert_eq!(biases[0].len(), 2, "{what}: one per Switch layer");
        assert!(
            biases[0].iter().flatten().any(|&b| b != 0.0),
            "{what}: the biases never moved"
        );
        // 4 steps of +-0.01 (or 0 at exactly the mean load).
        assert!(
            biases[0].iter().flatten().all(|b| b.abs() <= 0.04 + 1e-6),
            "{what}"
        );
        let latest = switch_transformer::train::RunDir::new(&run)
            .latest_checkpoint()
            .expect("a checkpoint at the end");
        let saved = switch_transformer::store::TensorFile::read(&latest.join("model.safetensors"))
            .unwrap()
            .tensors;
        for (l, want) in [0, 1].into_iter().zip(&biases[0]) {
            let name = format!("transformer.layers.{l}.feed_forward.expert_bias");
            assert_eq!(&saved[&name].to_f32(), want, "{what}: {name}");
        }
    }
    // Stopped after step 3 and resumed in one process: the same run as one without a stop
    // (the biases came back from the checkpoint: the losses of steps 4-8 depend on them).
    let mut c = config(8);
    c.set("model.balance=bias").unwrap();
    c.set("model.bias_rate=0.05").unwrap();
    train_on_ranks(1, &c, &text, &tmp.join("straight"), None);
    train_on_ranks(1, &c, &text, &tmp.join("stopped"), Some(3));
    assert_eq!(
        resume_on_ranks(1, &text, &tmp.join("stopped")),
        [Finish::Completed]
    );
    assert_eq!(losses(&tmp.join("straight")), losses(&tmp.join("stopped")));
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// The expert-parallel run `c` trained in one process with every expert (`tmp/one`) and on 2
/// thread ranks (`tmp/two`); `inspect` of each rank's trainer at its end, in rank order.
fn one_process_and_two_ranks<R: Send>(
    c: &RunConfig,
    tmp: &Path,
    text: &Path,
    inspect: impl Fn(&Trainer) -> R + Sync,
) -> Vec<R> {
    let mut one = c.clone();
    one.train.expert_parallel = false;
    train_on_ranks(1, &one, text, &tmp.join("one"), None);
    let run = tmp.join("two");
    on_ranks(2, |world| {
        let mut c = c.clone();
        c.train.replicas = 2;
        let data = TextData::load(text, c.train.seq_len + 1).unwrap();
        let mut t = Trainer::create(c, data, &run, placement(Some(world))).unwrap();
        t.run(&AtomicBool::new(false), &mut |_| {}).unwrap();
        inspect(&t)
    })
}

/// [`config`] with the experts sharded over the ranks.
fn expert_parallel(steps: u64) -> RunConfig {
    let mut c = config(steps);
    c.train.expert_parallel = true;
    c
}

#[test]
fn expert_parallel_ranks_take_the_steps_of_one_process() {
    let (tmp, text) = setup("ep-same");
    let run = tmp.join("two");
    let held = one_process_and_two_ranks(&expert_parallel(20), &tmp, &text, |t| {
        // What this rank holds of each Switch layer: its share of the experts.
        let s = t.replicas()[0].model.layers[0].switch().unwrap();
        (s.local_experts(), s.n_experts())
    });
    assert_eq!(held, [(2, 4), (2, 4)], "each rank holds 2 of the 4 experts");
    let (a, b) = (losses(&tmp.join("one")), losses(&run));
    assert_eq!(a.len(), 20);
    assert_close(&a, &b, "2 expert-parallel ranks vs one process");
    // Validation (on the experts gathered to rank 0) and the checkpoint: the whole model.
    assert_close(
        &valid_losses(&tmp.join("one")),
        &valid_losses(&run),
        "validation",
    );
    let dir = &switch_transformer::train::checkpoint::list(&run.join("checkpoints"))[0].1;
    let loaded = switch_transformer::train::checkpoint::load(
        dir,
        &RunConfig::from_toml_file(&run.join("config.toml"))
            .unwrap()
            .model,
        Default::default(),
        &common::test_device().autodiff(),
    )
    .unwrap();
    assert_eq!(loaded.model.layers[1].switch().unwrap().local_experts(), 4);
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// Shared experts are replicated under expert parallelism (each rank holds all of them and
/// the same copy), with the sequence-level balancing loss: 2 ranks take the steps of one
/// process, and the checkpoint holds the shared experts once.
#[test]
fn shared_experts_are_replicated_on_expert_parallel_ranks() {
    let (tmp, text) = setup("ep-shared");
    let mut c = expert_parallel(8);
    c.set("model.shared_experts=1").unwrap();
    c.set("model.shared_d_ff=16").unwrap();
    c.set("model.balance_scope=sequence").unwrap();
    let run = tmp.join("two");
    let shared = one_process_and_two_ranks(&c, &tmp, &text, |t| {
        let s = t.replicas()[0].model.layers[0].switch().unwrap();
        assert_eq!(s.local_experts(), 2);
        switch_transformer::store::host_f32(s.shared.as_ref().unwrap().layer1.weight.val())
    });
    assert_eq!(
        shared[0].len(),
        32 * 16,
        "each rank holds the whole shared expert"
    );
    assert_eq!(shared[0], shared[1], "the same copy on every rank");
    assert_close(
        &losses(&tmp.join("one")),
        &losses(&run),
        "2 expert-parallel ranks with a shared expert vs one process",
    );
    let file = switch_transformer::store::TensorFile::read(
        &switch_transformer::train::checkpoint::list(&run.join("checkpoints"))[0]
            .1
            .join("model.safetensors"),
    )
    .unwrap();
    let name = "transformer.layers.0.feed_forward.shared_experts.layer1.weight";
    assert_eq!(file.get(name).unwrap().shape, [16, 32]);
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn expert_parallel_checkpoints_resume_on_one_process_and_back() {
    let (tmp, text) = setup("ep-resume");
    let c = expert_parallel(10);
    let mut plain = c.clone();
    plain.train.expert_parallel = false;
    train_on_ranks(1, &plain, &text, &tmp.join("straight"), None);
    let straight = losses(&tmp.join("straight"));
    // 2 expert-parallel ranks stop after step 4 (the experts gathered into the checkpoint);
    // one process resumes with every expert.
    let a = tmp.join("two-then-one");
    train_on_ranks(2, &c, &text, &a, Some(4));
    assert_eq!(losses(&a).len(), 4);
    assert_eq!(resume_on_ranks(1, &text, &a), [Finish::Completed]);
    assert_close(
        &straight,
        &losses(&a),
        "2 expert-parallel ranks, then one process",
    );
    // One process stops after step 4; 2 ranks resume and shard the experts.
    let b = tmp.join("one-then-two");
    train_on_ranks(1, &plain, &text, &b, Some(4));
    let finishes = on_ranks(2, |world| {
        let data = TextData::load(&text, c.train.seq_len + 1).unwrap();
        let sharded = ["train.expert_parallel=true".to_string()];
        let mut t = Trainer::resume_with(&b, data, placement(Some(world)), &sharded).unwrap();
        assert_eq!(
            t.replicas()[0].model.layers[0]
                .switch()
                .unwrap()
                .local_experts(),
            2
        );
        t.run(&AtomicBool::new(false), &mut |_| {}).unwrap()
    });
    assert_eq!(finishes, [Finish::Completed, Finish::Completed]);
    assert_close(
        &straight,
        &losses(&b),
        "one process, then 2 expert-parallel ranks",
    );
    let saved = RunConfig::from_toml_file(&b.join("config.toml")).unwrap();
    assert!(saved.train.expert_parallel, "the resumed run records it");
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn per_rank_routing_with_sharded_experts_is_per_rank_data_parallelism() {
    // Each rank routes its own tokens (capacity per rank, as in the paper): sharding the
    // experts moves the tokens, not the arithmetic.
    let (tmp, text) = setup("ep-alone");
    let mut dp = config(10);
    dp.train.global_routing = false;
    let mut ep = dp.clone();
    ep.train.expert_parallel = true;
    train_on_ranks(2, &dp, &text, &tmp.join("dp"), None);
    train_on_ranks(2, &ep, &text, &tmp.join("ep"), None);
    let (a, b) = (losses(&tmp.join("dp")), losses(&tmp.join("ep")));
    assert_eq!(a.len(), 10);
    assert_close(&a, &b, "per-rank routing: data- vs expert-parallel");
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn expert_parallelism_is_refused_where_it_cannot_run() {
    let (tmp, text) = setup("ep-refused");
    let data = || TextData::load(&text, 17).unwrap();
    // One process: no ranks to shard over.
    let run = tmp.join("one");
    let e = Trainer::create(expert_parallel(2), data(), &run, placement(None))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--distributed"), "{e}");
    assert!(!run.exists(), "nothing written");
    // Each rank's error when `c` starts on its `replicas` ranks.
    let refused = |c: RunConfig, name: &str| {
        on_ranks(c.train.replicas, |world| {
            let run = tmp.join(format!("{name}-{}", world.rank()));
            Trainer::create(c.clone(), data(), &run, placement(Some(world)))
                .err()
                .unwrap()
                .to_string()
        })
    };
    // 4 experts over 3 ranks; expert dropout (the grouped kernel has none).
    let mut c = expert_parallel(2);
    c.train.batch_size = 6;
    c.train.replicas = 3;
    for e in refused(c, "three") {
        assert!(
            e.contains("n_experts = 4 cannot be split over 3 ranks"),
            "{e}"
        );
    }
    let mut c = expert_parallel(2);
    c.train.replicas = 2;
    c.model.expert_dropout = 0.1;
    for e in refused(c, "dropout") {
        assert!(e.contains("expert_dropout"), "{e}");
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn a_distributed_run_needs_an_mpi_launcher() {
    let tmp = common::temp_dir("dist-cli");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switch"))
        .args(["train", "--distributed", "--set", "train.steps=1"])
        .current_dir(&tmp)
        .env_remove("OMPI_COMM_WORLD_SIZE")
        .env_remove("PMI_SIZE")
        .env_remove("PMIX_RANK")
        .env_remove("SLURM_NTASKS")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    if cfg!(feature = "mpi") {
        assert!(err.contains("needs an MPI launcher"), "{err}");
    } else {
        assert!(err.contains("needs the `mpi` feature"), "{err}");
    }
    assert!(!tmp.join("runs").exists(), "nothing written");
    std::fs::remove_dir_all(&tmp).unwrap();
}

/// Real MPI jobs: `mpirun -np 2` of the `switch` binary (built with `--features mpi`).
#[cfg(feature = "mpi")]
mod mpi_jobs {
    use super::*;
    use std::process::{Child, Command, Output, Stdio};

    /// `switch train` arguments for a run NAME of [`config`]`(steps)` (the thread-rank tests'
    /// configuration) checkpointing every `every` steps, written to `dir/NAME.toml`.
    fn switch_args(data: &Path, dir: &Path, name: &str, steps: u64, every: u64) -> Vec<String> {
        let mut c = config(steps);
        c.train.checkpoint_interval = every;
        let file = dir.join(format!("{name}.toml"));
        std::fs::write(&file, c.to_toml()).unwrap();
        ["train", "--name", name, "--config"]
            .iter()
            .map(|s| s.to_string())
            .chain([file.display().to_string(), "--data".into()])
            .chain([data.display().to_string()])
            .collect()
    }

    /// Starts `mpirun -np 2 switch ARGS --distributed` (a run `runs/r` in `tmp`) and returns it
    /// once the run has a checkpoint, with the run's directory.
    fn start_until_checkpoint(args: &[String], tmp: &Path, stderr: Stdio) -> (Child, PathBuf) {
        let run = tmp.join("runs/r");
        let job = mpirun(2, args, tmp)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        common::wait_for("a checkpoint", Duration::from_secs(120), || {
            !switch_transformer::train::checkpoint::list(&run.join("checkpoints")).is_empty()
        });
        (job, run)
    }

    /// `mpirun -np n switch ARGS --distributed` in `cwd`.
    fn mpirun(n: usize, args: &[String], cwd: &Path) -> Command {
        let mut c = Command::new("mpirun");
        c.args([
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            &n.to_string(),
        ])
        .arg(env!("CARGO_BIN_EXE_switch"))
        .args(args)
        .arg("--distributed")
        .current_dir(cwd)
        .env_remove("RUST_LOG");
        c
    }

    fn ok(out: Output, what: &str) -> Output {
        assert!(
            out.status.success(),
            "{what}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Rank 0's pid, from the run's lock file.
    fn rank0_pid(run: &Path) -> i32 {
        let lock = std::fs::read_to_string(run.join("lock")).unwrap();
        lock.split_whitespace().next().unwrap().parse().unwrap()
    }

    /// `switch finetune` arguments of a run NAME in `tmp` (its pairs written there) of the
    /// `start` fixture with the data-parallel tests' settings and then `extra`.
    fn finetune_args(tmp: &Path, name: &str, extra: &[&str]) -> Vec<String> {
        let (train, valid) = (tmp.join("train.jsonl"), tmp.join("valid.jsonl"));
        if !train.exists() {
            crate::finetune::pairs(&train, 24, 5);
            crate::finetune::pairs(&valid, 10, 6);
        }
        let model = common::manifest_dir().join("tests/data/hf-finetune/start");
        let mut a: Vec<String> = vec!["finetune".into(), "--name".into(), name.into()];
        for (flag, path) in [("--model", model), ("--train", train), ("--valid", valid)] {
            a.push(flag.into());
            a.push(path.display().to_string());
        }
        for s in crate::finetune::PARALLEL_SETTINGS.iter().chain(extra) {
            a.push("--set".into());
            a.push(s.to_string());
        }
        a
    }

    /// `mpirun -np 2 switch finetune --distributed`: the two processes split each update's
    /// micro-batches (grad_accum = 2, dropout and jitter on) and the validations, and end with
    /// the model, metrics and generations of one process, bit for bit; rank 0 alone reports.
    #[test]
    fn mpirun_two_processes_finetune_as_one() {
        let tmp = common::temp_dir("mpi-finetune");
        let args = |name: &str| finetune_args(&tmp, name, &[]);
        ok(
            Command::new(env!("CARGO_BIN_EXE_switch"))
                .args(args("one"))
                .current_dir(&tmp)
                .output()
                .unwrap(),
            "one process",
        );
        let out = ok(
            mpirun(2, &args("two"), &tmp).output().unwrap(),
            "mpirun -np 2 switch finetune",
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            stdout.matches("wrote ").count(),
            1,
            "rank 0 reports: {stdout}"
        );
        assert!(
            stdout.contains("split over 2 workers (1 replicas x 2 ranks)"),
            "{stdout}"
        );
        // Rank 0 says what the exchanges took, the longest kinds first.
        let exchanges = stdout
            .lines()
            .find(|l| l.starts_with("exchanges between the 2 ranks"))
            .unwrap_or_else(|| panic!("no exchange line: {stdout}"));
        assert!(exchanges.contains(" MB), "), "{exchanges}");
        let (one, two) = (tmp.join("runs/one"), tmp.join("runs/two"));
        for f in ["model/model.safetensors", "generations.jsonl"] {
            let same = std::fs::read(one.join(f)).unwrap() == std::fs::read(two.join(f)).unwrap();
            assert!(same, "{f} of mpirun -np 2 differs from one process's");
        }
        assert_eq!(
            crate::finetune::metric_lines(&one),
            crate::finetune::metric_lines(&two)
        );
    }

    /// SIGTERM to rank 0 of a `switch finetune` job: every rank stops after the same update
    /// (exit status 130) with one checkpoint; `mpirun -np 2 switch finetune --resume` finishes
    /// the run with the model of one process that never stopped, bit for bit.
    #[test]
    fn a_terminated_finetune_job_checkpoints_and_resumes_on_the_ranks() {
        let tmp = common::temp_dir("mpi-finetune-term");
        let long = ["max_steps=400", "eval_every=0", "save_every=0"];
        ok(
            Command::new(env!("CARGO_BIN_EXE_switch"))
                .args(finetune_args(&tmp, "one", &long))
                .current_dir(&tmp)
                .output()
                .unwrap(),
            "one process",
        );
        let run = tmp.join("runs/two");
        let mut job = mpirun(2, &finetune_args(&tmp, "two", &long), &tmp)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        common::wait_for("5 updates", Duration::from_secs(120), || {
            std::fs::read_to_string(run.join("metrics.jsonl")).is_ok_and(|m| m.lines().count() >= 5)
        });
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(rank0_pid(&run), libc::SIGTERM) };
        let status = common::exits_within(&mut job, Duration::from_secs(60), "the job to end");
        assert!(!status.success(), "a stopped job is not a finished one");
        let checkpoints: Vec<_> = std::fs::read_dir(&run)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("model-step-"))
            .collect();
        assert_eq!(checkpoints.len(), 1, "one checkpoint of the stopped update");
        assert!(!run.join("model").exists());
        ok(
            mpirun(
                2,
                &["finetune".into(), "--resume".into(), "runs/two".into()],
                &tmp,
            )
            .output()
            .unwrap(),
            "mpirun -np 2 switch finetune --resume",
        );
        let same = std::fs::read(tmp.join("runs/one/model/model.safetensors")).unwrap()
            == std::fs::read(run.join("model/model.safetensors")).unwrap();
        assert!(
            same,
            "the resumed job differs from one process never stopped"
        );
        assert_eq!(
            crate::finetune::metric_lines(&tmp.join("runs/one")),
            crate::finetune::metric_lines(&run)
        );
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn mpirun_two_processes_take_the_steps_of_one() {
        let (tmp, text) = setup("mpi-same");
        ok(
            Command::new(env!("CARGO_BIN_EXE_switch"))
                .args(switch_args(&text, &tmp, "one", 20, 1000))
                .current_dir(&tmp)
                .output()
                .unwrap(),
            "one process",
        );
        let out = ok(
            mpirun(2, &switch_args(&text, &tmp, "two", 20, 1000), &tmp)
                .output()
                .unwrap(),
            "mpirun -np 2",
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            stdout.matches("run runs/two").count(),
            1,
            "rank 0 reports: {stdout}"
        );
        let (one, two) = (losses(&tmp.join("runs/one")), losses(&tmp.join("runs/two")));
        assert_eq!(one.len(), 20);
        assert_close(&one, &two, "mpirun -np 2 vs one process");
        // Expert-parallel: each process holds 2 of the 4 experts; tokens travel by Alltoallv.
        let mut args = switch_args(&text, &tmp, "ep", 20, 1000);
        args.push("--expert-parallel".into());
        ok(
            mpirun(2, &args, &tmp).output().unwrap(),
            "mpirun -np 2 --expert-parallel",
        );
        let ep = losses(&tmp.join("runs/ep"));
        assert_close(&one, &ep, "mpirun -np 2 --expert-parallel vs one process");
        let saved = RunConfig::from_toml_file(&tmp.join("runs/ep/config.toml")).unwrap();
        assert!(saved.train.expert_parallel);
        // The checkpoint of 2 ranks is an ordinary run: eval reads it.
        ok(
            Command::new(env!("CARGO_BIN_EXE_switch"))
                .args(["eval", "--run", "runs/two"])
                .current_dir(&tmp)
                .output()
                .unwrap(),
            "eval of the 2-rank run",
        );
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn mpirun_bench_reports_once_for_the_job() {
        let tmp = common::temp_dir("mpi-bench");
        let args: Vec<String> = [
            "bench",
            "--json",
            "--steps",
            "2",
            "--layers",
            "1",
            "--global-routing",
        ]
        .iter()
        .chain(&common::TINY_BENCH_ARGS)
        .map(|s| s.to_string())
        .collect();
        let out = ok(mpirun(2, &args, &tmp).output().unwrap(), "mpirun bench");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.len(), 1, "{stdout}");
        let r: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(r["ranks"], 2);
        assert_eq!(r["peak_rss_mb_ranks"].as_array().unwrap().len(), 2);
        assert!(r["exchange_ms_median"].as_f64().unwrap() > 0.0);
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    /// A rank that cannot start ends the whole job within seconds with its reason (an agreed
    /// start, `distributed::agree`), instead of the others waiting in their first exchange until
    /// the time-out: rank 0 refusing the name of an existing run, and a run another live
    /// process holds.
    #[test]
    fn a_rank_that_cannot_start_ends_the_job_with_its_reason() {
        let (tmp, text) = setup("mpi-refused-start");
        let args = switch_args(&text, &tmp, "r", 2, 1000);
        ok(
            Command::new(env!("CARGO_BIN_EXE_switch"))
                .args(&args)
                .current_dir(&tmp)
                .output()
                .unwrap(),
            "the first run",
        );
        let within = |args: &[String], needle: &str| {
            let t0 = std::time::Instant::now();
            let out = mpirun(2, args, &tmp).output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{err}");
            assert!(err.contains(needle), "{err}");
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "took {:?}: {err}",
                t0.elapsed()
            );
        };
        within(&args, "already holds a run");
        // A live process (this test's) holds the run's lock: --resume is refused on rank 0.
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        let lock = tmp.join("runs/r/lock");
        std::fs::write(&lock, format!("{} {}\n", std::process::id(), host.trim())).unwrap();
        let resume: Vec<String> = ["train", "--resume", "runs/r", "--data"]
            .iter()
            .map(|s| s.to_string())
            .chain([text.display().to_string()])
            .collect();
        within(&resume, "lock");
        std::fs::remove_file(&lock).unwrap();
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    /// Ranks given different jobs (another text with the same characters, another
    /// `train.lr`) are stopped before the first step, naming what differs, and nothing is
    /// trained (MPMD: `mpirun -np 1 A : -np 1 B`).
    #[test]
    fn ranks_that_start_different_jobs_are_stopped_naming_the_difference() {
        let (tmp, text) = setup("mpi-disagree");
        // The same characters, another order: another SHA-256.
        let other = tmp.join("other.txt");
        let mut chars: Vec<char> = std::fs::read_to_string(&text).unwrap().chars().collect();
        chars.reverse();
        std::fs::write(&other, chars.into_iter().collect::<String>()).unwrap();
        let rank_args = |data: &Path, extra: &[&str]| -> Vec<String> {
            let mut a = vec![env!("CARGO_BIN_EXE_switch").to_string()];
            a.extend(switch_args(data, &tmp, "r", 2, 1000));
            a.extend(extra.iter().map(|s| s.to_string()));
            a.push("--distributed".into());
            a
        };
        for (second, needle) in [
            (rank_args(&other, &[]), "data = "),
            (
                rank_args(&text, &["--set", "train.lr=0.5"]),
                "train.lr = 0.5 here",
            ),
        ] {
            let t0 = std::time::Instant::now();
            let out = Command::new("mpirun")
                .args(["--allow-run-as-root", "--oversubscribe", "-np", "1"])
                .args(rank_args(&text, &[]))
                .args([":", "-np", "1"])
                .args(&second)
                .current_dir(&tmp)
                .env_remove("RUST_LOG")
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{err}");
            assert!(err.contains(needle) && err.contains("rank 1"), "{err}");
            assert!(t0.elapsed() < Duration::from_secs(10), "{err}");
            assert!(
                switch_transformer::train::checkpoint::list(&tmp.join("runs/r/checkpoints"))
                    .is_empty(),
                "nothing trained"
            );
            let _ = std::fs::remove_dir_all(tmp.join("runs"));
        }
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn a_batch_that_does_not_split_over_the_ranks_is_refused_before_any_work() {
        let (tmp, text) = setup("mpi-split");
        // batch_size 4 over 3 ranks.
        let out = mpirun(3, &switch_args(&text, &tmp, "r", 2, 1000), &tmp)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("cannot be split over 3 ranks"), "{err}");
        assert!(!tmp.join("runs/r").exists(), "nothing written");
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn a_killed_rank_ends_the_job_and_resume_continues() {
        let (tmp, text) = setup("mpi-kill");
        // Expert-parallel: the checkpoints gather every rank's experts, the resume shards them.
        let mut args = switch_args(&text, &tmp, "r", 100_000, 5);
        args.push("--expert-parallel".into());
        let (mut job, run) = start_until_checkpoint(&args, &tmp, Stdio::null());
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(rank0_pid(&run), libc::SIGKILL) };
        let status = common::exits_within(&mut job, Duration::from_secs(60), "the job to end");
        assert!(!status.success());
        let last = switch_transformer::train::checkpoint::list(&run.join("checkpoints"))
            .last()
            .unwrap()
            .0;
        // Resume on 2 ranks for 3 more steps (rank 0's stale lock is taken over).
        let mut resume: Vec<String> = ["train", "--resume", "runs/r", "--set"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        resume.push(format!("train.steps={}", last + 3));
        ok(mpirun(2, &resume, &tmp).output().unwrap(), "resume");
        let steps = losses(&run).len() as u64;
        assert_eq!(steps, last + 3);
        let c = RunConfig::from_toml_file(&run.join("config.toml")).unwrap();
        assert!(
            c.train.expert_parallel,
            "the resumed job shards the experts again"
        );
        std::fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn a_hung_rank_is_a_time_out_naming_the_step() {
        let (tmp, text) = setup("mpi-hang");
        let mut args = switch_args(&text, &tmp, "r", 100_000, 5);
        args.extend(["--exchange-timeout".to_string(), "3".to_string()]);
        let (mut job, run) = start_until_checkpoint(&args, &tmp, Stdio::piped());
        // Rank 0 stops answering (SIGSTOP): rank 1 gives up after 3 s and ends the job.
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(rank0_pid(&run), libc::SIGSTOP) };
        let status = common::exits_within(&mut job, Duration::from_secs(60), "the job to end");
        assert!(!status.success());
        let mut err = String::new();
        use std::io::Read;
        job.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        assert!(
            err.contains("rank 1: step") && err.contains("has waited"),
            "{err}"
        );
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
