"""The config fails closed: unknown keys and wrong types are errors, never silent defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from bdserver.config import load_config
from bdserver.errors import ConfigError


def _load(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    f = tmp_path / "config.toml"
    f.write_text(text)
    return load_config(str(f))


def test_known_keys_load_with_their_types(tmp_path: Path) -> None:
    cfg = _load(tmp_path, 'state_dir = "/s"\nfetch_deadline_s = 5\nprefetch_chunks = 0\n')
    assert cfg.state_dir == "/s" and cfg.fetch_deadline_s == 5.0 and cfg.prefetch_chunks == 0
    assert cfg.socket == "/run/bdserver/bdserver.sock" and cfg.cache_dir == "/s/cache"


@pytest.mark.parametrize("text, word", [
    ("cache_max_byte = 1\n", "unknown keys"),  # a typo must not silently keep the default
    ('prefetch_chunks = "12"\n', "prefetch_chunks must be int"),
    ("prefetch_chunks = true\n", "prefetch_chunks must be int"),
    ("fetch_deadline_s = -1\n", "must not be negative"),
    ('trust = "allow-everything"\n', "trust must be dict"),
    ("state_dir = [\n", "not valid"),
])
def test_a_bad_config_is_an_error_naming_the_key(tmp_path: Path, text: str, word: str) -> None:
    with pytest.raises(ConfigError, match=word):
        _load(tmp_path, text)


def test_a_missing_config_named_explicitly_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "nope.toml"))
