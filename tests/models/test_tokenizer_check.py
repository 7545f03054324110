"""models.loader.tokenizer_check: a tokenizer built into the wrong model type (transformers 5.17 turns Gemma-3's GGUF
tokenizer into a Unigram model that splits common words) is recognised; a right one, a small vocabulary and a
non-transformers object are not judged wrong."""

from __future__ import annotations

from sparseattn.models.loader import _PROBE_WORDS, tokenizer_check


class _Tok:
    """A minimal tokenizer: a vocabulary and a word -> pieces rule."""

    def __init__(self, marker: str, whole: tuple[str, ...], split_every: bool) -> None:
        self.marker, self.split = marker, split_every
        self.vocab = {marker + w: i for i, w in enumerate(whole)}
        self.pieces: list[str] = []

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        self.pieces = []
        for w in text.split()[1:]:
            tok = self.marker + w
            if tok in self.vocab and not self.split:
                self.pieces.append(tok)
            else:  # split into two pieces, as a mis-built model does
                self.pieces += [self.marker + w[:2], w[2:]]
        return {"input_ids": list(range(len(self.pieces)))}

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [self.pieces[i] for i in ids]


def test_a_tokenizer_that_splits_whole_words_is_flagged():
    bad = _Tok("\u2581", _PROBE_WORDS, split_every=True)
    reason = tokenizer_check(bad)
    assert reason is not None and reason.startswith(f"it splits {len(_PROBE_WORDS)} of {len(_PROBE_WORDS)} common words")
    assert "'startup'" in reason and "transformers" in reason


def test_right_small_and_foreign_tokenizers_pass():
    assert tokenizer_check(_Tok("\u2581", _PROBE_WORDS, split_every=False)) is None  # SentencePiece, built right
    assert tokenizer_check(_Tok("\u0120", _PROBE_WORDS, split_every=False)) is None  # byte-level BPE, built right
    assert tokenizer_check(_Tok("\u2581", _PROBE_WORDS[:2], split_every=True)) is None  # too few whole words to judge
    assert tokenizer_check(object()) is None  # not a transformers tokenizer
