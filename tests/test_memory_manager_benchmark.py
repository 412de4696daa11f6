"""Smoke test of ``benchmarks/paged_memory_benchmark.py``: it runs and its results have the promised
shape.  No timing is asserted (the machine is shared and noisy); the memory numbers come from a
seeded simulation, so their order (paged wastes less and fits more) is checked."""

import json

import pytest
import torch

from benchmarks.common import machine_description
from benchmarks.paged_memory_benchmark import (
    PagedBenchConfig, config_from_args, main, make_workload, parse_args, quick_config, render, run_paged_benchmark,
)

TINY = dict(requests=16, max_len=256, prompt_median=24, output_median=24, budget_seqs=2, prefix_requests=2,
            system_len=32, d_model=32, progress=False, threads=1)


@pytest.fixture(scope="module")
def result():
    return run_paged_benchmark(quick_config(**TINY))


def test_simulation_rows_and_paging_wins(result):
    reserve, paged = result["simulation"]
    assert (reserve["mode"], paged["mode"]) == ("reserve max length", "paged")
    for r in (reserve, paged):
        assert 0 <= r["waste"] < 1 and 0 < r["utilization"] <= 1 and r["steps"] > 0 and r["max_in_flight"] >= 1
    assert reserve["preemptions"] == 0 and reserve["max_in_flight"] <= TINY["budget_seqs"]
    assert paged["waste"] < reserve["waste"] and paged["mean_in_flight"] > reserve["mean_in_flight"]
    assert result["fit"]["paged"] > result["fit"]["reserve_max_length"] == TINY["budget_seqs"]


def test_prefix_rows(result):
    px = result["prefix"]
    full, shared = px["rows"]
    assert full["tokens_prefilled"] == full["tokens_total"] > shared["tokens_prefilled"]
    saved = (TINY["system_len"] // 16) * 16 * (TINY["prefix_requests"] - 1)  # full blocks of the system prompt
    assert full["tokens_total"] - shared["tokens_prefilled"] == saved
    assert shared["blocks_held"] < full["blocks_held"]
    assert px["max_abs_logit_diff"] < 1e-4
    assert all(s > 0 for r in px["rows"] for s in r["samples_s"]) and shared["speedup"] > 0


def test_render_json_cli_and_threads(result, tmp_path, capsys):
    text = render(result, machine_description())
    assert "reserved but unused (%)" in text and "Prefill of 2 requests" in capsys.readouterr().out
    before = torch.get_num_threads()
    out = tmp_path / "pm.json"
    main(["--quick", "--no-progress", "--requests", "8", "--prefix-requests", "2", "--threads", "1",
          "--out", str(out)])
    torch.set_num_threads(before)
    data = json.loads(out.read_text())
    assert set(data) == {"machine", "command", "results"} and data["command"].endswith(f"--out {out}")
    assert out.with_suffix(".md").read_text().startswith("## Paged KV memory benchmark")
    cfg = config_from_args(parse_args(["--quick", "--budget-seqs", "3", "--seed", "2"]))
    assert (cfg.budget_seqs, cfg.seed, cfg.requests) == (3, 2, quick_config().requests)
    assert PagedBenchConfig().requests == 300 and len(make_workload(cfg)) == cfg.requests
    with pytest.raises(SystemExit):
        parse_args(["--requests", "0"])
