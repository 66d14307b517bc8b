"""The training-step comparison's inputs on a CPU (gptcore.bench.steps): a preset's model dims, batch and
micro-batches per step, the vocabulary override, a clear refusal of an unknown preset, and the results/ rows it
writes from records."""

from __future__ import annotations

from gptcore.bench import steps


def test_a_presets_dims_and_batches_with_the_vocabulary_it_implies_or_is_given():
    config, batch, accum = steps.preset_config("shakespeare_char", None)
    assert (config.n_layer, config.n_embd, config.block_size, config.dropout, batch) == (6, 384, 256, 0.2, 64)
    assert config.vocab_size == steps.CHAR_VOCAB and accum == 1
    config, batch, accum = steps.preset_config("gpt2_small", None)
    assert (config.n_layer, config.n_embd, config.vocab_size, batch, accum) == (12, 768, 50304, 12, 4)
    assert steps.preset_config("gpt2_small", 65)[0].vocab_size == 65


def test_an_unknown_preset_is_one_line_naming_the_presets(capsys):
    assert steps.main(["--preset", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'nosuch'" in err and "shakespeare_char" in err


def test_the_results_rows_carry_the_machine_and_each_step_and_category():
    env = dict(device="NVIDIA H100", date="2026-12-07", torch="2.11", cuda_tile="1.7.0", commit="abc")
    records = [
        dict(status="ok", backend="cutile", mode="graph", ms=5.65432),
        dict(status="skipped", backend="torch", mode="eager"),
    ]
    profiles = {"cutile": {"categories": {"matmul": {"ms": 2.0, "share": 0.5, "kernels": 100.0}}, "total_ms": 4.0,
                           "kernels": 290.0}}  # fmt: skip
    rows = steps.csv_rows("dims", env, records, profiles)
    assert [(r["backend"], r["what"], r["ms"]) for r in rows] == [
        ("cutile", "step graph", 5.6543),
        ("cutile", "profile matmul", 2.0),
        ("cutile", "profile total", 4.0),
    ]
    assert all(r["gpu"] == "NVIDIA H100" and r["commit"] == "abc" and set(r) <= set(steps.CSV_FIELDS) for r in rows)


def test_results_rows_append_under_one_header(tmp_path):
    from gptcore.bench.timing import append_csv

    path = tmp_path / "rows.csv"
    append_csv(path, ["gpu", "ms"], [{"gpu": "H100", "ms": 1.5, "extra": "left out"}])
    append_csv(path, ["gpu", "ms"], [{"gpu": "H200", "ms": 1.25}])
    assert path.read_text().splitlines() == ["gpu,ms", "H100,1.5", "H200,1.25"]
