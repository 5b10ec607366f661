"""``make bench-gpu``'s script on the CPU: its one-line refusal without CUDA, its batch search
and a toy-size run of every registered model (the GPU run itself needs a GPU)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_gpu  # noqa: E402

from mirror.models import MODELS  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_refuses_in_one_line_with_exit_code_2(capsys):
    assert bench_gpu.main([]) == bench_gpu.NO_GPU_EXIT == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA device" in err


@pytest.mark.parametrize("limit", [1, 63, 64, 1000, 5000])
def test_largest_batch_search_finds_the_limit_within_3_percent(limit: int):
    probes: list[int] = []

    def fits(batch: int) -> bool:
        probes.append(batch)
        return batch <= limit

    found, at_cap = bench_gpu.largest_batch(fits, 64, cap=4096)
    if limit >= 4096:
        assert (found, at_cap) == (4096, True)
    else:
        assert not at_cap and found <= limit and found >= 0.97 * limit
    assert len(probes) < 20


def test_oom_is_recognised_and_other_errors_are_not():
    assert bench_gpu.is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert bench_gpu.is_oom(RuntimeError("CUDA error: out of memory"))
    assert not bench_gpu.is_oom(RuntimeError("shape mismatch"))


def test_tiny_cpu_run_measures_every_registered_model_and_prints_the_sizing(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert bench_gpu.main(["--device", "cpu", "--tiny", "--batch", "8", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert {r["batch"] for r in result["results"]} == {8}  # --batch overrides the plan's 16
    assert sorted({r["model"] for r in result["results"]}) == sorted(n for n, s in MODELS.items() if s.view.name == "sequence")
    for row in result["results"]:
        assert row["tokens_per_s"] > 0 and row["patients_per_s"] > 0
        assert row["max_batch_worst_case"] >= 4 and row["gpu_hours_per_epoch_100m"] > 0
    assert result["mean_tokens_per_patient"] > 1
    printed = capsys.readouterr().out
    assert "100M patients" in printed and "| ae |" in printed and "| wae |" in printed
