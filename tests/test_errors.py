"""opensloth.errors.run_cli: one line per error, who prints it under torchrun, torchrun's error file, --debug."""

from __future__ import annotations

import errno
import json
import os

import pytest

import opensloth.errors as errors
from opensloth.errors import PatchTargetError, ReportedError, UserInputError, run_cli, same_on_every_rank


def _raise(exc):
    def main(argv):
        raise exc

    return main


@pytest.fixture(autouse=True)
def _one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "TORCHELASTIC_ERROR_FILE", "OPENSLOTH_DEBUG"):
        monkeypatch.delenv(name, raising=False)


def _lines(capsys):
    return capsys.readouterr().err.splitlines()


def test_one_line_and_exit_codes(capsys):
    assert run_cli(_raise(UserInputError("--x 1 is bad;\n  use 2"))) == 2
    assert _lines(capsys) == ["error: --x 1 is bad; use 2"]
    assert run_cli(_raise(PatchTargetError("pin transformers"))) == 2
    assert run_cli(_raise(ReportedError("the builder died; relaunch"))) == 1  # a failed run, not bad input
    assert _lines(capsys) == ["error: pin transformers", "error: the builder died; relaunch"]
    assert run_cli(lambda argv: None) == 0


def test_full_disk_anywhere_is_one_line(capsys):
    exc = OSError(errno.ENOSPC, "No space left on device", "/data/out/file.bin")
    assert run_cli(_raise(exc)) == 2
    (line,) = _lines(capsys)
    assert line.startswith("error: no space left on the device writing /data/out/file.bin")
    with pytest.raises(PermissionError):  # other OS errors keep their traceback (not ours to explain)
        run_cli(_raise(PermissionError(errno.EACCES, "denied")))


def test_under_torchrun_rank0_prints_shared_errors_and_each_rank_its_own(capsys, monkeypatch, tmp_path):
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    waits = []
    monkeypatch.setattr(errors, "_outlive_rank0", lambda: waits.append(os.environ["RANK"]))
    shared = UserInputError("--learning_rate -1 must be > 0")
    shared.every_rank = True
    monkeypatch.setenv("RANK", "1")
    assert run_cli(_raise(shared)) == 2
    assert _lines(capsys) == [] and not error_file.exists()  # quiet: rank 0 prints the same line
    assert waits == ["1"]  # and it outlives rank 0, so torchrun names rank 0's failure as the root cause
    assert run_cli(_raise(UserInputError("only here"))) == 2
    assert _lines(capsys) == ["error (rank 1): only here"]
    monkeypatch.setenv("RANK", "0")
    assert run_cli(_raise(shared)) == 2
    assert _lines(capsys) == ["error: --learning_rate -1 must be > 0"]
    payload = json.loads(error_file.read_text())["message"]  # what torchrun shows as the root cause
    assert payload["extraInfo"]["py_callstack"] == "error: --learning_rate -1 must be > 0"
    assert waits == ["1"]  # ranks that print do not wait


def test_a_quiet_rank_waits_only_under_a_launcher(monkeypatch):
    for name in ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_ERROR_FILE"):
        monkeypatch.delenv(name, raising=False)
    naps = []
    monkeypatch.setattr(errors.time, "sleep", naps.append)
    monkeypatch.setattr(errors, "QUIET_RANK_GRACE_S", 3)
    errors._outlive_rank0()  # no launcher: returns at once, without a nap
    assert naps == []
    clock = iter(range(0, 100))
    monkeypatch.setattr(errors.time, "monotonic", lambda: next(clock))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    errors._outlive_rank0()  # under torchrun: naps until the launcher ends it or the bound passes
    assert naps and all(0 < n <= 0.5 for n in naps) and len(naps) == 2


def test_same_on_every_rank_marks_reported_errors_only():
    with pytest.raises(UserInputError) as err, same_on_every_rank():
        raise UserInputError("x")
    assert err.value.every_rank
    with pytest.raises(KeyError), same_on_every_rank():
        raise KeyError("a bug stays a bug")


def test_debug_flag_adds_the_traceback_and_is_taken_out_of_argv(capsys, monkeypatch):
    seen = []

    def main(argv):
        seen.append(argv)
        raise UserInputError("bad")

    assert run_cli(main, ["--a", "1", "--debug"]) == 2
    err = capsys.readouterr().err
    assert seen == [["--a", "1"]] and "Traceback" in err and err.splitlines()[-1] == "error: bad"
