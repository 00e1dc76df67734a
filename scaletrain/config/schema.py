"""The typed config tree: one dataclass node per component.

A component receives only its own node. Every field has a default, so an empty TOML file is a
valid config (the `debug` flavor on the built-in corpus). Field comments state units. A string
field with a fixed set of values is typed `Literal[...]` (the aliases below): config/load.py
checks every value against its type, and code that needs the list reads it from the type
(`typing.get_args(AcMode)`), so the allowed values are written once, here. Checks that need
more than the type (ranges, several fields) live in `validate.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FfnKind = Literal["swiglu", "squared_relu"]
ActivationSparsity = Literal["none", "2:4"]  # "2:4" needs ffn = "squared_relu"
MoeRouter = Literal["softmax", "sigmoid"]  # top-k of softmax, renormalised | sigmoid scores (DeepSeek-V3)
MoeBalance = Literal["aux_loss", "bias", "none"]  # sequence-wise Switch loss | aux-loss-free bias (arXiv 2408.15664)
TokenizerKind = Literal["byte", "bpe", "file"]  # 256 bytes + specials | trained locally | a tokenizer.json
DataSource = Literal["builtin", "builtin_code", "builtin_prose", "text", "jsonl", "parquet", "hf_disk"]
OptimName = Literal["adamw"]
FusedOptim = Literal["auto", "true", "false"]  # "auto": fused on CUDA
ScheduleKind = Literal["cosine", "wsd", "constant", "linear"]  # wsd: warmup-stable-decay
Device = Literal["auto", "cpu", "cuda"]  # "auto": cuda when present
Precision = Literal["auto", "fp32", "bf16", "fp8"]  # "auto": bf16 on CUDA, fp32 on CPU (parallel/dims.py)
Fp8Recipe = Literal["tensorwise", "rowwise"]
SdpaBackend = Literal["auto", "flash", "cudnn", "efficient", "math"]  # "auto": torch picks
CompileMode = Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"]
NanPolicy = Literal["skip", "rollback", "abort"]
CheckpointVerify = Literal["checksum", "size"]  # sizes + sha256 of every file | sizes only (fast)
ProgressMode = Literal["auto", "rich", "plain", "none"]  # "auto": a live bar on a TTY
PpSchedule = Literal["gpipe", "1f1b", "interleaved_1f1b"]
AcMode = Literal["none", "selective", "full"]  # activation checkpointing, by growing recompute
RouterInit = Literal["normal", "zero"]  # a new MoE router: N(0, model.init_std) | zeros (uniform routing)
AttentionKind = Literal["gqa", "mla"]  # grouped-query | DeepSeek's multi-head latent attention (planner only)


@dataclass
class ModelConfig:
    """Llama-style decoder shape. `flavor` names a registry entry (config/flavors.py) whose
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
    ffn: FfnKind = "swiglu"
    activation_sparsity: ActivationSparsity = "none"
    tie_embeddings: bool = False
    init_std: float = 0.02  # std of the normal init of linear and embedding weights
    head_dim: int = 0  # width of one attention head; 0 = dim / n_heads (Qwen3-30B-A3B: 128 with dim 2048, 32 heads)
    qk_norm: bool = False  # RMSNorm over head_dim of every query and key head before RoPE (Qwen3)
    # Multi-head latent attention (DeepSeek-V2/V3): priced by the planner (model/flops_mla.py), not
    # built by the trainer, which implements "gqa" only. Widths in channels; defaults = DeepSeek-V3.
    # Set n_kv_heads = n_heads with it (MLA shares no key/value head; the layout checks read n_kv_heads).
    attention: AttentionKind = "gqa"
    mla_q_lora_rank: int = 1536  # width of the compressed query latent; 0 = no query compression (V2-Lite)
    mla_kv_lora_rank: int = 512  # width of the compressed key/value latent
    mla_qk_nope_dim: int = 128  # per-head query/key channels without RoPE
    mla_qk_rope_dim: int = 64  # per-head query/key channels with RoPE (the key part shared by all heads)
    mla_v_dim: int = 128  # per-head value width
    # Mixture of experts (model/moe.py, docs/moe.md); moe_experts = 0 is a dense model and the
    # other moe_* keys are then unused.
    moe_experts: int = 0  # routed experts per MoE layer
    moe_top_k: int = 2  # routed experts per token
    moe_ffn_dim: int = 0  # hidden width of one routed expert (SwiGLU, per gate); 0 = ffn_dim
    moe_shared_experts: int = 0  # always-on experts, one SwiGLU of width moe_ffn_dim * moe_shared_experts
    moe_dense_layers: int = 0  # the first k layers keep a dense FFN of width ffn_dim
    moe_router: MoeRouter = "softmax"
    moe_balance: MoeBalance = "aux_loss"
    moe_aux_coef: float = 0.01  # weight of each MoE layer's auxiliary loss (moe_balance = "aux_loss")
    moe_bias_rate: float = 1e-3  # expert-bias step per optimizer step (moe_balance = "bias")
    moe_capacity_factor: float = 0.0  # 0 = dropless; > 0: each expert takes ceil(cf * tokens * top_k / experts) per micro-batch in training


def head_dim_of(cfg: ModelConfig) -> int:
    """Width of one attention head: model.head_dim, or dim / n_heads when it is 0."""
    return cfg.head_dim or cfg.dim // cfg.n_heads


@dataclass
class TokenizerConfig:
    kind: TokenizerKind = "byte"
    vocab_size: int = 2048  # target vocab for kind = "bpe" (specials included)
    path: str = ""  # tokenizer.json for kind = "file"
    train_chars: int = 20_000_000  # characters of training text used to train a BPE


@dataclass
class DomainConfig:
    """One data domain of a mixture, a `[[data.domains]]` table: where its documents come from
    (as in [data]) and its share of the training sequences. Every other data setting (seq_len,
    val_fraction, max_documents, cache_dir, ...) comes from [data]. See docs/btx.md."""

    name: str = ""  # required; letters, digits, '_', '-': names `val_loss_<name>` and a BTX branch folder
    source: DataSource = "builtin"  # as data.source
    path: str = ""  # file or folder for every source but the builtin ones
    text_field: str = "text"  # column / key holding the text (jsonl, parquet, hf_disk)
    weight: float = 1.0  # share of training sequences: weight / sum of weights (0 = validation only)


@dataclass
class DataConfig:
    source: DataSource = "builtin"
    path: str = ""  # file or folder for every source but "builtin"
    text_field: str = "text"  # column / key holding the text (jsonl, parquet, hf_disk)
    cache_dir: str = "data_cache"  # shards and trained tokenizers are cached here
    val_fraction: float = 0.05  # fraction of documents (by file) held out for validation
    max_documents: int = 0  # 0 = all; otherwise the first N documents in sorted order
    seq_len: int = 256  # tokens per training sequence
    batch_size: int = 8  # sequences per micro-batch per data-parallel rank
    seed: int = 0  # seed of the sample order (independent of train.seed)
    # [[data.domains]] tables replace source/path/text_field with several named corpora, mixed by
    # weight; validation then reports every domain (val_loss_<name>) and their mean (val_loss).
    domains: list[DomainConfig] = field(default_factory=list)
    domain: str = ""  # train on this one domain of data.domains ("" = the weighted mixture); validation still covers all


@dataclass
class OptimConfig:
    name: OptimName = "adamw"
    lr: float = 3e-4  # peak learning rate
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # applied to matrices only (not norms, biases, embeddings)
    grad_clip: float = 1.0  # max global L2 norm; 0 disables clipping
    fused: FusedOptim = "auto"


@dataclass
class ScheduleConfig:
    kind: ScheduleKind = "cosine"
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    decay_fraction: float = 0.2  # wsd: fraction of the steps spent in the final decay


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps
    seed: int = 0  # model init and sampling seed
    grad_accum: int = 1  # micro-batches per optimizer step
    device: Device = "auto"
    precision: Precision = "auto"  # "fp8": torchao float8 linears + bf16 autocast
    fp8_recipe: Fp8Recipe = "tensorwise"  # scaling, with precision = "fp8"
    compile: bool = False  # torch.compile each transformer block
    sdpa_backend: SdpaBackend = "auto"  # attention kernel
    compile_mode: CompileMode = "default"  # torch.compile mode; "reduce-overhead" = CUDA graphs
    deterministic: bool = True  # deterministic algorithms (bit-exact resume on CPU)
    eval_interval: int = 0  # steps between validation passes; 0 = only at the end
    eval_batches: int = 8  # micro-batches per validation pass
    sample_prompt: str = ""  # text sampled from the model at the end ("" = no sample)
    sample_tokens: int = 0  # tokens generated for that sample
    threads: int = 0  # torch CPU threads; 0 = torch's default
    nan_policy: NanPolicy = "abort"  # what a non-finite loss or gradient does
    hang_timeout_s: float = 0.0  # watchdog: seconds without progress before stacks are dumped and the rank exits (0 = off)


@dataclass
class CheckpointConfig:
    interval: int = 0  # steps between checkpoints; 0 = only the final one
    keep: int = 3  # complete checkpoints kept (oldest deleted first); 0 = keep all
    save_final: bool = True
    async_save: bool = False  # stage to CPU and write in a background thread; training continues meanwhile
    verify: CheckpointVerify = "checksum"  # before resuming


@dataclass
class MetricsConfig:
    log_interval: int = 0  # steps between log lines; 0 = auto, ~50 lines per run (metrics.jsonl gets every step)
    tensorboard: bool = True
    plot: bool = True  # loss-curve PNG at the end
    progress: ProgressMode = "auto"


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
    pp_schedule: PpSchedule = "1f1b"
    pp_microbatches: int = 0  # 0 = pp degree
    pp_virtual_stages: int = 0  # model chunks per pp rank with "interleaved_1f1b" (0 = 2); 1 otherwise
    ac: AcMode = "none"  # "full": whole blocks; "selective": the attention modules
    ac_every: int = 1  # with ac = "full": checkpoint every k-th block (1 = all)


@dataclass
class BtxConfig:
    """Steps of each stage of `scaletrain btx` (Branch-Train-MiX, recipes/btx.py, docs/btx.md).
    Every stage is an ordinary run of this same config with train.steps set from here (so
    train.steps itself is what `scaletrain train` on this config runs: a dense run on the mixture)."""

    seed_steps: int = 100  # stage seed: dense optimizer steps on the mixture of data.domains
    branch_steps: int = 100  # stage branch: dense optimizer steps of each branch on its own domain
    finetune_steps: int = 100  # stage finetune: MoE optimizer steps on the mixture after the mix
    seed_expert: bool = False  # stage mix: the seed's FFN joins the branches' as one more expert (the paper's generalist)
    router_init: RouterInit = "normal"  # stage mix: how the router of the mixed MoE starts
    baselines: bool = True  # also run the compute-matched baselines dense, btm and upcycle (docs/btx.md)


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
    btx: BtxConfig = field(default_factory=BtxConfig)
