"""opensloth.data.sources: local files, folders and hub ids, with errors that name the file and line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import REPO, SFT_DIR, write_lines

ROOT = str(REPO)


# ---- imports stay light ------------------------------------------------------


def test_import_is_light():
    code = (
        "import sys, opensloth.data, opensloth.utils\n"
        "heavy = [m for m in ('torch', 'datasets', 'trl', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---- sources -------------------------------------------------------------------


def test_load_records_folder_with_split_slicing():
    from opensloth.data import load_records

    full = load_records(SFT_DIR, "train")
    part = load_records(SFT_DIR, "train[:1%]")
    assert len(part) == len(full) // 100
    assert part[0] == full[0]
    assert len(load_records(SFT_DIR, "test[10:20]")) == 10


def test_load_records_json_parquet_and_save_to_disk(tmp_path):
    from opensloth.data import load_records

    ds = load_records(SFT_DIR, "test")
    ds.to_parquet(str(tmp_path / "chat.parquet"))
    ds.to_json(str(tmp_path / "chat.json"), lines=False)
    ds.save_to_disk(str(tmp_path / "saved"))
    assert load_records(str(tmp_path / "chat.parquet"), "train[:5]")["messages"] == ds[:5]["messages"]
    assert load_records(str(tmp_path / "chat.json"), "train")["messages"] == ds["messages"]
    sliced = load_records(str(tmp_path / "saved"), "train[:10%]")
    assert sliced["messages"] == ds[: len(ds) // 10]["messages"]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    from opensloth.data import DatasetFormatError, load_records

    path = write_lines(tmp_path / "bad.jsonl", ['{"text": "a"}', '{"text": "b"}', '{"text": "c"', '{"text": "d"}'])
    with pytest.raises(DatasetFormatError) as err:
        load_records(path)
    assert f"{path}:3:" in str(err.value)
    assert err.value.line == 3


def test_missing_path_is_not_sent_to_the_hub(tmp_path):
    from opensloth.data import DatasetSourceError, load_records

    with pytest.raises(DatasetSourceError, match="does not exist"):
        load_records(str(tmp_path / "nope.jsonl"))


@pytest.mark.slow
def test_hub_id_from_offline_datasets_cache(tmp_path):
    """The hub-id branch, served offline from a datasets cache built from a local repo copy."""
    import datasets

    repo = tmp_path / "repo" / "tiny-chat" / "data"
    repo.mkdir(parents=True)
    lines = open(os.path.join(SFT_DIR, "test.jsonl"), encoding="utf-8").read().splitlines()
    write_lines(repo / "train.jsonl", lines[:20])
    cache = tmp_path / "cache"
    datasets.load_dataset(str(repo.parent), cache_dir=str(cache))
    os.rename(cache / "tiny-chat", cache / "opensloth___tiny-chat")  # as if downloaded from the hub
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    code = (
        "from opensloth.data import load_records, DatasetSourceError\n"
        "ds = load_records('opensloth/tiny-chat', 'train[:25%]')\n"
        "print(len(ds), ds.column_names)\n"
        "try:\n    load_records('opensloth/not-cached')\n"
        "except DatasetSourceError as e:\n    print('ERR', 'HF_DATASETS_OFFLINE' in str(e))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "5 ['messages', 'source']" in out
    assert "ERR True" in out




def test_non_utf8_and_empty_files_name_the_file_and_line(tmp_path):
    """datasets reads a Latin-1 byte without complaint; the pre-flight inspection names the line."""
    from opensloth.data import DatasetFormatError, DatasetSourceError, load_records
    from opensloth.data.sources import inspect_source

    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DatasetFormatError, match=r"latin1.jsonl:2: not valid UTF-8 \(byte 0xe9"):
        inspect_source(str(path))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DatasetSourceError, match="empty.jsonl is empty"):
        load_records(str(tmp_path / "empty.jsonl"))


def test_a_typo_of_a_local_folder_is_not_sent_to_the_hub(monkeypatch):
    from opensloth.data import DatasetSourceError, load_records
    from opensloth.data.sources import looks_local

    monkeypatch.chdir(ROOT)
    assert looks_local("data/sftt") and not looks_local("trl-lib/Capybara")
    with pytest.raises(DatasetSourceError, match=r"did you mean data/sft\?"):
        load_records("data/sftt")
