"""``open_store``: the composition root that builds a store from its URL."""

from __future__ import annotations

from pathlib import Path

import pytest

from sagaway import MemoryStore, SQLiteStore, StoreError
from sagaway.store import open_store
from sagaway.testing.conformance import create, fetch, new_run


@pytest.mark.parametrize("url", ["memory://", "MEMORY://"])
async def test_memory_url(url: str) -> None:
    store = open_store(url)
    assert type(store) is MemoryStore
    assert store.url == "memory://"
    async with store:
        await create(store, new_run("run-1"))
        assert (await fetch(store, "run-1")).row_version == 1


def test_each_memory_url_is_a_fresh_store() -> None:
    assert open_store("memory://") is not open_store("memory://")


async def test_relative_sqlite_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_store("sqlite:///rel.db")
    assert type(store) is SQLiteStore
    assert (store.path, store.url, store.synchronous) == ("rel.db", "sqlite:///rel.db", "FULL")
    async with store:
        await create(store, new_run("run-1"))
    assert (tmp_path / "rel.db").is_file()


async def test_absolute_sqlite_url(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "abs.db"
    url = f"sqlite:///{path}"  # four slashes: sqlite:/// + /tmp/...
    assert url.startswith("sqlite:////")
    store = open_store(url)
    assert type(store) is SQLiteStore
    assert (store.path, store.url) == (str(path), url)
    async with store:
        await create(store, new_run("run-1"))
    assert path.is_file()


def test_sqlite_url_options(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/s.db?synchronous=NORMAL")
    assert isinstance(store, SQLiteStore)
    assert store.synchronous == "NORMAL"
    with pytest.raises(StoreError, match="unknown SQLite URL option"):
        open_store(f"sqlite:///{tmp_path}/s.db?journal_mode=off")


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///"])
def test_sqlite_url_without_a_file(url: str) -> None:
    with pytest.raises(StoreError, match=r"no database file .*sqlite:///path/to/sagas\.db"):
        open_store(url)


@pytest.mark.parametrize(
    "url",
    [
        "mongodb://localhost/sagas",
        "redis://localhost:6379/0",
        "sagas.db",
        "/var/lib/sagas.db",
        "",
        "sqlite3:///sagas.db",
    ],
)
def test_unknown_scheme_says_what_to_use(url: str) -> None:
    with pytest.raises(StoreError) as info:
        open_store(url)
    message = str(info.value)
    assert repr(url) in message
    assert "memory://" in message and "sqlite:///" in message
