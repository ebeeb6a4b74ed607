"""opensloth.preflight and the source inspection it uses: what passes, what each check reads, nothing written.

The bad inputs themselves (one line each, through the scripts) are tests/test_bad_inputs.py.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from helpers import PREF_DATA, SFT_DATA, TINY_MODEL, write_lines

from opensloth.data.sources import inspect_source
from opensloth.distributed import DistEnv, launcher_problem
from opensloth.errors import UserInputError
from opensloth.preflight import (DataCheck, Plan, check_data, check_model_folder, run_preflight, safetensors_header,
                                 share_verdict)


def test_the_embedded_default_passes_and_nothing_is_written(tmp_path):
    plan = Plan(model_name=str(TINY_MODEL), run_dir=str(tmp_path / "out" / "sft_ws1"),
                data=(DataCheck(str(SFT_DATA), "train"), DataCheck(str(SFT_DATA), "test[:10]"),
                      DataCheck(str(PREF_DATA), "train", "preference")))
    verdict = run_preflight(plan)
    assert verdict.resume_from_checkpoint is None and verdict.notes == []
    assert os.listdir(tmp_path) == []  # the write probe is gone and no run dir was created


def test_safetensors_shards_are_read_through_the_index(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(TINY_MODEL, model)
    os.rename(model / "model.safetensors", model / "model-00001-of-00001.safetensors")
    header = safetensors_header(str(model / "model-00001-of-00001.safetensors"))
    index = {"weight_map": {name: "model-00001-of-00001.safetensors" for name in header if name != "__metadata__"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    assert check_model_folder(str(model)) == [str(model / "model-00001-of-00001.safetensors")]
    (model / "model-00001-of-00001.safetensors").write_bytes(b"\x00" * 4)
    with pytest.raises(UserInputError, match="model-00001-of-00001.safetensors is not a safetensors file"):
        check_model_folder(str(model))


def test_inspect_source_reads_json_parquet_and_saved_folders(tmp_path):
    from opensloth.data import load_records

    ds = load_records(str(SFT_DATA), "test[:12]")
    ds.to_parquet(str(tmp_path / "chat.parquet"))
    ds.to_json(str(tmp_path / "chat.json"), lines=False)
    ds.save_to_disk(str(tmp_path / "saved"))
    for path, rows in ((tmp_path / "chat.parquet", 12), (tmp_path / "chat.json", 12), (tmp_path / "saved", -1)):
        summary = inspect_source(str(path))
        assert summary.rows == rows and set(summary.columns) == {"messages", "source"}, path
    assert inspect_source("trl-lib/Capybara") is None  # a hub id: checked when it loads
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(UserInputError, match="broken.parquet: not a readable Parquet file"):
        inspect_source(str(tmp_path / "broken.parquet"))


def test_preference_format_chosen_explicitly(tmp_path):
    path = write_lines(tmp_path / "pairs.jsonl", [json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})])
    check_data(DataCheck(path, kind="preference", fmt="pairs"))
    with pytest.raises(UserInputError, match=r"format 'judged' needs columns \['prompt', 'candidates'\]"):
        check_data(DataCheck(path, kind="preference", fmt="judged"))


def test_share_verdict_in_one_process():
    env = DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1)
    assert share_verdict(env, None, None).resume_from_checkpoint is None
    with pytest.raises(UserInputError, match="bad data") as err:
        share_verdict(env, None, UserInputError("bad data"))
    assert err.value.every_rank


def test_launcher_problem_sees_accelerates_lone_process():
    accelerate = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "ACCELERATE_DYNAMO_BACKEND": "NO"}
    assert "--multi_gpu" in launcher_problem(accelerate)
    assert launcher_problem({**accelerate, "WORLD_SIZE": "2", "RANK": "0"}) is None  # --multi_gpu: torchrun vars
    assert launcher_problem({"ACCELERATE_DYNAMO_BACKEND": "NO"}) is None  # accelerate launch --num_processes 1
    assert launcher_problem({"MASTER_ADDR": "10.0.0.1"}) is None  # a plain python run on a cluster node
