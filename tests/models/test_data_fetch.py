"""`flopwise data fetch` (:func:`flopwise.models.data.fetch_corpus`) without the network.

The download is faked at ``data._run``, the one place the fetcher runs ``apt-get download``,
``dpkg-deb -x`` and the ``bible`` decoder: ``apt-get download`` leaves an empty ``.deb``
named like Debian's, ``dpkg-deb -x`` puts a gzipped Jargon File in place, and ``bible``
prints verses. Everything else (split, manifest, the atomic rename, the checks on what is
already at the destination) is the real code.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from flopwise.cli import main
from flopwise.models import data
from flopwise.models.data import fetch_corpus, load_corpus


def _kjv() -> str:
    chapters = []
    for c in range(1, 60):
        verses = "\n".join(f"  {v} And the word of chapter {c} verse {v} was spoken unto the people of the land."
                           for v in range(1, 20))
        chapters.append(f"Genesis {c}\n\n{verses}")
    return "\n\n".join(chapters) + "\n"


def _jargon() -> str:
    return "\n\n".join(f"   :hack {i}: n. A quick job that produces what is needed, but not well; entry {i} of "
                       "the lexicon, with some more words to make the paragraph long enough." * 3
                       for i in range(400)) + "\n"


class FakeApt:
    """Stands in for ``data._run``; counts the downloads."""

    def __init__(self):
        self.downloads = 0

    def __call__(self, cmd, cwd=None):
        if cmd[:2] == ["apt-get", "download"]:
            self.downloads += 1
            Path(cwd, f"{cmd[2]}_1.0-1_all.deb").write_bytes(b"")
            return ""
        if cmd[:2] == ["dpkg-deb", "-x"]:
            if Path(cmd[2]).name.startswith("jargon-text_"):
                doc = Path(cmd[3], "usr/share/doc/jargon-text")
                doc.mkdir(parents=True, exist_ok=True)
                with gzip.open(doc / "jargon.txt.gz", "wt", encoding="utf-8") as f:
                    f.write(_jargon())
            return ""
        if cmd[0].endswith("usr/bin/bible"):
            return _kjv()
        raise AssertionError(f"unexpected command {cmd}")


@pytest.fixture
def apt(monkeypatch, tmp_path):
    fake = FakeApt()
    monkeypatch.setattr(data, "_run", fake)
    monkeypatch.setenv("FLOPWISE_DATA", str(tmp_path / "cache"))
    return fake


def _fetch(dest, **kw) -> dict:
    return fetch_corpus(dest, log=lambda s: None, **kw)


def _tree(path: Path) -> dict:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_fetch_writes_a_corpus_and_replaces_only_its_own(apt, tmp_path):
    dest = tmp_path / "corpus"
    m = _fetch(dest)
    assert sorted(os.listdir(dest)) == ["manifest.json", "train.txt", "val.txt"]
    c = load_corpus(dest)
    assert (len(c.train), len(c.val), c.sha256) == (m["train_bytes"], m["val_bytes"], m["sha256"])
    assert apt.downloads == 3
    assert _fetch(dest) == m and apt.downloads == 3  # present and intact: nothing downloaded
    assert _fetch(dest, force=True) == m and apt.downloads == 6  # --force replaces its own corpus
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _fetch(empty) == m  # an empty folder is fine
    assert not [e for e in os.listdir(tmp_path) if e.startswith(".fetch-")]


@pytest.mark.parametrize("force", [False, True])
def test_fetch_never_deletes_other_files(apt, tmp_path, force):
    # the walkthrough: `mkdir fd2; echo x > fd2/notes.txt; flopwise data fetch --dir fd2` deleted notes.txt
    dest = tmp_path / "fd2"
    dest.mkdir()
    (dest / "notes.txt").write_text("x\n")
    with pytest.raises(FileExistsError, match=r"fd2.*'notes.txt'.*remove or move it yourself"):
        _fetch(dest, force=force)
    assert _tree(dest) == {"notes.txt": b"x\n"}
    assert apt.downloads == 0  # refused before the download

    # a corpus folder with a file of the user's in it: kept as it is
    (dest / "notes.txt").unlink()
    _fetch(dest)
    (dest / "notes.txt").write_text("x\n")
    before = _tree(dest)
    with pytest.raises(FileExistsError, match="'notes.txt'"):
        _fetch(dest, force=True)
    assert _tree(dest) == before


@pytest.mark.parametrize("force", [False, True])
def test_fetch_refuses_a_file(apt, tmp_path, force):
    # `touch afile; flopwise data fetch --dir afile` replaced the file with a corpus folder
    dest = tmp_path / "afile"
    dest.write_text("mine\n")
    with pytest.raises(FileExistsError, match="afile is not a folder"):
        _fetch(dest, force=force)
    assert dest.is_file() and dest.read_text() == "mine\n"


def test_fetch_force_refuses_a_folder_of_the_users_text(apt, tmp_path):
    # the same three names, but not a corpus fetch_corpus wrote: --force must not replace it
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "train.txt").write_text("my text\n")
    (dest / "val.txt").write_text("my val\n")
    (dest / "manifest.json").write_text(json.dumps({"name": "my corpus"}))
    before = _tree(dest)
    with pytest.raises(FileExistsError, match="manifest.json that is not one `flopwise data fetch` wrote"):
        _fetch(dest, force=True)
    assert _tree(dest) == before
    partial = tmp_path / "partial"  # train.txt and val.txt of the user's, no manifest
    partial.mkdir()
    (partial / "train.txt").write_text("my text\n")
    (partial / "val.txt").write_text("my val\n")
    for force in (False, True):
        with pytest.raises(FileExistsError, match=r"\(no manifest.json\)"):
            _fetch(partial, force=force)
    assert _tree(partial) == {"train.txt": b"my text\n", "val.txt": b"my val\n"}


def test_cli_fetch_refuses_with_an_error(apt, tmp_path, capsys):
    dest = tmp_path / "fd2"
    dest.mkdir()
    (dest / "notes.txt").write_text("x\n")
    assert main(["data", "fetch", "--dir", str(dest)]) == 2
    err = capsys.readouterr().err
    assert "flopwise: error:" in err and "notes.txt" in err and "--dir" in err
    assert _tree(dest) == {"notes.txt": b"x\n"}


def test_fetch_present_message_names_force_and_the_flag(apt, tmp_path):
    dest = tmp_path / "corpus"
    _fetch(dest)
    lines = []
    fetch_corpus(dest, log=lines.append)
    assert len(lines) == 1 and "already at" in lines[0] and "force=True (--force)" in lines[0]


@pytest.mark.parametrize("edit", ["truncate", "same_size"])
def test_fetch_detects_a_damaged_corpus(apt, tmp_path, edit):
    dest = tmp_path / "fd2"
    m = _fetch(dest)
    train = dest / "train.txt"
    if edit == "truncate":
        train.write_bytes(b"12345")  # the walkthrough: 5 bytes, and fetch said "already at"
        match = r"train.txt is 5 B, its manifest.json says"
    else:
        b = bytearray(train.read_bytes())
        b[100] ^= 1
        train.write_bytes(bytes(b))
        match = "the SHA-256 of train.txt"
    damaged = _tree(dest)
    with pytest.raises(ValueError, match=rf"does not match its manifest.json: {match}.*damaged or was edited.*"
                                         r"force=True \(--force\)"):
        _fetch(dest)
    assert _tree(dest) == damaged and apt.downloads == 3  # untouched, nothing downloaded
    assert main(["data", "fetch", "--dir", str(dest)]) == 2
    # what training reads refuses it too, instead of training on it under the manifest's name
    with pytest.raises(ValueError, match=rf"does not match its manifest.json: {match}.*--force"):
        load_corpus(dest)
    assert _fetch(dest, force=True) == m  # --force repairs it
    assert load_corpus(dest).sha256 == m["sha256"]


def test_load_corpus_default_refuses_a_damaged_cache(apt, tmp_path):
    dest = data.corpus_dir()
    _fetch(None)
    assert (dest / "train.txt").exists()
    (dest / "val.txt").write_bytes(b"edited\n")
    with pytest.raises(ValueError, match="val.txt is 7 B"):
        load_corpus()
    assert main(["data", "info"]) == 2
