"""One run of the learning-quality benchmark, in its own process: `python bench/quality_run.py SPEC.json`.

Kinds (spec["kind"]): `corpora` builds the train/eval corpora; `base` evaluates the unmodified base model;
`full` fine-tunes every weight with transformers' Trainer; `lorakit` trains an adapter with lorakit.train.
Every run that yields a model scores it with the same function, `held_out`. The result is written as JSON
to spec["out"] (quality.py spawns these processes and collects the results).
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import common

EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED = f"embedded:{EMBEDDED_NAME}"
SEED = 42
BLOCK = 512
MIN_DOC_TOKENS = 32  # shorter documents (an empty __init__.py) are skipped

# code: training documents from these standard-library packages, eval documents from these single-file
# modules: the two sets cannot share a file.
CODE_TRAIN = ("json", "email", "logging", "http", "urllib", "xml", "concurrent", "importlib", "sqlite3",
              "asyncio", "wsgiref", "html", "dbm", "multiprocessing", "unittest", "tomllib", "zoneinfo",
              "ctypes")  # fmt: skip
CODE_EVAL = ("argparse", "ast", "calendar", "configparser", "csv", "dataclasses", "difflib", "fractions",
             "gzip", "heapq", "inspect", "pprint", "shutil", "statistics", "string", "tarfile", "textwrap",
             "zipfile")  # fmt: skip
# structured: Adobe Font Metrics files, grouped by family (Karl Berry's names: p + two letters, cm* for Computer
# Modern). These families are held out whole: New Century Schoolbook and Times.
AFM_EVAL_FAMILIES = ("pnc", "ptm")
PROSE_EVAL_EVERY = 4  # every 4th documentation topic (sorted keys) is held out


# --- corpora --------------------------------------------------------------------------------------


def round_robin(groups: list[list]) -> list:
    """The first item of every group, then the second of every group, and so on."""
    out = []
    for i in range(max((len(g) for g in groups), default=0)):
        out += [g[i] for g in groups if i < len(g)]
    return out


def code_documents() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])

    def package_files(name: str) -> list[Path]:
        files = sorted((stdlib / name).rglob("*.py"))
        return [f for f in files if not {"test", "tests", "__pycache__"} & set(f.relative_to(stdlib).parts)]

    groups = [package_files(p) for p in CODE_TRAIN if (stdlib / p).is_dir()]
    train = [(str(f.relative_to(stdlib)), f.read_text(encoding="utf-8")) for f in round_robin(groups)]
    held = [stdlib / f"{m}.py" for m in CODE_EVAL if (stdlib / f"{m}.py").is_file()]
    held_out = [(f.name, f.read_text(encoding="utf-8")) for f in held]
    return train, held_out


def prose_documents() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    from pydoc_data.topics import topics

    keys = sorted(topics)
    train = [(k, topics[k]) for i, k in enumerate(keys) if i % PROSE_EVAL_EVERY != PROSE_EVAL_EVERY - 1]
    held_out = [(k, topics[k]) for i, k in enumerate(keys) if i % PROSE_EVAL_EVERY == PROSE_EVAL_EVERY - 1]
    return train, held_out


def afm_family(name: str) -> str:
    return "cm" if name.startswith("cm") else name[:3]


def structured_documents() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    import matplotlib

    files = sorted((Path(matplotlib.get_data_path()) / "fonts" / "afm").glob("*.afm"))
    families = sorted({afm_family(f.name) for f in files})

    def docs(fams: list[str]) -> list[tuple[str, str]]:
        groups = [[f for f in files if afm_family(f.name) == fam] for fam in fams]
        return [(f.name, f.read_text(encoding="latin-1")) for f in round_robin(groups)]

    train = docs([f for f in families if f not in AFM_EVAL_FAMILIES])
    return train, docs([f for f in families if f in AFM_EVAL_FAMILIES])


CORPORA = {"code": code_documents, "prose": prose_documents, "structured": structured_documents}


def count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def cut_to(tokenizer, text: str, limit: int) -> tuple[str, int]:
    """`text` cut at a line boundary to at most `limit` tokens, and its token count ("" if no line fits)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) <= limit:
        return text, len(enc["input_ids"])
    end = enc["offset_mapping"][limit][0]  # where the first token past the limit starts
    lines = text[:end].splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines.pop()  # a partial line
    while lines:
        piece = "".join(lines)
        n = count(tokenizer, piece)
        if n <= limit:
            return piece, n
        lines.pop()
    return "", 0


def take(tokenizer, docs: list[tuple[str, str]], budget: int, min_docs: int) -> list[dict]:
    """Documents in order until `budget` tokens; none longer than budget / min_docs (cut at a line boundary)."""
    cap = max(budget // max(min_docs, 1), MIN_DOC_TOKENS)
    out, total = [], 0
    for source, text in docs:
        room = min(budget - total, cap)
        if room < MIN_DOC_TOKENS:
            break
        piece, n = cut_to(tokenizer, text, room)
        if n < MIN_DOC_TOKENS:
            continue
        out.append({"source": source, "text": piece, "tokens": n, "cut": piece != text})
        total += n
    return out


def safe_name(source: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in source)


def build_corpus(tokenizer, corpus: str, root: Path, train_tokens: int, eval_tokens: int, min_docs: int) -> dict:
    """<root>/train/NNN-<source>.txt (one document each) and <root>/eval.txt (held-out documents, blank-line joined)."""
    import shutil

    train_docs, eval_docs = CORPORA[corpus]()
    train = take(tokenizer, train_docs, train_tokens, min_docs)
    held = take(tokenizer, eval_docs, eval_tokens, min_docs)
    overlap = {d["source"] for d in train} & {d["source"] for d in held}
    if overlap:
        raise SystemExit(f"{corpus}: train and eval share {sorted(overlap)}")
    if root.exists():
        shutil.rmtree(root)
    (root / "train").mkdir(parents=True)
    digest = hashlib.sha256()
    for i, d in enumerate(train):
        d["file"] = f"train/{i:03d}-{safe_name(d['source'])}.txt"
        (root / d["file"]).write_text(d["text"], encoding="utf-8")
        digest.update(d["file"].encode() + b"\0" + d["text"].encode())
    eval_text = "\n\n".join(d["text"].strip("\n") for d in held) + "\n"
    (root / "eval.txt").write_text(eval_text, encoding="utf-8")
    digest.update(b"eval.txt\0" + eval_text.encode())

    def listing(docs: list[dict]) -> list[dict]:
        return [{k: d[k] for k in ("source", "file", "tokens", "cut") if k in d} for d in docs]

    return {
        "corpus": corpus,
        "dir": str(root),
        "train_dir": str(root / "train"),
        "eval_file": str(root / "eval.txt"),
        "train_tokens": sum(d["tokens"] for d in train),
        "eval_tokens": sum(d["tokens"] for d in held),
        "eval_file_tokens": count(tokenizer, eval_text),
        "train_documents": listing(train),
        "eval_documents": listing(held),
        "digest": digest.hexdigest()[:16],
    }


def run_corpora(spec: dict) -> dict:
    """Build every corpus the spec names; also report where the embedded model's folder is."""
    from transformers import AutoTokenizer

    from lorakit.models.embedded import pull_embedded

    model_dir = pull_embedded(EMBEDDED_NAME)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    root = Path(spec["corpora_dir"])
    built = {}
    for corpus in spec["corpora"]:
        built[corpus] = build_corpus(
            tokenizer, corpus, root / corpus, spec["train_tokens"], spec["eval_tokens"], spec["min_docs"]
        )
        print(f"{corpus}: {built[corpus]['train_tokens']} train tokens, {built[corpus]['eval_tokens']} eval tokens")
    return {"model_dir": str(model_dir), "corpora": built}


# --- the held-out metric --------------------------------------------------------------------------


def held_out(model, tokenizer, eval_file: str) -> dict:
    """Mean next-token loss on eval.txt, as `lorakit eval` computes it: the same for every run."""
    from lorakit.use import evaluate

    model.eval()
    blocks = evaluate.examples(Path(eval_file), "text", tokenizer, BLOCK)
    started = time.perf_counter()
    loss, tokens = evaluate.loss(model, blocks)
    return {
        "eval_loss": loss,
        "perplexity": math.exp(loss),
        "eval_tokens_scored": tokens,
        "eval_blocks": len(blocks),
        "eval_digest": common.blocks_digest([b.input_ids for b in blocks]),
        "eval_s": round(time.perf_counter() - started, 1),
    }


def seed_everything() -> None:
    import torch
    from transformers import set_seed

    torch.manual_seed(SEED)
    set_seed(SEED)


# --- runs -----------------------------------------------------------------------------------------


def run_base(spec: dict) -> dict:
    import lorakit

    seed_everything()
    started = time.perf_counter()
    model, tokenizer = lorakit.load(None, base=EMBEDDED, store=spec["store"])
    out = {"load_s": round(time.perf_counter() - started, 1)}
    out.update(held_out(model, tokenizer, spec["eval_file"]))
    return out


def run_full(spec: dict) -> dict:
    """Every weight trained, the transformers tutorials' way: EOS-joined documents cut into blocks, Trainer."""
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    from scenario import tutorial_blocks

    seed_everything()
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"])
    out = {"load_s": round(time.perf_counter() - started, 1)}
    before = held_out(model, tokenizer, spec["eval_file"])
    out.update(eval_loss_before=before["eval_loss"], eval_digest_before=before["eval_digest"])
    texts = [f.read_text(encoding="utf-8") for f in sorted(Path(spec["train_dir"]).glob("*.txt"))]
    train_ds = tutorial_blocks(tokenizer, texts, BLOCK)
    args = TrainingArguments(
        output_dir=str(Path(spec["workdir"]) / "out" / spec["name"]),
        per_device_train_batch_size=4,
        num_train_epochs=1,
        learning_rate=spec["lr"],
        lr_scheduler_type="cosine",
        warmup_steps=0.05,  # a ratio of the steps (transformers 5 took warmup_ratio into warmup_steps)
        seed=SEED,
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, data_collator=collator)
    started = time.perf_counter()
    result = trainer.train()
    out.update(
        train_s=round(time.perf_counter() - started, 1),
        train_loss=result.training_loss,
        steps=trainer.state.global_step,
        train_tokens_seen=len(train_ds) * BLOCK,  # every block is full: the remainder is dropped
        learning_rate=spec["lr"],
        optimizer=str(getattr(args.optim, "value", args.optim)),
        precision="bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        log=[h for h in trainer.state.log_history if "loss" in h],
    )
    out.update(held_out(model, tokenizer, spec["eval_file"]))
    return out


def merge(into: dict, changes: dict) -> dict:
    """`into` with `changes` applied key by key (nested mappings merged, other values replaced)."""
    out = dict(into)
    for k, v in changes.items():
        out[k] = merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def lorakit_recipe(spec: dict) -> dict:
    """Only data and a name: every other setting is lorakit's default, changed only by the run's overrides."""
    work = Path(spec["workdir"])
    recipe = {
        "base_model": EMBEDDED,
        "data": {"sources": [{"path": spec["train_dir"], "format": "text"}], "eval_split": spec["eval_file"]},
        "output": {"name": spec["adapter"], "store": spec["store"], "runs_dir": str(work / "runs")},
    }
    return merge(recipe, spec.get("overrides") or {})


def learning_rate_record(plan: dict) -> dict:
    """What the Plan recorded about the learning rate: every field naming it, and the notes that mention it."""
    fields = {k: v for k, v in plan.items() if "learning_rate" in k or k == "lr" or k.startswith("lr_")}
    notes = [n for n in plan.get("notes") or [] if "learning rate" in n.lower() or "learning_rate" in n]
    return {**fields, "notes": notes} if notes else fields


def run_lorakit(spec: dict) -> dict:
    import lorakit
    from lorakit.recipe import validate_recipe
    from lorakit.store.metadata import META_FILE

    seed_everything()
    raw = lorakit_recipe(spec)
    recipe = validate_recipe(raw, "quality", default_name=spec["adapter"])
    started = time.perf_counter()
    result = lorakit.train(recipe, overwrite=True)
    train_wall = time.perf_counter() - started
    adapter_dir = str(result.path)
    meta = json.loads((Path(adapter_dir) / META_FILE).read_text())
    plan = meta.get("plan") or {}
    metrics = meta.get("metrics") or {}
    del result
    gc.collect()
    print("\n".join(f"  {k}: {v}" for k, v in plan.items()))
    out = {
        "recipe": raw,
        "learning_rate": plan.get("learning_rate"),
        "learning_rate_record": learning_rate_record(plan),
        "plan": plan,
        "lora": (meta.get("recipe") or {}).get("lora"),
        "trainable_params": meta.get("trainable_params"),
        "lorakit_metrics": metrics,
        "steps": metrics.get("steps"),
        "train_tokens_seen": metrics.get("train_tokens_seen"),
        "train_loss": metrics.get("train_loss"),
        "train_s": metrics.get("train_runtime_s"),
        "train_call_s": round(train_wall, 1),
        "adapter_dir": adapter_dir,
    }
    seed_everything()
    started = time.perf_counter()
    model, tokenizer = lorakit.load(spec["adapter"], store=spec["store"])
    out["load_s"] = round(time.perf_counter() - started, 1)
    out.update(held_out(model, tokenizer, spec["eval_file"]))
    return out


RUNNERS = {"corpora": run_corpora, "base": run_base, "full": run_full, "lorakit": run_lorakit}


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    started = time.perf_counter()
    result = RUNNERS[spec["kind"]](spec)
    result.update(name=spec["name"], kind=spec["kind"], process_s=round(time.perf_counter() - started, 1))
    result["peak_rss_mb"] = round(common.vm_hwm_mb())
    Path(spec["out"]).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main(sys.argv[1])
