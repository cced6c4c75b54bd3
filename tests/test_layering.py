"""The package's layering: every module imports in a fresh interpreter, no import cycles, no upward imports.

Layers, bottom up: kernels/ (Triton), ops/ (attention, SLA, int8), models/ (DiT, VAE, umT5, tokenizer) beside
the small shared modules (checkpoint, devices, progress, ...), then pipeline / placement, then the adapters
(cli, doctor, comfy_nodes). Imports are read from the source (lazy ones inside functions included), so one
subprocess does for the runtime check.
"""

from __future__ import annotations

import ast
import subprocess
import sys

from helpers import REPO

PACKAGE = REPO / "turbowan"
ADAPTERS = {"turbowan.pipeline", "turbowan.placement", "turbowan.cli", "turbowan.doctor", "turbowan.comfy_nodes"}
COMFY = {"comfy", "folder_paths"}  # ComfyUI's own modules: only the nodes may import them

# module prefix -> turbowan modules it must not import (a name ending in "." covers a sub-package)
FORBIDDEN = {
    "turbowan.kernels.": {"turbowan.ops.", "turbowan.models.", *ADAPTERS},
    "turbowan.models.": ADAPTERS,
    "turbowan.ops.": {"turbowan.models.", "turbowan.pipeline", "turbowan.cli", "turbowan.doctor",
                      "turbowan.comfy_nodes"},
}


def _module_name(path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    rel = REPO.joinpath(*name.split("."))
    return rel.with_suffix(".py").is_file() or (rel / "__init__.py").is_file()


def _imports(path) -> set[str]:
    """Every module `path` imports, anywhere in the file (turbowan modules resolved, others by top name)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            out.add(base)
            # `from package import submodule` imports the submodule too
            out.update(f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}"))
    return out


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_imports_in_a_fresh_interpreter():
    modules = sorted(m for m in _graph() if m != "turbowan.__main__")  # __main__ runs the CLI
    # Optional GPU packages (Triton, SpargeAttn) may be missing here: only their own absence is forgiven.
    script = (f"import sys; sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests' / 'comfy_double')!r}]\n"
              f"for m in {modules!r}:\n"
              "    try:\n        __import__(m)\n"
              "    except ModuleNotFoundError as e:\n"
              "        if e.name is None or e.name.startswith('turbowan'):\n            raise\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def test_no_import_cycles():
    graph = _graph()
    edges = {m: {t for t in targets if t in graph and t != m} for m, targets in graph.items()}
    # A package's __init__ importing its own submodule is how a package exposes it, not a cycle.
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in edges.items()}
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        for t in sorted(edges[m]):
            if state.get(t) == "open":
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_module_imports_a_layer_above_it():
    upward = set()
    for module, targets in _graph().items():
        for prefix, banned in FORBIDDEN.items():
            if module.startswith(prefix):
                upward |= {(module, t) for t in targets
                           if any(t == b or (b.endswith(".") and t.startswith(b)) for b in banned)}
        if module != "turbowan.comfy_nodes":
            upward |= {(module, t) for t in targets if t.split(".")[0] in COMFY}
    assert not upward, f"upward imports: {sorted(upward)}"
