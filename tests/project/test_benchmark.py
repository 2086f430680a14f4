"""The benchmark module runs and reports (its numbers are not checked here: speed is claimed from
benchmark runs only)."""

from __future__ import annotations

from fused_optim.benchmark.cli import main
from fused_optim.benchmark.report import plot_speedups
from fused_optim.benchmark.timing import Bench


def test_quick_table_for_one_suite(capsys):
    rows = main(["--rounds", "1", "--suites", "clip", "--cases", "b"])
    assert {r.op for r in rows} == {"clip_grad_norm_ clipping", "clip_grad_norm_ no clip", "clip_grad_value_"}
    assert all(r.fused_ms > 0 and r.ref_ms > 0 for r in rows)
    out = capsys.readouterr().out
    assert "| op | case | reference |" in out and "of mul_" in out


def test_plot_writes_a_png(tmp_path):
    path = tmp_path / "speedup.png"
    plot_speedups(Bench("cpu", rounds=1), str(path), counts=(10, 100), totals=(10**4, 10**5))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_flat_suite_reports_its_rows():
    rows = main(["--rounds", "1", "--suites", "flat", "--cases", "b"])
    assert {r.op for r in rows} >= {
        "flat clip_grad_norm_ clipping", "flat clip_grad_norm_ no clip", "flat l1l2_penalty", "flat l1l2_grad_",
        "ModelEMA.update, flat", "clip_grad_norm_(model.parameters()) no clip, flattened",
        "host overhead: flat clip_grad_norm_",
    }
    assert {r.yardstick for r in rows if r.op == "ModelEMA.update, flat"} == {"lerp_"}


def test_pre_step_and_step_suites_report_their_rows():
    rows = main(["--rounds", "1", "--suites", "pre_step", "--cases", "b"])
    assert {r.op for r in rows} == {"pre_step_ no clip", "pre_step_ clipping", "flat pre_step_ no clip", "flat pre_step_ clipping"}
    assert all(r.ref_ms > 0 and r.fused_ms > 0 for r in rows)
    rows = main(["--rounds", "1", "--suites", "step", "--cases", "a"])
    assert len(rows) == 2 and all(r.op == "transformer training step" for r in rows)


def test_structured_dropout_suite_reports_its_rows():
    rows = main(["--rounds", "1", "--suites", "structured_dropout", "--cases", "a"])
    assert {r.op for r in rows} == {
        "drop_path fwd", "dropout1d fwd", "dropout1d fwd inplace", "drop_path fwd+bwd", "drop_path_add (x + drop_path(branch))",
    }
    assert {r.reference for r in rows if r.op == "drop_path_add (x + drop_path(branch))"} == {
        "x + timm drop_path(branch)", "yardstick x + y"}


def test_clients_suite_reports_its_rows():
    import importlib.util

    rows = main(["--rounds", "1", "--suites", "clients", "--cases", "a"])
    expected = {"nanoGPT-style iteration"} | ({"HF Trainer step (GPT-2)"} if importlib.util.find_spec("transformers") else set())
    assert {r.op for r in rows} == expected
    assert all(r.ref_ms > 0 and r.fused_ms > 0 for r in rows)
