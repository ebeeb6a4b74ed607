"""opensloth.chat: answers through the chat template, with or without the adapter, one-shot or interactive."""

from __future__ import annotations

import pytest

from helpers import TINY_MODEL, random_lora_adapter, run


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return random_lora_adapter(str(tmp_path_factory.mktemp("adapter")))


def test_reply_uses_the_chat_template_and_the_adapter(adapter):
    from opensloth.chat import ChatSession

    session = ChatSession(adapter)  # a run directory: the base comes from adapter_config.json
    assert session.base == str(TINY_MODEL) and session.adapter == adapter
    msgs = [{"role": "user", "content": "What is 12 + 7?"}]
    tuned = session.reply(msgs, max_new_tokens=24)
    assert tuned == session.reply(msgs, max_new_tokens=24), "greedy decoding must be deterministic"
    base_only = ChatSession(str(TINY_MODEL)).reply(msgs, max_new_tokens=24)
    assert session.reply(msgs, max_new_tokens=24, use_adapter=False) == base_only
    assert tuned != base_only, "the random adapter changes the answer"
    # The pretrained base answers arithmetic in the trained format.
    assert "Answer:" in ChatSession(str(TINY_MODEL)).reply(msgs, max_new_tokens=96)


def test_cli_one_shot_and_interactive(adapter):
    proc = run(["python", "-m", "opensloth.chat", "--model", adapter, "--prompt", "What is 12 + 7?",
                "--compare_base", "--max_new_tokens", "16"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("[base] ") == 1 and proc.stdout.count("[tuned] ") == 1
    import subprocess
    import sys

    from helpers import REPO, clean_env

    piped = subprocess.run([sys.executable, "-m", "opensloth.chat", "--model", str(TINY_MODEL), "--max_new_tokens", "8"],
                           input="Compute 3 + 4.\n\n/reset\nWhat is 1 + 1?\n/exit\nnever answered\n", text=True,
                           capture_output=True, cwd=REPO, env=clean_env(), timeout=120)
    assert piped.returncode == 0, piped.stderr[-2000:]
    assert len([ln for ln in piped.stdout.splitlines() if ln.strip()]) >= 2


@pytest.mark.parametrize("args,needle", [
    (["--model", "data/sftt"], "does not exist"),
    (["--model", "data"], "neither config.json"),
    (["--model", str(TINY_MODEL), "--adapter", str(TINY_MODEL)], "adapter_config.json"),
    (["--model", str(TINY_MODEL), "--compare_base"], "needs a LoRA adapter"),
])
def test_bad_input_is_one_line(args, needle):
    proc = run(["python", "-m", "opensloth.chat", *args, "--prompt", "hi"], timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr
