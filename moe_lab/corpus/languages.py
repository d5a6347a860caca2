"""The ``french`` / ``german`` / ``spanish`` / ``italian`` domains.

Real running text in French/German/Spanish/Italian that pip installs is scarce:
the JupyterLab language packs (BSD-3-Clause) ship human-translated UI strings,
which are real sentences and come with their English originals (kept as
parallel pairs). Everything else is generated from hand-written sentence
templates (data files: ``templates/{fr,de,es,it}.json``) whose slots are filled
with localised data: person and company names and street addresses from Faker,
and country/language names, dates, numbers, currency and percent formatting
from Babel (Unicode CLDR data). Templates avoid constructions that need
gender/case agreement with a slot, or supply the agreeing form through
per-gender keys. Faker, Babel and the language packs are the ``corpus`` extra.
"""

from __future__ import annotations

import datetime as dt
import gettext
import json
import random
import re
from decimal import Decimal
from pathlib import Path
from typing import Iterator

try:  # the `corpus` extra; build_corpus names the install command when it is missing
    from babel import Locale, dates, numbers
    from faker import Faker
except ImportError:  # pragma: no cover - exercised through build.check_extra
    Locale = dates = numbers = Faker = None

from .base import MAX_SYNTHETIC_SHARE, Document, Item, dist_license, package_dir, package_dist, rel_files, round_robin
from .prose import ProseSet, capped, prose_items

#: Domain name -> language code; ``templates/<code>.json`` holds the language's settings
#: (Faker locale, catalogue package, date format), word lists and sentence templates.
LANGUAGE_CODES = {"french": "fr", "german": "de", "spanish": "es", "italian": "it"}
TEMPLATES_DIR = Path(__file__).with_name("templates")
#: Keys every template file must have (``gender`` maps "m"/"f" to the slots that agree with a person).
TEMPLATE_KEYS = ("code", "faker", "catalogue", "short_date", "cities", "topics", "fields", "hobbies", "jobs",
                 "gender", "news_titles", "news", "bio", "letter_open", "letter_first", "letter",
                 "letter_close", "subject")

_LANG_CODES = ("en", "fr", "de", "es", "it", "pt", "nl", "ru", "zh", "ja", "ar", "pl", "sv",
               "el", "tr", "ko", "hi", "da", "fi", "cs", "hu", "ro", "uk", "ga", "eu", "ca")
_NOT_COUNTRIES = {"EU", "EZ", "UN", "QO", "XA", "XB", "XK", "ZZ", "AQ", "AC", "CP", "DG", "EA", "IC", "TA"}


def load_templates(code: str) -> dict:
    """One language's template file, checked for the keys the generator reads."""
    path = TEMPLATES_DIR / f"{code}.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    missing = [k for k in TEMPLATE_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}; expected {list(TEMPLATE_KEYS)}")
    if cfg["code"] != code:
        raise ValueError(f"{path}: key 'code' is {cfg['code']!r}, expected {code!r}")
    return cfg


LANGS: dict[str, dict] = {name: load_templates(code) for name, code in LANGUAGE_CODES.items()}


def requires(lang: str) -> tuple[str, ...]:
    """Modules (of the ``corpus`` extra) that the ``lang`` domain needs."""
    return ("faker", "babel", LANGS[lang]["catalogue"])


def it_art(prep: str, number: int) -> str:
    """Italian article (+preposition) before a number: 'il 3' but 'l'8', 'dell'11'."""
    elide = str(number)[0] == "8" or number in (1, 11)
    forms = {"il": ("il ", "l'"), "Il": ("Il ", "L'"), "al": ("al ", "all'"), "del": ("del ", "dell'"),
             "dal": ("dal ", "dall'")}
    return forms[prep][elide]


def es_conjunctions(text: str) -> str:
    """Spanish 'y' becomes 'e' before an /i/ sound and 'o' becomes 'u' before /o/."""
    text = re.sub(r"\by (?=[iIíÍ]|[hH][iIíÍ](?![aAeEoO]))", "e ", text)
    return re.sub(r"\bo (?=[oOóÓ]|[hH][oOóÓ])", "u ", text)


#: French "de"/"que" elide before a vowel: "d'Angers", "études d'informatique".
FR_ELISION = re.compile(r"\b([dD]e|[qQ]ue) (?=[aeiouyéèêàâîôûAEIOUYÉÈÊÀÂÎÔÛ])")


class LangGen:
    """Fills one language's templates; one instance per (language, seed)."""

    def __init__(self, lang: str, rng: random.Random):
        self.cfg = LANGS[lang]
        self.rng = rng
        self.code = self.cfg["code"]
        self.faker = Faker(self.cfg["faker"])
        self.faker.seed_instance(rng.randrange(2**32))
        loc = Locale.parse(self.code)
        self.countries = [loc.territories[c] for c in sorted(loc.territories)
                          if len(c) == 2 and c.isalpha() and c not in _NOT_COUNTRIES]
        self.languages = [loc.languages[c] for c in _LANG_CODES if c in loc.languages and c != self.code]
        self.days = [loc.days["format"]["wide"][i] for i in range(7)]
        self.months = [loc.months["format"]["wide"][i] for i in range(1, 13)]

    def _person(self) -> tuple[str, str, str]:
        g = self.rng.choice("mf")
        first = self.faker.first_name_male() if g == "m" else self.faker.first_name_female()
        return g, first, f"{first} {self.faker.last_name()}"

    def context(self) -> dict[str, str]:
        rng, cfg, loc = self.rng, self.cfg, self.code
        g, first, name = self._person()
        g2, first2, name2 = self._person()
        rand_date = lambda: dt.date(2015, 1, 1) + dt.timedelta(days=rng.randrange(16 * 365))  # noqa: E731
        d, d2 = rand_date(), rand_date()
        d1 = dt.date(2024, rng.randint(1, 12), rng.randint(1, 20))
        hour = rng.randint(8, 17)
        pct = rng.randint(2, 95)
        topics = rng.sample(cfg["topics"], 2)
        hobbies = rng.sample(cfg["hobbies"], 2)
        countries = rng.sample(self.countries, 3)
        langs = rng.sample(self.languages, 2)
        year = rng.randint(1950, 2000)
        ctx = {
            "P": name, "P2": name2, "F": first, "city": rng.choice(cfg["cities"]),
            "city2": rng.choice(cfg["cities"]), "company": self.faker.company(), "company2": self.faker.company(),
            "street": self.faker.street_address(), "date": dates.format_date(d, "long", locale=loc),
            "date2": dates.format_date(d2, "long", locale=loc), "day": rng.choice(self.days),
            "month": rng.choice(self.months), "year": str(year), "year2": str(year + rng.randint(22, 40)), "year3": str(year + rng.randint(25, 45)),
            "time": f"{hour}:{rng.choice(['00', '15', '30', '45'])}", "time2": f"{hour + 2}:00",
            "n": str(rng.randint(2, 30)), "big": numbers.format_decimal(rng.randint(100, 90_000), locale=loc),
            "money": numbers.format_currency(Decimal(rng.randint(1000, 50_000_000)).scaleb(-2), "EUR", locale=loc),
            "pct": numbers.format_percent(pct / 100, locale=loc),
            "country": countries[0], "country2": countries[1], "country3": countries[2],
            "lang": langs[0], "lang2": langs[1], "topic": topics[0], "topic2": topics[1],
            "Topic": topics[0][:1].upper() + topics[0][1:], "field": rng.choice(cfg["fields"]),
            "hobby": hobbies[0], "hobby2": hobbies[1], "order": str(rng.randint(100_000, 999_999)),
            "d1": dates.format_date(d1, cfg["short_date"], locale=loc),
            "d2": dates.format_date(d1 + dt.timedelta(days=rng.randint(2, 9)), cfg["short_date"], locale=loc),
            "job": rng.choice(cfg["jobs"])[g == "f"],
        }
        ctx.update(cfg["gender"][g])
        if loc == "fr":
            ctx["e2"] = cfg["gender"][g2]["e"]  # agreement with the letter's sender (P2)
        if loc == "it":
            d1b = d1 + dt.timedelta(days=1)
            ctx.update({"Il_date": it_art("Il", d.day) + ctx["date"], "il_date2": it_art("il", d2.day) + ctx["date2"],
                        "al_date2": it_art("al", d2.day) + ctx["date2"], "del_date": it_art("del", d.day) + ctx["date"],
                        "dal_d1": it_art("dal", d1.day) + ctx["d1"], "al_d2": it_art("al", d1b.day) + ctx["d2"],
                        "il_pct": it_art("il", pct) + ctx["pct"], "del_pct": it_art("del", pct) + ctx["pct"]})
        return ctx

    def _fill(self, templates: list[str], ctx: dict, k: int) -> list[str]:
        return [t.format_map(ctx) for t in self.rng.sample(templates, min(k, len(templates)))]

    def document(self) -> tuple[str, str]:
        """A short news item, biography or letter; returns (kind, text)."""
        cfg, rng = self.cfg, self.rng
        ctx = self.context()
        kind = rng.choice(["news", "news", "bio", "letter"])
        if kind == "news":
            title = rng.choice(cfg["news_titles"]).format_map(ctx)
            body = [cfg["news"][0].format_map(ctx)] + self._fill(cfg["news"][1:], ctx, rng.randint(6, 11))
            cut = rng.randint(3, len(body) - 2)
            text = f"{title}\n\n{' '.join(body[:cut])}\n\n{' '.join(body[cut:])}"
        elif kind == "bio":
            text = f"{ctx['P']}\n\n" + " ".join([cfg["bio"][0].format_map(ctx)] + self._fill(cfg["bio"][1:], ctx, rng.randint(5, 9)))
        else:
            opening = rng.choice(cfg["letter_open"]).format_map(ctx)
            first = rng.choice(cfg["letter_first"]).format_map(ctx)
            body = self._fill(cfg["letter"], ctx, rng.randint(3, 6))
            topic = rng.choice(cfg["topics"])
            subject = cfg["subject"] + topic[:1].upper() + topic[1:]
            closing = rng.choice(cfg["letter_close"]).format_map(ctx)
            text = f"{subject}\n\n{opening}\n\n{first} {' '.join(body)}\n\n{closing}"
        text = text.replace("..", ".")  # company names such as "S.A." end sentences too
        if self.code == "es":
            text = es_conjunctions(text)
        elif self.code == "fr":
            text = FR_ELISION.sub(lambda m: m.group(1)[0] + "'", text)
        return kind, text


def _catalogue_pairs(package: str) -> list[tuple[str, str, str]]:
    """(file, English msgid, translation) from a package's compiled gettext catalogues."""
    root = package_dir(package)
    if root is None:
        return []
    pairs, seen = [], set()
    for path in rel_files(root, "*.mo"):
        with open(path, "rb") as fh:
            catalog = gettext.GNUTranslations(fh)._catalog
        for key in sorted(catalog, key=str):
            msgid = key[0] if isinstance(key, tuple) else key
            text = catalog[key]
            msgid = msgid.split("\x04")[-1]  # drop the msgctxt prefix
            text = re.sub(r"<[^>]+>", "", text).strip()
            if not msgid or sum(w.isalpha() for w in text.split()) < 3 or text in seen:
                continue
            seen.add(text)
            pairs.append((path.stem, msgid.strip(), text))
    return pairs


def _catalogue_documents(domain: str, package: str, pairs: list[tuple[str, str, str]], field: int
                         ) -> Iterator[tuple[Document, str, str, list[tuple[str, str, str]]]]:
    """Catalogue pairs packed into documents of about 1,500 characters, one string a line (the
    English msgid with ``field=1``, the translation with ``field=2``); yields (document, source
    label, licence, the pairs in it)."""
    dist = package_dist(package)
    licence = dist_license(dist) if dist else "unknown"
    label = f"pypi:{dist.metadata['Name'].lower()}" if dist else package
    doc_no, buf, size = 0, [], 0
    for i, pair in enumerate(pairs):
        buf.append(pair)
        size += len(pair[field]) + 1
        if size >= 1500 or i == len(pairs) - 1:
            yield Document(domain, f"catalogue/{package}/{doc_no:04d}", "\n".join(p[field] for p in buf)), label, licence, buf
            doc_no, buf, size = doc_no + 1, [], 0


def english_interface_items() -> Iterator[Item]:
    """The English originals (msgids) of every language pack's strings, each once, as English
    interface text: JupyterLab's own menus, dialogs and error messages. Strings are taken in
    the order of ``LANGS`` and their catalogues; a string with fewer than 3 words is left out."""
    seen: set[str] = set()
    for lang in LANGS:
        package = LANGS[lang]["catalogue"]
        pairs = []
        for source, en, text in _catalogue_pairs(package):
            if en not in seen and sum(w.isalpha() for w in en.split()) >= 3:
                seen.add(en)
                pairs.append((source, en, text))
        for doc, label, licence, _ in _catalogue_documents("english", package, pairs, 1):
            yield doc, label, licence


def language_docs(lang: str, rng: random.Random, parallel: list[dict], prose: ProseSet | None = None,
                  budget: int = 0) -> Iterator[Item]:
    """Real catalogue text interleaved with template-generated documents; with ``prose`` (real
    paragraphs from :mod:`.prose`), the prose first fills up to 3/4 of the ``budget`` and the
    catalogue + template text is capped at 1/3 of the prose used, so it is at most
    ``MAX_SYNTHETIC_SHARE`` of the domain."""
    cfg = LANGS[lang]
    package = cfg["catalogue"]

    def catalogue() -> Iterator[Item]:
        for doc, label, licence, buf in _catalogue_documents(lang, package, _catalogue_pairs(package), 2):
            for source, en, text in buf:
                parallel.append({"lang": cfg["code"], "doc_id": doc.id, "source": source, "en": en, "text": text})
            yield doc, label, licence

    def generated() -> Iterator[Item]:
        gen = LangGen(lang, rng)
        for i in range(10**9):
            kind, text = gen.document()
            yield Document(lang, f"gen/{kind}/{i:06d}", text), "generated-templates+faker+babel", \
                "generated; Faker (MIT) and Babel/CLDR (BSD-3-Clause, Unicode-3.0) data"

    synthetic = round_robin(catalogue(), generated())
    if prose is None:
        yield from synthetic
        return
    real = list(prose_items(prose, cfg["code"], (1 - MAX_SYNTHETIC_SHARE) * budget))
    real_chars = sum(len(doc.text) for doc, _, _ in real)
    yield from round_robin(iter(real), capped(synthetic, real_chars * MAX_SYNTHETIC_SHARE / (1 - MAX_SYNTHETIC_SHARE)))

