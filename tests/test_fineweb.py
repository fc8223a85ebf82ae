"""data/fineweb/prepare.py on local parquet and jsonl shards, and on parquet shards served like the Hub's."""
import importlib.util
import json
import os

import numpy as np
import pytest

from forge.data import load_meta
from forge.tokenize import gpt2_meta
from tests.util import REPO, run_py

datasets = pytest.importorskip("datasets")
pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
fsspec = pytest.importorskip("fsspec")

VAL_DOCUMENTS = 15


def load_prepare():
    spec = importlib.util.spec_from_file_location("fineweb_prepare", REPO / "data" / "fineweb" / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def docs(shakespeare_text):
    """FineWeb-shaped documents: 2-6k characters, one with unicode, one empty."""
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(60):
        start, length = int(rng.integers(0, len(shakespeare_text) - 6000)), int(rng.integers(2000, 6000))
        docs.append(shakespeare_text[start:start + length])
    docs[3], docs[20] = "Ünïcode — 日本語 🙂 " + docs[3], ""
    return docs


@pytest.fixture(scope="module")
def shards(tmp_path_factory, docs):
    """The documents as two parquet shards (several row groups each, extra columns like FineWeb's) and as
    two jsonl files."""
    root = tmp_path_factory.mktemp("fineweb")
    (root / "parquet").mkdir()
    (root / "jsonl").mkdir()
    for i, part in enumerate((docs[:25], docs[25:])):
        table = pa.table({"text": part, "id": [f"<urn:{i}:{j}>" for j in range(len(part))],
                          "token_count": [len(t) // 4 for t in part]})
        pq.write_table(table, root / "parquet" / f"{i:03d}_00000.parquet", row_group_size=7)
        with open(root / "jsonl" / f"{i:03d}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": t, "id": j}) + "\n" for j, t in enumerate(part))
    return root


def expected_stream(docs, gpt2_encoding):
    return [i for doc in docs for i in gpt2_encoding.encode_ordinary(doc) + [50256]]


def bins(folder) -> tuple[list, list]:
    return tuple(np.fromfile(folder / f"{split}.bin", dtype="<u2").tolist() for split in ("val", "train"))


def test_local_shards_stream_into_val_then_train(tmp_path, shards, docs, gpt2_encoding):
    prepare = load_prepare()
    prepare.main(["--input", str(shards / "parquet"), "--out_dir", str(tmp_path / "p"), "--val_documents",
                  str(VAL_DOCUMENTS), "--num_proc", "2"])
    val, train = bins(tmp_path / "p")
    assert val == expected_stream(docs[:VAL_DOCUMENTS], gpt2_encoding)  # the first documents are val
    assert train == expected_stream(docs[VAL_DOCUMENTS:], gpt2_encoding)
    max_ids = {"train": max(expected_stream(docs[VAL_DOCUMENTS:], gpt2_encoding)),
               "val": max(expected_stream(docs[:VAL_DOCUMENTS], gpt2_encoding))}
    assert load_meta(tmp_path / "p") == {**gpt2_meta(), "max_token_ids": max_ids}
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["meta.json", "train.bin", "val.bin"]

    prepare.main(["--input", str(shards / "jsonl"), "--out_dir", str(tmp_path / "j"), "--val_documents",
                  str(VAL_DOCUMENTS), "--num_proc", "1", "--max_tokens", "5000"])
    assert bins(tmp_path / "j") == (val, train[:5000])  # jsonl reads the same; max_tokens is exact


class RangeFileSystem(fsspec.AbstractFileSystem):
    """ranges://<local path>: a remote file system like the Hub's HfFileSystem, whose files are read by byte
    ranges (fsspec's buffered file: a 5 MiB read-ahead cache); the ranges fetched are recorded."""
    protocol = "ranges"
    fetched = []

    def info(self, path, **kwargs):
        return {"name": path, "size": os.path.getsize(self._strip_protocol(path)), "type": "file"}

    def _open(self, path, mode="rb", **kwargs):
        return RangeFile(self, path, mode, **kwargs)


class RangeFile(fsspec.spec.AbstractBufferedFile):
    def _fetch_range(self, start, end):
        RangeFileSystem.fetched.append((start, end))
        with open(self.path, "rb") as f:
            f.seek(start)
            return f.read(end - start)


def serve_hub(monkeypatch, tmp_path, files) -> list:
    """The Hub subset's files served by RangeFileSystem: a dataset folder laid out like FineWeb's repository
    (sample/10BT/*.parquet and a dataset card declaring the config) listed by the real
    datasets.load_dataset_builder, whose paths are then handed out as ranges:// URLs; the calls made."""
    fsspec.register_implementation("ranges", RangeFileSystem, clobber=True)
    RangeFileSystem.fetched.clear()
    repo = tmp_path / "hub-repo"
    (repo / "sample" / "10BT").mkdir(parents=True)
    for file in files:
        (repo / "sample" / "10BT" / file.name).symlink_to(file)
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: sample-10BT\n  data_files:\n  - split: train\n"
                                    "    path: sample/10BT/*\n---\n")
    calls, real_builder = [], datasets.load_dataset_builder

    def load_dataset_builder(path, name=None, **options):
        calls.append((path, name))
        builder = real_builder(str(repo), name, **options)
        builder.config.data_files["train"] = [f"ranges://{f}" for f in builder.config.data_files["train"]]
        return builder

    monkeypatch.setattr(datasets, "load_dataset_builder", load_dataset_builder)
    return calls


def test_local_parquet_needs_no_datasets_import(shards):
    """Local parquet is read by pyarrow alone: `datasets` (~2.7 s and ~70 MB to import) stays unloaded."""
    probe = ("import importlib.util, sys; from pathlib import Path\n"
             "spec = importlib.util.spec_from_file_location('prepare', 'data/fineweb/prepare.py')\n"
             "prepare = importlib.util.module_from_spec(spec); spec.loader.exec_module(prepare)\n"
             f"_, stream = prepare.open_stream('fineweb', 'sample-10BT', Path({str(shards / 'parquet')!r}))\n"
             "print(len(list(stream)), 'datasets' in sys.modules)")
    assert run_py("-c", probe, check=True).stdout.split() == ["60", "False"]  # every document of both shards
    jsonl = probe.replace(str(shards / "parquet"), str(shards / "jsonl"))
    assert run_py("-c", jsonl, check=True).stdout.split() == ["60", "True"]  # jsonl is read by `datasets`


def test_the_hub_path_is_the_same_reader(tmp_path, monkeypatch, shards):
    """A Hub run reads the files `datasets` lists for the subset (remote, by ranges) with the reader --input uses."""
    prepare = load_prepare()
    calls = serve_hub(monkeypatch, tmp_path, sorted((shards / "parquet").iterdir()))
    common = ["--val_documents", str(VAL_DOCUMENTS), "--num_proc", "1", "--max_tokens", "3000"]
    prepare.main(["--dataset", "fineweb", "--subset", "sample-10BT", "--out_dir", str(tmp_path / "hub"), *common])
    prepare.main(["--input", str(shards / "parquet"), "--out_dir", str(tmp_path / "local"), *common])
    assert calls == [("HuggingFaceFW/fineweb", "sample-10BT")]
    assert RangeFileSystem.fetched
    assert bins(tmp_path / "hub") == bins(tmp_path / "local")


def test_default_folder_and_already_prepared(tmp_path, monkeypatch, shards, capsys):
    prepare = load_prepare()
    monkeypatch.setattr(prepare, "DATA", tmp_path)
    args = ["--input", str(shards / "jsonl"), "--val_documents", "5", "--num_proc", "1", "--max_tokens", "100"]
    prepare.main(args)
    out = tmp_path / "fineweb-edu-sample-10BT"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    prepare.main([*args, "--max_tokens", "200"])
    assert "already prepared" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    prepare.main([*args, "--max_tokens", "200", "--force"])
    assert len(bins(out)[1]) == 200


def test_pool_workers_never_reuse_an_earlier_runs_tokenizer(tmp_path, gpt2_encoding):
    """Forked workers inherit their parent's state: a num_proc=1 run with another tokenizer before must not leak."""
    from forge.tokenize import char_meta, tokenize_to_bin

    tokenize_to_bin(["abc"], tmp_path / "chars.bin", char_meta(list("abc")), num_proc=1)
    tokenize_to_bin(["hello world"], tmp_path / "bpe.bin", gpt2_meta(), num_proc=2)
    assert np.fromfile(tmp_path / "bpe.bin", dtype="<u2").tolist() == gpt2_encoding.encode_ordinary("hello world")


@pytest.mark.parametrize("where", ["local", "hub"])
def test_a_slow_reader_holds_one_batch_and_fetches_the_file_once(tmp_path, monkeypatch, shakespeare_text, where):
    """Read by `datasets` streaming, pyarrow decoded a whole file's row groups ahead of a slow reader (the tokenizer):
    memory grew with the size of one parquet file; read one row group per shard instead, a remote file's footer
    and a read-ahead block were fetched again for each row group. Now about one batch is held whatever the
    file, and a remote file is fetched about once."""
    import time

    rows, groups, chars = 50, 40, 10_000  # 0.5 MB of text per row group, 20 MB in the file
    words, rng = np.array(sorted(set(shakespeare_text.split()))), np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, chars // 5))[:chars] for _ in range(rows * groups)]
    path = tmp_path / "big.parquet"
    pq.write_table(pa.table({"text": texts, "id": [str(i) for i in range(len(texts))]}), path, row_group_size=rows)
    prepare = load_prepare()
    if where == "hub":
        serve_hub(monkeypatch, tmp_path, [path])
    _, stream = prepare.open_stream("fineweb", "sample-10BT", path if where == "local" else None)
    baseline, held = pa.total_allocated_bytes(), []
    for i, text in enumerate(prepare.texts(stream, "big.parquet", local=where == "local")):
        assert text == texts[i]
        if i % (10 * rows) == 1:
            time.sleep(0.2)  # a slow reader: time for a scan to run ahead
            held.append(pa.total_allocated_bytes() - baseline)
    assert i == len(texts) - 1
    assert max(held) < 4 * 10**6, held  # 2 MB: 100 documents; 20 MB (the whole file) before
    if where == "hub":  # one shard per row group fetched a footer and a 5 MiB read-ahead block for each
        assert sum(end - start for start, end in RangeFileSystem.fetched) < path.stat().st_size + 100_000
