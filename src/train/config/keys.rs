//! Every configuration key with its meaning: what `switch train --help` lists and what an
//! unknown key's error names (a test checks that every field of [`super::RunConfig`] has one).

/// Every configuration key with its meaning, for `--help` and error messages.
pub const KEYS: &[(&str, &str)] = &[
    (
        "model.n_vocab",
        "vocabulary size; set from the data's characters",
    ),
    ("model.d_model", "width of the residual stream"),
    (
        "model.heads",
        "attention heads (d_model must be divisible by it)",
    ),
    (
        "model.d_ff",
        "hidden width of each expert FFN (and of dense blocks' FFN)",
    ),
    (
        "model.expert_d_ff",
        "hidden width of each expert alone (0 = model.d_ff): fine-grained experts, many narrow \
         ones with top_k > 1",
    ),
    ("model.n_layers", "number of Switch Transformer blocks"),
    ("model.n_experts", "experts per Switch layer"),
    (
        "model.capacity_factor",
        "capacity = floor(capacity_factor * tokens / n_experts)",
    ),
    (
        "model.drop_tokens",
        "drop tokens routed beyond an expert's capacity",
    ),
    (
        "model.is_scale_prob",
        "scale expert outputs by the router probability",
    ),
    (
        "model.top_k",
        "experts per token: 1 = Switch, k >= 2 = top-k MoE (paper's baseline: 2)",
    ),
    (
        "model.drop_policy",
        "which tokens drop over capacity: random (labml), position, confidence (batch-prioritized)",
    ),
    (
        "model.route_on",
        "where routing is decided: auto (host on the CPU, device on GPUs), host, device",
    ),
    (
        "model.dropped_tokens",
        "a dropped token contributes: pass_through (labml) or zero (paper)",
    ),
    (
        "model.eval_capacity_factor",
        "capacity factor outside training, 0 = capacity_factor (paper: 2.0)",
    ),
    (
        "model.router_jitter",
        "multiplicative router-input noise eps in training (paper: 0.01)",
    ),
    (
        "model.expert_dropout",
        "dropout inside the experts in training (paper: 0.4 fine-tuning)",
    ),
    (
        "model.balance",
        "how the load is balanced: aux (the auxiliary loss, train.lb_coef; paper) | bias \
         (a per-expert bias on the choice, no auxiliary loss; DeepSeek-V3) | none",
    ),
    (
        "model.bias_rate",
        "with model.balance = bias: how far a step moves each expert's bias (DeepSeek-V3: 0.001)",
    ),
    (
        "model.balance_scope",
        "the load-balancing loss's fractions over the batch (paper) or per sequence, averaged \
         (DeepSeek-V3's sequence-wise loss): batch | sequence",
    ),
    (
        "model.shared_experts",
        "always-on experts every token passes through, added to the routed output (DeepSeek-MoE)",
    ),
    (
        "model.shared_d_ff",
        "hidden width of each shared expert (0 = the routed experts' width)",
    ),
    (
        "model.dropout",
        "dropout on sub-layer outputs in training (paper: 0.1)",
    ),
    (
        "model.switch_every",
        "a Switch layer every k-th block, dense FFN between; 0 = dense baseline (paper: 2)",
    ),
    (
        "model.pos_embedding",
        "learned positional embeddings (labml: none)",
    ),
    (
        "model.max_seq_len",
        "positions of the learned positional embedding",
    ),
    (
        "model.init",
        "labml (identical experts and layers), independent, truncated_normal (paper)",
    ),
    (
        "model.init_scale",
        "truncated_normal scale s: sigma = sqrt(s / fan_in) (paper: 0.1)",
    ),
    (
        "model.precision",
        "compute type f32, bf16 or f16; router and losses stay f32 (paper: bf16)",
    ),
    (
        "train.seed",
        "seed for initialisation, data order and token dropping",
    ),
    ("train.batch_size", "windows per batch"),
    ("train.seq_len", "characters per window"),
    ("train.steps", "optimizer steps to train for"),
    ("train.lb_coef", "load-balancing loss coefficient"),
    ("train.lr", "Noam base learning rate"),
    ("train.warmup", "Noam warm-up steps"),
    ("train.beta1", "Adam beta1"),
    ("train.beta2", "Adam beta2"),
    (
        "train.eps",
        "Adam eps (added to sqrt(v) before bias correction, as labml)",
    ),
    ("train.grad_clip", "global gradient-norm clip"),
    (
        "train.z_loss_coef",
        "router z-loss coefficient (ST-MoE: 0.001)",
    ),
    (
        "train.replicas",
        "data-parallel replicas, each on batch_size/replicas windows (switch train --devices)",
    ),
    (
        "train.global_routing",
        "replicas route the whole batch together, as one model (else each its own windows)",
    ),
    (
        "train.expert_parallel",
        "shard the experts over the ranks of a --distributed job (tokens travel to them)",
    ),
    (
        "train.log_interval",
        "steps between training lines in metrics.jsonl",
    ),
    ("train.eval_interval", "steps between validations"),
    (
        "train.eval_batches",
        "fixed validation batches per validation",
    ),
    ("train.checkpoint_interval", "steps between checkpoints"),
    (
        "train.skip_nonfinite",
        "steps with a non-finite loss or gradient norm skipped before the run stops (0 = none)",
    ),
    (
        "train.keep_checkpoints",
        "most recent checkpoints kept (plus the best)",
    ),
    (
        "train.sample_prompt",
        "prompt of the greedy sample at each validation",
    ),
    (
        "train.sample_tokens",
        "characters generated for that sample",
    ),
];
