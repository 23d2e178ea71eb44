"""Fixtures of the transformers-export and lm-eval tests: one exported model and the local task directory, built once
per session (tests/hf_helpers.py says how)."""

import pytest

from tests.hf_helpers import BLOCK, Export, all_docs, make_export, write_tasks


@pytest.fixture(scope="session")
def pascal_export(tiny_data, tmp_path_factory) -> Export:
    """A random model with the default band (pascal, n = 3, window 3), exported both ways."""
    return make_export(str(tmp_path_factory.mktemp("pascal_export")), tiny_data)


@pytest.fixture(scope="session")
def lm_eval_tasks(pascal_export, tmp_path_factory) -> str:
    """The local task directory; its LAMBADA passages are made partly from pascal_export's model."""
    docs = all_docs(pascal_export.model, pascal_export.tokenizer, BLOCK)
    return write_tasks(str(tmp_path_factory.mktemp("lm_eval_tasks")), docs)
