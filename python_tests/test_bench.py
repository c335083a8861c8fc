"""The benchmark harness: it times, checks, writes provenance and plots; never a timed assert."""

import csv
import time

import pytest

from fastnlp.bench import harness


def _case(op: str, check_fails: bool = False) -> harness.Case:
    def slow():
        time.sleep(0.002)
        return 1

    def fast():
        return 2 if check_fails else 1

    def check(outputs):
        return None if outputs["ours"] == outputs["baseline"] else "values differ"

    return harness.Case(op=op, name=f"{op} case", impls={"ours": fast, "baseline": slow}, baselines=["baseline"],
                        ours="ours", check=check)


def test_run_writes_a_table_and_a_csv_with_provenance(tmp_path, capsys):
    results = harness.run([_case("first"), _case("second", check_fails=True)], "cpu", repeats=3,
                          out_dir=str(tmp_path))
    printed = capsys.readouterr().out
    assert "first case" in printed and "second case" in printed
    with open(tmp_path / "bench_cpu.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(row["op"], row["impl"], row["role"]) for row in rows] == [
        ("first", "ours", "ours"), ("first", "baseline", "baseline"),
        ("second", "ours", "ours"), ("second", "baseline", "baseline")]
    for row in rows:
        assert row["device"] == "cpu" and row["torch"] and row["commit"] and row["date"]
        assert int(row["repeats"]) == 3 and float(row["median_ms"]) > 0
    assert rows[0]["check"] == "ok" and rows[2]["check"].startswith("FAILED")
    # The speed-up column is the baseline's median over ours', whatever its value.
    baseline = rows[1]
    assert float(baseline["speedup_vs_this"]) == pytest.approx(
        float(baseline["median_ms"]) / float(rows[0]["median_ms"]), rel=0.01)
    assert results[0].speedup("ours") == 1.0


def test_plot_is_drawn_from_the_csv(tmp_path):
    pytest.importorskip("matplotlib")  # an optional extra: without it the table and CSV still come out
    harness.run([_case("first"), _case("second")], "cpu", repeats=2, out_dir=str(tmp_path))
    png = harness.plot(str(tmp_path / "bench_cpu.csv"), str(tmp_path / "again.png"))
    assert png is not None and (tmp_path / "again.png").read_bytes().startswith(b"\x89PNG")


def test_a_second_run_appends_to_the_csv(tmp_path):
    for _ in range(2):
        harness.run([_case("op")], "cpu", repeats=2, out_dir=str(tmp_path))
    with open(tmp_path / "bench_cpu.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 4


def test_a_case_must_name_its_implementations():
    with pytest.raises(ValueError, match="is not an impl"):
        harness.Case(op="op", name="case", impls={"ours": lambda: None}, baselines=["missing"], ours="ours")
