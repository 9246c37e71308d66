"""bench/report.py: the targets table judges each lorakit scenario against its own baseline."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
report = pytest.importorskip("report")


def scenario(name, tokens_per_s, peak_rss_mb, eval_loss):
    return {"name": name, "tokens_per_s": tokens_per_s, "peak_rss_mb": peak_rss_mb, "eval_loss": eval_loss}


def rows_by_target(lines):
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}


def test_each_target_is_judged_against_its_own_baseline():
    results = {
        "scenarios": [
            scenario("trl-peft", 200.0, 3000.0, 3.50),
            scenario("trl-peft-qlora", 100.0, 2000.0, 3.60),
            scenario("lorakit", 520.0, 2100.0, 3.60),  # 2.6x, but +2.9% loss
            scenario("lorakit-qlora", 190.0, 990.0, 3.60),  # 1.9x its baseline (0.95x trl-peft), 0.495x its memory
        ],
        "extras": {
            "data_prep": {"runs": [{"name": "prep-plain", "seconds": 9.0}, {"name": "prep-lorakit", "seconds": 3.0}]},
            "first_token": {"rows": {"lorakit generate": {"median_s": 2.5}}},
        },
    }
    got = rows_by_target(report.targets_table(results))
    assert got["LoRA tokens/s vs trl-peft"] == ["2.60×", "≥ 2.5×", "yes"]
    assert got["LoRA eval loss vs trl-peft"] == ["+2.9%", "±2%", "**no**"]
    assert got["QLoRA tokens/s vs trl-peft-qlora"] == ["1.90×", "≥ 2×", "**no**"]
    assert got["QLoRA peak RSS vs trl-peft-qlora"] == ["0.49×", "≤ 0.5×", "yes"]
    assert got["data preparation vs the plain script"] == ["3.00×", "≥ 3×", "yes"]
    assert got["lorakit generate, first token (s)"] == ["2.50 s", "< 3 s", "yes"]


def test_failed_or_missing_scenarios_are_left_out():
    results = {"scenarios": [scenario("trl-peft", 200.0, 3000.0, 3.5), {"name": "lorakit", "error": "exit 1"}]}
    assert report.targets_table(results)[2:] == []
