"""Base model references (hub id, local folder, GGUF file, embedded model) and their weights' fingerprint."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.fs import cache_dir, sha256_file
from lorakit.models.embedded import EMBEDDED, embedded_dir, pull_embedded

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


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


def portable_id(reference: str, ref: ModelRef) -> str:
    """The base model's name as another machine resolves it (adapter_config.json's base_model_name_or_path): the
    hub id of a hub model or of the model the embedded one is; for a local folder or file, the path as the recipe
    gave it (never a path lorakit chose, such as its cache)."""
    if ref.kind == "hub":
        return ref.path
    if ref.kind == "embedded":
        return EMBEDDED[reference.removeprefix("embedded:")]["hub_id"]
    return reference


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
        h.update(sha256_file(f).encode())
    digest = "sha256:" + h.hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(digest)
    return digest


def parameter_count(ref: ModelRef) -> int:
    """Parameters in the base's safetensors files, read from their headers (no weights read); 0 if unknown."""
    import struct

    root = local_files(ref)
    if root is None or ref.gguf_file:
        return 0
    total = 0
    for f in sorted(root.glob("*.safetensors")):
        try:
            with f.open("rb") as fh:
                (size,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(size))
        except (OSError, ValueError, struct.error):
            return 0
        for name, info in header.items():
            if name != "__metadata__":
                n = 1
                for d in info.get("shape", []):
                    n *= d
                total += n
    return total
