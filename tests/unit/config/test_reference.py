"""docs/configuration.md is exactly what the schema generates, and the generator covers every key."""

import dataclasses
import os

from pascal_dist.config import RunConfig
from pascal_dist.config.reference import markdown, sections
from tests.helpers import REPO


def schema_keys(cls, prefix=""):
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from schema_keys(type(default), f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def test_the_page_is_current():
    with open(os.path.join(REPO, "docs", "configuration.md")) as f:
        page = f.read()
    assert page == markdown(), (
        "docs/configuration.md is stale: python -m pascal_dist.config.reference > docs/configuration.md"
    )


def test_every_key_has_a_row_with_its_meaning():
    rows = {key: doc for _, _, section in sections() for key, _, _, doc in section}
    assert sorted(rows) == sorted(schema_keys(RunConfig))
    assert all(rows.values()), [k for k, doc in rows.items() if not doc]
