"""The benchmark harness: it times, checks, writes provenance and plots; never a timed assert."""

import csv
import os
import time

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


def test_the_commit_outside_a_repository_comes_from_fastnlp_commit(tmp_path, monkeypatch):
    # A lent GPU machine gets a copy of the tree without its git history.
    monkeypatch.delenv("FASTNLP_COMMIT", raising=False)
    assert harness.git_commit(cwd=str(tmp_path)) == "unknown"
    monkeypatch.setenv("FASTNLP_COMMIT", "8f1974b")
    assert harness.git_commit(cwd=str(tmp_path)) == "8f1974b"


def test_lstm_bench_leaves_cudnn_tf32_as_it_found_it():
    from fastnlp.bench import lstm as bench_lstm

    before = torch.backends.cudnn.allow_tf32
    with bench_lstm._ieee_float32():
        assert torch.backends.cudnn.allow_tf32 is False
    assert torch.backends.cudnn.allow_tf32 == before


def test_lstm_bench_on_cuda_also_times_the_step_loop():
    """On CUDA the LSTM cases add ours with the whole-sequence kernels off (read per call
    from the environment), so that one run shows what the kernel gains; not on the CPU."""
    from fastnlp.bench import lstm as bench_lstm

    seen = []

    def ours():
        seen.append(os.environ.get("FASTNLP_CUDA_LSTM_SEQUENCE_KERNEL"))
        return len(seen)

    impls = {bench_lstm.OURS: ours, bench_lstm.TORCH: lambda: None}
    assert bench_lstm._with_step_loop(impls, "cpu") is impls
    with_loop = bench_lstm._with_step_loop(impls, "cuda")
    assert set(with_loop) == {bench_lstm.OURS, bench_lstm.TORCH, bench_lstm.OURS_STEP_LOOP}
    before = os.environ.get("FASTNLP_CUDA_LSTM_SEQUENCE_KERNEL")
    with_loop[bench_lstm.OURS_STEP_LOOP]()
    with_loop[bench_lstm.OURS]()
    assert seen == ["0", before]
    assert os.environ.get("FASTNLP_CUDA_LSTM_SEQUENCE_KERNEL") == before


def test_a_case_must_name_its_implementations():
    with pytest.raises(ValueError, match="is not an impl"):
        harness.Case(op="op", name="case", impls={"ours": lambda: None}, baselines=["missing"], ours="ours")


@pytest.mark.parametrize("bidirectional", [True, False])
def test_lstm_cases_run_and_agree_at_a_tiny_shape(bidirectional):
    import fastnlp.nn
    from fastnlp.bench import lstm as bench_lstm

    d = bench_lstm._Data(3, 5, 4, 6, bidirectional, device="cpu", fastnlp_nn=fastnlp.nn)
    threads = torch.get_num_threads()
    for case in (bench_lstm._padded_case(d), bench_lstm._frozen_input_case(d), bench_lstm._packed_case(d),
                 bench_lstm._cell_loop_case(d), bench_lstm._layer_norm_case(d), bench_lstm._latency_case(d),
                 bench_lstm._cell_inference_case(d)):
        outputs = {name: run() for name, run in case.impls.items()}
        assert case.check(outputs) is None, case.name
    assert torch.get_num_threads() == threads  # the one-core products put the thread count back


def test_lstm_cpu_run_times_inference_at_batch_one_and_at_the_first_shapes_batch():
    from fastnlp.bench import lstm as bench_lstm

    names = {case.name for case in bench_lstm.cases("cpu", quick=True)}
    for batch in (1, bench_lstm.SHAPES[0][0]):
        for dtype in ("", " bfloat16"):
            assert f"inference B={batch} T=64 I=256 H=256 bi{dtype}" in names, names


@pytest.mark.parametrize("bidirectional", [True, False])
def test_lstm_bfloat16_cases_run_and_agree_at_a_tiny_shape(bidirectional):
    # The CUDA run has these for every shape, the CPU run for the first; on
    # the CPU without the products-alone floor (see fastnlp.bench.lstm).
    import fastnlp.nn
    from fastnlp.bench import lstm as bench_lstm

    d = bench_lstm._Data(3, 5, 4, 6, bidirectional, device="cpu", fastnlp_nn=fastnlp.nn, dtype=torch.bfloat16)
    assert d.shape.endswith("bfloat16")
    for case in (bench_lstm._padded_case(d), bench_lstm._packed_case(d)):
        assert bench_lstm.PRODUCTS not in case.impls and bench_lstm.PRODUCTS not in case.baselines
        outputs = {name: run() for name, run in case.impls.items()}
        assert case.check(outputs) is None, case.name
        loss, grads = outputs[bench_lstm.OURS]
        assert loss.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    latency = bench_lstm._latency_case(d)
    outputs = {name: run() for name, run in latency.impls.items()}
    assert latency.name.endswith("bfloat16") and outputs[bench_lstm.OURS].dtype == torch.bfloat16
    assert latency.check(outputs) is None
    outputs[bench_lstm.OURS] = outputs[bench_lstm.OURS] + 0.1  # off by twice bfloat16's tolerance: caught
    assert latency.check(outputs) is not None


class _CountMatmulFlops(TorchDispatchMode):
    """Sums 2 * M * K * N over the matrix products run under it, whatever their overload."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "addmm_"):
            a, b = args[-2:] if name != "mm" else args[:2]
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        elif name == "_linear_pointwise":  # oneDNN's x (m, k) @ weight (n, k)^T
            x, weight = args[:2]
            self.flops += 2 * x.shape[0] * x.shape[1] * weight.shape[0]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("directions", [1, 2])
@pytest.mark.parametrize("per_step_weight_grads", [True, False])
def test_lstm_products_floor_does_one_step_of_products(per_step_weight_grads, directions):
    # Forward (x W_ih^T and h W_hh^T) and backward (input, hidden and both
    # weight gradients): three times 2 * rows * 4H * (I + H) flops per
    # direction, no more. (One intra-op thread: the directions then run here,
    # one after the other, where the counting mode sees them.)
    import fastnlp.nn
    from fastnlp.bench import lstm as bench_lstm

    B, T, I, H = 3, 5, 4, 6
    d = bench_lstm._Data(B, T, I, H, False, device="cpu", fastnlp_nn=fastnlp.nn)
    rows = bench_lstm._rows_per_step(d.lengths)
    assert rows[0] == B and sum(rows) == int(d.lengths.sum())
    run = bench_lstm._products_alone(d, rows, directions, per_step_weight_grads)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _CountMatmulFlops() as counter:
            run()
    finally:
        torch.set_num_threads(threads)
    assert counter.flops == directions * 3 * 2 * sum(rows) * 4 * H * (I + H)


def test_two_directions_of_products_run_at_once_on_one_thread_each():
    import threading

    from fastnlp.bench import lstm as bench_lstm

    threads = torch.get_num_threads()
    both_started = threading.Barrier(2, timeout=30)  # broken (an error) unless both run at the same time
    seen = []

    def call():
        seen.append((threading.get_ident(), torch.get_num_threads()))
        both_started.wait()

    bench_lstm._concurrently_on_one_thread_each([call, call])
    assert len({ident for ident, _ in seen}) == 2
    assert [n for _, n in seen] == [1, 1]
    assert torch.get_num_threads() == threads


def test_an_error_in_the_other_thread_is_raised_by_the_caller():
    from fastnlp.bench import lstm as bench_lstm

    def fails():
        raise ValueError("in the worker")

    with pytest.raises(ValueError, match="in the worker"):
        bench_lstm._concurrently_on_one_thread_each([lambda: None, fails])
