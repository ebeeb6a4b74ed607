"""The import rules of docs/architecture.md, checked over every import statement of src/opensloth.

The layer table is parsed from the document itself, so the document stays true:
each module belongs to one layer, imports only from its own layer or lower,
the leaves import nothing from opensloth, there are no import cycles (function-local
imports included), and importing the package or an entry point's top level loads
no heavy library (Unsloth must be imported before transformers/TRL).
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

from helpers import REPO, clean_env

SRC = REPO / "src"
PACKAGE = SRC / "opensloth"
DOC = REPO / "docs" / "architecture.md"
HEAVY = ("torch", "transformers", "trl", "unsloth", "datasets", "peft", "accelerate")
ROOT = "opensloth"  # in the table: the package __init__ only, not a prefix of everything


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _layers() -> dict[str, int]:
    text = DOC.read_text()
    block = re.search(r"<!-- layers:start -->(.*?)<!-- layers:end -->", text, re.S)
    assert block, f"{DOC} has no layers table"
    table = {}
    for line in block.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].isdigit():
            continue
        for name in re.findall(r"`([\w.]+)`", cells[2]):
            assert name not in table, f"{name} is listed twice in the layers table"
            table[name] = int(cells[0])
    return table


LAYERS = _layers()


def layer_of(module: str) -> tuple[str, int]:
    """The table entry (longest prefix) a module belongs to, and its layer."""
    if module == ROOT:
        return ROOT, LAYERS[ROOT]
    matches = [p for p in LAYERS if p != ROOT and (module == p or module.startswith(p + "."))]
    assert matches, f"{module} belongs to no layer of docs/architecture.md; add it to the table"
    best = max(matches, key=len)
    return best, LAYERS[best]


@lru_cache(maxsize=None)
def imports_of(module: str, top_level_only: bool = False) -> frozenset[str]:
    """opensloth modules imported by ``module`` (every statement, function-local ones too)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in MODULES else base)
    return frozenset(m for m in found if m in MODULES and m != module)


def test_every_module_has_a_layer_and_the_table_lists_only_real_modules():
    for module in MODULES:
        layer_of(module)
    unknown = [name for name in LAYERS if name not in MODULES and name != "opensloth.dpo.rules"]
    assert not unknown, f"docs/architecture.md lists modules that do not exist: {unknown}"


def test_imports_go_to_the_same_layer_or_lower():
    upward = []
    for module in MODULES:
        _, mine = layer_of(module)
        for target in imports_of(module):
            entry, theirs = layer_of(target)
            if theirs > mine:
                upward.append(f"{module} (layer {mine}) imports {target} ({entry}, layer {theirs})")
    assert not upward, "imports that go up:\n" + "\n".join(upward)


def test_leaves_import_nothing_from_opensloth():
    leaves = [m for m in MODULES if layer_of(m)[1] == 0]
    assert set(leaves) == {"opensloth.errors", "opensloth.log", "opensloth.atomic"}
    for module in leaves:
        assert not imports_of(module), f"leaf {module} imports {sorted(imports_of(module))}"


def _cycles(graph: dict[str, frozenset[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = {m: imports_of(m) for m in MODULES}
    assert not _cycles(graph), f"import cycles: {_cycles(graph)}"
    # The check can fail: a two-module cycle is found.
    assert _cycles({"a": frozenset({"b"}), "b": frozenset({"a"}), "c": frozenset()}) == [["a", "b"]]


def _imports_heavy_at_top(module: str) -> bool:
    tree = ast.parse(MODULES[module].read_text())
    for node in tree.body:
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
        if any(n.split(".")[0] in HEAVY for n in names):
            return True
    return any(_imports_heavy_at_top(t) for t in imports_of(module, top_level_only=True))


def test_opensloth_modules_are_imported_at_the_top_unless_they_are_heavy():
    """A function-local import of a light opensloth module hides a real dependency."""
    hidden = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("opensloth"):
                    targets = {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                               for a in node.names}
                    if not any(_imports_heavy_at_top(t) for t in targets):
                        hidden.append(f"{module}:{node.lineno} imports {sorted(targets)} inside {fn.name}()")
    assert not hidden, "\n".join(hidden)


def _heavy_after(code: str) -> list[str]:
    probe = (f"import sys\n{code}\n"
             f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=clean_env(), capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()[-1]
    return eval(out)  # a printed list of names


def test_import_opensloth_loads_no_heavy_library():
    assert _heavy_after("import opensloth") == []
    # The light parts the entry points import before Unsloth, and the old paths.
    light = ["opensloth.config", "opensloth.launch", "opensloth.data", "opensloth.cache", "opensloth.packing",
             "opensloth.tasks", "opensloth.sft", "opensloth.dpo", "opensloth.dpo.run", "opensloth.patches",
             "opensloth.online_dpo.config", "opensloth.rollout.run", "opensloth.patching", "opensloth.utils",
             "opensloth.training"]
    assert _heavy_after("\n".join(f"import {m}" for m in light)) == []
    # The check can fail.
    assert "torch" in _heavy_after("import opensloth.rollout.sampling")


@pytest.mark.parametrize("script", ["train_configurable.py", "train_dpo.py", "precompute_dataset.py",
                                    "run_oak_dpo.py", "rollout.py"])
def test_entry_points_import_no_heavy_library_before_setup(script):
    code = ("import importlib.util\n"
            f"spec = importlib.util.spec_from_file_location('entry', 'train_scripts/{script}')\n"
            "spec.loader.exec_module(importlib.util.module_from_spec(spec))")
    assert _heavy_after(code) == []


COMPAT = {
    "opensloth.patching": ["applied_patches", "PatchTargetError"],
    "opensloth": ["OPENSLOTH_DATA_DIR", "CacheConfig", "cache_dataset_wrapper", "simple_cache_dataset_wrapper"],
    "opensloth.patching.ddp_patch": ["ddp_patch", "patch_trainer_loss_scaling", "CPU_DDP_PATCH",
                                     "patch_optimize_sft_trainer_batch_samples", "patch_trainer_deterministic_sampler"],
    "opensloth.patching.batch_samples": ["patch_optimize_sft_trainer_batch_samples", "settings_for",
                                         "unpatch_optimize_sft_trainer_batch_samples", "BatchSamplesSettings"],
    "opensloth.patching.registry": ["PatchTargetError", "swap_method", "unpatch", "is_patched"],
    "opensloth.utils": ["simple_cache_dataset_wrapper", "cache_dataset_wrapper", "CacheConfig"],
    "opensloth.utils.packing": ["pack", "plan_step", "plan_pairs", "best_fit_decreasing", "attention_coef_for",
                                "IGNORE_INDEX"],
    "opensloth.utils.dataset_cache": ["simple_cache_dataset_wrapper", "cache_dataset_wrapper", "sft_dataset_kwargs",
                                      "load_prepared_dataset", "DatasetCacheConfig", "CacheWaitTimeout",
                                      "_check_distributed_environment", "DistEnv", "DistributedEnvError",
                                      "CacheConfig"],
    "opensloth.training": ["load_model_and_tokenizer", "LoraSettings", "resolve_backend", "step_losses"],
    "opensloth.sft": ["SFTSettings", "build_sft_trainer"],
    "opensloth.errors": ["UserInputError", "PatchTargetError", "run_cli"],
}


@pytest.mark.parametrize("module", sorted(COMPAT))
def test_public_names_users_know_keep_working(module):
    mod = importlib.import_module(module)
    for name in COMPAT[module]:
        assert hasattr(mod, name), f"{module}.{name} is gone"
    assert importlib.import_module("opensloth.patching.ddp_patch").ddp_patch is (
        importlib.import_module("opensloth.patches.ddp").ddp_patch)


def test_compat_modules_are_thin_re_exports():
    for module, path in MODULES.items():
        if layer_of(module)[1] != LAYERS["opensloth.patching"] or module == ROOT:
            continue
        tree = ast.parse(path.read_text())
        for node in tree.body:
            is_doc = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            is_all = isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__all__"]
            assert is_doc or is_all or isinstance(node, (ast.Import, ast.ImportFrom)), (
                f"{module} line {node.lineno}: a re-export module holds imports and __all__ only")
        assert len(path.read_text().splitlines()) <= 12, f"{module} is not thin"
