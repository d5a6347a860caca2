"""Real prose in five languages, read from downloaded Debian packages (no network, no dpkg).

Why this exists: the template sentences of the French/German/Spanish/Italian corpus
domains teach a model each language's surface, not the language. Debian ships real,
freely licensed books whose translations are *paragraph-parallel*: the same paragraph,
at the same place of the same page, in English, French, German, Spanish and Italian.
That gives (1) real running text for every language domain and (2) aligned paragraphs
for asking whether routing follows the language or the content.

The packages are downloaded once, by you, with ``apt-get download`` (see
:data:`APT_COMMAND`); this module only reads the ``.deb`` files (an ``ar`` archive holding
``data.tar.xz``) with the standard library, or an already unpacked tree.

    sources = load_prose("~/.cache/moe_lab/debs")           # every source, every language
    sources.paragraphs["fr"][0]                             # Paragraph(source, page, index, text)
    aligned_paragraphs(sources)                             # [{"id", "page", "en", "fr", ...}, ...]
    is_heldout_page("debian-handbook", "sect.apt-get")     # the same answer in every language

Paragraphs are identified by ``(source, page, index)``: the index is the paragraph's position
in the page, which is what makes two languages comparable. A translated paragraph that is
identical to the English one is an untranslated fallback and is dropped.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterator

from .base import Document, Item

LANGS: tuple[str, ...] = ("en", "fr", "de", "es", "it")
#: Corpus domain of each language (the English prose joins the ``english`` domain).
LANG_DOMAINS: dict[str, str] = {"en": "english", "fr": "french", "de": "german", "es": "spanish", "it": "italian"}
DEFAULT_DIR = Path("~/.cache/moe_lab/debs")
#: Percent of pages held out; a page is held out in every language or in none.
HELDOUT_PAGE_PERCENT = 8
MIN_WORDS = 6
MAX_DOC_CHARS = 4_000


@dataclass(frozen=True)
class ProseSource:
    """One Debian package of paragraph-parallel documentation."""

    package: str
    title: str
    licence: str
    kind: str  # "docbook-html" (publican XHTML <div class="para">), "mallard" (<p> in .page), "fortune", "roff"
    #            or "wordnet" (the usage examples of WordNet's data.* files)
    dirs: dict[str, str]  # language -> directory inside the package holding its pages
    suffix: str  # page file suffix
    group: str = ""  # the held-out namespace: pages of one group are held out together in every language
    parallel: bool = True  # translations of one text, page by page (alignable)
    files: tuple[str, ...] = ()  # only these file names in the directory (default: every file with the suffix)
    page_size: int = 0  # cut each file's paragraphs into pages of this many (a file that is one long list)

    @property
    def split_group(self) -> str:
        return self.group or self.package


SOURCES: dict[str, ProseSource] = {
    "debian-handbook": ProseSource(
        "debian-handbook", "The Debian Administrator's Handbook (Hertzog, Mas)",
        "GPL-2.0-or-later OR CC-BY-SA-3.0", "docbook-html",
        {lang: f"usr/share/doc/debian-handbook/html/{loc}"
         for lang, loc in [("en", "en-US"), ("fr", "fr-FR"), ("de", "de-DE"), ("es", "es-ES"), ("it", "it-IT")]},
        ".html"),
    "gnome-user-docs": ProseSource(
        "gnome-user-docs", "GNOME Help (the desktop user guide)", "CC-BY-SA-3.0", "mallard",
        {lang: f"usr/share/help/{loc}/gnome-help"
         for lang, loc in [("en", "C"), ("fr", "fr"), ("de", "de"), ("es", "es"), ("it", "it")]},
        ".page"),
    # everyday English: the usage examples of WordNet's synsets ("he was elected to a seat in the Senate"),
    # one short sentence each, written by lexicographers; cut into pages of 40 examples for the split.
    "wordnet-base": ProseSource(
        "wordnet-base", "WordNet 3.0 usage examples (Princeton University)", "WordNet-3.0 (a BSD-style licence, "
        "see the package's copyright file)", "wordnet", {"en": "usr/share/wordnet"}, "", parallel=False,
        files=("data.adj", "data.adv", "data.noun", "data.verb"), page_size=40),
    # everyday language: quotations, proverbs, jokes (strfile format: entries separated by "%" lines).
    # Not fortunes-it: it writes accents as apostrophes ("e'" for "è"); there is no French package.
    "fortunes": ProseSource(
        "fortunes", "Fortune cookies (fortune-mod, English)", "BSD-style (fortune-mod); a collection of "
        "quotations, see the package's copyright file", "fortune", {"en": "usr/share/games/fortunes"}, "",
        parallel=False),
    "fortunes-de": ProseSource(
        "fortunes-de", "German fortune cookies (quotations, proverbs, jokes)", "GPL-2.0-or-later", "fortune",
        {"de": "usr/share/games/fortunes/de"}, "", parallel=False),
    "fortunes-es": ProseSource(
        "fortunes-es", "Spanish fortune cookies (quotations, proverbs)", "GPL-2.0-or-later", "fortune",
        {"es": "usr/share/games/fortunes/es"}, "", parallel=False),
    **{f"manpages-{lang}": ProseSource(
        f"manpages-{lang}", f"Translated manual pages ({lang}; manpages-l10n)", "GPL-3.0-or-later (translations); "
        "the original pages' own free licences", "roff", {lang: f"usr/share/man/{lang}"}, ".gz",
        group="manpages", parallel=False) for lang in ("fr", "de", "es", "it")},
}
#: The paragraph-parallel books (the aligned set comes from these).
PARALLEL_SOURCES = tuple(name for name, src in SOURCES.items() if src.parallel)
#: The exact command that fetches every source (Debian 12 "bookworm" package names).
APT_COMMAND = "apt-get download " + " ".join(SOURCES)


class MissingProseSources(FileNotFoundError):
    """The Debian packages are not where the builder looked; the message says how to get them."""


@dataclass(frozen=True)
class Paragraph:
    source: str
    page: str
    index: int  # position in the page (the same paragraph has the same index in every language)
    text: str

    @property
    def key(self) -> str:
        return f"{self.source}/{self.page}#{self.index}"


@dataclass
class ProseSet:
    """Paragraphs per language, and where they came from."""

    paragraphs: dict[str, list[Paragraph]]
    sources: dict[str, dict]  # package -> {"version", "licence", "title", "file"}
    raw: dict[str, dict[str, dict[str, list[str]]]] = field(default_factory=dict, repr=False)
    # raw[source][lang][page]: every paragraph of the page, untranslated ones included (for alignment)


# --------------------------------------------------------------------------- reading .deb files

def _ar_members(data: bytes) -> Iterator[tuple[str, bytes]]:
    """Members of a Unix ``ar`` archive (a .deb is one): 8-byte magic, then 60-byte headers."""
    if data[:8] != b"!<arch>\n":
        raise ValueError("not an ar archive (a .deb starts with '!<arch>\\n')")
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos:pos + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        yield name, data[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)  # members are padded to an even offset


def _open_tar(name: str, blob: bytes) -> tarfile.TarFile:
    if name.endswith(".zst"):
        raise ValueError(f"{name} is zstd-compressed, which Python's tarfile cannot read before 3.14; "
                         "unpack the package with `dpkg-deb -x FILE.deb DIR` and pass DIR instead")
    return tarfile.open(fileobj=io.BytesIO(blob), mode="r:*")


def read_deb(path: str | os.PathLike, prefixes: tuple[str, ...] = ("",)) -> tuple[dict, dict[str, bytes]]:
    """(control fields, {path: bytes}) of a .deb: the files of ``data.tar.*`` under ``prefixes``."""
    data = Path(path).read_bytes()
    control, files = {}, {}
    for name, blob in _ar_members(data):
        if name.startswith("control.tar"):
            with _open_tar(name, blob) as tar:
                member = next((m for m in tar.getmembers() if m.name.lstrip("./") == "control"), None)
                if member is not None:
                    text = tar.extractfile(member).read().decode("utf-8")
                    control = dict(re.findall(r"(?m)^([A-Za-z-]+):[ \t]*(.*)$", text))
        elif name.startswith("data.tar"):
            with _open_tar(name, blob) as tar:
                for m in tar.getmembers():
                    rel = m.name.lstrip("./")
                    if m.isfile() and any(rel.startswith(p) for p in prefixes):
                        files[rel] = tar.extractfile(m).read()
    if not files and not control:
        raise ValueError(f"{path}: no control.tar.* or data.tar.* member; is it a Debian package?")
    return control, files


def _read_tree(root: Path, prefixes: tuple[str, ...]) -> dict[str, bytes]:
    files = {}
    for prefix in prefixes:
        base = root / prefix
        if base.is_dir():
            for p in sorted(base.rglob("*")):
                if p.is_file():
                    files[p.relative_to(root).as_posix()] = p.read_bytes()
    return files


def locate_sources(where: str | os.PathLike | None = None,
                   packages: tuple[str, ...] = tuple(SOURCES)) -> dict[str, Path]:
    """Find each package's ``<package>_<version>_all.deb`` in ``where`` (default
    ``~/.cache/moe_lab/debs``), or an unpacked tree (``where/usr/share/...``) holding its files.
    Raises :class:`MissingProseSources` with the exact download command when one is missing, and
    ``ValueError`` when a package is there in two versions (the corpus would depend on which)."""
    root = Path(where if where is not None else DEFAULT_DIR).expanduser()
    found, missing = {}, []
    for pkg in packages:
        debs = sorted(root.glob(f"{pkg}_*.deb")) if root.is_dir() else []
        if len(debs) > 1:
            raise ValueError(f"{root} holds {len(debs)} versions of {pkg} ({', '.join(d.name for d in debs)}); "
                             "keep one, so the corpus depends on a known version")
        if debs:
            found[pkg] = debs[0]
        elif root.is_dir() and all((root / d).is_dir() for d in SOURCES[pkg].dirs.values()):
            found[pkg] = root
        else:
            missing.append(pkg)
    if missing:
        raise MissingProseSources(
            f"the real-prose sources {missing} are not in {root} (looked for {missing[0]}_<version>_all.deb "
            f"or an unpacked tree with {next(iter(SOURCES[missing[0]].dirs.values()))}/). Download them once, on a "
            f"Debian/Ubuntu machine, with:\n    mkdir -p {root} && (cd {root} && apt-get download "
            f"{' '.join(missing)})\n(or pass the directory that holds them).")
    return found


# --------------------------------------------------------------------------- page formats

class _DocbookParas(HTMLParser):
    """Text of every top-level ``<div class="para">`` of a publican XHTML page, in order."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paras: list[str] = []
        self._buf: list[str] | None = None
        self._depth = 0

    def handle_starttag(self, tag, attrs):
        if self._buf is not None:
            self._depth += tag not in ("br", "img", "hr")  # void elements have no end tag
        elif tag == "div" and ("class", "para") in attrs:
            self._buf, self._depth = [], 1

    def handle_endtag(self, tag):
        if self._buf is None or tag in ("br", "img", "hr"):
            return
        self._depth -= 1
        if self._depth == 0:
            self.paras.append(" ".join("".join(self._buf).split()))
            self._buf = None

    def handle_data(self, data):
        if self._buf is not None:
            self._buf.append(data)


_MALLARD = "{http://projectmallard.org/1.0/}"
_MALLARD_SKIP = {"info", "code", "screen", "media", "title", "desc", "links", "subtitle"}


def _mallard_paras(xml: bytes) -> list[str]:
    """Text of every ``<p>`` of a Mallard page, outside metadata and code, in document order."""
    root = ET.fromstring(xml)
    out: list[str] = []

    def walk(el, skip: bool):
        tag = el.tag.replace(_MALLARD, "") if isinstance(el.tag, str) else ""
        skip = skip or tag in _MALLARD_SKIP
        if tag == "p" and not skip:
            out.append(" ".join("".join(el.itertext()).split()))
            return
        for child in el:
            walk(child, skip)

    walk(root, False)
    return out


_ROFF_ESCAPES = [  # (pattern, replacement), applied in order to a paragraph's text
    (r"\\f(\[[^\]]*\]|\(..|.)", ""),  # font changes \fB \fI \fP \f(CW \f[B]
    (r"\\\((em|en)", "\u2014"), (r"\\[*]?\(([lr]q|[LR]q)", '"'), (r"\\\(aq", "'"),
    (r"\\\(Fo", "\u00ab"), (r"\\\(Fc", "\u00bb"), (r"\\\(co", "\u00a9"), (r"\\\*\[[^\]]*\]", ""),
    (r"\\-", "-"), (r"\\[&,/:%|^)]", ""), (r"\\e", "\\\\"), (r"\\ ", " "), (r"\\~", " "),
    (r"\\\(..", ""), (r"\\s[-+]?\d", ""), (r"\\\*.", ""),
]
_ROFF_ESCAPES_RX = [(re.compile(a), b) for a, b in _ROFF_ESCAPES]
_ROFF_INLINE = {"B", "I", "BR", "IR", "RB", "RI", "BI", "IB", "SM", "SB"}  # font macros: their arguments are text


def _roff_paras(blob: bytes) -> list[str]:
    """Running-text paragraphs of a (gzipped) manual page: text lines between paragraph macros
    (``.PP``, ``.SH``, ``.TP``...), font macros (``.B word``) kept as text, no-fill blocks
    (``.nf``/``.EX``: examples, synopses) and the tag line after ``.TP`` left out, escapes resolved."""
    data = gzip.decompress(blob) if blob[:2] == b"\x1f\x8b" else blob
    text = data.decode("utf-8", errors="replace")
    out, buf = [], []
    nofill = tag_next = False

    def flush():
        if buf:
            out.append(" ".join(buf))
            buf.clear()

    for line in text.splitlines():
        if line.startswith((".", "'")):
            m = re.match(r"[.'][ \t]*([A-Za-z]+)[ \t]*(.*)", line)
            if not m:  # a comment (.\\") or an unknown request
                continue
            macro, args = m.groups()
            if macro in ("nf", "EX"):
                flush()
                nofill = True
            elif macro in ("fi", "EE"):
                nofill = False
            elif macro in _ROFF_INLINE and not nofill:
                words = " ".join(a.strip('"') for a in re.findall(r'"[^"]*"|\S+', args))
                if tag_next:
                    tag_next = False
                else:
                    buf.append(words)
            else:
                flush()
                tag_next = macro == "TP"
        elif nofill:
            continue
        elif not line.strip():
            flush()
        elif tag_next:  # the term of a .TP item, not a sentence
            tag_next = False
        else:
            buf.append(line)
    flush()
    paras = []
    for p in out:
        for rx, sub in _ROFF_ESCAPES_RX:
            p = rx.sub(sub, p)
        paras.append(" ".join(p.split()))
    return paras


_ATTRIBUTION = re.compile(r"(?m)^\s*(--|\u2014)\s.*", re.S)  # "\t\t-- Author" and all that follows


def _fortune_paras(blob: bytes) -> list[str]:
    """One paragraph per fortune (entries separated by ``%`` lines), without its attribution."""
    text = blob.decode("utf-8", errors="replace")
    entries = re.split(r"(?m)^%[ \t]*$", text)
    return [" ".join(_ATTRIBUTION.sub("", e).split()) for e in entries if e.strip()]


_QUOTED = re.compile(r'"([^"]+)"')


def _wordnet_examples(blob: bytes) -> list[str]:
    """The usage examples of a WordNet ``data.*`` file, one paragraph each, in file order.

    A synset line ends with ``| gloss; "example"; "example"``; the examples are the quoted parts
    of the gloss. Each becomes a sentence: whitespace collapsed, the first letter upper-cased
    and a full stop added when it has no final punctuation. The licence header (lines starting
    with two spaces) is skipped."""
    out = []
    for line in blob.decode("utf-8", errors="replace").splitlines():
        if line.startswith("  ") or " | " not in line:
            continue
        for ex in _QUOTED.findall(line.split(" | ", 1)[1]):
            ex = " ".join(ex.split())
            if not ex:
                continue
            ex = ex[0].upper() + ex[1:]
            out.append(ex if ex[-1] in ".!?" else ex + ".")
    return out


def page_paragraphs(kind: str, blob: bytes) -> list[str]:
    """Every paragraph of one page (``kind``: ``"docbook-html"``, ``"mallard"``, ``"fortune"``,
    ``"roff"`` or ``"wordnet"``)."""
    if kind == "wordnet":
        return _wordnet_examples(blob)
    if kind == "roff":
        return _roff_paras(blob)
    if kind == "fortune":
        return _fortune_paras(blob)
    if kind == "docbook-html":
        parser = _DocbookParas()
        parser.feed(blob.decode("utf-8"))
        return parser.paras
    if kind == "mallard":
        return _mallard_paras(blob)
    raise ValueError(f"unknown page kind {kind!r}; expected 'docbook-html', 'mallard', 'fortune', 'roff' or 'wordnet'")


_MOJIBAKE = re.compile("[\u00c3\u00c2][\u0080-\u00bf]")  # UTF-8 read as Latin-1 (e.g. "altresÃ¬")
_ENGLISH = frozenset("the and of to is are with this that for be by from".split())


def is_prose(text: str, min_words: int = MIN_WORDS) -> bool:
    """A running-text paragraph: enough words, mostly letters, ends like a sentence; not a
    command line, a list of names or mis-decoded text."""
    words = text.split()
    if len(words) < min_words or _MOJIBAKE.search(text):
        return False
    letters = sum(ch.isalpha() or ch.isspace() for ch in text)
    return letters >= 0.8 * len(text) and text[-1] in ".!?:;)»\"'…"


def looks_english(text: str, threshold: float = 0.12) -> bool:
    """More than ``threshold`` of the words are common English function words: an untranslated
    paragraph (used where no English original of the same page is at hand, i.e. manual pages)."""
    words = text.lower().split()
    return sum(w in _ENGLISH for w in words) > threshold * len(words)


# --------------------------------------------------------------------------- the prose set

def _pages(source: ProseSource, files: dict[str, bytes]) -> dict[str, dict[str, list[str]]]:
    """raw[lang][page] = every paragraph, pages sorted by name (a stable order). A source with a
    ``page_size`` has pages ``<file>/<k:04d>`` of that many paragraphs each."""
    raw: dict[str, dict[str, list[str]]] = {}
    for lang, d in source.dirs.items():
        prefix = d.rstrip("/") + "/"
        names = sorted(n for n in files if n.startswith(prefix) and n.endswith(source.suffix)
                       and (source.kind == "roff" or "/" not in n[len(prefix):])  # man pages: man1/ls.1.gz
                       and (not source.files or n[len(prefix):] in source.files)
                       and not n.endswith((".dat", ".u8")))  # strfile indexes, UTF-8 duplicates of fortunes
        raw[lang] = {}
        for n in names:
            page, paras = n[len(prefix):len(n) - len(source.suffix)], page_paragraphs(source.kind, files[n])
            if not source.page_size:
                raw[lang][page] = paras
                continue
            for k in range(0, len(paras), source.page_size):
                raw[lang][f"{page}/{k // source.page_size:04d}"] = paras[k:k + source.page_size]
    return raw


def load_prose(where: str | os.PathLike | None = None, sources: tuple[str, ...] = tuple(SOURCES),
               langs: tuple[str, ...] = LANGS) -> ProseSet:
    """Read the packages (see :func:`locate_sources`) into paragraphs per language.

    A paragraph is kept when it is running text (:func:`is_prose`) and, outside English,
    differs from every English paragraph of the same page (identical text is an untranslated
    fallback that would put English into the French domain); for manual pages, which have no
    English original here, when it does not :func:`looks_english`. ``langs`` limits the
    languages read; a source with none of them is skipped."""
    unknown = set(sources) - set(SOURCES)
    if unknown:
        raise ValueError(f"unknown prose sources {sorted(unknown)}; known: {sorted(SOURCES)}")
    located = locate_sources(where, tuple(sources))
    paragraphs: dict[str, list[Paragraph]] = {lang: [] for lang in langs}
    meta, raw_all = {}, {}
    for name in sources:
        src, path = SOURCES[name], located[name]
        src_langs = tuple(lang for lang in langs if lang in src.dirs)
        if not src_langs:
            continue
        prefixes = tuple(src.dirs[lang] for lang in src_langs)
        if path.is_dir():
            control, files = {}, _read_tree(path, prefixes)
        else:
            control, files = read_deb(path, prefixes)
        raw = _pages(src, files)
        empty = [lang for lang in src_langs if not raw.get(lang)]
        if empty:
            raise ValueError(f"{path}: no {src.suffix} pages for {empty} under "
                             f"{[src.dirs[lang] for lang in empty]}; is this the {name} package?")
        raw_all[name] = raw
        meta[name] = {"version": control.get("Version", "unpacked tree"), "licence": src.licence,
                      "title": src.title, "file": path.name}
        english = raw.get("en", {})
        for lang in src_langs:
            for page, paras in raw[lang].items():
                en = set(english.get(page, ())) if lang != "en" else set()
                paragraphs[lang].extend(
                    Paragraph(name, page, i, t) for i, t in enumerate(paras)
                    if is_prose(t) and t not in en and not (src.kind == "roff" and looks_english(t)))
    return ProseSet(paragraphs=paragraphs, sources=meta, raw=raw_all)


NEAR_COPY = 0.9  # difflib similarity ratio at which two language versions count as one text


def has_near_copies(texts, threshold: float = NEAR_COPY) -> bool:
    """Whether two of ``texts`` are near copies (``difflib`` similarity ratio >= ``threshold``): a
    "translation" that fell back to the source text, perhaps with other quote marks."""
    import difflib

    texts = list(texts)
    return any(difflib.SequenceMatcher(None, a, b, autojunk=False).ratio() >= threshold
               for i, a in enumerate(texts) for b in texts[i + 1:])


def aligned_paragraphs(prose: ProseSet, langs: tuple[str, ...] = LANGS) -> list[dict]:
    """The same paragraph in every language: ``{"id", "source", "page", "index", "split", <lang>: text}``.

    Alignment is by document structure: a page enters only when it has the same number of
    paragraphs in every language, and a paragraph only when each translation is running text
    and differs from the English one (so it *was* translated) and no two language versions are
    near copies (:func:`has_near_copies`: a paragraph left untranslated in two languages, or
    differing only by its quote marks, would make routing look as if it followed the content)."""
    kept = {lang: {p.key for p in prose.paragraphs[lang]} for lang in langs}
    out = []
    for name, raw in prose.raw.items():
        if not SOURCES[name].parallel or not set(langs) <= set(raw):
            continue
        for page in sorted(raw[langs[0]]):
            per = [raw[lang].get(page) for lang in langs]
            if any(p is None for p in per) or len({len(p) for p in per}) != 1:
                continue
            for i in range(len(per[0])):
                key = f"{name}/{page}#{i}"
                if (all(key in kept[lang] for lang in langs)
                        and not has_near_copies(raw[lang][page][i] for lang in langs)):
                    out.append({"id": key, "source": name, "page": page, "index": i,
                                "split": "heldout" if is_heldout_page(name, page) else "train",
                                **{lang: raw[lang][page][i] for lang in langs}})
    return out


def _page_hash(group: str, page: str) -> int:
    return int.from_bytes(hashlib.sha1(f"{group}/{page}".encode()).digest()[:8], "big")


def is_heldout_page(source: str, page: str, percent: int = HELDOUT_PAGE_PERCENT) -> bool:
    """Held out by page, never by language: the key names the source (its held-out group) and
    page only, so a held-out page is held out in every language and no translation of it is
    trained on."""
    return _page_hash(source, page) % 100 < percent


def page_order(group: str, pages: list[str]) -> list[str]:
    """Pages in a fixed order that depends on nothing but their names, with the held-out pages
    spread evenly: training and held-out pages each sorted by their hash, then merged so that
    every prefix holds out its share (``len(held) / len(pages)``, about ``HELDOUT_PAGE_PERCENT``)."""
    ranked = sorted(pages, key=lambda pg: (_page_hash(group, pg), pg))
    held = [pg for pg in ranked if is_heldout_page(group, pg)]
    kept = [pg for pg in ranked if not is_heldout_page(group, pg)]
    n, n_held = len(pages), len(held)
    out: list[str] = []
    taken = 0  # held-out pages placed so far
    for k in range(n):
        due = ((k + 1) * n_held + n // 2) // n  # held-out pages a prefix of k + 1 pages should have
        if held and (taken < due or not kept):
            out.append(held.pop(0))
            taken += 1
        else:
            out.append(kept.pop(0))
    return out


def prose_documents(prose: ProseSet, lang: str, max_chars: int = MAX_DOC_CHARS) -> Iterator[tuple[str, str, str]]:
    """(document id, text, source) for one language: a page's kept paragraphs, in order,
    packed into documents of at most ``max_chars``. Ids are ``deb/<group>/<page>/<n>`` with the
    source's held-out group (``manpages`` for every language's manual pages), so
    :func:`split_key` gives the same page key in every language.

    Sources come in the order of :data:`SOURCES` (the books first), and the pages of a source in
    :func:`page_order`: a corpus that takes only the first documents (a small size) takes the
    same pages in every language, and about ``HELDOUT_PAGE_PERCENT`` of them are held out."""
    by_page: dict[tuple[str, str], list[str]] = {}
    for p in prose.paragraphs[lang]:
        by_page.setdefault((p.source, p.page), []).append(p.text)
    order = [(name, page) for name in SOURCES
             for page in page_order(SOURCES[name].split_group, [pg for src, pg in by_page if src == name])]
    for name, page in order:
        texts = by_page[(name, page)]
        group, source = SOURCES[name].split_group, name
        buf, size, n = [], 0, 0
        for t in texts + [None]:  # None flushes the last document
            if buf and (t is None or size + len(t) > max_chars):
                yield f"deb/{group}/{page}/{n:03d}", "\n\n".join(buf), source
                buf, size, n = [], 0, n + 1
            if t is not None:
                buf.append(t)
                size += len(t) + 2


def prose_items(prose: ProseSet, lang: str, limit: float = float("inf")) -> Iterator[Item]:
    """Corpus items (document, source label, licence) of one language's real prose, in the order
    of :func:`prose_documents`, up to ``limit`` characters; a document whose text repeats an earlier one is skipped
    here (as the builder would) so callers can count on every yielded character."""
    total, seen = 0, set()
    for doc_id, text, source in prose_documents(prose, lang):
        if total + len(text) > limit:
            return
        digest = hashlib.sha1(text.encode("utf-8")).digest()
        if digest in seen:
            continue
        seen.add(digest)
        total += len(text)
        yield Document(LANG_DOMAINS[lang], doc_id, text), f"deb:{source}", prose.sources[source]["licence"]


def capped(items: Iterator[Item], limit: float) -> Iterator[Item]:
    """Whole items while their characters stay within ``limit``."""
    total = 0
    for item in items:
        if total + len(item[0].text) > limit:
            return
        total += len(item[0].text)
        yield item


def split_key(doc_id: str) -> str | None:
    """The page a prose document id belongs to (``group/page``), or None for other documents."""
    if not doc_id.startswith("deb/"):
        return None
    group, rest = doc_id[4:].split("/", 1)
    return f"{group}/{rest.rsplit('/', 1)[0]}"
