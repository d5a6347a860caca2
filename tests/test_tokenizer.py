"""Tests for moe_lab.tokenizer: ids must match mistral-common and transformers exactly."""

import hashlib
import pickle
import shutil

import numpy as np
import pytest
import torch

import moe_lab.tokenizer as tokmod
from moe_lab.tokenizer import Tokenizer, load_tokenizer

V1_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"

TEXTS = {
    "python": (
        "def fib(n: int) -> int:\n"
        '    """Return the n-th Fibonacci number."""\n'
        "    if n < 2:\n"
        "        return n\n"
        "    return fib(n - 1) + fib(n - 2)\n"
    ),
    "space_runs": "a    b  c\t\td   \n\n\n  e" + " " * 20 + "f",
    "leading_whitespace": "   indented line\n\ttabbed\n",
    "trailing_whitespace": "trailing spaces   \n\n",
    "windows_newlines": "int x = 1;\r\nreturn x;\r\n",
    "digits": "Pi is 3.14159265, 2**10 = 1024, year 2024, tel. +33 1 23 45 67 89",
    "emoji": "Party 🎉🦜😀 time 👩‍💻! 🫠",
    "accents": "Crème brûlée, naïve café, jalapeño, Ångström, Œuvre, ǅ",
    "french": "Le chat s'est assis sur le tapis. « Où est-il ? » demanda-t-elle.",
    "chinese": "我喜欢学习机器学习。混合专家模型很有趣！",
    "japanese": "日本語のテキストとカタカナ、ひらがな。",
    "arabic": "مرحبا بالعالم، كيف حالك؟",
    "russian": "Привет, мир! Как дела? Ёжик.",
    "mixed_scripts": "abcабв123你好xyz_ÿ\u200bz",
    "chat_markup_as_text": "<s>[INST] not special [/INST]</s>",
    "empty": "",
}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def mistral():
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.v1()


@pytest.fixture(scope="module")
def hf_tok(tok):
    """A transformers tokenizer built offline from the same SentencePiece file.

    transformers 5 converts a ``tokenizer.model`` only through protobuf (not installed
    here) and ``LlamaTokenizer(vocab_file=...)`` alone yields a 3-token vocab, so we
    extract vocab and scores with sentencepiece and give them to ``LlamaTokenizer``.
    Two details are needed to reproduce SentencePiece exactly:

    * merges ranked by piece *score*, not id: the whitespace pieces (``"▁▁"``, ids
      259/260...) have score -1e9, so SentencePiece merges them last
      (``"    return"`` -> ``"▁▁▁", "▁return"``); ranking by id gives ``"▁▁▁▁", "return"``.
    * Mixtral's hub ``tokenizer.json`` (legacy=True) normalizer ``Prepend("▁")`` +
      ``Replace(" ", "▁")`` with no pre-tokenizer. transformers 5's ``LlamaTokenizer``
      uses ``Metaspace(prepend_scheme="always")`` instead, which skips the dummy prefix
      when the text already starts with a space (``" x"`` would lose a ``"▁"``).
    """
    pytest.importorskip("transformers")
    from tokenizers import normalizers
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    sp = tok._sp
    n = sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    special = {sp.id_to_piece(i) for i in range(n) if sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)}
    scores = {p: sp.get_score(i) for p, i in vocab.items() if p not in special}
    merges = generate_merges(vocab, vocab_scores=scores, skip_tokens=special)
    hf = LlamaTokenizer(vocab=vocab, merges=merges, legacy=True, add_prefix_space=True, add_bos_token=True)
    backend = hf.backend_tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    return hf


# ---------------------------------------------------------------- the model file


def test_shipped_file_sha256(tok):
    path = tokmod.default_model_path()
    assert path.name == "tokenizer.model.v1" and path.parent.parent.name == "mistral_common"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == V1_SHA256
    assert tok.sha256 == V1_SHA256 and tokmod.V1_SHA256 == V1_SHA256


def test_special_ids(tok):
    assert (tok.vocab_size, len(tok), tok.bos_id, tok.eos_id, tok.unk_id) == (32000, 32000, 1, 2, 0)
    assert tok.pieces([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert "vocab_size=32000" in repr(tok) and "tokenizer.model.v1" in repr(tok)


def test_byte_fallback_pieces(tok):
    assert tok.pieces(range(3, 259), raw=True) == [f"<0x{b:02X}>" for b in range(256)]
    assert tok.pieces([259], raw=True) == ["▁▁"]  # first ordinary piece
    assert tok.decode([3 + 0xC3, 3 + 0xA9]) == "é"  # two UTF-8 bytes fused back into one character


def test_load_from_file_and_directory(tmp_path, tok):
    src = tokmod.default_model_path()
    shutil.copy(src, tmp_path / "tokenizer.model")
    assert load_tokenizer(tmp_path).encode("Bonjour") == tok.encode("Bonjour")
    assert load_tokenizer(tmp_path / "tokenizer.model", expected_sha256=V1_SHA256).path.endswith("tokenizer.model")
    v1_dir = tmp_path / "v1"
    v1_dir.mkdir()
    shutil.copy(src, v1_dir / "tokenizer.model.v1")
    assert load_tokenizer(str(v1_dir)).vocab_size == 32000


# ---------------------------------------------------------------- ids vs reference implementations


@pytest.mark.parametrize("name", TEXTS)
def test_ids_match_mistral_common(tok, mistral, name):
    text = TEXTS[name]
    ref = mistral.instruct_tokenizer.tokenizer
    assert tok.encode(text) == ref.encode(text, bos=True, eos=False)
    assert tok.encode(text, bos=False, eos=True) == ref.encode(text, bos=False, eos=True)


@pytest.mark.parametrize("name", TEXTS)
def test_ids_match_transformers(tok, hf_tok, name):
    text = TEXTS[name]
    # split_special_tokens: like SentencePiece, read "<s>" in the text as characters
    assert tok.encode(text) == hf_tok.encode(text, split_special_tokens=True)
    assert tok.decode(tok.encode(text)) == hf_tok.decode(tok.encode(text), skip_special_tokens=True)


def test_random_strings_match_transformers(tok, hf_tok):
    """Many short random strings over an alphabet rich in whitespace edge cases."""
    rng = np.random.default_rng(0)
    alphabet = list("ab xyz  \n\t\r12.,()é你😀🦜▁")
    texts = ["".join(rng.choice(alphabet, size=rng.integers(0, 25))) for _ in range(500)]
    ours = tok.encode_batch(texts)
    theirs = [hf_tok.encode(t) for t in texts]
    mismatched = [t for t, a, b in zip(texts, ours, theirs) if a != b]
    assert not mismatched
    # a literal "▁" in the text is read as a space marker, so it decodes to " "
    assert [tok.decode(ids) for ids in ours] == [t.replace("▁", " ") for t in texts]


def test_literal_word_marker_decodes_to_space(tok, mistral):
    """SentencePiece limitation: U+2581 in the input is indistinguishable from a space."""
    assert tok.encode("a▁b") == tok.encode("a b") == mistral.instruct_tokenizer.tokenizer.encode("a▁b", True, False)
    assert tok.decode(tok.encode("a▁b")) == "a b"


@pytest.mark.parametrize("name", TEXTS)
def test_roundtrip(tok, name):
    text = TEXTS[name]
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text  # control tokens are dropped


def test_markup_is_plain_text(tok):
    ids = tok.encode("<s>[INST]", bos=False)
    assert tok.bos_id not in ids and 3 not in ids  # neither BOS nor a byte piece
    assert "".join(tok.pieces(ids)) == "▁<s>[INST]"


def test_encode_batch(tok):
    texts = list(TEXTS.values())
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, bos=False, eos=True) == [tok.encode(t, bos=False, eos=True) for t in texts]
    assert tok.encode_batch([]) == []


def test_decode_accepts_tensors_and_arrays(tok):
    ids = tok.encode("Mixture of experts")
    text = "Mixture of experts"
    assert tok.decode(torch.tensor(ids)) == text
    assert tok.decode(np.array(ids, dtype=np.int32)) == text
    assert tok.decode(tuple(np.array(ids))) == text  # numpy scalar ints
    assert tok.pieces(torch.tensor(ids)) == tok.pieces(ids)


def test_pickle(tok):
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(TEXTS["python"]) == tok.encode(TEXTS["python"])
    assert clone.sha256 == tok.sha256 and clone.path == tok.path


# ---------------------------------------------------------------- pieces display


def test_pieces_display(tok):
    ids = tok.encode("Hello world\n  x;\r\n🦜")
    assert tok.pieces(ids, raw=True) == [
        "<s>", "▁Hello", "▁world", "<0x0A>", "▁", "▁x", ";\r", "<0x0A>",
        "<0xF0>", "<0x9F>", "<0xA6>", "<0x9C>",
    ]  # fmt: skip
    assert tok.pieces(ids) == [
        "<s>", "▁Hello", "▁world", "\\n", "▁", "▁x", ";\\r", "\\n",
        "\\xF0", "\\x9F", "\\xA6", "\\x9C",
    ]  # fmt: skip
    assert tok.pieces(tok.encode("\t", bos=False)) == ["▁", "\\t"]
    assert tok.pieces([2]) == ["</s>"]


def test_pieces_are_single_line_and_marker_kept(tok):
    displayed = tok.pieces(range(tok.vocab_size))
    assert all(p.isprintable() and p for p in displayed)  # nothing invisible or line-breaking
    raw = tok.pieces(range(tok.vocab_size), raw=True)
    starts_word = [r.startswith("▁") for r in raw]
    assert [d.startswith("▁") for d in displayed] == starts_word  # "▁" is never rewritten


# ---------------------------------------------------------------- chat format

FACTS_EXAMPLE = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2+2?"},
]
FACTS_EXAMPLE_IDS = [
    1, 733, 16289, 28793, 1739, 6817, 28723, 13, 13, 23809, 733, 28748, 16289, 28793, 22557, 28808, 2,
    733, 16289, 28793, 1824, 349, 28705, 28750, 28806, 28750, 28804, 733, 28748, 16289, 28793,
]  # fmt: skip


def test_chat_facts_example(tok):
    ids = tok.encode_chat(FACTS_EXAMPLE)
    assert ids == FACTS_EXAMPLE_IDS
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id


CONVERSATIONS = {
    "single_user": [{"role": "user", "content": "Explain MoE routing in one sentence."}],
    "system_single": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Bonjour !"},
    ],
    "multi_turn": [
        {"role": "user", "content": "Write fib in Python."},
        {"role": "assistant", "content": "def fib(n):\n    return n if n < 2 else fib(n-1) + fib(n-2)"},
        {"role": "user", "content": "Now in Rust?"},
        {"role": "assistant", "content": "fn fib(n: u64) -> u64 { if n < 2 { n } else { fib(n-1) + fib(n-2) } }"},
        {"role": "user", "content": "  And   with spaces\n\n"},
    ],
    "multi_turn_system": [
        {"role": "system", "content": "Answer in French.\nBe kind."},
        {"role": "user", "content": "How are you?"},
        {"role": "assistant", "content": "Très bien, merci ! 😀"},
        {"role": "user", "content": "日本語は？"},
    ],
    "empty_system": [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}],
    "ends_with_assistant": FACTS_EXAMPLE + [{"role": "assistant", "content": "4."}],
}


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_chat_matches_mistral_common(tok, name):
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    messages = CONVERSATIONS[name]
    # mistral-common's default ("test") mode rejects a final assistant message; its
    # finetuning mode requires one.
    mode = ValidationMode.finetuning if messages[-1]["role"] == "assistant" else ValidationMode.test
    ref = MistralTokenizer.from_file(tokmod.default_model_path(), mode=mode)
    expected = ref.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens
    ids = tok.encode_chat(messages)
    assert ids == expected
    assert (ids[-1] == tok.eos_id) == (messages[-1]["role"] == "assistant")


# ---------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    missing = tmp_path / "nope" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_tokenizer(missing)


def test_directory_without_model(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.model") as err:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(err.value)


@pytest.mark.parametrize("content", [b"", b"this is not a sentencepiece model\x00\xff" * 50])
def test_corrupt_file(tmp_path, content):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match="not a valid SentencePiece model") as err:
        load_tokenizer(bad)
    assert str(bad) in str(err.value)
    with pytest.raises(ValueError):
        load_tokenizer(tmp_path)  # same file found through its directory


def test_checksum_mismatch(tmp_path, monkeypatch):
    tampered = tmp_path / "tokenizer.model.v1"
    tampered.write_bytes(tokmod.default_model_path().read_bytes() + b"\x00")
    found = hashlib.sha256(tampered.read_bytes()).hexdigest()
    monkeypatch.setattr(tokmod, "default_model_path", lambda: tampered)
    with pytest.raises(ValueError, match="sha256 mismatch") as err:
        load_tokenizer()
    assert str(tampered) in str(err.value) and V1_SHA256 in str(err.value) and found in str(err.value)
    with pytest.raises(ValueError, match=found):
        load_tokenizer(tampered, expected_sha256=V1_SHA256)


@pytest.mark.parametrize("bad_id", [32000, -1, 10**9])
def test_out_of_range_ids(tok, bad_id):
    for fn in (tok.decode, tok.pieces):
        with pytest.raises(ValueError, match=rf"token id {bad_id} .*vocab_size 32000"):
            fn([1, 22557, bad_id])
    with pytest.raises(ValueError, match=str(bad_id)):
        tok.decode(torch.tensor([bad_id]))


def test_bad_id_types(tok):
    with pytest.raises(TypeError):
        tok.decode([1.5])
    with pytest.raises(TypeError):
        tok.decode("hello")
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


@pytest.mark.parametrize(
    "messages, match",
    [
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1 .*'user'.*'assistant'"),
        ([{"role": "assistant", "content": "hi"}], "message 0 .*'assistant'.*'user'"),
        ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "hi"}], "message 1"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "message 1 .*'system'"),
        ([{"role": "system", "content": "s"}], "at least one user"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}], "empty"),
        ([{"role": "tool", "content": "x"}], "unknown role 'tool'"),
        ([], "non-empty"),
    ],
)
def test_bad_chat(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.encode_chat(messages)


def test_bad_chat_types(tok):
    with pytest.raises(TypeError, match="message 0"):
        tok.encode_chat([{"role": "user"}])
    with pytest.raises(TypeError, match="content must be a str"):
        tok.encode_chat([{"role": "user", "content": None}])


def test_tokenizer_class_exported():
    assert isinstance(load_tokenizer(), Tokenizer)
