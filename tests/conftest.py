"""Fixtures shared across the suite: a small real-text dataset prepared once per session."""
import pytest


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Three of the embedded corpus's plays, BPE vocab 512: real text, prepared in a couple of seconds."""
    from pascal_dist.data.prepare import embedded_files, prepare
    from pascal_dist.data.shards import read_manifest

    out = tmp_path_factory.mktemp("data") / "tiny"
    prepare(out, files=embedded_files()[:3], vocab_size=512)
    assert read_manifest(out)["tokenizer"]["vocab_size"] == 512
    return str(out)
