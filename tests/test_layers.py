"""The package's layering: no import cycles between modules, and no import from a lower layer
to a higher one. Every ``import`` counts, also those inside functions (a lazy import is still
a dependency).

Layers, lowest first; a module may import from its own layer and from lower ones:

0. ``util``: paths, atomic files and media, progress lines, step-keyed randomness
1. ``diffusion``: the flow conventions, noise levels, samplers and losses (tensors only)
2. ``models``: the ``Denoiser`` contract and generic networks (VAE, text encoders, LoRA, EMA, ...)
3. ``families``: one adapter per model family and the registry that picks it
4. ``data``: clips, controls, pairs, latents, streaming, the data module
5. ``methods``: the training objectives (KD, DMD2), no Lightning
6. ``export``: model folders a run writes (teacher, student, official pipelines)
7. ``training``, ``callbacks``: the LightningModules, strategies, checkpoints, callbacks
8. ``cli``: the ``distill-pl`` command and its parsers
9. ``eval``, ``scale``: evaluation and sampling commands; memory estimates, FLOPs, benchmarks
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "distill_pl"

LAYERS = [
    ("util",),
    ("diffusion",),
    ("models",),
    ("families",),
    ("data",),
    ("methods",),
    ("export",),
    ("training", "callbacks"),
    ("cli",),
    ("eval", "scale"),
]
LAYER_OF = {folder: i for i, folders in enumerate(LAYERS) for folder in folders}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The distill_pl modules that ``path`` imports (``from pkg import module`` resolved)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("distill_pl"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("distill_pl"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
    return {m for m in found if m in known}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path, set(mods)) - {name} for name, path in mods.items()}


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYER_OF.get(parts[1]) if len(parts) > 1 else None


def test_every_folder_has_a_layer():
    # a module's layer is its top folder under the package (families/wan/ is in families)
    folders = {p.relative_to(PACKAGE).parts[0] for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE}
    assert folders <= set(LAYER_OF), f"folders without a layer: {sorted(folders - set(LAYER_OF))}"
    loose = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert not loose, f"modules loose at the package top: {loose}"


def test_no_upward_imports():
    upward = [
        f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
        for a, deps in graph().items() for b in deps
        if layer(a) is not None and layer(b) is not None and layer(b) > layer(a)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(edges[node]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(cycles)


def test_the_checker_finds_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The checks can fail: a planted cycle and a planted upward import are reported."""
    pkg = tmp_path / "distill_pl"
    (pkg / "util").mkdir(parents=True)
    (pkg / "cli").mkdir()
    (pkg / "util" / "a.py").write_text("from distill_pl.cli import b\n")
    (pkg / "cli" / "b.py").write_text("import distill_pl.util.a\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["PACKAGE"]), "PACKAGE", pkg)
    edges = graph()
    assert edges["distill_pl.util.a"] == {"distill_pl.cli.b"}
    assert edges["distill_pl.cli.b"] == {"distill_pl.util.a"}
    assert layer("distill_pl.cli.b") > layer("distill_pl.util.a")
