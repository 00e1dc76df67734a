"""The typed config tree: one dataclass node per component.

A component receives only its own node (rule 2 of DESIGN.md). Every field has a default, so
an empty TOML file is a valid config (the `debug` flavor on the built-in corpus). Field
comments state units. Validation that needs more than one node lives in `validate.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    """Llama-style decoder shape. `flavor` names a registry entry (model/flavors.py) whose
    values are the defaults; any other key set in the same [model] table overrides it."""

    flavor: str = "debug"
    dim: int = 64  # hidden size
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2  # grouped-query attention: n_heads % n_kv_heads == 0
    ffn_dim: int = 192  # hidden size of the FFN (per gate for SwiGLU)
    vocab_size: int = 512  # rows of the embedding; must be >= the tokenizer's vocab
    max_seq_len: int = 256  # longest sequence the RoPE table covers (tokens)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    ffn: str = "swiglu"  # "swiglu" | "squared_relu"
    activation_sparsity: str = "none"  # "none" | "2:4" (2:4 needs ffn = "squared_relu")
    tie_embeddings: bool = False
    init_std: float = 0.02  # std of the normal init of linear and embedding weights
    head_dim: int = 0  # width of one attention head; 0 = dim / n_heads (Qwen3-30B-A3B: 128 with dim 2048, 32 heads)
    qk_norm: bool = False  # RMSNorm over head_dim of every query and key head before RoPE (Qwen3)
    # Mixture of experts (model/moe.py, docs/moe.md); moe_experts = 0 is a dense model and the
    # other moe_* keys are then unused.
    moe_experts: int = 0  # routed experts per MoE layer
    moe_top_k: int = 2  # routed experts per token
    moe_ffn_dim: int = 0  # hidden width of one routed expert (SwiGLU, per gate); 0 = ffn_dim
    moe_shared_experts: int = 0  # always-on experts, one SwiGLU of width moe_ffn_dim * moe_shared_experts
    moe_dense_layers: int = 0  # the first k layers keep a dense FFN of width ffn_dim
    moe_router: str = "softmax"  # "softmax" (top-k of softmax, renormalised) | "sigmoid" (DeepSeek-V3)
    moe_balance: str = "aux_loss"  # "aux_loss" (sequence-wise Switch loss) | "bias" (aux-loss-free, arXiv 2408.15664) | "none"
    moe_aux_coef: float = 0.01  # weight of each MoE layer's auxiliary loss (moe_balance = "aux_loss")
    moe_bias_rate: float = 1e-3  # expert-bias step per optimizer step (moe_balance = "bias")
    moe_capacity_factor: float = 0.0  # 0 = dropless; > 0: each expert takes ceil(cf * tokens * top_k / experts) per micro-batch in training


@dataclass
class TokenizerConfig:
    kind: str = "byte"  # "byte" (256 bytes + specials) | "bpe" (trained locally) | "file"
    vocab_size: int = 2048  # target vocab for kind = "bpe" (specials included)
    path: str = ""  # tokenizer.json for kind = "file"
    train_chars: int = 20_000_000  # characters of training text used to train a BPE


@dataclass
class DataConfig:
    source: str = "builtin"  # "builtin" | "text" | "jsonl" | "parquet" | "hf_disk"
    path: str = ""  # file or folder for every source but "builtin"
    text_field: str = "text"  # column / key holding the text (jsonl, parquet, hf_disk)
    cache_dir: str = "data_cache"  # shards and trained tokenizers are cached here
    val_fraction: float = 0.05  # fraction of documents (by file) held out for validation
    max_documents: int = 0  # 0 = all; otherwise the first N documents in sorted order
    seq_len: int = 256  # tokens per training sequence
    batch_size: int = 8  # sequences per micro-batch per data-parallel rank
    seed: int = 0  # seed of the sample order (independent of train.seed)


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-4  # peak learning rate
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # applied to matrices only (not norms, biases, embeddings)
    grad_clip: float = 1.0  # max global L2 norm; 0 disables clipping
    fused: str = "auto"  # "auto" (fused on CUDA) | "true" | "false"


@dataclass
class ScheduleConfig:
    kind: str = "cosine"  # "cosine" | "wsd" (warmup-stable-decay) | "constant" | "linear"
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    decay_fraction: float = 0.2  # wsd: fraction of the steps spent in the final decay


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps
    seed: int = 0  # model init and sampling seed
    grad_accum: int = 1  # micro-batches per optimizer step
    device: str = "auto"  # "auto" (cuda when present) | "cpu" | "cuda"
    precision: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU) | "fp32" | "bf16" | "fp8" (torchao float8 linears + bf16 autocast)
    fp8_recipe: str = "tensorwise"  # with precision = "fp8": "tensorwise" | "rowwise" scaling
    compile: bool = False  # torch.compile each transformer block
    sdpa_backend: str = "auto"  # attention kernel: "auto" (torch picks) | "flash" | "cudnn" | "efficient" | "math"
    compile_mode: str = "default"  # torch.compile mode: "default" | "reduce-overhead" (CUDA graphs) | "max-autotune-no-cudagraphs" | "max-autotune"
    deterministic: bool = True  # deterministic algorithms (bit-exact resume on CPU)
    eval_interval: int = 0  # steps between validation passes; 0 = only at the end
    eval_batches: int = 8  # micro-batches per validation pass
    sample_prompt: str = ""  # text sampled from the model at the end ("" = no sample)
    sample_tokens: int = 0  # tokens generated for that sample
    threads: int = 0  # torch CPU threads; 0 = torch's default
    nan_policy: str = "abort"  # non-finite loss/gradients: "skip" | "rollback" | "abort"
    hang_timeout_s: float = 0.0  # watchdog: seconds without progress before stacks are dumped and the rank exits (0 = off)


@dataclass
class CheckpointConfig:
    interval: int = 0  # steps between checkpoints; 0 = only the final one
    keep: int = 3  # complete checkpoints kept (oldest deleted first); 0 = keep all
    save_final: bool = True
    async_save: bool = False  # stage to CPU and write in a background thread; training continues meanwhile
    verify: str = "checksum"  # before resuming: "checksum" (sizes + sha256 of every file) | "size" (fast)


@dataclass
class MetricsConfig:
    log_interval: int = 0  # steps between log lines; 0 = auto, ~50 lines per run (metrics.jsonl gets every step)
    tensorboard: bool = True
    plot: bool = True  # loss-curve PNG at the end
    progress: str = "auto"  # "auto" (live bar on a TTY) | "rich" | "plain" | "none"


@dataclass
class ParallelConfig:
    """Parallel degrees; their product must equal the world size. -1 on dp_shard means
    "whatever is left"."""

    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    # Expert parallelism: MoE experts sharded over `ep` of the dp_shard x cp ranks, tokens
    # dispatched and combined by all-to-all (parallel/ep.py, docs/moe.md). Not a factor of the
    # world size: it re-uses data-parallel ranks.
    ep: int = 1
    pp_schedule: str = "1f1b"  # "gpipe" | "1f1b" | "interleaved_1f1b"
    pp_microbatches: int = 0  # 0 = pp degree
    pp_virtual_stages: int = 0  # model chunks per pp rank with "interleaved_1f1b" (0 = 2); 1 otherwise
    ac: str = "none"  # activation checkpointing: "none" | "full" (blocks) | "selective" (attention, op-level)
    ac_every: int = 1  # with ac = "full": checkpoint every k-th block (1 = all)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
