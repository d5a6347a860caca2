"""Build a small multi-domain text corpus for training a tiny Mixtral.

Why this exists: the Mixtral paper studies which expert each token is routed to
on different Pile subsets (code, English prose, DM Mathematics, other
languages, ...). To reproduce that kind of analysis on a toy model we need a
corpus whose domains are clearly distinct, that is assembled locally without
any network access, and that is byte-for-byte reproducible, so that two people
who run ``python -m moe_lab.corpus --out data/corpus --size full --seed 0``
train on the same text.

Every domain is either *read* from material that ships with Python or with the
project's pip dependencies (stdlib source, the Python reference manual text,
package docstrings and descriptions, translation catalogues, JSON files) or
*generated* from a seeded ``random.Random`` (maths questions, LaTeX documents,
JSON/CSV records, template sentences in French/German/Spanish/Italian). Nothing
is committed: the text is rebuilt on demand. See ``data/DATA_CARD.md``.
Building needs the ``corpus`` extra (``pip install 'moe_lab[corpus]'``: Faker,
Babel, the JupyterLab language packs); reading a built corpus does not.

The package, one module per concern::

    base.py           Document, Corpus, budgets (DOMAINS, SIZES, CHARS_PER_TOKEN), shared helpers
    python_source.py  domain "python": the standard library, cut at top-level statements
    english.py        domain "english": docstrings, the reference manual, package READMEs
    mathematics.py    domain "math": DM-Mathematics-style questions with exact answers
    languages.py      domains "french", "german", "spanish", "italian" (templates/*.json + catalogues)
    records.py        domain "data": JSON / CSV records and shipped JSON files
    latex.py          domain "latex": LaTeX documents with computed mathematics
    prose.py          real prose from downloaded Debian packages (--prose): paragraphs per language,
                      page-level held-out split, the paragraph-aligned set (stdlib only)
    build.py          build_corpus (domain registry SOURCES), write_corpus, load_corpus, sample_texts
    __main__.py       the command line

Output layout of ``build_corpus(out_dir=...)``::

    train.jsonl      one {"domain", "id", "text"} object per line
    heldout.jsonl    same, ~5% of documents (chosen by a hash of domain/id)
    parallel.jsonl   English/other-language sentence pairs from catalogues
    aligned.jsonl    the same paragraph in en/fr/de/es/it (with --prose; empty without it)
    stats.json       documents/characters per domain and split, sources, licences
"""

from .base import (  # noqa: F401
    CHARS_PER_TOKEN,
    DOMAINS,
    FILES,
    HELDOUT_PERCENT,
    MAX_DOC_CHARS,
    MAX_SYNTHETIC_SHARE,
    SIZES,
    Corpus,
    Document,
    Item,
)
from .build import (  # noqa: F401
    INSTALL_EXTRA,
    REQUIRES,
    SOURCES,
    build_corpus,
    check_extra,
    domain_items,
    is_heldout_document,
    load_corpus,
    sample_texts,
    write_corpus,
)
from .mathematics import math_item  # noqa: F401
from .prose import (  # noqa: F401
    APT_COMMAND,
    MissingProseSources,
    ProseSet,
    aligned_paragraphs,
    load_prose,
)
