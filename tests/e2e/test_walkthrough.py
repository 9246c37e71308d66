"""The README's "two domains" walkthrough on the embedded model, and the memory a merge needs."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import read_meta

pytestmark = pytest.mark.e2e


def test_both_adapters_train_and_list(walkthrough):
    store = walkthrough.workdir / "adapters"
    for name in ("quickstart", "tides"):
        m = read_meta(store, name)["metrics"]
        assert m["eval_loss_after"] < m["eval_loss_before"] - 0.5, (name, m)  # measured: -1.4 for each
    listing = walkthrough.result.stdout.split("saved adapter 'tides'", 1)[1]
    assert "quickstart" in listing and "tides" in listing


def test_side_by_side_generation(walkthrough):
    out = walkthrough.result.stdout
    order = [out.find(h) for h in ("base model", "adapter quickstart", "adapter tides", "merged:")]
    assert -1 not in order and order == sorted(order), out[-3000:]


def test_merged_and_gguf_models_run_and_agree_with_base_plus_adapter(walkthrough, embedded):
    work = walkthrough.workdir
    merged_line = re.search(r"^merged: (.*)$", walkthrough.result.stdout, re.M).group(1)
    gguf_line = re.search(r"^gguf: (.*)$", walkthrough.result.stdout, re.M).group(1)
    assert merged_line.startswith("Day 3. Wind:") and gguf_line.startswith("Day 3. Wind:")
    assert len(merged_line) > len("Day 3. Wind:") + 20
    # the merged folder equals base + adapter in plain PEFT, and the q8_0 GGUF is within its quantization
    tok = AutoTokenizer.from_pretrained(work / "merged" / "quickstart")
    ids = tok("Day 3. Wind: NW, force 4.", return_tensors="pt")["input_ids"]
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(embedded), str(work / "adapters" / "quickstart")
    )
    merged = AutoModelForCausalLM.from_pretrained(work / "merged" / "quickstart")
    gguf = AutoModelForCausalLM.from_pretrained(work / "merged", gguf_file="quickstart-q8_0.gguf", dtype=torch.float32)
    with torch.no_grad():
        want, got, q8 = (m.eval()(input_ids=ids).logits for m in (peft, merged, gguf))
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) / scale < 1e-4
    assert float((q8 - want).abs().max()) / scale < 0.15
    assert (q8[0, -1].argmax() == want[0, -1].argmax()).item()


def _peak_mb(code: str, *args: str, cwd) -> float:
    """Run python `code` in a fresh process; its peak resident memory (VmHWM) in MB, read as it exits."""
    probe = (
        "import atexit, re\n"
        "def _report():\n"
        "    hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
        "    print(f'VmHWM {int(hwm) / 1024:.0f}', flush=True)\n"
        "atexit.register(_report)\n"
    )
    res = subprocess.run([sys.executable, "-c", probe + code, *args], cwd=cwd, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    return float(re.search(r"VmHWM (\d+)", res.stdout).group(1))


def test_merge_never_holds_two_copies_of_the_model(walkthrough, embedded, tmp_path):
    """Measured: 513 MB model, 1197 MB peak for `lorakit merge`, 402 MB for the imports alone: 1.55×, i.e. one
    copy of the weights plus ~0.3 GB of verification (4 × 128 × 49k reference logits in float32, a forward
    pass). A second copy of the weights would add 1×."""
    model_mb = (embedded / "model.safetensors").stat().st_size / 2**20
    imports = _peak_mb(
        "from lorakit import cli, merge; cli.quiet_libraries(); import peft\n"
        "from transformers import AutoModelForCausalLM\n",
        cwd=walkthrough.workdir,
    )
    merge = _peak_mb(
        "import sys\nsys.argv[0] = 'lorakit'\nfrom lorakit.cli import main\nmain()\n",
        "merge", "quickstart", "--out", str(tmp_path / "m"), cwd=walkthrough.workdir,
    )  # fmt: skip
    assert (tmp_path / "m" / "model.safetensors").is_file()
    extra = (merge - imports) / model_mb
    assert extra < 2.0, f"merge peak {merge:.0f} MB, imports {imports:.0f} MB, model {model_mb:.0f} MB: {extra:.2f}x"
