"""What the training data is: every file prepare reads, by digest, and the settings that shape its examples.

One hash of both names the data in an adapter's metadata, decides whether a run may resume, and is the part of
the prepared-data cache key that stands for the files. Each file is read and hashed once per run."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from lorakit.data.sources import is_saved_dataset, source_files
from lorakit.fs import sha256_file
from lorakit.recipe import DataSection


@dataclass(frozen=True)
class Content:
    hash: str  # "sha256:<hex>"
    files: dict[str, str]  # "sources[i]/<name>" or "eval_split/<name>" -> sha256 of that file
    settings: dict  # the data section as hashed: no paths, no `cache` or `packing`

    def short_files(self) -> dict[str, str]:
        """The digests cut to 12 characters: enough to tell which file changed, small enough for run.json."""
        return {name: digest[:12] for name, digest in self.files.items()}


def _file_digests(path: Path) -> list[tuple[str, str]]:
    """(name under `path`, sha256) of every file prepare reads from `path`; a saved dataset's files too."""
    files = sorted(f for f in path.rglob("*") if f.is_file()) if is_saved_dataset(path) else source_files(path)
    return [(f.relative_to(path).as_posix() if f != path else f.name, sha256_file(f)) for f in files]


def data_content(section: DataSection) -> Content:
    """The digests of the sources' files and the eval file, and one hash of them with the data settings.

    Paths are left out of the hash (the same bytes moved elsewhere are the same data); the files are named by
    their place in the recipe instead, so a changed file is reported as `sources[1]/notes.md`. `cache` and
    `packing` are left out: neither changes which examples prepare makes (packing is part of the resume key).
    """
    roles = [(f"sources[{i}]", Path(s.path)) for i, s in enumerate(section.sources)]
    if isinstance(section.eval_split, str):
        roles.append(("eval_split", Path(section.eval_split)))
    files = {f"{role}/{name}": digest for role, path in roles for name, digest in _file_digests(path)}
    unhashed = {"cache": True, "packing": True, "sources": {"__all__": {"path"}}}
    settings = section.model_dump(mode="json", exclude=unhashed)
    if isinstance(section.eval_split, str):
        settings["eval_split"] = "file"
    h = hashlib.sha256(json.dumps({"settings": settings, "files": files}, sort_keys=True).encode())
    return Content("sha256:" + h.hexdigest(), files, settings)


def content_hash(section: DataSection) -> str:
    """The data's hash alone (for tests and tools that do not prepare the data)."""
    return data_content(section).hash
