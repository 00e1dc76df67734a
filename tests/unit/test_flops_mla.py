"""Multi-head latent attention in the one formula set (model/flops.py, model/flops_mla.py): the
DeepSeek-V3 parameter counts, FLOPs against a hand-written sum of GEMMs, saved tensors, and the
trainer's refusal to build it (the planner prices it; scaletrain does not train it)."""

import dataclasses

import pytest

from conftest import debug_train_args, main_exit
from scaletrain.config.schema import ModelConfig
from scaletrain.errors import ConfigError
from scaletrain.model.flops import (activation_bytes_per_layer, flops_per_token, forward_flops_per_layer,
                                    param_counts, saved_activation_bytes)

# DeepSeek-V3's config.json (deepseek-ai/DeepSeek-V3): the mla_* widths are ModelConfig's defaults.
DSV3 = ModelConfig(flavor="deepseek_v3", dim=7168, n_layers=61, n_heads=128, n_kv_heads=128, ffn_dim=18432,
                   vocab_size=129280, max_seq_len=4096, attention="mla", moe_experts=256, moe_top_k=8,
                   moe_ffn_dim=2048, moe_shared_experts=1, moe_dense_layers=3, moe_router="sigmoid")

# A tiny MLA model: dim 32, 4 heads, r_q 12, r_kv 8, n 6, r 4, v 5.
TINY = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=48, vocab_size=64, attention="mla",
                   mla_q_lora_rank=12, mla_kv_lora_rank=8, mla_qk_nope_dim=6, mla_qk_rope_dim=4, mla_v_dim=5)


def test_deepseek_v3_total_and_activated_parameters():
    """DeepSeek-V3 technical report (arXiv 2412.19437, abstract and section 4.2): 671B total and
    37B activated parameters per token. Counted as the report does: embedding + untied output
    head + 61 layers (3 dense, 58 MoE: 256 routed experts, 1 shared, a 256-way router), the
    multi-token-prediction module excluded. Tolerance 1% on the total and 3% on the activated
    count: both are rounded to whole billions in the report (37.55B counted here)."""
    c = param_counts(DSV3)
    assert c["total"] == pytest.approx(671e9, rel=0.01)
    assert c["active"] == pytest.approx(37e9, rel=0.03)
    # attention per layer: wq_a 7168x1536, wq_b 1536x128*192, wkv_a 7168x576, wkv_b 512x128*256, wo 128*128x7168
    assert c["attention_per_layer"] == 7168 * 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 * 128 * 256 + 16384 * 7168
    assert c["norm_per_layer"] == 2 * 7168 + 1536 + 512  # block norms + the two latent norms


def test_mla_forward_flops_are_the_sum_of_its_gemms():
    s = 10
    pairs = s * (s + 1) // 2
    f = forward_flops_per_layer(TINY, s, causal=True)
    assert f["qkv"] == 2 * s * (32 * 12 + 12 * 4 * (6 + 4) + 32 * (8 + 4) + 8 * 4 * (6 + 5))
    assert f["attn_scores"] == 2 * 4 * (6 + 4) * pairs  # Q K^T over the 10-wide q/k heads
    assert f["attn_values"] == 2 * 4 * 5 * pairs  # P V over the 5-wide value heads
    assert f["out_proj"] == 2 * s * (4 * 5) * 32
    assert f["ffn"] == 2 * s * 32 * 48 * 3
    head = 2 * s * 32 * 64
    exact = 3 * (2 * sum(forward_flops_per_layer(TINY, s).values()) + head) / s
    assert flops_per_token(TINY, s, "exact") == exact
    # torchtitan's convention: 6 x matmul params + attention at its two head widths
    counts = param_counts(TINY)
    assert flops_per_token(TINY, s) == 6 * counts["active_non_embedding"] + 6 * 2 * 4 * (10 + 5) * s


def test_mla_without_query_compression_has_one_query_projection():
    v2_lite = dataclasses.replace(TINY, mla_q_lora_rank=0)
    c, f = param_counts(v2_lite), forward_flops_per_layer(v2_lite, 10)
    assert c["attention_per_layer"] == 32 * 40 + 32 * 12 + 8 * 44 + 20 * 32  # wq, wkv_a, wkv_b, wo
    assert c["norm_per_layer"] == 2 * 32 + 8
    assert f["qkv"] == 2 * 10 * (32 * 40 + 32 * 12 + 8 * 44)


def test_mla_saved_tensors():
    b, s, B = 2, 10, 2
    T = b * s
    # no AC, one rank: the two block norms' inputs and 1/rms, the FFN input, the attention input
    # (wq_a/wkv_a), the latents (12 + 12) and their 1/rms, the normalised latents (12 + 8), q and k
    # (4 x 10 each), v and O (4 x 5 each), logsumexp (4 heads), the SwiGLU's 4 x 48
    expected = (2 * T * 32 * B + 2 * T * 4 + T * 32 * B + T * 32 * B + T * (12 + 12) * B + 2 * T * 4
                + T * (12 + 8) * B + T * (2 * 40 + 2 * 20) * B + T * 4 * 4 + 4 * T * 48 * B)
    assert saved_activation_bytes(TINY, b, s, B) == expected
    # tp 2: everything but the gathered FFN input and normalised latents halves
    gathered = T * 32 * B + T * (12 + 8) * B
    assert saved_activation_bytes(TINY, b, s, B, tp=2) == pytest.approx(gathered + (expected - gathered) / 2)
    # selective and full AC keep what a GQA layer keeps: the attention's tensors are recomputed
    gqa = dataclasses.replace(TINY, attention="gqa", n_kv_heads=4)
    for ac in ("selective", "full"):
        assert saved_activation_bytes(TINY, b, s, B, ac) == saved_activation_bytes(gqa, b, s, B, ac)
        assert activation_bytes_per_layer(TINY, b, s, B, ac) == activation_bytes_per_layer(gqa, b, s, B, ac)
    # op-level SAC: block input, wq_a out (12), wkv_a out (12), wo out (32), O (20), logsumexp, then w3 (48)
    assert saved_activation_bytes(TINY, b, s, B, "op") == T * (32 + 12 + 12 + 32 + 20 + 48) * B + T * 4 * 4
    # the Korthikanti count: as "none" at tp 1, with wo's input counted apart from O
    assert activation_bytes_per_layer(TINY, b, s, B) == expected + T * 20 * B


def test_the_trainer_refuses_to_build_mla():
    from scaletrain.model.transformer import build_model

    with pytest.raises(ConfigError, match=r"implements only 'gqa'.*planner only"):
        build_model(TINY)
    with pytest.raises(ConfigError, match="mla_qk_rope_dim = 3 is odd"):
        build_model(dataclasses.replace(TINY, mla_qk_rope_dim=3))


def test_train_refuses_mla_with_one_line(tmp_path, capsys, data_cache):
    run = tmp_path / "run"
    code, err = main_exit(capsys, *debug_train_args(run, data_cache, 1, "--model.attention", "mla"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "implements only 'gqa'" in err
    # a DeepSeek-sized MLA model hears the same, not a memory pre-flight about a model it cannot build
    big = ("--model.dim", "16384", "--model.n_layers", "64", "--model.n_heads", "128", "--model.n_kv_heads", "128")
    code, err = main_exit(capsys, *debug_train_args(run, data_cache, 1, "--model.attention", "mla", *big))
    assert code == 2 and "implements only 'gqa'" in err and "memory" not in err
