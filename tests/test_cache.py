"""Dataset cache in one process: keys, publish/validate, corruption, timeouts, the scoped patch."""

from __future__ import annotations

import json
import os
import time
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_DIR = os.path.join(ROOT, "data", "tiny-qwen3")
SFT_DIR = os.path.join(ROOT, "data", "sft")

_DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "TORCHELASTIC_RUN_ID", "OPENSLOTH_LAUNCH_ID")


@pytest.fixture(autouse=True)
def single_process_env(monkeypatch):
    for name in _DIST_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def oslog(caplog):
    """caplog for the opensloth logger (it does not propagate to the root logger)."""
    import logging

    from opensloth.log import get_logger

    logger = get_logger()
    logger.addHandler(caplog.handler)
    caplog.handler.setLevel(logging.INFO)
    yield caplog
    logger.removeHandler(caplog.handler)


@pytest.fixture(scope="module")
def raw():
    from opensloth.data import load_records

    return load_records(SFT_DIR, "train[:40]"), load_records(SFT_DIR, "test[:8]")


class FakeTrainer:
    """What the wrapper needs of a trainer: datasets and args."""

    def __init__(self, train_dataset, eval_dataset, args):
        self.train_dataset, self.eval_dataset, self.args = train_dataset, eval_dataset, args


class CountingFactory:
    """A trainer factory that tokenizes raw ``messages`` (counting tokenizer calls) like SFTTrainer would."""

    def __init__(self, max_length=128, shuffle=False):
        self.calls = []  # "raw" or "tokenized", per call
        self.tokenize_calls = 0
        self.args = types.SimpleNamespace(max_length=max_length, packing=False, shuffle_dataset=shuffle, seed=1)

    def _tokenize(self, ds, tokenizer):
        def tok(row):
            self.tokenize_calls += 1
            ids = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]
            ids = list(ids)[: self.args.max_length]
            return {"input_ids": ids, "labels": ids}

        out = ds.map(tok, remove_columns=ds.column_names, load_from_cache_file=False)
        return out.shuffle(seed=1) if self.args.shuffle_dataset else out

    def __call__(self, model, tokenizer, train_dataset, val_dataset, world_size):
        if "input_ids" in train_dataset.column_names:
            self.calls.append("tokenized")
        else:
            self.calls.append("raw")
            train_dataset = self._tokenize(train_dataset, tokenizer)
            val_dataset = self._tokenize(val_dataset, tokenizer) if val_dataset is not None else None
        return FakeTrainer(train_dataset, val_dataset, self.args)


def _wrap(factory, cache_dir, **cfg):
    from opensloth.cache import DatasetCacheConfig, cache_dataset_wrapper

    return cache_dataset_wrapper(DatasetCacheConfig(cache_dir=str(cache_dir), **cfg), {"max_seq_length": 128})(factory)


def _only_entry(cache_dir):
    entries = [e for e in os.listdir(cache_dir) if not e.startswith(".")]
    assert len(entries) == 1, entries
    return os.path.join(cache_dir, entries[0])


# ---- key ---------------------------------------------------------------------------


def test_cache_key_depends_on_content_not_storage(tokenizer, raw):
    import copy

    import datasets

    from opensloth.cache.key import compute_cache_key
    from opensloth.cache.key import cache_key_parts

    train, val = raw
    base = compute_cache_key(cache_key_parts(train, val, tokenizer, 128, {"a": 1}))
    in_memory = datasets.Dataset.from_list(train.to_list())
    assert compute_cache_key(cache_key_parts(in_memory, val, tokenizer, 128, {"a": 1})) == base
    edited = train.to_list()
    edited[5]["messages"][0]["content"] += "!"
    changed = {
        "record": cache_key_parts(datasets.Dataset.from_list(edited), val, tokenizer, 128, {"a": 1}),
        "order": cache_key_parts(train.select(list(range(1, 40)) + [0]), val, tokenizer, 128, {"a": 1}),
        "max_seq_length": cache_key_parts(train, val, tokenizer, 256, {"a": 1}),
        "params": cache_key_parts(train, val, tokenizer, 128, {"a": 2}),
        "no val": cache_key_parts(train, None, tokenizer, 128, {"a": 1}),
    }
    other_tok = copy.deepcopy(tokenizer)
    other_tok.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    changed["chat template"] = cache_key_parts(train, val, other_tok, 128, {"a": 1})
    for what, parts in changed.items():
        assert compute_cache_key(parts) != base, what


def test_tokenizer_fingerprint_parts(tokenizer):
    import copy

    from opensloth.cache.key import tokenizer_fingerprint

    fp = tokenizer_fingerprint(tokenizer)
    assert tokenizer_fingerprint(copy.deepcopy(tokenizer)) == fp
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<|new_token|>"], special_tokens=True)
    changed = tokenizer_fingerprint(other)
    assert changed["added_tokens"] != fp["added_tokens"] and changed["combined"] != fp["combined"]
    assert changed["chat_template"] == fp["chat_template"]
    padded = copy.deepcopy(tokenizer)
    padded.pad_token = "<|im_start|>"  # the pad token never appears in tokenized rows
    assert tokenizer_fingerprint(padded)["combined"] == fp["combined"]


# ---- cold / warm / corrupt -------------------------------------------------------------


def test_cold_then_warm(tmp_path, tokenizer, raw):
    from opensloth.cache.key import dataset_fingerprint

    train, val = raw
    factory = CountingFactory()
    build = _wrap(factory, tmp_path)
    cold = build(None, tokenizer, train, val, 1)
    assert factory.calls == ["raw"] and factory.tokenize_calls == 48
    path = _only_entry(tmp_path)
    meta = json.load(open(os.path.join(path, "cache_metadata.json")))
    assert meta["splits"]["train"]["rows"] == 40 and meta["splits"]["val"]["rows"] == 8
    assert meta["key_parts"]["max_seq_length"] == 128 and "world_size" not in json.dumps(meta["key_parts"])
    assert meta["versions"]["datasets"] and meta["created_at"] and meta["raw_sizes"] == {"train": 40, "val": 8}

    factory.tokenize_calls = 0
    warm = build(None, tokenizer, train, val, 1)
    assert factory.calls == ["raw", "tokenized"] and factory.tokenize_calls == 0
    assert dataset_fingerprint(warm.train_dataset) == dataset_fingerprint(cold.train_dataset)
    assert dataset_fingerprint(warm.eval_dataset) == dataset_fingerprint(cold.eval_dataset)


def _flip_byte(path, offset):
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([byte[0] ^ 0xFF]))


def test_corrupted_file_is_detected_and_rebuilt(tmp_path, tokenizer, raw, oslog):
    train, val = raw
    factory = CountingFactory()
    build = _wrap(factory, tmp_path)
    build(None, tokenizer, train, val, 1)
    path = _only_entry(tmp_path)
    arrow = os.path.join(path, "train", "data-00000-of-00001.arrow")
    _flip_byte(arrow, os.path.getsize(arrow) // 2)  # same size, different bytes

    trainer = build(None, tokenizer, train, val, 1)
    assert factory.calls == ["raw", "raw"]  # rebuilt from the raw data
    assert "fails its SHA-256 check" in oslog.text and "rebuilding" in oslog.text
    assert len(trainer.train_dataset) == 40
    factory.calls.clear()
    build(None, tokenizer, train, val, 1)
    assert factory.calls == ["tokenized"]  # and the rebuilt cache is reused


def test_truncated_file_detected_with_size_check(tmp_path, tokenizer, raw):
    train, val = raw
    factory = CountingFactory()
    build = _wrap(factory, tmp_path, verify="size")
    build(None, tokenizer, train, val, 1)
    arrow = os.path.join(_only_entry(tmp_path), "val", "data-00000-of-00001.arrow")
    with open(arrow, "r+b") as fh:
        fh.truncate(100)
    build(None, tokenizer, train, val, 1)
    assert factory.calls == ["raw", "raw"]


def test_half_written_cache_is_never_loaded(tmp_path, tokenizer, raw):
    train, val = raw
    factory = CountingFactory()
    build = _wrap(factory, tmp_path)
    build(None, tokenizer, train, val, 1)
    path = _only_entry(tmp_path)
    os.remove(os.path.join(path, "READY"))  # as if killed between the rename and the marker
    dead_tmp = os.path.join(tmp_path, f".{os.path.basename(path)}.tmp-{os.uname().nodename}-999999999-abcd")
    os.makedirs(os.path.join(dead_tmp, "train"))  # a killed builder's leftovers

    build(None, tokenizer, train, val, 1)
    assert factory.calls == ["raw", "raw"]
    assert os.path.exists(os.path.join(path, "READY"))
    assert not os.path.exists(dead_tmp)


def test_metadata_mismatch_is_rebuilt(tmp_path, tokenizer, raw):
    train, val = raw
    factory = CountingFactory()
    build = _wrap(factory, tmp_path)
    build(None, tokenizer, train, val, 1)
    meta_path = os.path.join(_only_entry(tmp_path), "cache_metadata.json")
    meta = json.load(open(meta_path))
    meta["cache_key"] = "something-else"
    json.dump(meta, open(meta_path, "w"))
    build(None, tokenizer, train, val, 1)
    assert factory.calls == ["raw", "raw"]


def test_changed_trainer_options_are_a_clear_error(tmp_path, tokenizer, raw):
    from opensloth.cache import DatasetCacheMismatchError

    train, val = raw
    factory = CountingFactory(max_length=128)
    build = _wrap(factory, tmp_path)
    build(None, tokenizer, train, val, 1)
    factory.args.max_length = 64
    with pytest.raises(DatasetCacheMismatchError, match="max_length: cached 128 vs now 64.*cache_key_params"):
        build(None, tokenizer, train, val, 1)


UnslothSFTTrainer = type("UnslothSFTTrainer", (FakeTrainer,), {"__module__": "UnslothSFTTrainer"})


class RewritingFactory(CountingFactory):
    """Unsloth's GPU-path SFTTrainer with padding_free unset: padding-free (and max_length cleared) when it
    tokenizes raw data, off (max_length kept) when handed tokenized rows."""

    def __init__(self, trainer_cls, padding_free=None):
        super().__init__()
        self.trainer_cls, self.padding_free = trainer_cls, padding_free

    def __call__(self, model, tokenizer, train_dataset, val_dataset, world_size):
        raw_data = "input_ids" not in train_dataset.column_names
        t = super().__call__(model, tokenizer, train_dataset, val_dataset, world_size)
        args = types.SimpleNamespace(**vars(self.args), padding_free=self.padding_free)
        if self.padding_free is None:
            args.padding_free, args.max_length = (True, None) if raw_data else (False, self.args.max_length)
        return self.trainer_cls(t.train_dataset, t.eval_dataset, args)


def test_options_the_trainer_rewrote_itself_are_named_as_such(tmp_path, tokenizer, raw):
    """Run 1 on an H200: rank 1 refused the cache rank 0 built (padding_free True/None vs False/512)."""
    from opensloth.cache import DatasetCacheMismatchError

    train, val = raw
    build = _wrap(RewritingFactory(UnslothSFTTrainer), tmp_path / "unsloth")
    build(None, tokenizer, train, val, 1)
    with pytest.raises(DatasetCacheMismatchError) as err:
        build(None, tokenizer, train, val, 1)
    msg = str(err.value)
    assert "max_length: cached None vs now 128" in msg and "padding_free: cached True vs now False" in msg
    assert "Unsloth's UnslothSFTTrainer rewrote them itself" in msg and "padding_free=False" in msg
    assert "cache_key_params" not in msg

    # The same differences from a trainer not known to rewrite them: the settings message.
    build = _wrap(RewritingFactory(FakeTrainer), tmp_path / "other")
    build(None, tokenizer, train, val, 1)
    with pytest.raises(DatasetCacheMismatchError, match="cache_key_params") as err:
        build(None, tokenizer, train, val, 1)
    assert "rewrote" not in str(err.value)


@pytest.mark.parametrize("padding_free", [False, True])
def test_explicit_padding_free_keeps_builder_and_readers_in_agreement(tmp_path, tokenizer, raw, padding_free):
    train, val = raw
    factory = RewritingFactory(UnslothSFTTrainer, padding_free=padding_free)
    build = _wrap(factory, tmp_path)
    build(None, tokenizer, train, val, 1)
    assert build(None, tokenizer, train, val, 1).args.padding_free is padding_free
    assert factory.calls == ["raw", "tokenized"]


def test_padding_free_left_unset_reads_as_off():
    from opensloth.cache.key import trainer_prepare_args

    unset = FakeTrainer(None, None, types.SimpleNamespace(padding_free=None, max_length=8))
    off = FakeTrainer(None, None, types.SimpleNamespace(padding_free=False, max_length=8))
    assert trainer_prepare_args(unset) == trainer_prepare_args(off) == {"padding_free": False, "max_length": 8}


def test_reprepared_data_is_restored(tmp_path, tokenizer, raw, oslog):
    train, val = raw
    factory = CountingFactory(shuffle=True)

    def reshuffling(model, tokenizer, train_dataset, val_dataset, world_size):
        trainer = factory(model, tokenizer, train_dataset, val_dataset, world_size)
        trainer.train_dataset = trainer.train_dataset.shuffle(seed=5)  # what a second preparation would do
        return trainer

    build = _wrap(reshuffling, tmp_path)
    cold = build(None, tokenizer, train, val, 1)
    warm = build(None, tokenizer, train, val, 1)
    assert warm.train_dataset["input_ids"] == cold.train_dataset.flatten_indices()["input_ids"]
    assert "re-prepared the cached dataset" in oslog.text


def test_builder_error_leaves_no_cache(tmp_path, tokenizer, raw):
    train, val = raw

    def broken(*args):
        raise RuntimeError("tokenizer exploded")

    with pytest.raises(RuntimeError, match="tokenizer exploded"):
        _wrap(broken, tmp_path)(None, tokenizer, train, val, 1)
    assert [e for e in os.listdir(tmp_path) if not e.startswith(".")] == []
    failed = [e for e in os.listdir(tmp_path) if e.endswith(".failed.json")]
    assert len(failed) == 1 and "tokenizer exploded" in open(os.path.join(tmp_path, failed[0])).read()
    assert not [e for e in os.listdir(tmp_path) if e.endswith(".building.json")]


def test_sft_dataset_kwargs(raw):
    from opensloth.cache import sft_dataset_kwargs

    train, _ = raw
    assert sft_dataset_kwargs(train) is None
    assert sft_dataset_kwargs(train.map(lambda r: {"input_ids": [1]})) == {"skip_prepare_dataset": True}


# ---- waiting ranks -------------------------------------------------------------------


def _waiter_launch(launch_id, rank=1):
    from opensloth.distributed import DistEnv
    from opensloth.cache.coordination import CacheLaunch

    env = DistEnv(rank=rank, local_rank=rank, world_size=2, local_world_size=2)
    return CacheLaunch(env=env, use_group=False, launch_id=launch_id, host=os.uname().nodename, started=time.time())


def test_waiter_times_out_with_clear_error(tmp_path, tokenizer, raw, monkeypatch):
    """File-flag mode (no process group): rank 1 waits for a builder that never comes."""
    from opensloth.cache import CacheWaitTimeout

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    train, val = raw
    factory = CountingFactory()
    build = _wrap(factory, tmp_path, timeout_minutes=1.0 / 60, poll_interval_s=0.05, sync="file")
    start = time.monotonic()
    with pytest.raises(CacheWaitTimeout) as err:
        build(None, tokenizer, train, val, 2)
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert str(tmp_path) in message and "READY" in message and "global rank 0" in message
    assert factory.calls == []


def test_waiter_reports_builder_failure(tmp_path):
    from opensloth.cache.coordination import (CacheBuildFailedError, DatasetCacheConfig, marker_path, wait_for_prepared,
                                              write_marker)

    cfg = DatasetCacheConfig(cache_dir=str(tmp_path), timeout_minutes=1, poll_interval_s=0.05)
    write_marker(marker_path(str(tmp_path), "k1", "failed"),
                  {"launch_id": "other-launch", "error": "old failure", "pid": 1, "host": "h"})
    write_marker(marker_path(str(tmp_path), "k2", "failed"),
                  {"launch_id": "L", "error": "ValueError: bad row", "pid": 1, "host": "h"})
    with pytest.raises(CacheBuildFailedError, match="ValueError: bad row"):
        wait_for_prepared(os.path.join(tmp_path, "k2"), "k2", cfg, _waiter_launch("L"))
    # A failure of another launch is ignored: this waiter keeps waiting (and times out).
    cfg_short = DatasetCacheConfig(cache_dir=str(tmp_path), timeout_minutes=0.5 / 60, poll_interval_s=0.05)
    from opensloth.cache import CacheWaitTimeout

    with pytest.raises(CacheWaitTimeout):
        wait_for_prepared(os.path.join(tmp_path, "k1"), "k1", cfg_short, _waiter_launch("L"))


def test_waiter_loads_published_cache(tmp_path, tokenizer, raw):
    from opensloth.cache.coordination import DatasetCacheConfig, wait_for_prepared

    train, val = raw
    _wrap(CountingFactory(), tmp_path)(None, tokenizer, train, val, 1)
    path = _only_entry(tmp_path)
    cfg = DatasetCacheConfig(cache_dir=str(tmp_path), timeout_minutes=0.1)
    meta = wait_for_prepared(path, os.path.basename(path), cfg, _waiter_launch(None), sleep=pytest.fail)
    assert meta["splits"]["train"]["rows"] == 40


def test_builder_liveness_decisions():
    from opensloth.cache.coordination import builder_liveness

    alive = lambda pid: pid == 10  # noqa: E731
    marker = {"launch_id": "L", "host": "h1", "pid": 10, "heartbeat": 100.0, "stage": "tokenizing", "rank": 0}
    assert builder_liveness(marker, "L", "h1", 101.0, 60, alive) is None
    assert builder_liveness(None, "L", "h1", 101.0, 60, alive) is None
    assert "is gone" in builder_liveness({**marker, "pid": 11}, "L", "h1", 101.0, 60, alive)
    assert builder_liveness({**marker, "pid": 11}, "L", "h2", 101.0, 60, alive) is None  # other host: no pid check
    assert "heartbeat" in builder_liveness(marker, "L", "h2", 200.0, 60, alive)
    assert builder_liveness({**marker, "pid": 11}, "OLD", "h1", 1000.0, 60, alive) is None  # another launch
    assert builder_liveness(marker, None, "h1", 1000.0, 60, alive) is None  # no launch id: only the timeout


def test_config_validation():
    from opensloth.cache import DatasetCacheConfig

    with pytest.raises(ValueError, match="builder"):
        DatasetCacheConfig(builder="node")
    with pytest.raises(ValueError, match="heartbeat_timeout_s"):
        DatasetCacheConfig(heartbeat_interval_s=10, heartbeat_timeout_s=5)
    with pytest.raises(ValueError, match="cache_dir"):
        DatasetCacheConfig(cache_dir="")


# ---- the scoped accelerate patch ---------------------------------------------------------


class _FakeState:
    def __init__(self):
        self.waits = 0

    def wait_for_everyone(self):
        self.waits += 1


def test_prepare_alone_swaps_and_restores():
    from accelerate.state import PartialState

    from opensloth.patches import applied_patches
    from opensloth.patches.registry import is_patched
    from opensloth.patches.prepare_alone import PREPARE_ALONE_PATCH, prepare_alone

    original = PartialState._goes_first
    state = _FakeState()
    list(PartialState._goes_first(state, False))
    assert state.waits == 1  # stock: a non-main rank waits
    with prepare_alone(True):
        assert is_patched(PartialState._goes_first, PREPARE_ALONE_PATCH)
        with prepare_alone(True):  # idempotent when nested
            list(PartialState._goes_first(state, False))
            list(PartialState._goes_first(state, True))
        assert is_patched(PartialState._goes_first, PREPARE_ALONE_PATCH)
    assert state.waits == 1  # no waits while patched
    assert PartialState._goes_first is original
    assert PREPARE_ALONE_PATCH in [p.name for p in applied_patches()]
    with prepare_alone(False):
        assert PartialState._goes_first is original


def test_prepare_alone_refuses_a_changed_target(monkeypatch):
    from accelerate.state import PartialState

    from opensloth.patches.registry import PatchTargetError
    from opensloth.patches.prepare_alone import prepare_alone

    def _goes_first(self, is_main):
        yield

    monkeypatch.setattr(PartialState, "_goes_first", _goes_first)
    with pytest.raises(PatchTargetError, match="wait_for_everyone"):
        with prepare_alone(True):
            pass


# ---- precomputed datasets ---------------------------------------------------------------


def test_load_prepared_dataset_checks_tokenizer_and_length(tmp_path, tokenizer, raw):
    import copy

    from opensloth.data import prepare_chat_dataset
    from opensloth.cache.key import tokenizer_fingerprint
    from opensloth.cache.store import PreparedDatasetError, PreparedDatasetMismatchError, publish_prepared
    from opensloth.cache import load_prepared_dataset

    train, val = raw
    tok_train, _ = prepare_chat_dataset(train, tokenizer, mode="tokens", max_seq_length=96)
    tok_val, _ = prepare_chat_dataset(val, tokenizer, mode="tokens", max_seq_length=96)
    path = str(tmp_path / "precomputed" / "tiny")
    publish_prepared(path, {"train": tok_train, "val": tok_val}, {"tokenizer": tokenizer_fingerprint(tokenizer)})

    got_train, got_val = load_prepared_dataset(path, tokenizer, max_seq_length=96)
    assert got_train["input_ids"] == tok_train["input_ids"] and len(got_val) == len(tok_val)

    other = copy.deepcopy(tokenizer)
    other.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    with pytest.raises(PreparedDatasetMismatchError, match="differs in: chat_template"):
        load_prepared_dataset(path, other)
    with pytest.raises(PreparedDatasetMismatchError, match="longer than max_seq_length=64"):
        load_prepared_dataset(path, tokenizer, max_seq_length=64)
    with pytest.raises(PreparedDatasetError, match="not usable: missing"):
        load_prepared_dataset(str(tmp_path / "nothing"), tokenizer)


def test_precompute_script_roundtrip(tmp_path, tokenizer, oslog):
    import sys

    sys.path.insert(0, os.path.join(ROOT, "train_scripts"))
    try:
        import precompute_dataset
    finally:
        sys.path.pop(0)
    from opensloth.cache import load_prepared_dataset

    argv = ["--model_name", TOKENIZER_DIR, "--dataset", SFT_DIR, "--name", "tiny", "--output_root", str(tmp_path),
            "--max_seq_length", "96", "--assistant_only", "--train_samples", "50", "--val_samples", "10"]
    assert precompute_dataset.main(argv) == 0
    path = os.path.join(tmp_path, "tiny")
    meta = json.load(open(os.path.join(path, "cache_metadata.json")))
    assert meta["key_parts"]["max_seq_length"] == 96 and meta["key_parts"]["params"]["assistant_only"] is True
    assert meta["source"]["dataset"] == SFT_DIR and meta["reports"][0]["total_in"] == 50
    train, val = load_prepared_dataset(path, tokenizer, max_seq_length=96)
    assert train.column_names == ["input_ids", "labels"] and len(val) <= 10
    assert any(-100 in labels for labels in train["labels"])  # assistant-only masking happened
    mtime = os.path.getmtime(os.path.join(path, "READY"))
    assert precompute_dataset.main(argv) == 0  # identical input: left as is
    assert os.path.getmtime(os.path.join(path, "READY")) == mtime
    assert "nothing to do" in oslog.text


def test_cache_key_params_must_be_plain_values(tmp_path):
    from opensloth.cache import simple_cache_dataset_wrapper

    simple_cache_dataset_wrapper(cache_dir=str(tmp_path), max_seq_length=128, opts={"a": [1, 2]})
    with pytest.raises(TypeError, match=r"cache_key_params\['collator'\]"):
        simple_cache_dataset_wrapper(cache_dir=str(tmp_path), collator=object())


def test_default_cache_dir_is_a_user_cache_never_the_data_folder(monkeypatch, tmp_path):
    from opensloth.cache import CACHE_DIR_ENV, DatasetCacheConfig, default_cache_dir

    assert default_cache_dir({CACHE_DIR_ENV: "/x/y", "XDG_CACHE_HOME": "/z"}) == "/x/y"
    assert default_cache_dir({"XDG_CACHE_HOME": "/z"}) == "/z/opensloth/datasets"
    monkeypatch.delenv(CACHE_DIR_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == str(tmp_path / ".cache" / "opensloth" / "datasets")
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "c"))
    assert DatasetCacheConfig().cache_dir == str(tmp_path / "c")
    assert "data" not in default_cache_dir({}).split("/")[-2:]
def test_a_global_builder_whose_folder_other_hosts_cannot_see_is_refused_at_once(tmp_path, monkeypatch):
    """Node-local cache folders with builder='global': every rank stops with the fix instead of waiting 30 min."""
    import opensloth.cache.coordination as coordination
    from opensloth.cache.coordination import (CacheLaunch, CacheNotSharedError, DatasetCacheConfig,
                                              require_shared_cache_dir)
    from opensloth.distributed import DistEnv

    calls = []
    monkeypatch.setattr(coordination, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(coordination, "all_gather_object_list", lambda seen: [seen, False])  # rank 1 sees nothing
    env = DistEnv(rank=0, local_rank=0, world_size=2, local_world_size=1)
    launch = CacheLaunch(env=env, use_group=True, launch_id="L1", host="node-a", started=0.0, hosts=["node-a", "node-b"])
    cache = tmp_path / "cache"
    fast = dict(poll_interval_s=0.01, heartbeat_interval_s=0.01, heartbeat_timeout_s=0.05)
    with pytest.raises(CacheNotSharedError, match="node-b cannot see.*--cache_builder local") as err:
        require_shared_cache_dir(launch, DatasetCacheConfig(cache_dir=str(cache), **fast), str(cache))
    assert err.value.every_rank and err.value.exit_code == 2
    assert calls == ["barrier", "barrier"] and os.listdir(cache) == []  # the probe is gone
    calls.clear()
    require_shared_cache_dir(launch, DatasetCacheConfig(cache_dir=str(cache), builder="local"), str(cache))
    launch.hosts = ["node-a", "node-a"]
    require_shared_cache_dir(launch, DatasetCacheConfig(cache_dir=str(cache)), str(cache))
    assert calls == []  # one host, or node-local builders: nothing to check
