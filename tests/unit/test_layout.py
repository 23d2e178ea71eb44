"""The package's shape: layers that import only downwards, no import cycle, a layout page that lists every module,
and no file that points to a document outside the repository."""

import ast
import os
import re
import subprocess

import pytest

from tests.helpers import REPO

# Lowest first: a module may import its own package and any package of a LOWER layer, never a higher one; two
# packages of one layer know nothing of each other.
LAYERS = [
    ["pascal_dist", "pascal_dist.errors"],
    ["pascal_dist.attention"],
    ["pascal_dist.config"],
    ["pascal_dist.model", "pascal_dist.data"],
    ["pascal_dist.train"],
    ["pascal_dist.eval"],
    ["pascal_dist.cli"],
    ["pascal_dist.__main__"],
]
# What the layers below training must never import: the model and its parts know nothing of DeepSpeed or Slurm.
NOT_BELOW_TRAIN = ("deepspeed",)


def modules() -> dict[str, str]:
    """{dotted module name: file path} of every module in pascal_dist."""
    out = {}
    for root, _, files in os.walk(os.path.join(REPO, "pascal_dist")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                dotted = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                out[dotted.removesuffix(".__init__")] = path
    return out


def imports(path: str) -> set[str]:
    """Every module `path` imports, at module level or inside a function (a deferred import is still a dependency).
    `from pkg import sub` counts as importing pkg.sub when that is a module of ours, else as importing pkg."""
    ours, found = modules(), set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in ours else node.module)
    return found


def unit(module: str) -> str:
    """The layer entry a module belongs to: its package (or itself, for the top-level modules)."""
    matches = [u for layer in LAYERS for u in layer if module == u or module.startswith(u + ".")]
    return max(matches, key=len)


def layer_of(module: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if unit(module) in layer)


def internal_edges() -> dict[str, set[str]]:
    mods = modules()
    return {m: {i for i in imports(path) if i in mods and i != m} for m, path in mods.items()}


def test_every_module_has_a_layer():
    assert all(layer_of(m) is not None for m in modules())


def test_no_upward_or_sideways_import():
    wrong = []
    for module, targets in internal_edges().items():
        for target in targets:
            if unit(target) == unit(module) or target == "pascal_dist":
                continue
            if layer_of(target) >= layer_of(module):
                wrong.append(f"{module} imports {target}")
    assert not wrong, wrong


def test_no_import_cycle():
    edges = internal_edges()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt) :] + [node, nxt]))
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [])


def test_the_lower_layers_do_not_import_deepspeed():
    below = [m for m, path in modules().items() if layer_of(m) < layer_of("pascal_dist.train")]
    assert "pascal_dist.model.decoder" in below
    offenders = [m for m in below if any(i.split(".")[0] in NOT_BELOW_TRAIN for i in imports(modules()[m]))]
    assert not offenders, offenders


def test_every_module_says_what_it_owns_in_its_first_line():
    missing = [m for m, path in modules().items() if not ast.get_docstring(ast.parse(open(path).read()))]
    assert not missing, missing


def test_the_layout_page_lists_every_module_and_launcher():
    page = open(os.path.join(REPO, "docs", "layout.md")).read()
    listed = set(re.findall(r"`((?:pascal_dist|launcher)/[\w/]+\.py)`", page))
    wanted = {os.path.relpath(p, REPO) for p in modules().values()}
    wanted |= {f"launcher/{f}" for f in os.listdir(os.path.join(REPO, "launcher")) if f.endswith(".py")}
    assert not wanted - listed, f"docs/layout.md lacks {sorted(wanted - listed)}"
    assert not listed - wanted, f"docs/layout.md lists modules that do not exist: {sorted(listed - wanted)}"


# Documents that exist only outside the repository, which its users do not have
OUTSIDE = re.compile(r"\.\./shared|SPEC\.md|ANCHORS\.md|SPEC section|\bSPEC \d|STYLE\.md")


def test_nothing_points_to_a_document_outside_the_repository():
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    this = os.path.relpath(__file__, REPO)
    hits = []
    for name in files:
        if name == this or name.endswith((".png", ".whl")):
            continue
        try:
            text = open(os.path.join(REPO, name), encoding="utf-8").read()
        except (UnicodeDecodeError, FileNotFoundError):
            continue
        hits += [f"{name}: {m.group(0)}" for m in OUTSIDE.finditer(text)]
    assert not hits, hits
