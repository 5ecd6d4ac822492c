"""The one exact-match: SQuAD-style normalisation (lower-case, no punctuation, no articles,
collapsed whitespace), applied to the answer text up to its first newline."""

import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    text = text.split("\n", 1)[0].lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str | list[str]) -> bool:
    golds = [gold] if isinstance(gold, str) else gold
    pred = normalize_answer(prediction)
    return any(pred == normalize_answer(g) for g in golds)
