"""A few-KB stand-in for the Debian prose packages, in their real formats (tests never need the packages).

``make_prose_debs(dir)`` writes ``debian-handbook_0.1-test_all.deb`` (publican XHTML pages with
``<div class="para">``) and ``gnome-user-docs_0.1-test_all.deb`` (Mallard ``.page`` files): real
``ar`` archives with ``control.tar.xz`` and ``data.tar.xz``, as ``apt-get download`` gives them;
``fortunes``/``fortunes-de``/``fortunes-es`` (strfile text: entries between ``%`` lines) and
``manpages-<fr|de|es|it>_0.1-test_all.deb`` (gzipped roff manual pages) and
``wordnet-base_0.1-test_all.deb`` (WordNet ``data.*`` files: synset lines ending in
``| gloss; "example"``, plus an ``index.noun`` that is not read).
The text is built so the expected outcome is known: paragraph ``j`` of page ``i`` says the same
thing in every language; a few paragraphs are deliberately untranslated (English text in the
French page), too short, or code; one Mallard page has an extra Italian paragraph (so it cannot
be aligned).
"""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

N_HANDBOOK_PAGES = 30
N_GNOME_PAGES = 12
PARAS_PER_PAGE = 3

_WORDS = {  # (subject, verb phrase, object) per language; index i and j pick combinations
    "en": (["The server", "The user", "Our team", "The station", "The printer", "A neighbour"],
           ["checks every morning", "quietly repairs", "carefully describes", "waits for", "opens again"],
           ["the old network cable.", "the blue window in the kitchen.", "the weekly backup tape.",
            "the small garden behind the house.", "the configuration of the mail system."]),
    "fr": (["Le serveur", "L'utilisateur", "Notre équipe", "La gare", "L'imprimante", "Un voisin"],
           ["vérifie chaque matin", "répare tranquillement", "décrit avec soin", "attend", "ouvre de nouveau"],
           ["le vieux câble réseau.", "la fenêtre bleue de la cuisine.", "la bande de sauvegarde hebdomadaire.",
            "le petit jardin derrière la maison.", "la configuration du système de courrier."]),
    "de": (["Der Server", "Der Benutzer", "Unser Team", "Der Bahnhof", "Der Drucker", "Ein Nachbar"],
           ["prüft jeden Morgen", "repariert leise", "beschreibt sorgfältig", "wartet auf", "öffnet wieder"],
           ["das alte Netzwerkkabel.", "das blaue Fenster in der Küche.", "das wöchentliche Sicherungsband.",
            "den kleinen Garten hinter dem Haus.", "die Konfiguration des Mailsystems."]),
    "es": (["El servidor", "El usuario", "Nuestro equipo", "La estación", "La impresora", "Un vecino"],
           ["revisa cada mañana", "repara en silencio", "describe con cuidado", "espera", "abre de nuevo"],
           ["el viejo cable de red.", "la ventana azul de la cocina.", "la cinta de copia semanal.",
            "el pequeño jardín detrás de la casa.", "la configuración del sistema de correo."]),
    "it": (["Il server", "L'utente", "La nostra squadra", "La stazione", "La stampante", "Un vicino"],
           ["controlla ogni mattina", "ripara in silenzio", "descrive con cura", "aspetta", "apre di nuovo"],
           ["il vecchio cavo di rete.", "la finestra blu della cucina.", "il nastro di backup settimanale.",
            "il piccolo giardino dietro la casa.", "la configurazione del sistema di posta."]),
}
HANDBOOK_DIRS = {"en": "en-US", "fr": "fr-FR", "de": "de-DE", "es": "es-ES", "it": "it-IT"}
GNOME_DIRS = {"en": "C", "fr": "fr", "de": "de", "es": "es", "it": "it"}


def sentence(lang: str, i: int, j: int, k: int = 0) -> str:
    subj, verb, obj = _WORDS[lang]
    return f"{subj[(i + k) % len(subj)]} {verb[(j + 2 * k) % len(verb)]} {obj[(i * 3 + j + k) % len(obj)]}"


def paragraph(lang: str, i: int, j: int) -> str:
    """Paragraph j of page i: two sentences, the same content in every language."""
    return f"{sentence(lang, i, j)} {sentence(lang, i, j, 1)}"


def _handbook_page(lang: str, i: int) -> str:
    paras = [paragraph(lang, i, j) for j in range(PARAS_PER_PAGE)]
    if lang == "fr" and i == 0:
        paras[1] = paragraph("en", 0, 1)  # untranslated fallback: English text in the French page
    marked = [p.replace("The", '<code class="command">The</code>', 1) for p in paras]  # inline markup
    body = "".join(f'<div class="para">\n\t\t\t{p}\n\t\t</div>' for p in marked)
    return ('<?xml version="1.0" encoding="UTF-8" standalone="no"?>\n<html xmlns="http://www.w3.org/1999/xhtml">'
            f'<head><title>Page {i}</title></head><body><div class="section"><h2 class="title">{i}. Title</h2>'
            f'{body}<pre class="screen">$ apt-get install foo</pre><div class="para">apt-get</div>'
            '</div></body></html>')


def _gnome_page(lang: str, i: int) -> str:
    paras = [paragraph(lang, 100 + i, j) for j in range(PARAS_PER_PAGE)]
    if lang == "it" and i == 1:
        paras.append(paragraph("it", 100 + i, 9))  # an extra paragraph: this page cannot be aligned
    rest = "".join(f"<p>{p}</p>" for p in paras[1:])
    return (f'<?xml version="1.0" encoding="utf-8"?>\n<page xmlns="http://projectmallard.org/1.0/" id="p{i}">'
            f'<info><desc>Short description of page {i} in the info block.</desc></info>'
            f'<title>Page {i}</title><section><note><p>{paras[0]}</p></note>{rest}</section>'
            f'<code>ls -l /etc/apt/sources.list.d and more words here.</code></page>')


N_MAN_PAGES = 4


def man_page(lang: str, i: int) -> str:
    """A roff manual page: two running-text paragraphs (one with font escapes and a .B line), a
    .TP item whose tag is not text, a no-fill example, and an untranslated English paragraph."""
    words = paragraph(lang, 200 + i, 0).split()
    first = " ".join(words[:3]) + "\n\\fB" + words[3] + "\\fP " + " ".join(words[4:7]) + "\n.B " + " ".join(words[7:9]) + \
        "\n" + " ".join(words[9:])
    return (f'.\\" a comment\n.TH PAGE{i} 1 "2024" "test"\n.SH NAME\npage{i} \\- a test page\n.SH DESCRIPTION\n.PP\n'
            f"{first}\n.TP\n\\fB\\-\\-verbose\\fP\n{paragraph(lang, 200 + i, 1)}\n.nf\n"
            f"$ page{i} \\-\\-verbose and some more example words here.\n.fi\n.PP\n"
            "The options of this program are described in the English original and are not translated.\n")


N_FORTUNES = 5
FORTUNE_DIRS = {"fortunes": ("en", "usr/share/games/fortunes"), "fortunes-de": ("de", "usr/share/games/fortunes/de"),
                "fortunes-es": ("es", "usr/share/games/fortunes/es")}


def fortune_file(lang: str) -> str:
    """N_FORTUNES entries (sentences 300+i), each with an attribution, plus one too short to keep."""
    entries = [f"{paragraph(lang, 300 + i, 0)[:-1]},\nand then it ends.\n\t\t-- Somebody Famous, {1900 + i}\n\t\tthe end"
               for i in range(N_FORTUNES)]
    return "%\n".join(e + "\n" for e in entries + ["Too short."])


def fortune_text(lang: str, i: int) -> str:
    return f"{paragraph(lang, 300 + i, 0)[:-1]}, and then it ends."


N_WORDNET = 90  # usage examples kept (data.noun), more than two pages of the source's page_size
WORDNET_HEADER = "  1 This software and database is being provided to you, the LICENSEE, by \n"


def wordnet_example(i: int) -> str:
    """The kept example of synset i, as the reader gives it back (capitalised, full stop added)."""
    subj, verb, obj = _WORDS["en"]
    return f"{subj[i % 6].split()[1].capitalize()} {verb[i % 5]} {obj[(i // 5) % 5][:-1]} number {i}."


def wordnet_data_file() -> str:
    """A data.noun: the licence header, then N_WORDNET synsets whose gloss quotes one example
    (lower-case, no final stop) and one that is too short to keep."""
    lines = [WORDNET_HEADER]
    for i in range(N_WORDNET):
        example = wordnet_example(i)[:-1]
        lines.append(f"{i:08d} 03 n 01 thing{i} 0 000 | a thing used in tests; \"{example[0].lower()}{example[1:]}\"; "
                     f"\"short one\"  \n")
    return "".join(lines)


def _tar_xz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(f"./{name}")
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _ar(members: list[tuple[str, bytes]]) -> bytes:
    out = [b"!<arch>\n"]
    for name, data in members:
        out.append(f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode("ascii"))
        out.append(data + (b"\n" if len(data) % 2 else b""))
    return b"".join(out)


def make_deb(path: Path, package: str, version: str, files: dict[str, bytes]) -> Path:
    control = f"Package: {package}\nVersion: {version}\nArchitecture: all\nDescription: test fixture\n".encode()
    path.write_bytes(_ar([("debian-binary", b"2.0\n"), ("control.tar.xz", _tar_xz({"control": control})),
                          ("data.tar.xz", _tar_xz(files))]))
    return path


def prose_files() -> dict[str, dict[str, bytes]]:
    """{package: {path inside the package: bytes}}."""
    handbook = {f"usr/share/doc/debian-handbook/html/{d}/page{i:02d}.html": _handbook_page(lang, i).encode()
                for lang, d in HANDBOOK_DIRS.items() for i in range(N_HANDBOOK_PAGES)}
    handbook["usr/share/doc/debian-handbook/copyright"] = b"License: GPL-2.0+ or CC-BY-SA-3.0\n"
    gnome = {f"usr/share/help/{d}/gnome-help/topic-{i:02d}.page": _gnome_page(lang, i).encode()
             for lang, d in GNOME_DIRS.items() for i in range(N_GNOME_PAGES)}
    out = {"debian-handbook": handbook, "gnome-user-docs": gnome}
    for package, (lang, d) in FORTUNE_DIRS.items():
        out[package] = {f"{d}/everyday": fortune_file(lang).encode(), f"{d}/everyday.dat": b"\x00\x00\x00\x02binary"}
    out["wordnet-base"] = {"usr/share/wordnet/data.noun": wordnet_data_file().encode(),
                           "usr/share/wordnet/index.noun": b"thing0 n 1 0 1 0 00000000  \n"}
    for lang in ("fr", "de", "es", "it"):
        out[f"manpages-{lang}"] = {f"usr/share/man/{lang}/man1/page{i}.1.gz": gzip.compress(man_page(lang, i).encode(), mtime=0)
                                   for i in range(N_MAN_PAGES)}
    return out


def make_prose_debs(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for package, files in prose_files().items():
        make_deb(directory / f"{package}_0.1-test_all.deb", package, "0.1-test", files)
    return directory


def make_prose_tree(directory: Path) -> Path:
    """The same files unpacked (as ``dpkg-deb -x`` would leave them)."""
    for files in prose_files().values():
        for name, data in files.items():
            p = directory / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
    return directory
