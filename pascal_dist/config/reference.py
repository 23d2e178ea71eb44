"""docs/configuration.md, generated from the schema: every key, its type, its default and the docstring under it.

    python -m pascal_dist.config.reference > docs/configuration.md

A test compares the file with this output, so the page cannot go stale.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import typing

from pascal_dist.config import schema

HEADER = """# Configuration reference

Generated from `pascal_dist/config/schema.py` by `python -m pascal_dist.config.reference > docs/configuration.md`;
edit the schema, not this page. A run's config is the schema's defaults (the full-size recipe of
`configs/spec.yaml`), then the YAML of `--config`, then `key=value` overrides on the command line
(`train.max_steps=100`), each layer over the one before. An unknown key or a bad value is one `error:` line naming
the key. The DeepSpeed JSON (`--ds_config`) holds only what DeepSpeed owns (ZeRO stage, precision, communication):
batch sizes and clipping come from this config and are written into it (see docs/checkpoints.md for the keys it
refuses).
"""


def field_docs(cls: type) -> dict[str, str]:
    """{field: the docstring written under it} from the class's source (dataclasses keep no field docs)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _default(f: dataclasses.Field) -> object:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _type_name(cls: type, f: dataclasses.Field) -> str:
    hint = typing.get_type_hints(cls)[f.name]
    return str(hint).replace("typing.", "") if typing.get_origin(hint) else getattr(hint, "__name__", str(hint))


def sections(cls: type = schema.RunConfig, prefix: str = "") -> list[tuple[str, type, list[tuple[str, str, str, str]]]]:
    """(section key, its class, rows of (key, type, default, doc)), depth first."""
    rows, nested = [], []
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        default = _default(f)
        if dataclasses.is_dataclass(default):
            nested += sections(type(default), f"{prefix}{f.name}.")
        else:
            rows.append((prefix + f.name, _type_name(cls, f), json.dumps(default), docs.get(f.name, "")))
    return ([(prefix.rstrip("."), cls, rows)] if rows else []) + nested


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a literal | inside a table cell


def markdown() -> str:
    out = [HEADER]
    for key, cls, rows in sections():
        out.append(f"## `{key}`\n")
        doc = inspect.getdoc(cls)
        if doc and not doc.startswith(cls.__name__ + "("):  # dataclasses invent a signature docstring
            out.append(doc + "\n")
        out.append("| key | type | default | meaning |\n|---|---|---|---|")
        out += [f"| `{k}` | {t} | `{d}` | {_cell(doc)} |" for k, t, d, doc in rows]
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(markdown(), end="")
