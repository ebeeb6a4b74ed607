"""Which third-party packages does the Unsloth training path import, and does the GPU image plus .whl/ cover them?

    UNSLOTH_ALLOW_CPU=1 python scripts/check_gpu_imports.py            # report + exit 1 if something is missing
    UNSLOTH_ALLOW_CPU=1 python scripts/check_gpu_imports.py --json out.json

On a machine without CUDA, ``UNSLOTH_ALLOW_CPU=1`` makes Unsloth 2026.10 take its
CUDA-shaped import path (``unsloth/_gpu_init.py``, not the CPU backend) without
a device. This script installs an import blocker that refuses every
third-party top-level module whose distribution is neither in the GPU image
(``IMAGE_PACKAGES``, read off /work/.library/device/KINDS.md on 2026-11-17) nor
carried as a wheel (``CARRIED``, the list of scripts/gpu_wheels.sh), then
imports what the GPU check imports: ``unsloth``, ``FastLanguageModel``, TRL's
SFT/DPO trainers and configs, opensloth's patches and the DPO controller. A
blocked import that the code catches is reported as "optional"; one that
propagates fails the run.

Limits: branches that run only with a real device (Triton kernels, the
compiled trainer classes Unsloth writes to unsloth_compiled_cache/, which
``UNSLOTH_ALLOW_CPU=1`` skips) are not reached here; their imports were read
in the source instead (see docs/benchmarks.md, "GPU check").
"""

from __future__ import annotations

import argparse
import builtins
import importlib.metadata as md
import json
import os
import re
import sys
import traceback

# KINDS.md, "Python packages already there" (nvidia-h100-x1 / nvidia-h200 image 'cuda', 2026-11-17).
IMAGE_PACKAGES = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft
nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py
nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11
py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock
pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu
safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch torchaudio
torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split()

# scripts/gpu_wheels.sh PINS, plus opensloth itself (PYTHONPATH=src on the device).
CARRIED = """
unsloth unsloth-zoo trl datasets fsspec dill multiprocess cut-cross-entropy peft bitsandbytes tyro
docstring-parser typeguard msgspec opensloth
""".split()


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def allowed_distributions() -> set[str]:
    return {normalize(n) for n in IMAGE_PACKAGES + CARRIED}


def install_blocker(allowed: set[str], blocked: dict) -> None:
    """Refuse imports of modules whose distribution is not allowed; record who asked."""
    owners = md.packages_distributions()
    stdlib = set(sys.stdlib_module_names)
    real_import = builtins.__import__

    def guarded(name, globals=None, locals=None, fromlist=(), level=0):
        top = name.split(".")[0]
        if level == 0 and top and top not in stdlib and top not in sys.modules and not top.startswith("_"):
            dists = {normalize(d) for d in owners.get(top, [])}
            if dists and not (dists & allowed):
                importer = (globals or {}).get("__name__", "?")
                blocked.setdefault(top, {"distributions": sorted(dists), "importers": set()})
                blocked[top]["importers"].add(importer)
                raise ModuleNotFoundError(f"No module named {top!r} (blocked: not in the GPU image or .whl/)",
                                          name=top)
        return real_import(name, globals, locals, fromlist, level)

    builtins.__import__ = guarded


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    args = p.parse_args(argv)

    if "UNSLOTH_COMPILE_LOCATION" not in os.environ:  # keep Unsloth's generated files out of the repo
        import tempfile

        os.environ["UNSLOTH_COMPILE_LOCATION"] = tempfile.mkdtemp(prefix="unsloth_compiled_cache_")
    blocked: dict = {}
    install_blocker(allowed_distributions(), blocked)
    failure = None
    try:
        import unsloth  # noqa: F401
        from unsloth import FastLanguageModel  # noqa: F401
        from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer  # noqa: F401

        import opensloth.patches.dpo_dynamic_beta  # noqa: F401
        import opensloth.patches.batch_samples  # noqa: F401
        import opensloth.patches.ddp  # noqa: F401
        import opensloth.patches.unsloth_compat  # noqa: F401
    except Exception:
        failure = traceback.format_exc()

    owners = md.packages_distributions()
    loaded = sorted({m.split(".")[0] for m in list(sys.modules)} - set(sys.stdlib_module_names))
    dists = sorted({normalize(d) for m in loaded for d in owners.get(m, [])})
    image = {normalize(n) for n in IMAGE_PACKAGES}
    report = {
        "imported_distributions": dists,
        "from_image": [d for d in dists if d in image],
        "from_wheels": [d for d in dists if d not in image],
        "blocked_but_optional": {k: {"distributions": v["distributions"], "importers": sorted(v["importers"])}
                                 for k, v in sorted(blocked.items())},
        "failure": failure,
    }
    print("third-party distributions imported:", ", ".join(dists))
    print("  carried as wheels:", ", ".join(report["from_wheels"]) or "-")
    for mod, info in report["blocked_but_optional"].items():
        print(f"  blocked (absent on the GPU machine), import was optional: {mod} "
              f"({', '.join(info['distributions'])}) from {', '.join(info['importers'])}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    if failure:
        print("FAILED: an import the training path needs is missing on the GPU machine:\n" + failure, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
