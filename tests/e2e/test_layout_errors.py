"""Impossible layouts fail before any process-group work, with the offending keys and a valid
alternative, exit code 2 and nothing written. The world size comes from torchrun's WORLD_SIZE
variable; no processes need to be launched because the checks run before rendezvous, so the
CLI runs in this process (the fresh-process check of `train` is in tests/e2e/test_bad_input.py)."""

from __future__ import annotations

from conftest import debug_train_args, main_exit, main_run

CASES = {
    "product": (4, ("--parallel.dp_shard", "3"), ["parallel degrees multiply to 3", "world size is 4",
                                                  "--parallel.dp_shard -1"]),
    "tp_heads": (3, ("--parallel.tp", "3", "--parallel.dp_shard", "1"),
                 ["model.n_heads = 4 is not divisible by parallel.tp = 3", "Use tp in {1, 2}"]),
    "pp_layers": (3, ("--parallel.pp", "3", "--parallel.dp_shard", "1"),
                  ["model.n_layers=2 is not divisible by parallel.pp=3", "parallel.pp in"]),
    "cp_seq": (2, ("--parallel.cp", "2", "--parallel.dp_shard", "1", "--data.seq_len", "66"),
               ["data.seq_len = 66 is not divisible by 2*parallel.cp = 4", "use data.seq_len 64"]),
    "pp_microbatches": (2, ("--parallel.pp", "2", "--parallel.dp_shard", "1", "--parallel.pp_microbatches", "1"),
                        ["needs parallel.pp_microbatches >= parallel.pp", "pp_schedule='gpipe'"]),
    "pp_tied": (2, ("--parallel.pp", "2", "--parallel.dp_shard", "1", "--model.tie_embeddings", "true"),
                ["model.tie_embeddings=true cannot be used with parallel.pp=2"]),
    "tp_tied": (2, ("--parallel.tp", "2", "--parallel.dp_shard", "1", "--model.tie_embeddings", "true"),
                ["model.tie_embeddings = true cannot be used with parallel.tp = 2"]),
    "negative": (2, ("--parallel.tp", "0"), ["parallel.tp must be >= 1, got 0"]),
}


def test_impossible_layouts(tmp_path, data_cache, capsys, monkeypatch):
    run = tmp_path / "run"
    for name, (world, layout, messages) in CASES.items():
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("LOCAL_RANK", "0")
        code, err = main_exit(capsys, *debug_train_args(run, data_cache, 2, *layout))
        assert code == 2, (name, err)
        for message in messages:
            assert message in err, (name, err)
        assert "Traceback" not in err
        assert not run.exists()


def test_predicted_oom_is_refused_unless_forced(tmp_path, data_cache, capsys, monkeypatch):
    """The planner's memory check runs before anything is built: with room for almost nothing
    (the CPU capacity is RAM / LOCAL_WORLD_SIZE) the run is refused with the breakdown and a
    fix; --force runs it anyway."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(10**9))
    run = tmp_path / "run"
    args = debug_train_args(run, data_cache, 2)
    code, err = main_exit(capsys, *args)
    assert code == 2, err
    for part in ("predicted not to fit", "weights", "activations", "Pass --force to run anyway"):
        assert part in err
    assert not run.exists()
    code, out, err = main_run(capsys, *args, "--force")
    assert code == 0, err
    assert "planner" in out and (run / "metrics.jsonl").exists()  # the memory line names its prediction


def test_one_process_layout_points_to_the_launchers(tmp_path, data_cache, capsys, monkeypatch):
    """`--parallel.tp 3` without torchrun: the message says how to launch 3 processes (the
    scaletrain wrapper and plain torchrun) and which one-process layout would run instead."""
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "GROUP_RANK"):
        monkeypatch.delenv(var, raising=False)
    code, err = main_exit(capsys, *debug_train_args(tmp_path / "r", data_cache, 2, "--parallel.tp", "3"))
    assert code == 2, err
    assert "scaletrain launch local --nproc-per-node 3 train" in err
    assert "torchrun --standalone --nproc-per-node 3 -m scaletrain train" in err
    assert "--parallel.tp 1" in err and err.count("\n") == 1  # one line
    assert not (tmp_path / "r").exists()


def test_layout_error_names_a_valid_layout_and_prints_once(tmp_path, data_cache, capsys, monkeypatch):
    """Under a launcher (WORLD_SIZE=2) every rank raises the same layout error before any process
    group exists: rank 0 prints it, naming layouts of 2 processes that also satisfy the model
    (tp 2 divides the debug model's 4 heads and 2 KV heads); the other ranks exit 2 silently."""
    args = debug_train_args(tmp_path / "r", data_cache, 2, "--parallel.tp", "3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("GROUP_RANK", "0")
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        code, err = main_exit(capsys, *args)
        assert code == 2
        if rank == 0:
            assert "does not divide the world size 2" in err and "--parallel.tp 2" in err, err
            assert "--nproc-per-node 3" in err
        else:
            assert err == ""
    # A model tp 2 cannot split (3 heads): the suggestion skips it and keeps a layout that runs.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    code, err = main_exit(capsys, *args, "--model.n_heads", "3", "--model.n_kv_heads", "3", "--model.dim", "48")
    assert code == 2 and "--parallel.tp 1" in err and "--parallel.tp 2" not in err, err
    assert not (tmp_path / "r").exists()


def test_a_rank_failing_alone_still_says_so(tmp_path, data_cache, capsys, monkeypatch):
    """An error that can differ between ranks (a file that only this rank's node lacks, here the
    checkpoint to resume from) is printed by the rank that meets it, prefixed with its rank,
    when it runs on another node than rank 0."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("GROUP_RANK", "1")
    args = debug_train_args(tmp_path / "r", data_cache, 2, "--resume", str(tmp_path / "node-local" / "step-00000010"))
    code, err = main_exit(capsys, *args)
    assert code == 2 and err.startswith("[rank 2] error: ") and "step-00000010" in err, err
    assert err.count("error:") == 1
