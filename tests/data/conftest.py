from __future__ import annotations

import pytest

from opd_megatron.data.tiny_tokenizer import build_tiny_tokenizer
from opd_megatron.data.tokenizer import Tokenizer, load_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture(scope="session")
def tok(tiny_tokenizer_dir) -> Tokenizer:
    return load_tokenizer(tiny_tokenizer_dir)
