"""Tokens and noun lemmas for the caption metrics, offline.

The benchmarks' own scripts tokenise with nltk (`word_tokenize`, whose punkt data is a run-time
download) and singularise with pattern.en (CHAIR) or nltk's WordNet lemmatiser (AMBER). Here a
word is a run of letters and digits (hyphens inside a word keep it whole, as nltk does:
"hot-dog" is one token; an apostrophe splits: "dog's" -> "dog", "s"), and a noun's lemma comes
from lemminflect, whose lookup tables ship inside its wheel (no download at run time).
"""
from __future__ import annotations

import re
from functools import lru_cache

from lemminflect import getLemma

_WORD = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


def tokens(text: str) -> list[tuple[str, int, int]]:
    """The words of `text`, lowercased, each with its [start, end) character span."""
    return [(m.group(), m.start(), m.end()) for m in _WORD.finditer(text.lower())]


@lru_cache(maxsize=65536)
def noun_lemma(word: str) -> str:
    """The singular of `word` read as a noun ("dogs" -> "dog", "knives" -> "knife",
    "people" -> "people", "scissors" -> "scissors"); numbers and unknown shapes come back as is."""
    if not word.isalpha():
        return word
    lemmas = getLemma(word, upos="NOUN")
    return lemmas[0] if lemmas else word


def vocab_form(word: str, vocab) -> str:
    """`word`'s noun lemma, or the word itself where only the word is in `vocab` (a plural-only
    entry such as "skis" or "oxen" stays matched whatever the lemmatiser makes of it)."""
    lemma = noun_lemma(word)
    if lemma not in vocab and word in vocab:
        return word
    return lemma
