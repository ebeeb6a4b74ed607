"""opensloth.patches.ddp: device, idempotence, and each patch of ddp_patch() taking effect."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from opensloth.patches import applied_patches
from opensloth.patches.registry import PatchTargetError, swap_method, unpatch


# --- ddp_patch itself ---------------------------------------------------------------------------

def test_ddp_patch_returns_cpu_device_and_is_idempotent():
    from transformers import Trainer, TrainingArguments

    from opensloth.patches.ddp import ddp_patch

    device = ddp_patch()
    compute_loss, post_init = Trainer.compute_loss, TrainingArguments.__post_init__
    n_patches = len(applied_patches())
    assert device == torch.device("cpu")
    assert ddp_patch() == device
    # A second call must not wrap the wrappers again.
    assert Trainer.compute_loss is compute_loss
    assert TrainingArguments.__post_init__ is post_init
    assert len(applied_patches()) == n_patches
    names = {p.name for p in applied_patches()}
    assert {"trainer_loss_scale_out_of_place", "training_args_cpu_ddp", "trl_cpu_chunked_logprobs"} <= names


class _ViewOutput(torch.autograd.Function):
    """Returns a view of its input, like Unsloth's fused cross-entropy on GPU."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class _ViewLossModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(3.0))

    def forward(self, x, num_items_in_batch=None):
        loss = _ViewOutput.apply((self.w * x).sum() / num_items_in_batch)
        return {"loss": loss}


def _fake_trainer(num_processes=2):
    return SimpleNamespace(
        args=SimpleNamespace(average_tokens_across_devices=True, n_gpu=1),
        accelerator=SimpleNamespace(num_processes=num_processes, parallelism_config=None),
        model_accepts_loss_kwargs=True,
        compute_loss_func=None,
        label_smoother=None,
    )


def test_loss_scaling_patch_fixes_inplace_view_error():
    from transformers import Trainer

    from opensloth.patches.ddp import patch_trainer_loss_scaling

    patch_trainer_loss_scaling()
    patched = Trainer.compute_loss
    original = patched.__wrapped__
    model, inputs = _ViewLossModel(), {"x": torch.tensor([1.0, 2.0])}
    nib = torch.tensor(2)

    # Unpatched transformers: in-place `loss *= num_processes` on a custom-function view fails.
    with pytest.raises(RuntimeError, match="view"):
        original(_fake_trainer(), model, dict(inputs), num_items_in_batch=nib)

    trainer = _fake_trainer()
    loss = patched(trainer, model, dict(inputs), num_items_in_batch=nib)
    assert loss.item() == pytest.approx(3.0 * 3 / 2 * 2)  # scaled by num_processes=2
    loss.backward()
    assert model.w.grad.item() == pytest.approx(3 / 2 * 2)
    assert trainer.args.average_tokens_across_devices is True  # flag restored

    # Without token averaging the patch changes nothing.
    trainer.args.average_tokens_across_devices = False
    assert patched(trainer, _ViewLossModel(), dict(inputs), num_items_in_batch=nib).item() == pytest.approx(4.5)


def test_cpu_ddp_patch_sets_use_cpu():
    """On a CUDA-less machine stock TrainingArguments stays non-distributed (use_cpu False); the patch fixes it.

    Checked in a fresh process: once Unsloth is imported (other tests do, in this process) its CPU fallback
    wraps ``__post_init__`` and sets ``use_cpu`` itself, so the stock behaviour is only visible without it.
    """
    import subprocess
    import sys

    from transformers import TrainingArguments

    from helpers import clean_env
    from opensloth.patches.ddp import patch_training_args_cpu_ddp

    patch_training_args_cpu_ddp()
    assert TrainingArguments(output_dir="unused", report_to=[]).use_cpu is True
    probe = ("from transformers import TrainingArguments\n"
             "print('stock', TrainingArguments(output_dir='unused', report_to=[]).use_cpu)\n"
             "from opensloth.patches.ddp import patch_training_args_cpu_ddp\n"
             "patch_training_args_cpu_ddp()\n"
             "print('patched', TrainingArguments(output_dir='unused', report_to=[]).use_cpu)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, env=clean_env())
    assert out.returncode == 0, out.stderr[-2000:]
    seen = dict(line.split() for line in out.stdout.splitlines() if line.startswith(("stock ", "patched ")))
    assert seen == {"stock": "False", "patched": "True"}


def test_patch_fails_loudly_when_target_missing():
    class Empty:
        pass

    with pytest.raises(PatchTargetError, match="cannot find its target"):
        swap_method(Empty, "compute_loss", lambda f: f, name="x", written_for="test", description="")


# --- TRL's fused LM head on CPU -------------------------------------------------------------------

def _reference_logprobs(hidden, weight, bias, targets, temperature, softcap, scale):
    z = (hidden @ weight.t() + bias) * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z / temperature, dim=-1)
    return logp.gather(-1, targets[:, None]).squeeze(-1), logp


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_torch_chunked_logprobs_match_reference(softcap, monkeypatch):
    from opensloth.patches import trl_cpu_logprobs as mod

    monkeypatch.setattr(mod, "_ROW_ELEMENTS", 7 * 11)  # force several chunks (7 rows of vocab 11)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(20, 6, generator=gen, requires_grad=True)
    weight, bias = torch.randn(11, 6, generator=gen), torch.randn(11, generator=gen)
    targets = torch.randint(0, 11, (20,), generator=gen)
    out = mod.torch_chunked_log_probs(hidden, weight, bias, targets, 0.7, 64, softcap, 1.3)
    ref, logp = _reference_logprobs(hidden, weight, bias, targets, 0.7, softcap, 1.3)
    torch.testing.assert_close(out[0], ref)
    torch.testing.assert_close(out[1], -(logp.exp() * logp).sum(-1).detach())
    assert torch.equal(out[4], logp.argmax(-1) == targets)
    (g_out,) = torch.autograd.grad(out[0].sum(), hidden)
    (g_ref,) = torch.autograd.grad(ref.sum(), hidden)
    torch.testing.assert_close(g_out, g_ref)


def test_trl_logprob_router_installed():
    from trl.trainer import utils as trl_utils

    from opensloth.patches.trl_cpu_logprobs import patch_trl_cpu_logprobs

    patch_trl_cpu_logprobs()
    router = trl_utils._ChunkedLogProbFunction
    assert router is not None and hasattr(router, "apply")
    assert patch_trl_cpu_logprobs() is False  # idempotent
    h, w = torch.randn(3, 4), torch.randn(5, 4)
    t = torch.tensor([0, 1, 2])
    lp = router.apply(h, w, None, t, 1.0, 8, None, 1.0, ())[0]
    torch.testing.assert_close(lp, torch.log_softmax(h @ w.t(), -1).gather(-1, t[:, None]).squeeze(-1))


def test_stacked_patches_stay_idempotent_and_unpatch_any_layer():
    from opensloth.patches.registry import is_patched

    class Target:
        def f(self):
            return ["base"]

    def layer(tag):
        def make(original):
            def f(self):
                return original(self) + [tag]
            return f
        return make

    kw = dict(written_for="test", description="")
    assert swap_method(Target, "f", layer("a"), name="test_layer_a", **kw) is True
    assert swap_method(Target, "f", layer("b"), name="test_layer_b", **kw) is True
    # "a" sits under "b": applying it again must not wrap a second time.
    assert swap_method(Target, "f", layer("a"), name="test_layer_a", **kw) is False
    assert Target().f() == ["base", "a", "b"]
    # Removing the lower layer keeps the upper one working.
    assert unpatch(Target, "f", "test_layer_a") is True
    assert Target().f() == ["base", "b"]
    assert not is_patched(Target.f, "test_layer_a") and is_patched(Target.f, "test_layer_b")
    assert unpatch(Target, "f", "test_layer_b") is True
    assert Target().f() == ["base"]
    assert unpatch(Target, "f", "test_layer_b") is False
