"""Training data: reading every file kind, formatting with loss masks, chunking, mixing, splitting, errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from conftest import RECIPES
from lorakit.data.content import content_hash, data_content
from lorakit.data.formats import chunk, format_records, tokenize_chat, tokenize_texts
from lorakit.data.prepare import n_tokens, prepare
from lorakit.data.sources import read_records
from lorakit.data.tokens import IGNORE, Example
from lorakit.errors import LorakitError
from lorakit.recipe import DataSection, DataSource


def load_tok(path: Path):
    from transformers import AutoTokenizer

    from lorakit.models.tokenizer import fix_pad_token

    tok = AutoTokenizer.from_pretrained(path)
    fix_pad_token(tok)
    return tok


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """prepare() caches by default: keep its entries in the test's folder, never in the user's cache."""
    monkeypatch.setattr("lorakit.data.prepare.cache_root", lambda: tmp_path / "data-cache")


@pytest.fixture(scope="module")
def llama_tok(tiny_llama):
    tok = load_tok(tiny_llama)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    return tok


@pytest.fixture(scope="module")
def gpt2_tok(tiny_gpt2):
    tok = load_tok(tiny_gpt2)
    assert not tok.chat_template and tok.eos_token == "<|endoftext|>"
    return tok


def texts(path: Path, **kw) -> list[str]:
    return [r["text"] for r in read_records(DataSource(path=str(path), **kw))]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def supervised_runs(ex: Example) -> list[list[int]]:
    """Maximal runs of consecutive supervised labels."""
    runs: list[list[int]] = []
    prev = False
    for label in ex.labels:
        if label != IGNORE:
            if not prev:
                runs.append([])
            runs[-1].append(label)
        prev = label != IGNORE
    return runs


def last_supervised(ex: Example) -> int:
    return [t for t in ex.labels if t != IGNORE][-1]


def section(*sources: dict, **kw) -> DataSection:
    return DataSection(sources=[DataSource(**s) for s in sources], **kw)


# --- reading ----------------------------------------------------------------------------------

PROSE = "The first tide.\nIt rose.\n\nSecond paragraph,\nstill second.\n\n\n\nThird.\n"


@pytest.mark.parametrize("suffix", [".txt", ".md"])
@pytest.mark.parametrize(
    ("split", "expected"),
    [
        ("file", [PROSE.strip()]),
        ("paragraph", ["The first tide.\nIt rose.", "Second paragraph,\nstill second.", "Third."]),
        ("line", ["The first tide.", "It rose.", "Second paragraph,", "still second.", "Third."]),
    ],
)
def test_text_files_split(tmp_path, suffix, split, expected):
    path = tmp_path / f"doc{suffix}"
    path.write_text(PROSE)
    assert texts(path, split=split) == expected


def test_paragraph_split_handles_crlf_and_bom(tmp_path):
    path = tmp_path / "win.txt"
    path.write_bytes("\ufeffone\r\ntwo\r\n\r\nthree\r\n".encode())
    assert texts(path, split="paragraph") == ["one\ntwo", "three"]
    assert texts(path, split="line") == ["one", "two", "three"]


def test_paragraph_split_on_whitespace_only_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("first\n  \nsecond\n\t\nthird\n")
    assert texts(path, split="paragraph") == ["first", "second", "third"]


ROWS = [{"text": "alpha", "body": "beta"}, {"text": "gamma", "body": "delta"}]


def write_table(path: Path, rows: list[dict]) -> Path:
    kind = path.name.split(".", 1)[1]
    if kind == "jsonl":
        write_jsonl(path, rows)
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "data.json":
        path.write_text(json.dumps({"data": rows, "version": 2}))
    elif kind == "csv":
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("name", ["t.jsonl", "t.json", "t.data.json", "t.csv", "t.parquet"])
@pytest.mark.parametrize(("field", "expected"), [(None, ["alpha", "gamma"]), ("body", ["beta", "delta"])])
def test_table_files(tmp_path, name, field, expected):
    path = write_table(tmp_path / name, ROWS)
    assert texts(path, field=field) == expected


def test_folder_of_mixed_files_read_in_sorted_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("two")
    write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}])
    (tmp_path / "c.csv").write_text("text\nthree\n")
    (tmp_path / "sub" / "d.md").write_text("four\n\nfive")
    (tmp_path / "notes.py").write_text("print('not data')")
    (tmp_path / "README").write_text("not data either")
    assert texts(tmp_path, split="paragraph") == ["one", "two", "three", "four", "five"]


def test_table_rows_shaped_for_each_format(tmp_path):
    inst = write_jsonl(
        tmp_path / "i.jsonl",
        [
            {"instruction": "Do", "output": "Done", "input": None},
            {"instruction": "A", "input": "B", "output": "C"},
        ],
    )
    assert read_records(DataSource(path=str(inst), format="instruction")) == [
        {"instruction": "Do", "input": "", "output": "Done"},
        {"instruction": "A", "input": "B", "output": "C"},
    ]
    comp = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "Q", "completion": "A", "extra": 1}])
    assert read_records(DataSource(path=str(comp), format="completion")) == [{"prompt": "Q", "completion": "A"}]


# --- formatting -------------------------------------------------------------------------------


@pytest.mark.parametrize("tok_name", ["llama", "gpt2"])
def test_text_format_ends_with_eos_and_supervises_everything(llama_tok, gpt2_tok, tok_name):
    tok = {"llama": llama_tok, "gpt2": gpt2_tok}[tok_name]
    docs = ["The keeper lit the lamp.", "Tide high at noon"]
    examples = format_records(tok, [{"text": t} for t in docs], "text")
    assert len(examples) == 2
    for doc, ex in zip(docs, examples, strict=True):
        assert ex.input_ids[-1] == tok.eos_token_id
        assert ex.labels == ex.input_ids
        assert ex.input_ids[:-1] == tok(doc)["input_ids"]
        assert tok.eos_token_id not in ex.input_ids[:-1]


@pytest.mark.parametrize("tok_name", ["llama", "gpt2"])
def test_completion_format_masks_the_prompt(llama_tok, gpt2_tok, tok_name):
    tok = {"llama": llama_tok, "gpt2": gpt2_tok}[tok_name]
    prompt, completion = "Wind at dawn:", " north-west, force four"
    (ex,) = format_records(tok, [{"prompt": prompt, "completion": completion}], "completion")
    n = len(tok(prompt)["input_ids"])
    assert n > 0
    assert ex.labels[:n] == [IGNORE] * n
    assert ex.labels[n:] == ex.input_ids[n:]
    assert IGNORE not in ex.labels[n:]
    assert last_supervised(ex) == tok.eos_token_id
    assert tok.decode(ex.labels[n:]) == completion + tok.eos_token


def test_instruction_format_uses_the_chat_template(llama_tok):
    records = [{"instruction": "Name the tide.", "input": "At noon", "output": "High water."}]
    (ex,) = format_records(llama_tok, records, "instruction")
    rendered = llama_tok.decode(ex.input_ids)
    assert "<|im_start|>user\nName the tide.\n\nAt noon<|im_end|>" in rendered
    assert "<|im_start|>assistant\nHigh water.<|im_end|>" in rendered
    assert "### Instruction:" not in rendered
    assert [llama_tok.decode(run) for run in supervised_runs(ex)] == ["High water.<|im_end|>"]
    assert last_supervised(ex) == llama_tok.eos_token_id


@pytest.mark.parametrize(
    ("inp", "sections"),
    [("", ["### Instruction:\nName the tide.", "### Response:\n"]), ("At noon", ["### Input:\nAt noon"])],
)
def test_instruction_format_uses_alpaca_without_a_template(gpt2_tok, inp, sections):
    records = [{"instruction": "Name the tide.", "input": inp, "output": "High water."}]
    (ex,) = format_records(gpt2_tok, records, "instruction")
    rendered = gpt2_tok.decode(ex.input_ids)
    assert rendered.startswith("### Instruction:")
    assert rendered.endswith("### Response:\nHigh water.<|endoftext|>")
    for s in sections:
        assert s in rendered
    assert ("### Input:" in rendered) == bool(inp)
    assert [gpt2_tok.decode(run) for run in supervised_runs(ex)] == ["High water.<|endoftext|>"]
    assert last_supervised(ex) == gpt2_tok.eos_token_id


CONVERSATION = [
    {"role": "system", "content": "Answer like a keeper."},
    {"role": "user", "content": "When is high tide"},
    {"role": "assistant", "content": "At noon."},
    {"role": "user", "content": "And the wind"},
    {"role": "assistant", "content": "North-west."},
]


def test_chat_format_supervises_only_assistant_turns(llama_tok):
    tok = llama_tok
    ex = tokenize_chat(tok, CONVERSATION)
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert len(ex.input_ids) == len(ex.labels)
    # Both assistant turns, each through its <|im_end|>, and nothing else.
    assert [tok.decode(run) for run in supervised_runs(ex)] == ["At noon.<|im_end|>", "North-west.<|im_end|>"]
    masked = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels, strict=True) if lab == IGNORE])
    for m in CONVERSATION[:2] + CONVERSATION[3:4]:
        assert m["content"] in masked
    for i, (tid, lab) in enumerate(zip(ex.input_ids, ex.labels, strict=True)):
        if lab != IGNORE:
            assert lab == tid
        if tid == tok.eos_token_id and lab != IGNORE:  # the newline after <|im_end|> is not learned
            assert tok.decode([ex.input_ids[i + 1]]) == "\n"
            assert ex.labels[i + 1] == IGNORE
    assert last_supervised(ex) == tok.eos_token_id


@pytest.mark.parametrize(("name", "fmt"), [("chat.jsonl", "chat"), ("instructions.jsonl", "instruction")])
def test_shipped_data_last_supervised_label_is_eos(llama_tok, name, fmt):
    records = read_records(DataSource(path=str(RECIPES / "data" / name), format=fmt))
    examples = format_records(llama_tok, records, fmt)
    assert len(examples) == len(records) > 0
    for ex, rec in zip(examples, records, strict=True):
        assert last_supervised(ex) == llama_tok.eos_token_id
        turns = [m for m in rec["messages"] if m["role"] == "assistant"] if fmt == "chat" else [rec]
        assert len(supervised_runs(ex)) == len(turns)


def test_chat_record_without_assistant(tmp_path):
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]},
        ],
    )
    with pytest.raises(LorakitError, match=r"line 2: messages: no assistant message") as info:
        read_records(DataSource(path=str(path), format="chat"))
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("messages", "pattern"),
    [
        ("just text", r"line 1: messages must be a non-empty list of \{role, content\} objects"),
        ([{"role": "user"}], r"line 1: messages\[0\]\.content must be a string, got null"),
        ([["user", "hi"]], r"line 1: messages\[0\] is a JSON list, expected a \{role, content\} object"),
    ],
)
def test_chat_messages_must_be_role_content_objects(tmp_path, messages, pattern):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": messages}])
    with pytest.raises(LorakitError, match=pattern):
        read_records(DataSource(path=str(path), format="chat"))


def test_chat_format_needs_a_chat_template(gpt2_tok):
    with pytest.raises(LorakitError, match="needs a tokenizer with a chat template"):
        format_records(gpt2_tok, [{"messages": CONVERSATION}], "chat")


def test_non_text_format_on_a_text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(LorakitError, match="format 'chat' needs a table file") as info:
        read_records(DataSource(path=str(path), format="chat"))
    assert str(path) in str(info.value)


# --- chunking ---------------------------------------------------------------------------------


def test_chunk_splits_and_keeps_order():
    ex = Example(list(range(10)), list(range(10)))
    pieces = chunk([ex], 4)
    assert [p.input_ids for p in pieces] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert [p.labels for p in pieces] == [p.input_ids for p in pieces]
    short = Example([1, 2, 3], [1, 2, 3])
    assert chunk([short], 4) == [short]


def test_chunk_drops_pieces_with_nothing_supervised():
    ids = list(range(12))
    # piece 0: only the prompt; piece 1: supervised; piece 2: its only label is on the first token,
    # which a causal LM never predicts inside the block.
    labels = [IGNORE] * 4 + [4, 5, IGNORE, 7] + [8, IGNORE, IGNORE, IGNORE]
    pieces = chunk([Example(ids, labels)], 4)
    assert [p.input_ids for p in pieces] == [[4, 5, 6, 7]]
    assert pieces[0].labels == [4, 5, IGNORE, 7]
    assert chunk([Example([1, 2, 3], [IGNORE] * 3)], 8) == []


def test_chunk_real_chat_examples(llama_tok):
    examples = [tokenize_chat(llama_tok, CONVERSATION)] * 2
    pieces = chunk(examples, 8)
    assert all(1 <= len(p.input_ids) <= 8 for p in pieces)
    assert all(len(p.input_ids) == len(p.labels) for p in pieces)
    assert all(any(t != IGNORE for t in p.labels[1:]) for p in pieces)
    kept = sum(t != IGNORE for p in pieces for t in p.labels[1:])
    total = sum(t != IGNORE for e in examples for t in e.labels)
    assert 0 < kept <= total
    assert len(pieces) < sum(-(-len(e.input_ids) // 8) for e in examples)  # prompt-only pieces dropped


# --- prepare: mixing and eval -----------------------------------------------------------------


def lines_file(path: Path, prefix: str, n: int) -> Path:
    path.write_text("\n".join(f"{prefix} entry number {i} of the log." for i in range(n)))
    return path


def test_prepare_mixes_sources_by_weight(tmp_path, llama_tok):
    a = lines_file(tmp_path / "a.txt", "Harbour", 6)
    b = lines_file(tmp_path / "b.txt", "Beacon", 8)
    block = 32
    own = {key: chunk(tokenize_texts(llama_tok, texts(p, split="line")), block) for key, p in (("a", a), ("b", b))}
    assert (len(own["a"]), len(own["b"])) == (6, 8)  # one block-sized piece per line
    sec = section(
        {"path": str(a), "split": "line", "weight": 2.0},
        {"path": str(b), "split": "line", "weight": 0.5},
        block_size=block,
        eval_split=0.0,
    )
    prep = prepare(sec, llama_tok, seed=3)
    rep = prep.report
    src_a, src_b = rep["sources"]
    assert (src_a["documents"], src_b["documents"]) == (6, 8)
    assert (src_a["weight"], src_b["weight"]) == (2.0, 0.5)
    assert src_a["train_tokens"] == 2 * n_tokens(own["a"])
    assert len(prep.train) == 2 * len(own["a"]) + round(len(own["b"]) * 0.5)
    # realized tokens per source in the shuffled train set
    keys = {k: {tuple(e.input_ids) for e in v} for k, v in own.items()}
    assert keys["a"].isdisjoint(keys["b"])
    realized = {k: sum(len(e.input_ids) for e in prep.train if tuple(e.input_ids) in s) for k, s in keys.items()}
    assert realized == {"a": src_a["train_tokens"], "b": src_b["train_tokens"]}
    assert rep["train_tokens"] == n_tokens(prep.train) == realized["a"] + realized["b"]
    assert src_a["share"] == round(realized["a"] / rep["train_tokens"], 4)
    assert src_b["share"] == round(realized["b"] / rep["train_tokens"], 4)
    assert src_a["share"] + src_b["share"] == pytest.approx(1.0, abs=1e-3)
    assert src_a["share"] > 0.7  # 12 pieces' worth of a vs 4 of b
    assert prep.eval == [] and rep["eval_examples"] == 0 and rep["eval_tokens"] == 0
    assert rep["supervised_tokens"] == rep["train_tokens"]  # text format learns every token


def test_prepare_eval_fraction_is_disjoint_from_train(tmp_path, llama_tok):
    path = lines_file(tmp_path / "log.txt", "Lamp", 12)
    prep = prepare(section({"path": str(path), "split": "line"}, block_size=32, eval_split=0.25), llama_tok, 0)
    all_docs = {tuple(e.input_ids) for e in tokenize_texts(llama_tok, texts(path, split="line"))}
    assert len(all_docs) == 12
    train = {tuple(e.input_ids) for e in prep.train}
    held = {tuple(e.input_ids) for e in prep.eval}
    assert len(prep.eval) == 3 and len(prep.train) == 9
    assert train.isdisjoint(held)
    assert train | held == all_docs
    assert prep.report["eval_examples"] == 3
    assert prep.report["eval_tokens"] == n_tokens(prep.eval)
    train_ds, eval_ds = prep.datasets()
    assert (len(train_ds), len(eval_ds)) == (9, 3)
    assert train_ds.column_names == ["input_ids", "labels"]


def test_prepare_records_which_documents_it_held_out(tmp_path, llama_tok):
    a = lines_file(tmp_path / "a.txt", "Lamp", 12)
    b = lines_file(tmp_path / "b.txt", "Tide", 10)
    sources = ({"path": str(a), "split": "line"}, {"path": str(b), "split": "line"})
    prep = prepare(section(*sources, block_size=32, eval_split=0.25), llama_tok, 3)
    held = [s["held_out"] for s in prep.report["sources"]]
    assert [len(h) for h in held] == [3, 2] and all(h == sorted(set(h)) for h in held)
    # The recorded indices name the records whose examples form the eval set, and no training example.
    docs = [tokenize_texts(llama_tok, texts(path, split="line")) for path in (a, b)]
    assert prep.eval == [d for source, h in zip(docs, held, strict=True) for d in (source[i] for i in h)]
    trained = {tuple(e.input_ids) for e in prep.train}
    assert not trained & {tuple(e.input_ids) for e in prep.eval}
    assert json.loads(json.dumps(prep.report)) == prep.report  # plain data for lorakit.json and the cache

    # An eval file holds out nothing from the sources; too few documents are split into pieces, not documents.
    eval_file = lines_file(tmp_path / "eval.txt", "Held", 2)
    by_file = prepare(section(*sources, block_size=32, eval_split=str(eval_file)), llama_tok, 3)
    assert [s["held_out"] for s in by_file.report["sources"]] == [[], []]
    few = lines_file(tmp_path / "few.txt", "Few", 3)
    pieces = prepare(section({"path": str(few), "split": "line"}, block_size=8, eval_split=0.3), llama_tok, 3)
    assert pieces.eval and pieces.report["sources"][0]["held_out"] == []


def test_prepare_eval_split_is_deterministic_per_seed(tmp_path, llama_tok):
    path = lines_file(tmp_path / "log.txt", "Lamp", 12)
    sec = section({"path": str(path), "split": "line"}, block_size=32, eval_split=0.25)
    first, again = prepare(sec, llama_tok, 5), prepare(sec, llama_tok, 5)
    assert first.eval == again.eval
    assert first.train == again.train


def test_prepare_eval_holds_out_whole_documents(tmp_path, llama_tok):
    folder = tmp_path / "docs"
    folder.mkdir()
    block = 16
    owners: dict[tuple, set] = {}
    for d in range(8):
        text = " ".join(f"Document {d} sentence {i} about the tide." for i in range(4))
        (folder / f"doc{d}.txt").write_text(text)
        for piece in chunk(tokenize_texts(llama_tok, [text]), block):
            owners.setdefault(tuple(piece.input_ids), set()).add(d)
    # Pieces that occur in several documents (shared phrasing) cannot tell where they came from.
    owner = {ids: next(iter(ds)) for ids, ds in owners.items() if len(ds) == 1}
    assert len(owner) > 16  # several distinctive pieces per document
    prep = prepare(section({"path": str(folder)}, block_size=block, eval_split=0.25), llama_tok, 0)
    train_docs = {owner[tuple(e.input_ids)] for e in prep.train if tuple(e.input_ids) in owner}
    eval_docs = {owner[tuple(e.input_ids)] for e in prep.eval if tuple(e.input_ids) in owner}
    assert eval_docs
    assert train_docs.isdisjoint(eval_docs)


def test_prepare_eval_split_path(tmp_path, llama_tok):
    train_file = write_jsonl(tmp_path / "train.jsonl", [{"text": f"Train line {i} for the keeper."} for i in range(5)])
    eval_file = write_jsonl(tmp_path / "eval.jsonl", [{"text": "Held out one."}, {"text": "Held out two."}])
    prep = prepare(section({"path": str(train_file)}, block_size=8, eval_split=str(eval_file)), llama_tok, 0)
    expected_eval = chunk(tokenize_texts(llama_tok, texts(eval_file)), 8)
    assert prep.eval == expected_eval
    assert llama_tok.decode(prep.eval[0].input_ids).startswith("Held out one.")
    assert len(prep.train) == len(chunk(tokenize_texts(llama_tok, texts(train_file)), 8))
    assert prep.report["eval_examples"] == len(expected_eval)


def test_prepare_eval_split_zero_gives_no_eval(tmp_path, llama_tok):
    path = lines_file(tmp_path / "log.txt", "Lamp", 10)
    prep = prepare(section({"path": str(path), "split": "line"}, block_size=16, eval_split=0.0), llama_tok, 0)
    assert prep.eval == []
    assert len(prep.train) == 10
    assert prep.datasets()[1] is None


# --- bad input --------------------------------------------------------------------------------


def make_bad(tmp_path: Path, kind: str) -> tuple[Path, dict]:
    """Write one kind of bad input; return its path and extra DataSource options."""
    if kind == "missing":
        return tmp_path / "nowhere.jsonl", {}
    if kind == "empty-folder":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "script.py").write_text("x = 1")
        return tmp_path / "empty", {}
    if kind.startswith("latin1"):
        suffix = kind.split("-")[1]
        line3 = {
            "txt": b"caf\xe9",
            "jsonl": b'{"text": "caf\xe9"}',
            "csv": b"caf\xe9",
            "json": b'{"text":"\xe9"}',
        }
        head = {
            "txt": b"line one\nline two\n",
            "jsonl": b'{"text": "a"}\n{"text": "b"}\n',
            "csv": b"text\nb\n",
            "json": b'[{"text": "a"},\n\n',
        }
        path = tmp_path / f"latin.{suffix}"
        path.write_bytes(head[suffix] + line3[suffix] + (b"]" if suffix == "json" else b"\n"))
        return path, {}
    path = tmp_path / "rows.jsonl"
    if kind == "bad-json-line3":
        path.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c",}\n{"text": "d"}\n')
    elif kind == "list-row":
        path.write_text('{"text": "a"}\n\n[1, 2]\n')
    elif kind == "missing-field":
        write_jsonl(path, [{"text": "a"}, {"body": "b", "id": 3}])
    elif kind == "missing-completion":
        write_jsonl(path, [{"prompt": "a", "answer": "b"}])
        return path, {"format": "completion"}
    elif kind == "bad-json-file":
        path = tmp_path / "rows.json"
        path.write_text('[{"text": "a"},\n {"text": "b"\n]')
    elif kind == "json-not-a-list":
        path = tmp_path / "rows.json"
        path.write_text('{"rows": [{"text": "a"}]}')
    elif kind == "bad-parquet":
        path = tmp_path / "rows.parquet"
        path.write_bytes(b"PAR1 this is not parquet")
    return path, {}


@pytest.mark.parametrize(
    ("kind", "pattern"),
    [
        ("missing", r"data source not found"),
        ("empty-folder", r"no data files in this folder \(looked for .*\.jsonl"),
        ("latin1-txt", r"not UTF-8 text \(byte 0xe9 at line 3"),
        ("latin1-jsonl", r"not UTF-8 text \(byte 0xe9 at line 3"),
        ("latin1-json", r"not UTF-8 text \(byte 0xe9 at line 3"),
        pytest.param(
            "latin1-csv",
            r"not UTF-8 text \(byte 0xe9 at line 3",
        ),
        ("bad-json-line3", r"line 3 is not valid JSON"),
        ("list-row", r"line 3 is a list, expected a JSON object"),
        ("missing-field", r"line 2 has no field 'text' \(fields: body, id\); set `field:`"),
        ("missing-completion", r"line 1 has no field 'completion' \(fields: prompt, answer\)"),
        ("bad-json-file", r"invalid JSON at line 3, column 1"),
        ("json-not-a-list", r"expected a JSON list of objects"),
        ("bad-parquet", r"cannot read parquet"),
    ],
)
def test_bad_input_names_the_file(tmp_path, kind, pattern):
    path, opts = make_bad(tmp_path, kind)
    with pytest.raises(LorakitError, match=pattern) as info:
        read_records(DataSource(path=str(path), **opts))
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("name", "content", "fmt"),
    [
        ("empty.json", "", "text"),
        ("empty.jsonl", "", "completion"),
        ("blank.jsonl", "\n  \n", "chat"),
    ],
)
def test_prepare_rejects_a_source_with_nothing_to_learn(tmp_path, llama_tok, name, content, fmt):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(LorakitError) as info:
        prepare(section({"path": str(path), "format": fmt}, block_size=8), llama_tok, 0)
    msg = str(info.value)
    assert str(path) in msg
    assert "invalid JSON at line 1" in msg or "no usable text in this source" in msg


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("empty.txt", ""),
        ("spaces.txt", "  \n\n\t \n"),
        ("empty.md", "\n"),
        ("empty.jsonl", ""),
        ("empty.csv", "text\n"),
    ],
)
def test_prepare_rejects_an_empty_text_source(tmp_path, llama_tok, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(LorakitError, match="no usable text in this source") as info:
        prepare(section({"path": str(path)}, block_size=8), llama_tok, 0)
    assert str(path) in str(info.value)


def test_prepare_rejects_less_than_one_block(tmp_path, llama_tok):
    path = tmp_path / "tiny.txt"
    path.write_text("Calm.")
    n = len(llama_tok("Calm.")["input_ids"]) + 1
    with pytest.raises(LorakitError) as info:
        prepare(section({"path": str(path)}, block_size=64, eval_split=0.0), llama_tok, 0)
    msg = str(info.value)
    assert f"training data has {n} tokens, less than one block" in msg
    assert "data.block_size=64" in msg


def test_csv_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufefftext,id\nhello,1\n".encode())
    assert texts(path) == ["hello"]


@pytest.mark.parametrize(
    ("name", "content", "fmt"),
    [
        ("null.jsonl", '{"text": null}\n', "text"),
        ("short.csv", "id,text\n1\n", "text"),
        ("null-out.jsonl", '{"instruction": "Say hi", "output": null}\n', "instruction"),
    ],
)
def test_null_values_are_not_read_as_the_word_none(tmp_path, name, content, fmt):
    path = tmp_path / name
    path.write_text(content)
    try:
        records = read_records(DataSource(path=str(path), format=fmt))
    except LorakitError as e:
        assert str(path) in str(e)
        return
    assert "None" not in json.dumps(records)


# --- content hash -----------------------------------------------------------------------------


def test_content_hash_tracks_data_content(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.txt").write_text("first")
    (folder / "b.jsonl").write_text('{"text": "second"}\n')
    sec = section({"path": str(folder)})
    h1 = content_hash(sec)
    assert h1.startswith("sha256:") and len(h1) == len("sha256:") + 64
    assert content_hash(sec) == h1
    assert content_hash(section({"path": str(folder)})) == h1

    (folder / "a.txt").write_text("first!")
    h2 = content_hash(sec)
    assert h2 != h1
    (folder / "a.txt").write_text("first")
    assert content_hash(sec) == h1  # back to the same bytes, back to the same hash

    (folder / "c.md").write_text("third")
    assert content_hash(sec) != h1
    (folder / "c.md").unlink()
    assert content_hash(section({"path": str(folder), "split": "line"})) != h1
    assert content_hash(sec) == h1


def test_content_hash_covers_saved_datasets_the_eval_file_and_the_settings(tmp_path):
    from datasets import Dataset

    def save(texts):
        Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))

    save(["one saved document", "another"])
    (tmp_path / "notes.txt").write_text("a text source")
    (tmp_path / "eval.txt").write_text("held-out text")
    sources = ({"path": str(tmp_path / "notes.txt")}, {"path": str(tmp_path / "saved")})
    sec = section(*sources, eval_split=str(tmp_path / "eval.txt"))
    content = data_content(sec)
    assert content.hash == content_hash(sec)
    assert "sources[0]/notes.txt" in content.files and "eval_split/eval.txt" in content.files
    assert any(name.startswith("sources[1]/") and name.endswith(".arrow") for name in content.files)

    save(["one saved document", "another, changed"])
    changed = data_content(sec)
    assert changed.hash != content.hash
    assert {n for n in content.files if content.files[n] != changed.files[n]} >= {
        n for n in content.files if n.endswith(".arrow")
    }
    (tmp_path / "eval.txt").write_text("other held-out text")
    assert content_hash(sec) not in (content.hash, changed.hash)
    h = content_hash(sec)
    assert content_hash(sec.model_copy(update={"block_size": 256})) != h
    assert content_hash(sec.model_copy(update={"eval_split": 0.2})) != h
    assert content_hash(sec.model_copy(update={"packing": False, "cache": False})) == h

    # The same bytes in another place are the same data.
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("notes.txt", "saved", "eval.txt"):
        (tmp_path / name).rename(moved / name)
    sources = ({"path": str(moved / "notes.txt")}, {"path": str(moved / "saved")})
    assert content_hash(section(*sources, eval_split=str(moved / "eval.txt"))) == h
