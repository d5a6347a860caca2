"""The real-prose reader (moe_lab.corpus.prose) and its place in the corpus, on a few-KB fixture in the
packages' own formats (tests/prose_fixture.py), so no test needs the Debian packages."""

import io
import json
import tarfile
from collections import Counter

import pytest

from moe_lab import corpus as mc
from moe_lab.corpus.__main__ import main as corpus_main
from moe_lab.corpus import build as mb
from moe_lab.corpus import prose as mp
from prose_fixture import (N_FORTUNES, N_GNOME_PAGES, N_HANDBOOK_PAGES, N_MAN_PAGES, N_WORDNET, PARAS_PER_PAGE,
                           fortune_text, make_deb, make_prose_debs, make_prose_tree, paragraph, wordnet_example)

N_PAGES = {"debian-handbook": N_HANDBOOK_PAGES, "gnome-user-docs": N_GNOME_PAGES}


@pytest.fixture(scope="module")
def debs(tmp_path_factory):
    return make_prose_debs(tmp_path_factory.mktemp("debs"))


@pytest.fixture(scope="module")
def prose(debs):
    return mp.load_prose(debs)


def test_read_deb_gives_control_fields_and_data_files(debs):
    control, files = mp.read_deb(debs / "debian-handbook_0.1-test_all.deb")
    assert control["Package"] == "debian-handbook" and control["Version"] == "0.1-test"
    pages = [n for n in files if n.endswith(".html")]
    assert len(pages) == 5 * N_HANDBOOK_PAGES
    assert "usr/share/doc/debian-handbook/copyright" in files


def test_read_deb_rejects_what_is_not_a_deb(tmp_path):
    bad = tmp_path / "x.deb"
    bad.write_bytes(b"PK\x03\x04 not an ar archive")
    with pytest.raises(ValueError, match="not an ar archive"):
        mp.read_deb(bad)


def test_zstd_members_get_a_clear_message(tmp_path):
    blob = b"!<arch>\n" + f"{'data.tar.zst':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{4:<10}`\n".encode() + b"abcd"
    path = tmp_path / "z_1_all.deb"
    path.write_bytes(blob)
    with pytest.raises(ValueError, match="dpkg-deb -x"):
        mp.read_deb(path)


def test_paragraphs_per_language_and_what_is_dropped(prose):
    # every page: PARAS_PER_PAGE real paragraphs; the short "apt-get" paragraph, <pre>, <code>,
    # <desc>/<title> metadata are not prose
    full = PARAS_PER_PAGE * (N_HANDBOOK_PAGES + N_GNOME_PAGES)
    man = 2 * N_MAN_PAGES  # two running-text paragraphs per manual page (no English manual pages)
    counts = {lang: len(p) for lang, p in prose.paragraphs.items()}
    assert counts["en"] == full + N_FORTUNES + N_WORDNET and counts["de"] == counts["es"] == full + man + N_FORTUNES
    assert counts["fr"] == full + man - 1  # the untranslated (English) paragraph of page00 is dropped
    assert counts["it"] == full + man + 1  # the extra paragraph of topic-01
    fr = {p.key: p.text for p in prose.paragraphs["fr"]}
    assert "debian-handbook/page00#1" not in fr
    assert fr["debian-handbook/page03#2"] == paragraph("fr", 3, 2)
    en = {p.key: p.text for p in prose.paragraphs["en"]}
    assert en["debian-handbook/page03#2"] == paragraph("en", 3, 2)  # inline <code> markup flattened
    assert en["gnome-user-docs/topic-04#0"] == paragraph("en", 104, 0)  # the <p> inside a <note>
    assert not any("description" in t or "sources.list" in t or "apt-get install" in t for t in en.values())


def test_manual_pages_give_running_text_only(prose):
    for lang in ("fr", "de", "es", "it"):
        man = {p.key: p.text for p in prose.paragraphs[lang] if p.source == f"manpages-{lang}"}
        # roff: font escapes and the .B line joined into the sentence; the .TP tag, the .nf example,
        # the NAME line and the untranslated English paragraph are not kept
        assert sorted(man.values()) == sorted(paragraph(lang, 200 + i, j) for i in range(N_MAN_PAGES) for j in (0, 1))
    assert mp.looks_english("The options of this program are described in the original.")
    assert not mp.looks_english(paragraph("fr", 1, 1)) and not mp.looks_english(paragraph("it", 2, 0))
    docs = {doc_id: src for doc_id, _, src in mp.prose_documents(prose, "de")}
    assert "deb/manpages/man1/page0.1/000" in docs and docs["deb/manpages/man1/page0.1/000"] == "manpages-de"
    assert mp.split_key("deb/manpages/man1/page0.1/000") == "manpages/man1/page0.1"  # the same key in every language


def test_fortunes_one_paragraph_each_without_attribution(prose):
    for lang in ("en", "de", "es"):
        got = [p.text for p in prose.paragraphs[lang] if p.source.startswith("fortunes")]
        assert got == [fortune_text(lang, i) for i in range(N_FORTUNES)]  # not the short one, not the .dat
    assert not any(p.source.startswith("fortunes") for lang in ("fr", "it") for p in prose.paragraphs[lang])


def test_wordnet_gives_its_usage_examples_as_sentences_in_pages(prose):
    got = [p for p in prose.paragraphs["en"] if p.source == "wordnet-base"]
    # every kept example, capitalised with a full stop; not the header, the short examples or index.noun
    assert [p.text for p in got] == [wordnet_example(i) for i in range(N_WORDNET)]
    size = mp.SOURCES["wordnet-base"].page_size
    # the file is cut into pages of `size` examples (two per synset here, the short one dropped)
    assert [p.page for p in got] == [f"data.noun/{(2 * i) // size:04d}" for i in range(N_WORDNET)]
    docs = [doc_id for doc_id, _, src in mp.prose_documents(prose, "en") if src == "wordnet-base"]
    assert {mp.split_key(d) for d in docs} == {f"wordnet-base/data.noun/{k:04d}" for k in range(-(-2 * N_WORDNET // size))}
    assert mp.page_paragraphs("wordnet", b'00000001 03 n 01 x 0 000 | a gloss; "it rained"\n') == ["It rained."]


def test_english_domain_is_mostly_real_prose_and_larger_with_it(prose):
    corpus = mc.build_corpus(None, size="small", seed=0, progress=False, domains=["english"], prose=prose)
    docs = corpus.split("train") + corpus.split("heldout")
    real = [d for d in docs if d.id.startswith("deb/")]
    interface = [d for d in docs if d.id.startswith("catalogue/")]
    technical = [d for d in docs if not d.id.startswith(("deb/", "catalogue/"))]
    assert real and technical
    # ENGLISH_PROSE_PER_DOC real-prose documents for each technical one, while the fixture's prose lasts
    assert len(real) == min(mb.ENGLISH_PROSE_PER_DOC * len(technical), len(list(mp.prose_items(prose, "en"))))
    # and one English interface-string document beside each technical one, while the strings last
    available = [doc.id for doc, _, _ in mc.languages.english_interface_items()]
    if available:
        assert abs(len(interface) - min(len(technical), len(available))) <= 1
        assert {d.id for d in interface} <= set(available)
    # the budget is PROSE_BUDGET_SCALE times the common one (the last document may cross it)
    budget = mb.PROSE_BUDGET_SCALE["english"] * mc.SIZES["small"] * mc.CHARS_PER_TOKEN["english"]
    assert budget - mc.MAX_DOC_CHARS < sum(len(d.text) for d in docs) < budget + mc.MAX_DOC_CHARS


def test_versions_and_licences_are_recorded(prose):
    assert prose.sources["debian-handbook"]["version"] == "0.1-test"
    assert prose.sources["debian-handbook"]["licence"] == "GPL-2.0-or-later OR CC-BY-SA-3.0"
    assert prose.sources["gnome-user-docs"]["licence"] == "CC-BY-SA-3.0"


def test_unpacked_tree_reads_the_same_paragraphs(prose, tmp_path):
    tree = mp.load_prose(make_prose_tree(tmp_path))
    assert tree.paragraphs == prose.paragraphs


def test_aligned_paragraphs_are_the_same_content_in_every_language(prose):
    aligned = mp.aligned_paragraphs(prose)
    ids = {row["id"] for row in aligned}
    assert "debian-handbook/page00#1" not in ids  # untranslated in French
    assert not any(row["page"] == "topic-01" for row in aligned)  # paragraph counts differ: not alignable
    assert {row["source"] for row in aligned} == {"debian-handbook", "gnome-user-docs"}  # not the manual pages
    assert len(aligned) == PARAS_PER_PAGE * (N_HANDBOOK_PAGES + N_GNOME_PAGES - 1) - 1
    for row in aligned:
        page_no = int(row["page"][-2:]) + (100 if row["source"] == "gnome-user-docs" else 0)
        for lang in mp.LANGS:
            assert row[lang] == paragraph(lang, page_no, row["index"])
        assert row["split"] == ("heldout" if mp.is_heldout_page(row["source"], row["page"]) else "train")


def test_heldout_is_by_page_and_the_same_for_every_language():
    pages = [f"p{i}" for i in range(2000)]
    share = sum(mp.is_heldout_page("src", p) for p in pages) / len(pages)
    assert abs(share - mp.HELDOUT_PAGE_PERCENT / 100) < 0.02
    assert mp.split_key("deb/src/page7/002") == "src/page7"
    assert mp.split_key("gen/news/000001") is None


def test_missing_packages_stop_with_the_exact_command(tmp_path, capsys):
    assert mp.APT_COMMAND == ("apt-get download debian-handbook gnome-user-docs wordnet-base fortunes fortunes-de "
                              "fortunes-es manpages-fr manpages-de manpages-es manpages-it")
    with pytest.raises(mp.MissingProseSources, match=mp.APT_COMMAND):
        mp.load_prose(tmp_path)
    make_deb(tmp_path / "debian-handbook_1_all.deb", "debian-handbook", "1", {"usr/share/doc/x": b"x"})
    with pytest.raises(mp.MissingProseSources, match="apt-get download gnome-user-docs wordnet-base fortunes "):
        mp.load_prose(tmp_path)  # the command names only what is missing
    assert corpus_main(["--out", str(tmp_path / "c"), "--size", "tiny", "--prose", str(tmp_path), "--quiet"]) == 2
    assert "apt-get download gnome-user-docs wordnet-base fortunes " in capsys.readouterr().err
    assert not (tmp_path / "c" / "train.jsonl").exists()


def test_a_package_without_pages_is_named(tmp_path):
    make_deb(tmp_path / "debian-handbook_1_all.deb", "debian-handbook", "1", {"usr/share/doc/x": b"x"})
    with pytest.raises(ValueError, match="debian-handbook.*no .html pages"):
        mp.load_prose(tmp_path, sources=("debian-handbook",))


# --------------------------------------------------------------------------- in the corpus

@pytest.fixture(scope="module")
def corpus(prose):
    return mc.build_corpus(None, size="tiny", seed=0, progress=False, prose=prose)


def test_language_domains_are_mostly_real_prose(corpus):
    for domain in ("french", "german", "spanish", "italian"):
        chars = Counter()
        for doc in corpus.train + corpus.heldout:
            if doc.domain == domain:
                chars["real" if doc.id.startswith("deb/") else "synthetic"] += len(doc.text)
        assert chars["real"] > 0
        assert chars["synthetic"] <= mc.MAX_SYNTHETIC_SHARE * (chars["real"] + chars["synthetic"])
    english = [d for d in corpus.train + corpus.heldout if d.domain == "english"]
    assert any(d.id.startswith("deb/") for d in english) and any(not d.id.startswith("deb/") for d in english)


def test_no_page_is_in_training_in_one_language_and_held_out_in_another(corpus):
    split_of = {}
    for split in ("train", "heldout"):
        for doc in corpus.split(split):
            key = mp.split_key(doc.id)
            if key is not None:
                split_of.setdefault(key, set()).add(split)
    assert split_of and all(len(s) == 1 for s in split_of.values())
    held = {k for k, s in split_of.items() if s == {"heldout"}}
    assert held == {k for k in split_of if mp.is_heldout_page(*k.split("/", 1))}
    assert held  # the fixture has held-out pages


def test_written_corpus_records_sources_and_is_byte_identical(debs, tmp_path):
    a = mc.build_corpus(tmp_path / "a", size="tiny", seed=0, progress=False, prose=debs)
    mc.build_corpus(tmp_path / "b", size="tiny", seed=0, progress=False, prose=debs)
    for name in mc.FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    stats = json.loads((tmp_path / "a" / "stats.json").read_text())
    assert stats["environment"]["debian_packages"] == {name: "0.1-test" for name in mp.SOURCES}
    assert stats["sources"]["french"]["deb:debian-handbook"]["license"] == "GPL-2.0-or-later OR CC-BY-SA-3.0"
    assert stats["aligned_paragraphs"] == len(a.aligned) > 0
    back = mc.load_corpus(tmp_path / "a")
    assert back.aligned == a.aligned and back.train == a.train


def test_corpus_without_prose_is_unchanged_and_has_no_aligned_set():
    plain = mc.build_corpus(None, size="tiny", seed=0, progress=False, domains=["french"])
    assert plain.aligned == [] and not any(d.id.startswith("deb/") for d in plain.train + plain.heldout)


def test_v4_config_meets_the_spec():
    """configs/tiny-mixtral-v4.json (the proposal for issue 12's retraining): the same family as
    the demo model, fits 64 MB in bf16, reads the real prose, trains on CPU."""
    from pathlib import Path

    from moe_lab.model import count_params
    from moe_lab.train import load_config

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "tiny-mixtral-v4.json")
    a = cfg.model
    assert (a.n_experts, a.experts_per_token, a.rope_theta, a.vocab_size) == (8, 2, 1e6, 32000)
    assert a.n_kv_heads < a.n_heads and a.router_aux_loss_coef == 0.02
    assert 2 * count_params(a).total <= 64e6
    assert cfg.device == "cpu" and cfg.data.prose_dir and cfg.data.corpus_size == "full"
    assert set(cfg.data.domain_weights) == set(mc.DOMAINS)


def test_a_small_corpus_takes_the_same_pages_in_every_language_and_holds_some_out(prose):
    """Pages come in hash order, so a budget that takes only some of them takes the same ones
    in every language, with held-out pages among them."""
    firsts = {}
    for lang in ("en", "de", "es"):
        pages = []
        for doc_id, _, src in mp.prose_documents(prose, lang):
            key = mp.split_key(doc_id)
            if src == "debian-handbook" and key not in pages:
                pages.append(key)
        firsts[lang] = pages[:10]
    assert firsts["en"] == firsts["de"] == firsts["es"]
    assert any(mp.is_heldout_page(*k.split("/", 1)) for k in firsts["en"][:10])


def test_page_order_spreads_held_out_pages():
    pages = [f"page{i}" for i in range(500)]
    order = mp.page_order("src", pages)
    assert sorted(order) == sorted(pages) and order == mp.page_order("src", list(reversed(pages)))
    held = [mp.is_heldout_page("src", p) for p in order]
    share = sum(held) / len(held)
    for k in (13, 50, 120, 333):  # every prefix holds out its share, to within one page
        assert abs(sum(held[:k]) - k * share) <= 1


def test_two_versions_of_a_package_are_refused(tmp_path):
    make_prose_debs(tmp_path)
    make_deb(tmp_path / "gnome-user-docs_0.2-test_all.deb", "gnome-user-docs", "0.2-test", {"usr/share/x": b"x"})
    with pytest.raises(ValueError, match="2 versions of gnome-user-docs"):
        mp.load_prose(tmp_path)
