"""Mixtral 8x7B tokenizer: a thin, inspectable wrapper around SentencePiece.

Mixtral 8x7B uses Mistral's "v1" SentencePiece BPE model: 32000 pieces, ``<unk>`` = 0,
``<s>`` (BOS) = 1, ``</s>`` (EOS) = 2, and 256 byte-fallback pieces ``<0x00>``..``<0xFF>``
at ids 3..258, so any text can be encoded without producing ``<unk>``.

We wrap ``sentencepiece`` directly (rather than going through mistral-common or
transformers) because it is the original implementation, it is fast, and it lets the
notebooks look at individual pieces. The tests check that the ids are identical to
mistral-common (Mistral's reference encoder) and to a transformers tokenizer built from
the same file.

The model file is the copy shipped inside the ``mistral-common`` package
(``mistral_common/data/tokenizer.model.v1``), byte-identical to the hub's
``tokenizer.model`` for Mixtral-8x7B-Instruct-v0.1, so nothing is downloaded.

Example::

    >>> tok = load_tokenizer()
    >>> ids = tok.encode("Hello world")
    >>> ids, tok.pieces(ids)
    ([1, 22557, 1526], ['<s>', '▁Hello', '▁world'])
"""

from __future__ import annotations

import hashlib
import importlib.resources
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

__all__ = [
    "V1_SHA256",
    "Tokenizer",
    "default_model_path",
    "load_tokenizer",
    "sha256_of",
]

#: sha256 of Mistral's v1 SentencePiece model (the one Mixtral 8x7B uses).
V1_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"

#: File names looked for, in order, when ``load_tokenizer`` is given a directory.
MODEL_FILENAMES = ("tokenizer.model", "tokenizer.model.v1")

# How ``Tokenizer.pieces`` displays non-printable characters (see its docstring).
_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(text: str) -> str:
    """Replace non-printable characters by Python-style escapes; keep everything else."""
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(f"\\x{ord(ch):02X}" if ord(ch) < 0x100 else f"\\u{ord(ch):04X}")
    return "".join(out)


def default_model_path() -> Path:
    """Path of the v1 model shipped inside the installed ``mistral-common`` package."""
    return Path(str(importlib.resources.files("mistral_common").joinpath("data", "tokenizer.model.v1")))


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _resolve_model_file(path: str | Path) -> Path:
    """Turn a file-or-directory argument into the model file, or raise FileNotFoundError."""
    path = Path(path).expanduser()
    if path.is_dir():
        for name in MODEL_FILENAMES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(
            f"no tokenizer model in directory {str(path)!r}: looked for {', '.join(MODEL_FILENAMES)}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer model file not found: {str(path)!r}")
    return path


def load_tokenizer(path: str | Path | None = None, *, expected_sha256: str | None = None) -> Tokenizer:
    """Load the Mixtral tokenizer.

    Args:
        path: ``None`` (default) for the v1 model shipped with mistral-common, whose
            sha256 is always checked against :data:`V1_SHA256`. Otherwise a
            ``tokenizer.model`` file, or a directory holding ``tokenizer.model`` (or
            ``tokenizer.model.v1``), e.g. a downloaded hub snapshot.
        expected_sha256: optionally check a ``path``'s file against this hash too.

    Raises:
        FileNotFoundError: the file, or a model file inside the directory, is missing.
        ValueError: the checksum does not match, or the file is not a SentencePiece model.
    """
    if path is None:
        model_file = default_model_path()
        if not model_file.is_file():
            raise FileNotFoundError(f"mistral-common does not ship {str(model_file)!r}; is it installed?")
        expected_sha256 = expected_sha256 or V1_SHA256
    else:
        model_file = _resolve_model_file(path)
    if expected_sha256 is not None:
        found = sha256_of(model_file)
        if found != expected_sha256.lower():
            raise ValueError(
                f"sha256 mismatch for {str(model_file)!r}: expected {expected_sha256}, found {found}"
            )
    return Tokenizer(model_file)


def _as_id_list(ids: Any) -> list[int]:
    """Accept a list/tuple of ints or a 1-D torch tensor / numpy array; return a list of ints."""
    if hasattr(ids, "tolist") and hasattr(ids, "ndim"):  # torch.Tensor, numpy.ndarray
        if ids.ndim != 1:
            raise ValueError(f"expected a 1-D sequence of token ids, got shape {tuple(ids.shape)}")
        if "int" not in str(ids.dtype):
            raise TypeError(f"token ids must be integers, got dtype {ids.dtype}")
        return ids.tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise TypeError(f"expected a sequence of token ids, got {type(ids).__name__}")
    out = []
    for i in ids:
        if isinstance(i, bool) or not hasattr(i, "__index__"):  # accepts int, numpy ints
            raise TypeError(f"token ids must be integers, got {i!r} ({type(i).__name__})")
        out.append(int(i))
    return out


class Tokenizer:
    """Mixtral SentencePiece tokenizer (see the module docstring).

    Attributes:
        path: the model file it was loaded from.
        sha256: sha256 of that file.
        vocab_size, bos_id, eos_id, unk_id: from the model (32000, 1, 2, 0 for v1).
    """

    def __init__(self, model_file: str | Path):
        model_file = Path(model_file)
        data = model_file.read_bytes()  # FileNotFoundError names the path
        self._init_from_proto(data, str(model_file))

    def _init_from_proto(self, data: bytes, path: str) -> None:
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(data)
        except Exception as e:  # sentencepiece raises RuntimeError / OSError on garbage
            raise ValueError(f"{path!r} is not a valid SentencePiece model: {e}") from e
        if sp.get_piece_size() == 0:
            raise ValueError(f"{path!r} is not a valid SentencePiece model: it has no pieces")
        self._sp = sp
        self._proto = data
        self.path = path
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.vocab_size: int = sp.get_piece_size()
        self.bos_id: int = sp.bos_id()
        self.eos_id: int = sp.eos_id()
        self.unk_id: int = sp.unk_id()

    # Pickling: SentencePieceProcessor is a C++ object, so ship the model bytes instead
    # (e.g. for DataLoader workers or multiprocessing).
    def __getstate__(self) -> dict:
        return {"proto": self._proto, "path": self.path}

    def __setstate__(self, state: dict) -> None:
        self._init_from_proto(state["proto"], state["path"])

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, unk_id={self.unk_id}, sha256={self.sha256[:12]}...)"
        )

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Encode one string to ids, with ``<s>`` first (``bos``) and ``</s>`` last (``eos``).

        SentencePiece prepends a "dummy prefix" space, so the first word is encoded like a
        word after a space (``"Hello"`` -> ``"▁Hello"``), and a text that really starts
        with a space gets an extra ``"▁"`` (``" Hello"`` -> ``"▁"``, ``"▁Hello"``), as in
        mistral-common and in the model's training data.
        Text such as ``"<s>"`` or ``"[INST]"`` is encoded as plain characters, never as
        control tokens.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._sp.encode(text, add_bos=bos, add_eos=eos)

    def encode_batch(self, texts: Sequence[str], bos: bool = True, eos: bool = False) -> list[list[int]]:
        """Encode many strings at once (SentencePiece's multi-threaded batch encode)."""
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"encode_batch expects strings, item {i} is {type(t).__name__}")
        return self._sp.encode(texts, add_bos=bos, add_eos=eos)

    def _check_ids(self, ids: Any) -> list[int]:
        ids = _as_id_list(ids)
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is out of range for vocab_size {self.vocab_size}")
        return ids

    def decode(self, ids: Any) -> str:
        """Decode ids (list, tuple, or 1-D tensor/ndarray of ints) to text.

        Control tokens (``<s>``, ``</s>``) are dropped, as in mistral-common. Byte-fallback
        tokens are joined back into UTF-8; an incomplete byte sequence (e.g. half an
        emoji) decodes to U+FFFD. Decoding is lossless for any text except one containing
        the marker character ``"▁"`` itself, which SentencePiece reads as a space.
        """
        return self._sp.decode(self._check_ids(ids))

    def pieces(self, ids: Any, raw: bool = False) -> list[str]:
        """One display string per token id, for tables and visualisations.

        Display conventions (``raw=False``), chosen so every token is visible on one line:

        * The SentencePiece word marker ``"▁"`` (U+2581) is kept as-is: it shows which
          tokens start a new word, and a run of spaces stays visible (``"▁▁▁"``).
        * Non-printable characters are shown as Python-style escapes: newline as ``"\\n"``
          (a backslash and an ``n``), tab as ``"\\t"``, carriage return as ``"\\r"``,
          other control characters as ``"\\xNN"`` or ``"\\uNNNN"``. This applies both to
          byte-fallback pieces (``<0x0A>`` -> ``"\\n"``) and to ordinary pieces that
          contain such characters (the vocabulary has e.g. ``");\\r"``).
        * Byte-fallback pieces for non-ASCII bytes (fragments of a UTF-8 character that is
          not in the vocabulary, e.g. a rare emoji) are shown as ``"\\xNN"`` (``"\\xF0"``).
        * Control tokens are shown as-is: ``"<s>"``, ``"</s>"``, ``"<unk>"``.

        ``raw=True`` returns SentencePiece's own piece strings (``"<0x0A>"``, ``");\\r"``).
        """
        ids = self._check_ids(ids)
        sp = self._sp
        if raw:
            return [sp.id_to_piece(i) for i in ids]
        out = []
        for i in ids:
            piece = sp.id_to_piece(i)
            if sp.is_byte(i):
                byte = int(piece[3:5], 16)  # "<0x0A>" -> 10
                out.append(_escape(chr(byte)) if byte < 0x80 else f"\\x{byte:02X}")
            elif sp.is_control(i) or sp.is_unknown(i):
                out.append(piece)
            else:
                out.append(_escape(piece))
        return out

    # ------------------------------------------------------------------ chat

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Encode a conversation in the Mixtral-Instruct v1 format.

        ``messages`` is a list of ``{"role": ..., "content": ...}`` dicts: an optional
        ``"system"`` message first, then ``"user"`` and ``"assistant"`` messages
        alternating, starting with ``"user"``. It may end with either role: end with a
        user message to prompt the model for an answer, or with an assistant message for
        a complete (training) transcript. Layout::

            <s>[INST] {system}\\n\\n{user 1} [/INST] {answer 1}</s>[INST] {user 2} [/INST]

        The ids are identical to mistral-common's v1 encoding, which (and so we) encodes
        each user turn ``"[INST] {content} [/INST]"`` as one SentencePiece call, and each
        answer as a separate call followed by ``</s>``. The space between ``[/INST]`` and
        the answer therefore comes from SentencePiece's dummy prefix, and ``[INST]`` /
        ``[/INST]`` are ordinary text tokens (v1 has no control tokens for them). An empty
        system prompt adds nothing, as in mistral-common.

        Raises:
            ValueError: unknown role, misplaced system message, roles that do not
                alternate, a conversation that starts with an assistant, or an empty
                assistant message.
            TypeError: a message that is not a dict with string content.
        """
        if isinstance(messages, Mapping) or not isinstance(messages, Sequence) or not messages:
            raise ValueError("encode_chat expects a non-empty list of {'role', 'content'} dicts")
        for k, m in enumerate(messages):
            if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
                raise TypeError(f"message {k} must be a dict with 'role' and 'content', got {m!r}")
            if not isinstance(m["content"], str):
                raise TypeError(f"message {k} content must be a str, got {type(m['content']).__name__}")
            if m["role"] not in ("system", "user", "assistant"):
                raise ValueError(f"message {k} has unknown role {m['role']!r} (system/user/assistant)")

        system = ""
        turns = list(messages)
        if turns[0]["role"] == "system":
            system = turns.pop(0)["content"]
        if not turns:
            raise ValueError("a conversation needs at least one user message after the system message")
        offset = len(messages) - len(turns)
        for k, m in enumerate(turns):
            expected = "user" if k % 2 == 0 else "assistant"
            if m["role"] != expected:
                where = "first" if k == 0 else f"after a {turns[k - 1]['role']} message"
                raise ValueError(
                    f"message {k + offset} has role {m['role']!r} but {expected!r} was expected {where}: "
                    "after an optional first system message, roles must alternate user, assistant, user, ..."
                )
            if expected == "assistant" and not m["content"]:
                raise ValueError(f"message {k + offset}: assistant content must not be empty")

        ids = [self.bos_id]
        for k, m in enumerate(turns):
            if m["role"] == "user":
                content = m["content"]
                if k == 0 and system:
                    content = f"{system}\n\n{content}"
                ids += self.encode(f"[INST] {content} [/INST]", bos=False)
            else:
                ids += self.encode(m["content"], bos=False, eos=True)
        return ids
