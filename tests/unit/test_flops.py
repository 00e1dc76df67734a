"""flops.py against values computed by hand, step by step, for two shapes."""

from __future__ import annotations

import pytest

from scaletrain.model import model_config_for
from scaletrain.model.flops import (
    activation_bytes_per_layer,
    flops_per_token,
    forward_flops_per_layer,
    output_head_forward_flops,
    param_counts,
)


def test_debug_param_counts_by_hand():
    # debug: dim 64, 2 layers, 4 heads (head_dim 16), 2 kv heads, ffn 192, vocab 512, untied.
    cfg = model_config_for("debug")
    embedding = 512 * 64  # 32,768
    attention = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64  # wq + wk + wv + wo (kv_dim 32) = 12,288
    ffn = 3 * 64 * 192  # w1, w3, w2 = 36,864
    norms = 2 * 64  # 128
    total = embedding + embedding + 2 * (attention + ffn + norms) + 64  # + final norm
    assert total == 164_160
    assert param_counts(cfg) == {
        "embedding": 32_768,
        "output": 32_768,
        "attention_per_layer": 12_288,
        "ffn_per_layer": 36_864,
        "norm_per_layer": 128,
        "final_norm": 64,
        "dense_layers": 2,
        "moe_layers": 0,
        "router_per_moe_layer": 0,
        "experts_per_moe_layer": 0,
        "active_experts_per_moe_layer": 0,
        "shared_per_moe_layer": 0,
        "total": 164_160,
        "active": 164_160,  # a dense model uses every parameter for every token
        "non_embedding": 164_160 - 32_768,
        "non_embedding_no_output": 164_160 - 2 * 32_768,
        "active_non_embedding": 164_160 - 32_768,
    }


def test_debug_flops_by_hand():
    cfg = model_config_for("debug")
    s = 256
    # torchtitan: 6 * (total - embedding) + 12 * layers * heads * head_dim * seq
    assert flops_per_token(cfg, s) == 6 * 131_392 + 12 * 2 * 4 * 16 * 256 == 1_181_568

    # exact, per token, forward, one layer (non-causal):
    qkv = 2 * 64 * (64 + 32 + 32)  # 16,384
    scores = 2 * 4 * 16 * 256  # 32,768 (one row of 256 keys per query, 4 heads of 16)
    values = scores
    out_proj = 2 * 64 * 64  # 8,192
    ffn = 3 * 2 * 64 * 192  # 73,728
    layer = qkv + scores + values + out_proj + ffn  # 163,840
    head = 2 * 64 * 512  # 65,536
    exact = 3 * (2 * layer + head)
    assert exact == 1_179_648
    assert flops_per_token(cfg, s, "exact") == exact
    # The two conventions differ only by the norm weights torchtitan counts as matmul weights.
    assert flops_per_token(cfg, s) - exact == 6 * (2 * 128 + 64)

    per_seq = forward_flops_per_layer(cfg, s)
    assert per_seq == {
        "qkv": qkv * s,
        "attn_scores": scores * s,
        "attn_values": values * s,
        "out_proj": out_proj * s,
        "ffn": ffn * s,
    }
    assert output_head_forward_flops(cfg, s) == head * s

    # Causal: only s*(s+1)/2 = 32,896 (query, key) pairs are computed.
    causal = forward_flops_per_layer(cfg, s, causal=True)
    assert causal["attn_scores"] == causal["attn_values"] == 2 * 4 * 16 * 32_896
    causal_layer_per_token = qkv + 2 * (2 * 4 * 16 * 32_896) / s + out_proj + ffn  # 131,200
    assert flops_per_token(cfg, s, "exact", causal=True) == 3 * (2 * causal_layer_per_token + head) == 983_808


def test_anchor_1b_matches_torchtitan_reference():
    # dim 2048, 16 layers, 32 heads (head_dim 64), 8 kv heads (kv_dim 512), ffn 8192, vocab 2048.
    cfg = model_config_for("anchor_1b")
    embedding = 2048 * 2048  # 4,194,304 (and the same again for the untied output head)
    attention = 2048 * 2048 + 2 * 2048 * 512 + 2048 * 2048  # 10,485,760
    ffn = 3 * 2048 * 8192  # 50,331,648
    per_layer = attention + ffn + 2 * 2048  # 60,821,504
    total = 2 * embedding + 16 * per_layer + 2048
    assert total == 981_534_720
    assert param_counts(cfg)["total"] == 981_534_720
    # 6 * 977,340,416 = 5,864,042,496 plus 12 * 16 * 32 * 64 * 2048 = 805,306,368
    assert 6 * (total - embedding) + 12 * 16 * 32 * 64 * 2048 == 6_669_348_864
    assert flops_per_token(cfg, 2048) == 6_669_348_864


@pytest.mark.parametrize(
    "flavor, published",
    [("llama3_8b", 8.03e9), ("llama3_70b", 70.55e9), ("llama3_405b", 405.8e9)],
)
def test_llama3_param_counts(flavor, published):
    total = param_counts(model_config_for(flavor))["total"]
    assert total == pytest.approx(published, rel=0.005)


def test_llama3_8b_exact_count():
    # 128256*4096*2 + 32 * (4096*4096*2 + 4096*1024*2 + 3*4096*14336 + 2*4096) + 4096
    assert param_counts(model_config_for("llama3_8b"))["total"] == 8_030_261_248


def test_tied_model_still_counts_the_output_matmul():
    untied = model_config_for("debug")
    tied = model_config_for("debug", tie_embeddings=True)
    assert param_counts(tied)["total"] == param_counts(untied)["total"] - 512 * 64
    assert param_counts(tied)["output"] == 0
    # The head's matmul runs either way, so the training FLOPs are the same.
    assert flops_per_token(tied, 256) == flops_per_token(untied, 256)
    assert flops_per_token(tied, 256, "exact") == flops_per_token(untied, 256, "exact")


def test_squared_relu_has_two_ffn_matmuls():
    cfg = model_config_for("debug", ffn="squared_relu")
    assert param_counts(cfg)["ffn_per_layer"] == 2 * 64 * 192
    assert forward_flops_per_layer(cfg, 10)["ffn"] == 2 * 2 * 64 * 192 * 10


def test_bad_convention_arguments():
    cfg = model_config_for("debug")
    with pytest.raises(ValueError, match="unknown FLOPs convention"):
        flops_per_token(cfg, 256, "kaplan")
    with pytest.raises(ValueError, match="causal"):
        flops_per_token(cfg, 256, "torchtitan", causal=True)
    with pytest.raises(ValueError, match="activation checkpointing"):
        activation_bytes_per_layer(cfg, 1, 256, ac="some")


def test_activation_bytes_by_hand():
    cfg = model_config_for("debug")
    b, s, d, q, f, h = 2, 256, 64, 64, 192, 4
    tokens = b * s  # 512
    norms = 2 * (tokens * d * 2 + tokens * 4)  # inputs (bf16) + 1/rms (fp32), two norms
    linear_inputs = 2 * tokens * d * 2  # wq/wk/wv input, w1/w3 input
    wo_input = tokens * q * 2
    swiglu = 4 * tokens * f * 2  # w1 out, silu(w1 out), w3 out, w2 input
    sdpa = 4 * tokens * q * 2 + b * h * s * 4  # q, k, v (repeated to 4 heads), O + logsumexp
    selective = norms + linear_inputs + swiglu  # the attention module is recomputed
    assert selective == 1_052_672
    assert activation_bytes_per_layer(cfg, b, s) == selective + wo_input + sdpa == 1_388_544
    assert activation_bytes_per_layer(cfg, b, s, ac="selective") == selective
    assert activation_bytes_per_layer(cfg, b, s, ac="full") == tokens * d * 2 == 65_536
    assert activation_bytes_per_layer(cfg, b, s, dtype_bytes=4, ac="full") == 131_072
    relu2 = model_config_for("debug", ffn="squared_relu")
    assert activation_bytes_per_layer(relu2, b, s) == 1_388_544 - 2 * tokens * f * 2
