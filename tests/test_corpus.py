"""Tests for moe_lab.corpus: determinism, splits, correctness of generated maths,
languages of the language domains, atomic writes and the command line."""

from __future__ import annotations

import ast
import json
import math
import operator
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from moe_lab import corpus as mc
from moe_lab.corpus import build as corpus_build
from moe_lab.corpus import languages


@pytest.fixture(scope="module")
def small() -> mc.Corpus:
    return mc.build_corpus(None, size="small", seed=0, progress=False)


@pytest.fixture(scope="module")
def tiny_seed1() -> mc.Corpus:
    return mc.build_corpus(None, size="tiny", seed=1, progress=False)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# ----------------------------------------------------------------------------- structure

def test_all_domains_present_with_non_trivial_size(small):
    assert len(mc.DOMAINS) >= 6
    assert small.domains == list(mc.DOMAINS)
    stats = small.stats()
    for domain in mc.DOMAINS:
        train, held = stats["train"][domain], stats["heldout"][domain]
        assert train["chars"] + held["chars"] >= 0.75 * mc.SIZES["small"] * mc.CHARS_PER_TOKEN[domain], domain
        assert train["documents"] >= 20, domain
        assert held["documents"] >= 1, domain


def test_no_document_in_both_splits(small):
    train_ids = {(d.domain, d.id) for d in small.train}
    held_ids = {(d.domain, d.id) for d in small.heldout}
    assert not train_ids & held_ids
    assert not {d.text for d in small.train} & {d.text for d in small.heldout}
    assert len(train_ids) == len(small.train)  # ids are unique
    fraction = len(small.heldout) / (len(small.train) + len(small.heldout))
    assert 0.02 < fraction < 0.10


def test_different_seed_changes_random_domains(tiny_seed1):
    tiny0 = mc.build_corpus(None, size="tiny", seed=0, progress=False)
    for domain in mc.DOMAINS:  # every domain uses the seed (generators or source order)
        texts0 = {d.text for d in tiny0.train + tiny0.heldout if d.domain == domain}
        texts1 = {d.text for d in tiny_seed1.train + tiny_seed1.heldout if d.domain == domain}
        assert texts0 != texts1, domain


def test_load_corpus_roundtrip_and_sample_texts(small, tmp_path):
    mc.write_corpus(small, tmp_path)
    loaded = mc.load_corpus(tmp_path)
    assert loaded.train == small.train and loaded.heldout == small.heldout
    assert loaded.domains == small.domains
    assert loaded.stats() == small.stats()
    texts = mc.sample_texts(loaded, "math", 3)
    assert len(texts) == min(3, sum(d.domain == "math" for d in loaded.heldout))
    assert texts == mc.sample_texts(loaded, "math", 3)
    assert all(t.startswith("Question:") for t in texts)
    assert len(mc.sample_texts(loaded, "latex", 2, split="train", max_chars=50)[0]) <= 50
    with pytest.raises(KeyError):
        mc.sample_texts(loaded, "klingon", 1)


def test_bad_size_is_rejected():
    with pytest.raises(ValueError):
        mc.build_corpus(None, size="huge", progress=False)


# ----------------------------------------------------------------------------- maths

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.Pow: operator.pow}


def _exact(expr: str, env: dict[str, Fraction] | None = None) -> Fraction:
    """Evaluate an arithmetic expression with exact fractions (independent of the module)."""
    env = env or {}

    def ev(node):
        if isinstance(node, ast.Constant):
            return Fraction(str(node.value))
        if isinstance(node, ast.Name):
            return env[node.id]
        if isinstance(node, ast.UnaryOp):
            return -ev(node.operand) if isinstance(node.op, ast.USub) else ev(node.operand)
        if isinstance(node, ast.BinOp):
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(ast.dump(node))

    return ev(ast.parse(expr, mode="eval").body)


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % p for p in range(2, math.isqrt(n) + 1))


NUM = r"(-?\d+(?:\.\d+)?)"
CHECKS: list[tuple[str, re.Pattern, object]] = [
    ("expression", re.compile(r"(?:What is|Calculate|Evaluate|Compute|What is the value of) ([-\d.+*/() ]+)[?.]"),
     lambda m, a: _exact(m[1]) == Fraction(a)),
    ("add", re.compile(rf"(?:Add|Sum|Total of) {NUM} and {NUM}\."), lambda m, a: _exact(f"{m[1]} + {m[2]}") == Fraction(a)),
    ("subtract", re.compile(rf"Subtract {NUM} from {NUM}\."), lambda m, a: _exact(f"{m[2]} - {m[1]}") == Fraction(a)),
    ("minus", re.compile(rf"What is {NUM} minus {NUM}\?"), lambda m, a: _exact(f"{m[1]} - {m[2]}") == Fraction(a)),
    ("less than", re.compile(rf"What is {NUM} less than {NUM}\?"), lambda m, a: _exact(f"{m[2]} - {m[1]}") == Fraction(a)),
    ("multiply", re.compile(rf"(?:Multiply {NUM} and {NUM}\.|What is the product of {NUM} and {NUM}\?)"),
     lambda m, a: _exact(f"({m[1] or m[3]}) * ({m[2] or m[4]})") == Fraction(a)),
    ("divide", re.compile(rf"(?:Divide {NUM} by {NUM}\.|What is {NUM} divided by {NUM}\?)"),
     lambda m, a: _exact(f"({m[1] or m[3]}) / ({m[2] or m[4]})") == Fraction(a)),
    ("linear equation", re.compile(r"Solve ([^,=]+) = ([^,=]+) for ([a-z])\."),
     lambda m, a: _exact(m[1], {m[3]: Fraction(a)}) == _exact(m[2], {m[3]: Fraction(a)})),
    ("gcd", re.compile(r"What is the greatest common (?:divisor|factor) of (\d+) and (\d+)\?|"
                       r"Calculate the highest common factor of (\d+) and (\d+)\."),
     lambda m, a: math.gcd(int(m[1] or m[3]), int(m[2] or m[4])) == int(a)),
    ("lcm", re.compile(r"(?:What is the (?:lowest|smallest) common multiple of (\d+) and (\d+)\?|"
                       r"Calculate the least common multiple of (\d+) and (\d+)\.)"),
     lambda m, a: math.lcm(int(m[1] or m[3]), int(m[2] or m[4])) == int(a)),
    ("remainder", re.compile(r"(?:What is|Calculate) the remainder when (\d+) is divided by (\d+)[?.]"),
     lambda m, a: int(m[1]) % int(m[2]) == int(a)),
    ("prime", re.compile(r"Is (\d+) (?:a prime number|prime)\?"), lambda m, a: str(_is_prime(int(m[1]))) == a),
    ("evaluate f", re.compile(r"Let ([a-z])\(([a-z])\) = ([^.]+)\. What is \1\((-?\d+)\)\?"),
     lambda m, a: _exact(m[3], {m[2]: Fraction(m[4])}) == Fraction(a)),
]


def _math_items(corpus: mc.Corpus):
    for doc in corpus.train + corpus.heldout:
        if doc.domain == "math":
            for block in doc.text.split("\n\n"):
                question, answer = block.split("\n")
                assert question.startswith("Question: ") and answer.startswith("Answer: ")
                yield question[len("Question: "):], answer[len("Answer: "):]


def test_math_answers_are_correct(small):
    checked = dict.fromkeys((name for name, _, _ in CHECKS), 0)
    for question, answer in _math_items(small):
        for name, pattern, check in CHECKS:
            m = pattern.fullmatch(question)
            if m:
                assert check(m, answer), (question, answer)
                checked[name] += 1
                break
    assert all(n >= 5 for n in checked.values()), checked


def test_math_derivatives_are_correct(small):
    sympy = pytest.importorskip("sympy")
    pattern = re.compile(r"(?:Differentiate (.+) with respect to ([a-z])\.|"
                         r"Find the (second |third )?derivative of (.+) wrt ([a-z])\.)")
    n = 0
    for question, answer in _math_items(small):
        m = pattern.fullmatch(question)
        if m and n < 40:
            expr, var = (m[1], m[2]) if m[1] else (m[4], m[5])
            order = {None: 1, "second ": 2, "third ": 3}[m[3]]
            x = sympy.Symbol(var)
            assert sympy.expand(sympy.diff(sympy.sympify(expr), x, order) - sympy.sympify(answer)) == 0, question
            n += 1
    assert n >= 10


# ----------------------------------------------------------------------------- languages

STOPWORDS = {
    "french": {"le", "les", "et", "est", "des", "du", "pour", "dans", "sur", "avec", "qui", "au", "aux", "vous", "pas", "ce"},
    "german": {"der", "die", "das", "und", "ist", "nicht", "mit", "von", "den", "zu", "ein", "eine", "für", "auf", "im", "dem"},
    "spanish": {"el", "los", "las", "y", "del", "por", "para", "su", "al", "es", "se", "como", "está"},
    "italian": {"il", "di", "e", "che", "per", "della", "gli", "nel", "alla", "è", "dei", "sono", "non", "ha"},
    "english": {"the", "and", "of", "to", "is", "that", "for", "with", "are", "this", "be"},
}


def _language_of(text: str) -> str:
    words = re.findall(r"\w+", text.lower())
    return max(STOPWORDS, key=lambda lang: sum(w in STOPWORDS[lang] for w in words))


@pytest.mark.parametrize("domain", ["french", "german", "spanish", "italian", "english"])
def test_language_domains_are_in_their_language(small, domain):
    docs = [d for d in small.train + small.heldout if d.domain == domain]
    detected = [_language_of(d.text) for d in docs]
    share = detected.count(domain) / len(docs)
    assert share >= 0.95, (domain, share)


def test_parallel_pairs_point_at_documents(small):
    if not small.parallel:
        pytest.skip("no JupyterLab language packs installed")
    split_of = {(d.domain, d.id): s for s in ("train", "heldout") for d in small.split(s)}
    domain_of = {cfg["code"]: name for name, cfg in languages.LANGS.items()}
    for pair in small.parallel:
        key = (domain_of[pair["lang"]], pair["doc_id"])
        assert split_of[key] == pair["split"]
        assert pair["en"] and pair["text"]
    assert {p["lang"] for p in small.parallel} == {"fr", "de", "es", "it"}


def test_english_interface_strings_are_the_packs_english_originals_each_once():
    packs = [cfg["catalogue"] for cfg in languages.LANGS.values()]
    pairs = [pair for package in packs for pair in languages._catalogue_pairs(package)]
    if not pairs:
        pytest.skip("no JupyterLab language packs installed")
    items = list(languages.english_interface_items())
    docs = [doc for doc, _, _ in items]
    assert {doc.domain for doc in docs} == {"english"}
    assert len({doc.id for doc in docs}) == len(docs) and all(doc.id.startswith("catalogue/") for doc in docs)
    assert all(label.startswith("pypi:jupyterlab-language-pack-") and licence for _, label, licence in items)
    # the English msgids in catalogue order, each once, at least 3 words, one a line; no translation
    expected, seen = [], set()
    for _, en, _ in pairs:
        if en not in seen and sum(w.isalpha() for w in en.split()) >= 3:
            seen.add(en)
            expected.append(en)
    assert "\n".join(doc.text for doc in docs) == "\n".join(expected)
    translations_only = {text for _, en, text in pairs} - {en for _, en, _ in pairs}
    assert not translations_only.intersection(expected)
    # packed into documents of about 1,500 characters, like the language domains' catalogue documents
    assert all(len(doc.text) < 1500 + max(map(len, expected)) for doc in docs)
    assert sum(len(doc.text) >= 1500 for doc in docs) >= len(docs) - len(packs)


def test_language_helpers():
    assert languages.es_conjunctions("habla francés y inglés o otro") == "habla francés e inglés u otro"
    assert languages.it_art("il", 8) == "l'" and languages.it_art("al", 3) == "al "
    assert languages.FR_ELISION.sub(lambda m: m.group(1)[0] + "'", "études de informatique") == "études d'informatique"


# ----------------------------------------------------------------------------- writing

def test_failed_write_leaves_previous_files_untouched(tmp_path, monkeypatch, tiny_seed1):
    tiny0 = mc.build_corpus(tmp_path, size="tiny", seed=0, progress=False)
    before = _files(tmp_path)
    calls = {"n": 0}
    real_dump = corpus_build._dump_doc

    def failing_dump(doc):
        calls["n"] += 1
        if calls["n"] > 20:
            raise OSError("disk full")
        return real_dump(doc)

    monkeypatch.setattr(corpus_build, "_dump_doc", failing_dump)
    with pytest.raises(OSError, match="disk full"):
        mc.write_corpus(tiny_seed1, tmp_path)
    assert _files(tmp_path) == before  # no temp files left, old corpus intact

    fresh = tmp_path / "fresh"
    calls["n"] = 0
    with pytest.raises(OSError):
        mc.write_corpus(tiny0, fresh)
    assert list(fresh.iterdir()) == []


def test_cli_build_is_byte_identical_to_api_build(small, tmp_path):
    """Two builds with the same seed, one through the CLI in a fresh process (so with a
    different str-hash seed) and one through the API, must produce identical bytes."""
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "moe_lab.corpus", "--out", str(out), "--size", "small",
                           "--seed", "0", "--quiet"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "math" in proc.stdout
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    assert stats["domains"] == list(mc.DOMAINS) and stats["seed"] == 0 and stats["size"] == "small"
    first = json.loads((out / "train.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert set(first) == {"domain", "id", "text"}

    mc.write_corpus(small, tmp_path / "api")
    cli, api = _files(out), _files(tmp_path / "api")
    assert sorted(cli) == sorted(mc.FILES)
    assert cli == api


# ----------------------------------------------------------------------------- package layout

@pytest.mark.parametrize("missing", ["faker", "babel", "jupyterlab_language_pack_de_DE"])
def test_building_without_the_corpus_extra_names_the_install_command(monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # what `import missing` sees when it is not installed
    with pytest.raises(ImportError, match=re.escape("pip install 'moe_lab[corpus]'")) as info:
        mc.build_corpus(None, size="tiny", progress=False)
    assert missing in str(info.value)


def test_domains_without_extra_packages_build_without_them(monkeypatch):
    for name in ("faker", "babel"):
        monkeypatch.setitem(sys.modules, name, None)
    corpus = mc.build_corpus(None, size="tiny", progress=False, domains=["math", "latex"])
    assert {d.domain for d in corpus.train} == {"math", "latex"}
    with pytest.raises(ImportError, match="faker"):
        mc.build_corpus(None, size="tiny", progress=False, domains=["data"])


def test_language_templates_are_data_files_with_every_key():
    files = sorted(p.name for p in languages.TEMPLATES_DIR.glob("*.json"))
    assert files == sorted(f"{code}.json" for code in languages.LANGUAGE_CODES.values())
    for name, code in languages.LANGUAGE_CODES.items():
        cfg = json.loads((languages.TEMPLATES_DIR / f"{code}.json").read_text(encoding="utf-8"))
        assert languages.LANGS[name] == cfg
        assert set(languages.TEMPLATE_KEYS) <= set(cfg)
        for gender in ("m", "f"):  # both genders fill the same agreement slots
            assert set(cfg["gender"][gender]) == set(cfg["gender"]["m"])


def test_bad_template_file_names_file_and_key(monkeypatch, tmp_path):
    cfg = json.loads((languages.TEMPLATES_DIR / "fr.json").read_text(encoding="utf-8"))
    del cfg["bio"]
    (tmp_path / "fr.json").write_text(json.dumps(cfg), encoding="utf-8")
    monkeypatch.setattr(languages, "TEMPLATES_DIR", tmp_path)
    with pytest.raises(ValueError, match=r"fr\.json.*'bio'"):
        languages.load_templates("fr")


def test_every_domain_has_a_source_and_a_budget():
    assert set(mc.SOURCES) | set(languages.LANGS) == set(mc.DOMAINS)
    assert set(mc.CHARS_PER_TOKEN) == set(mc.DOMAINS)


def test_cli_without_the_corpus_extra_says_how_to_install_it(monkeypatch, capsys, tmp_path):
    from moe_lab.corpus.__main__ import main

    monkeypatch.setitem(sys.modules, "faker", None)
    assert main(["--out", str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "faker" in err and "pip install 'moe_lab[corpus]'" in err
    assert not (tmp_path / "out").exists()  # nothing half-written
