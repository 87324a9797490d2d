"""The package layering of src/forgeline (docs/architecture.md): a package imports only packages below it, so there
is no import cycle. Every import counts: module level, inside functions, and under TYPE_CHECKING."""

import ast
from pathlib import Path

import forgeline

ROOT = Path(forgeline.__file__).parent

# lowest first; a package may import any package before it in this list, none after it
LAYERS = ["kernels", "model", "peft", "data", "train", "objectives", "parallel", "eval", "rl", "recipes", "label",
          "cli"]
# shared top-level modules (config.py, errors.py, files.py, tokenizer.py, ...) are used by every layer, so they may
# import none of the layers that drive training
SHARED_MAY_NOT_IMPORT = {"train", "objectives", "parallel", "recipes", "cli"}


def imported_packages(path: Path, root: Path = ROOT) -> set[str]:
    """The forgeline sub-packages one file imports, resolving relative imports against its own package."""
    rel = path.relative_to(root).parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ["forgeline", *rel[:-1]][: len(rel) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names = [module] + [f"{module}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "forgeline" and len(parts) > 1:
                found.add(parts[1])
    return found


def edges() -> dict[str, set[str]]:
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    out: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).parts
        source = rel[0] if len(rel) > 1 else path.stem
        out.setdefault(source, set()).update(p for p in imported_packages(path) if p in packages and p != source)
    return out


def test_every_package_has_a_layer():
    packages = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").is_file())
    assert sorted(LAYERS) == packages, "add the new package to LAYERS and to docs/architecture.md"


def test_packages_import_only_lower_layers():
    graph = edges()
    wrong = [f"{src} imports {dst}" for src in LAYERS for dst in sorted(graph.get(src, ()))
             if LAYERS.index(dst) > LAYERS.index(src)]
    assert not wrong, wrong


def test_no_import_cycle_between_packages():
    graph = {k: v & set(LAYERS) for k, v in edges().items() if k in LAYERS}

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    assert [p for p in LAYERS if p in reach(p)] == []


def test_shared_modules_do_not_import_the_training_layers():
    graph = edges()
    shared = [p.stem for p in ROOT.glob("*.py") if p.stem not in ("__init__", "__main__")]
    wrong = [f"{m}.py imports {dst}" for m in shared for dst in sorted(graph.get(m, ()) & SHARED_MAY_NOT_IMPORT)]
    assert not wrong, wrong


def test_the_checker_sees_imports_inside_functions_and_under_type_checking(tmp_path):
    probe = tmp_path / "forgeline" / "kernels" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    import forgeline.recipes\n\n\n"
                     "def f():\n    from ..cli import main\n    from . import cuda\n")
    assert imported_packages(probe, root=tmp_path / "forgeline") == {"cli", "recipes", "kernels"}
