"""`scaletrain bench --peer torchtitan`: torchtitan 0.2.2's own trainer on the identical job.

Identical means: the same model shape (a flavor registered from our config: dim, layers,
heads, KV heads, FFN width, vocab, RoPE theta, norm eps), the same text (our corpus's training
documents written in torchtitan's `c4_test` layout), the same tokenizer (ours, saved as a
Hugging Face tokenizer folder), batch, sequence length, optimizer (fused AdamW, same lr /
betas / eps / weight decay / clipping), precision (bf16 autocast over fp32
weights, or torchao float8 with the same recipe) and compile / activation-checkpointing
settings. torchtitan runs in its own process (torchrun, one GPU) after ours has released
the device; its log lines are parsed here (`parse_titan_log`).

torchtitan's `tps` is tokens per second per device averaged over each log window (whole-step
wall clock), `memory` is the peak *reserved* memory; the comparison uses the same warm-up
exclusion as ours (windows whose first step is after the warm-up).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from scaletrain.config.schema import Config
from scaletrain.errors import ConfigError

PEER_VERSION = "0.2.2"
FLAVOR = "scaletrain_peer"
MODEL_ARGS_ENV = "SCALETRAIN_PEER_MODEL_ARGS"

STEP_RE = re.compile(
    r"step:\s*(?P<step>\d+)\s+loss:\s*(?P<loss>\S+)\s+grad_norm:\s*(?P<gn>\S+)\s+"
    r"memory:\s*(?P<mem>[\d.]+)GiB\((?P<mempct>[\d.]+)%\)\s+tps:\s*(?P<tps>[\d,]+)\s+"
    r"tflops:\s*(?P<tflops>[\d,.]+)\s+mfu:\s*(?P<mfu>[\d.]+)%"
)
ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")


def installed_version() -> str | None:
    """torchtitan's installed version, or None."""
    try:
        return importlib.metadata.version("torchtitan")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_peer(cfg: Config, world_size: int) -> None:
    """ConfigError unless torchtitan 0.2.2 is installed and can run the same job."""
    version = installed_version()
    if version is None:
        raise ConfigError(f"--peer torchtitan needs torchtitan {PEER_VERSION} installed "
                          f"(pip install torchtitan=={PEER_VERSION} torchdata datasets tyro); it is not.")
    if version != PEER_VERSION:
        raise ConfigError(f"--peer torchtitan compares against torchtitan {PEER_VERSION}; {version} is installed "
                          f"(pip install torchtitan=={PEER_VERSION}).")
    m, p = cfg.model, cfg.parallel
    unsupported = []
    if world_size != 1 or p.tp > 1 or p.pp > 1 or p.cp > 1 or p.dp_replicate > 1:
        unsupported.append("more than one device (run the peer comparison from a single process on one GPU)")
    if m.ffn != "swiglu" or m.activation_sparsity != "none":
        unsupported.append(f"model.ffn = {m.ffn!r} / activation_sparsity = {m.activation_sparsity!r} "
                           "(torchtitan's Llama-3 has a SwiGLU FFN only)")
    if m.tie_embeddings:
        unsupported.append("model.tie_embeddings = true (torchtitan's Llama-3 is untied)")
    if cfg.train.grad_accum != 1:
        unsupported.append("train.grad_accum > 1")
    if p.ac == "full" and p.ac_every != 1:
        unsupported.append("parallel.ac_every != 1")
    if unsupported:
        raise ConfigError("--peer torchtitan cannot run this job identically: " + "; ".join(unsupported) + ".")


def titan_ffn_args(dim: int, ffn_dim: int) -> dict[str, Any]:
    """`multiple_of` / `ffn_dim_multiplier` that make torchtitan's FeedForward width equal
    `ffn_dim` (torchtitan: h = int(2 * 4 * dim / 3); h = int(mult * h) if mult; h rounded up to
    a multiple of `multiple_of`)."""
    base = int(2 * 4 * dim / 3)
    if base <= ffn_dim:
        return {"multiple_of": ffn_dim, "ffn_dim_multiplier": None}
    return {"multiple_of": ffn_dim, "ffn_dim_multiplier": ffn_dim / base}


def model_args(cfg: Config) -> dict[str, Any]:
    """torchtitan TransformerModelArgs fields for our model config."""
    m = cfg.model
    return {"dim": m.dim, "n_layers": m.n_layers, "n_heads": m.n_heads, "n_kv_heads": m.n_kv_heads,
            "vocab_size": m.vocab_size, "norm_eps": m.norm_eps, "rope_theta": m.rope_theta,
            **titan_ffn_args(m.dim, m.ffn_dim)}


def job_toml(cfg: Config, steps: int, log_freq: int, dump_folder: str) -> str:
    """torchtitan 0.2.2 job config (TOML text) for the same job; paths relative to its folder."""
    c, o = cfg, cfg.optim
    precision_fp8 = c.train.precision == "fp8"
    ac = {"none": 'mode = "none"', "full": 'mode = "full"',
          "selective": 'mode = "selective"\nselective_ac_option = "op"'}[c.parallel.ac]
    converters = '["quantize.linear.float8"]' if precision_fp8 else "[]"
    fp8 = (f'\n[quantize.linear.float8]\nrecipe_name = "{c.train.fp8_recipe}"\nfilter_fqns = ["output"]\n'
           if precision_fp8 else "")
    warmup = max(c.schedule.warmup_steps, 1)
    return f"""# written by `scaletrain bench --peer torchtitan`: the same job as the scaletrain config
[job]
dump_folder = "{dump_folder}"
print_config = false
[profiling]
enable_profiling = false
enable_memory_snapshot = false
[metrics]
log_freq = {log_freq}
disable_color_printing = true
enable_tensorboard = false
enable_wandb = false
[model]
name = "llama3"
flavor = "{FLAVOR}"
hf_assets_path = "assets/tokenizer"
converters = {converters}
[optimizer]
name = "AdamW"
lr = {o.lr}
beta1 = {o.beta1}
beta2 = {o.beta2}
eps = {o.eps}
weight_decay = {o.weight_decay}
implementation = "fused"
[lr_scheduler]
warmup_steps = {warmup}
decay_type = "linear"
min_lr_factor = {c.schedule.min_lr_ratio}
[training]
local_batch_size = {c.data.batch_size}
seq_len = {c.data.seq_len}
max_norm = {o.grad_clip}
steps = {steps}
dataset = "c4_test"
dataset_path = "assets/c4_test"
dtype = "float32"
mixed_precision_param = "bfloat16"
[parallelism]
data_parallel_replicate_degree = 1
data_parallel_shard_degree = -1
tensor_parallel_degree = 1
pipeline_parallel_degree = 1
context_parallel_degree = 1
[checkpoint]
enable = false
[activation_checkpoint]
{ac}
[compile]
enable = {"true" if c.train.compile else "false"}
components = ["model", "loss"]
[validation]
enable = false
{fp8}"""


LAUNCHER = f'''"""Registers the scaletrain flavor in torchtitan's llama3 table, then runs torchtitan's trainer."""
import json, os
from torchtitan.models.llama3 import llama3_args, TransformerModelArgs
llama3_args["{FLAVOR}"] = TransformerModelArgs(**json.loads(os.environ["{MODEL_ARGS_ENV}"]))
from torchtitan.train import main, Trainer
main(Trainer)
'''


def prepare_folder(cfg: Config, data, folder: Path, steps: int, log_freq: int) -> Path:
    """Write job config, launcher, tokenizer and corpus for the peer run into `folder`."""
    from scaletrain.data.corpus import list_documents

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "job.toml").write_text(job_toml(cfg, steps, log_freq, str(folder / "dump")), encoding="utf-8")
    (folder / "launch_titan.py").write_text(LAUNCHER, encoding="utf-8")
    data.tokenizer.save(str(folder / "assets" / "tokenizer"))
    corpus = folder / "assets" / "c4_test"
    corpus.mkdir(parents=True, exist_ok=True)
    train, _ = list_documents(cfg.data)
    with open(corpus / "data.json", "w", encoding="utf-8") as f:
        for doc in train:
            f.write(json.dumps({"text": doc.text, "timestamp": "", "url": doc.doc_id}) + "\n")
    return folder


def parse_titan_log(text: str, warmup: int) -> dict[str, Any]:
    """Steady state of a torchtitan log: windows (log lines) whose first step is > `warmup`.
    tokens/s is the step-weighted mean of the windows' `tps` (per device); memory the largest
    peak reserved GiB of any window. ConfigError when no steady window was logged."""
    windows, prev = [], 0
    for line in text.splitlines():
        m = STEP_RE.search(ANSI_RE.sub("", line))
        if not m:
            continue
        step = int(m["step"])
        windows.append({"first": prev + 1, "last": step, "tps": float(m["tps"].replace(",", "")),
                        "tflops": float(m["tflops"].replace(",", "")), "mfu": float(m["mfu"]) / 100,
                        "mem_gib": float(m["mem"]), "loss": float(m["loss"])})
        prev = step
    steady = [w for w in windows if w["first"] > warmup]
    if not steady:
        raise ConfigError(f"the torchtitan log has no window after step {warmup} ({len(windows)} windows logged); "
                          "raise --steps or lower --warmup.")
    n = [w["last"] - w["first"] + 1 for w in steady]
    total = sum(n)
    return {"steps": total, "tokens_per_s": sum(w["tps"] * k for w, k in zip(steady, n)) / total,
            "tflops": sum(w["tflops"] * k for w, k in zip(steady, n)) / total,
            "mfu": sum(w["mfu"] * k for w, k in zip(steady, n)) / total,
            "peak_reserved_bytes": max(w["mem_gib"] for w in windows) * 2**30,
            "loss_last": windows[-1]["loss"], "windows": windows}


def run_peer(cfg: Config, data, folder: Path, warmup: int, steps: int, timeout_s: float = 1800) -> dict[str, Any]:
    """Run torchtitan on the same job in a subprocess (one GPU) and return its steady state;
    the full log is kept in `folder/titan.log`."""
    log_freq = 5 if warmup % 5 == 0 and steps % 5 == 0 else 1
    prepare_folder(cfg, data, folder, warmup + steps, log_freq)
    env = {**os.environ, MODEL_ARGS_ENV: json.dumps(model_args(cfg)), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           "launch_titan.py", "--job.config_file", "job.toml"]
    log_path = folder / "titan.log"
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s)
    text = log_path.read_text(encoding="utf-8", errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(text.splitlines()[-25:])
        raise ConfigError(f"torchtitan exited {proc.returncode} (log {log_path}); last lines:\n{tail}")
    result = parse_titan_log(text, warmup)
    result.update(version=installed_version(), log=str(log_path), command=" ".join(cmd))
    return result
