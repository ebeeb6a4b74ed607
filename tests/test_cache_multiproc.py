"""Dataset cache across processes: 2 ranks on gloo, a real SFTTrainer, a killed builder.

Each test starts its ranks as subprocesses running this file (``python
tests/test_cache_multiproc.py <mode> <out_dir> ...``) with the
variables torchrun would set. Every rank writes what it saw to
``<out_dir>/rank<N>.json``; the tests compare those reports.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_DIR = os.path.join(ROOT, "data", "tiny-qwen3")
SFT_DIR = os.path.join(ROOT, "data", "sft")
LAUNCH_TIMEOUT_S = 120


# ---- launcher (test side) ----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode: str, out_dir, cache_dir, world_size: int = 2, extra=(), rank_args=None):
    """Run ``world_size`` ranks of this file; return ``{rank: (returncode, report_or_None, stderr)}``."""
    os.makedirs(out_dir, exist_ok=True)
    port = _free_port()
    procs = []
    for rank in range(world_size):
        env = {k: v for k, v in os.environ.items() if k not in ("TORCHELASTIC_RUN_ID", "OPENSLOTH_LAUNCH_ID")}
        env.update(HF_DATASETS_CACHE=str(os.path.join(os.fspath(out_dir), "hf-datasets")),
                   RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                   LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        args = [sys.executable, os.path.abspath(__file__), mode, str(out_dir), str(cache_dir), *extra,
                *((rank_args or {}).get(rank, ()))]
        procs.append(subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    results = {}
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    try:
        for rank, proc in enumerate(procs):  # rank 0 first, so a killed builder is reaped at once
            _, err = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
            report_path = os.path.join(out_dir, f"rank{rank}.json")
            report = json.load(open(report_path)) if os.path.exists(report_path) else None
            results[rank] = (proc.returncode, report, err)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def _ok(results):
    for rank, (code, report, err) in results.items():
        assert code == 0 and report is not None and "error" not in report, f"rank {rank} failed:\n{err[-3000:]}"
    return {rank: report for rank, (_, report, _) in results.items()}


# ---- tests ---------------------------------------------------------------------------


@pytest.mark.slow
def test_two_ranks_real_sft_trainer_builder_alone_tokenizes(tmp_path):
    """Cold: only rank 0 tokenizes, rank 1 waits and loads. Warm: nobody tokenizes. Same data everywhere."""
    reports = _ok(launch("sft", tmp_path / "out", tmp_path / "cache"))
    r0, r1 = reports[0], reports[1]
    cold0, warm0 = r0["calls"]
    cold1, warm1 = r1["calls"]
    assert cold0["factory_got"] == "raw" and cold0["tokenizer_calls"] >= 72  # 64 train + 8 eval rows
    assert cold1["factory_got"] == "tokenized" and cold1["tokenizer_calls"] == 0
    assert warm0["tokenizer_calls"] == 0 and warm1["tokenizer_calls"] == 0
    assert warm0["factory_got"] == warm1["factory_got"] == "tokenized"
    assert cold1["skip_prepare"] and warm0["skip_prepare"] and warm1["skip_prepare"]
    fingerprints = {c["train_fingerprint"] for c in (cold0, warm0, cold1, warm1)}
    assert len(fingerprints) == 1, "every rank must hold byte-identical training data"
    assert {c["eval_fingerprint"] for c in (cold0, warm0, cold1, warm1)} == {cold0["eval_fingerprint"]}
    assert r0["steps"] == r1["steps"] == 1 and r0["loss"] == pytest.approx(r1["loss"], rel=0.5)


@pytest.mark.slow
def test_killed_builder_then_relaunch(tmp_path):
    """Rank 0 dies mid-publish; rank 1 fails fast and clearly; the next launch rebuilds; 1 rank reuses it."""
    cache = tmp_path / "cache"
    first = launch("fake", tmp_path / "first", cache, rank_args={0: ["--kill-on-val-save"]})
    code0, _, _ = first[0]
    code1, report1, err1 = first[1]
    assert code0 == -signal.SIGKILL
    assert code1 != 0 and report1 is not None, err1[-3000:]
    assert report1["error_type"] == "CacheBuilderDiedError"
    assert str(cache) in report1["error"] and "relaunch" in report1["error"]
    assert report1["waited_s"] < 30  # the timeout is 60 s: the dead builder was noticed, not waited out
    leftovers = os.listdir(cache)
    assert not [e for e in leftovers if not e.startswith(".")], "nothing may be published by a killed builder"
    assert any(".tmp-" in e for e in leftovers), "the kill happened mid-write"

    second = _ok(launch("fake", tmp_path / "second", cache))
    assert second[0]["factory_got"] == ["raw"] and second[1]["factory_got"] == ["tokenized"]
    assert second[1]["tokenize_calls"] == 0
    assert second[0]["train_fingerprint"] == second[1]["train_fingerprint"]
    assert not any(".tmp-" in e for e in os.listdir(cache)), "the dead builder's temporary folder was swept"

    # World size is not part of the key: a 1-rank launch reuses the 2-rank cache.
    single = _ok(launch("fake", tmp_path / "single", cache, world_size=1))
    assert single[0]["factory_got"] == ["tokenized"] and single[0]["tokenize_calls"] == 0
    assert single[0]["train_fingerprint"] == second[0]["train_fingerprint"]


@pytest.mark.slow
def test_concurrent_launches_on_one_cache(tmp_path):
    """Two independent launches start at once on one cold cache: both build, one copy is kept, same bytes."""
    from concurrent.futures import ThreadPoolExecutor

    cache = tmp_path / "cache"
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(launch, "fake", tmp_path / f"launch{i}", cache, 1) for i in (0, 1)]
        first, second = (_ok(f.result())[0] for f in futures)
    assert first["train_fingerprint"] == second["train_fingerprint"]
    published = [e for e in os.listdir(cache) if not e.startswith(".")]
    assert len(published) == 1 and os.path.exists(os.path.join(cache, published[0], "READY"))
    assert not [e for e in os.listdir(cache) if ".tmp-" in e or ".trash-" in e], "a loser's temporary folder was left"
    third = _ok(launch("fake", tmp_path / "third", cache, world_size=1))[0]  # and a later launch reuses it
    assert third["factory_got"] == ["tokenized"] and third["train_fingerprint"] == first["train_fingerprint"]


# ---- worker (rank side) ------------------------------------------------------------------


def _write_report(out_dir: str, payload: dict) -> None:
    rank = int(os.environ.get("RANK", "0"))
    tmp = os.path.join(out_dir, f".rank{rank}.json.tmp")
    with open(tmp, "w") as fh:
        json.dump(payload, fh)
    os.replace(tmp, os.path.join(out_dir, f"rank{rank}.json"))


def _count_tokenizer_calls(tokenizer_cls, counter: dict) -> None:
    """Count every entry into the tokenizer class (chat template and plain calls)."""
    for name in ("apply_chat_template", "__call__", "encode", "batch_encode_plus"):
        original = getattr(tokenizer_cls, name, None)
        if original is None:
            continue

        def counted(self, *args, __original=original, **kwargs):
            counter["n"] += 1
            return __original(self, *args, **kwargs)

        setattr(tokenizer_cls, name, counted)


def worker_sft(out_dir: str, cache_dir: str) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opensloth.patches.ddp import ddp_patch

    ddp_patch()  # process group (gloo) and the CPU fixes a real training step needs
    import trl

    from opensloth.data import load_records
    from opensloth.cache.key import dataset_fingerprint
    from opensloth.cache import sft_dataset_kwargs, simple_cache_dataset_wrapper

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    model = AutoModelForCausalLM.from_pretrained(TOKENIZER_DIR)
    # Rows in memory: TRL's maps then have no datasets cache files through which rank 1 (or a
    # later run) could pick up rank 0's tokenization, so every count below is the cache's doing.
    train = load_records(SFT_DIR, "train[:64]").flatten_indices(keep_in_memory=True)
    val = load_records(SFT_DIR, "test[:8]").flatten_indices(keep_in_memory=True)
    counter = {"n": 0}
    _count_tokenizer_calls(type(tokenizer), counter)
    seen = []

    @simple_cache_dataset_wrapper(cache_dir=cache_dir, timeout_minutes=1.5, max_seq_length=128)
    def build_trainer(model, tokenizer, train_dataset, val_dataset, world_size):
        seen.append("tokenized" if "input_ids" in train_dataset.column_names else "raw")
        config = trl.SFTConfig(
            output_dir=os.path.join(out_dir, "run"), max_length=128, per_device_train_batch_size=4, max_steps=1,
            report_to=[], logging_steps=1, save_strategy="no", eval_strategy="no", dataloader_num_workers=0,
            ddp_find_unused_parameters=False, dataset_kwargs=sft_dataset_kwargs(train_dataset),
        )
        return trl.SFTTrainer(model=model, args=config, train_dataset=train_dataset, eval_dataset=val_dataset,
                              processing_class=tokenizer)

    calls = []
    for _ in range(2):  # cold, then warm
        counter["n"] = 0
        trainer = build_trainer(model, tokenizer, train, val, 2)
        calls.append({
            "factory_got": seen[-1],
            "tokenizer_calls": counter["n"],
            "skip_prepare": bool(getattr(trainer, "_skip_prepare_dataset", False)),
            "train_fingerprint": dataset_fingerprint(trainer.train_dataset),
            "eval_fingerprint": dataset_fingerprint(trainer.eval_dataset),
        })
    result = trainer.train()
    return {"calls": calls, "steps": trainer.state.global_step, "loss": result.training_loss}


class _FakeTrainer:
    def __init__(self, train_dataset, eval_dataset):
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.args = None


class _ShimTokenizer:
    """Just enough of a tokenizer for the cache key, without importing transformers (saves seconds per rank)."""

    def __init__(self, folder: str):
        import tokenizers

        self.backend_tokenizer = tokenizers.Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        self.name_or_path = folder
        self.chat_template = open(os.path.join(folder, "chat_template.jinja")).read()
        self.bos_token, self.eos_token, self.unk_token = None, "<|im_end|>", None

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size()

    def encode_messages(self, messages) -> list[int]:
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return self.backend_tokenizer.encode(text).ids


def worker_fake(out_dir: str, cache_dir: str, kill_on_val_save: bool) -> dict:
    import datasets

    from opensloth.data import load_records
    from opensloth.cache.key import dataset_fingerprint
    from opensloth.cache import DatasetCacheConfig, cache_dataset_wrapper

    if kill_on_val_save:
        original_save = datasets.Dataset.save_to_disk

        def save_then_die(self, path, *args, **kwargs):
            if os.path.basename(os.fspath(path)) == "val":  # train is already on disk: a half-written cache
                os.kill(os.getpid(), signal.SIGKILL)
            return original_save(self, path, *args, **kwargs)

        datasets.Dataset.save_to_disk = save_then_die

    tokenizer = _ShimTokenizer(TOKENIZER_DIR)
    train = load_records(SFT_DIR, "train[:48]")
    val = load_records(SFT_DIR, "test[:8]")
    stats = {"factory_got": [], "tokenize_calls": 0}

    def tokenize(ds):
        def one(row):
            stats["tokenize_calls"] += 1
            ids = tokenizer.encode_messages(row["messages"])
            return {"input_ids": ids[:128], "labels": ids[:128]}

        return ds.map(one, remove_columns=ds.column_names, load_from_cache_file=False)

    def factory(model, tokenizer, train_dataset, val_dataset, world_size):
        if "input_ids" in train_dataset.column_names:
            stats["factory_got"].append("tokenized")
            return _FakeTrainer(train_dataset, val_dataset)
        stats["factory_got"].append("raw")
        return _FakeTrainer(tokenize(train_dataset), tokenize(val_dataset))

    config = DatasetCacheConfig(cache_dir=cache_dir, timeout_minutes=1.0, poll_interval_s=0.1,
                                heartbeat_interval_s=0.5, heartbeat_timeout_s=5.0)
    build = cache_dataset_wrapper(config, {"max_seq_length": 128})(factory)
    start = time.monotonic()
    try:
        trainer = build(None, tokenizer, train, val, int(os.environ["WORLD_SIZE"]))
    except Exception as exc:
        return {"error": str(exc), "error_type": type(exc).__name__, "waited_s": time.monotonic() - start}
    return {**stats, "train_fingerprint": dataset_fingerprint(trainer.train_dataset)}


def main(argv: list[str]) -> int:
    mode, out_dir, cache_dir, *flags = argv
    try:
        if mode == "sft":
            report = worker_sft(out_dir, cache_dir)
        elif mode == "fake":
            report = worker_fake(out_dir, cache_dir, "--kill-on-val-save" in flags)
        else:
            raise SystemExit(f"unknown mode {mode}")
    except BaseException as exc:  # report, then exit without waiting on peers that may be gone
        import traceback

        traceback.print_exc()
        _write_report(out_dir, {"error": str(exc), "error_type": type(exc).__name__})
        sys.stderr.flush()
        os._exit(3)
    _write_report(out_dir, report)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if "error" not in report else 3)  # skip process-group teardown at exit


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
