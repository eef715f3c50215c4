"""Pure text and number metrics of the evaluation protocol: Rouge-L and exact match as MiniLLM's
`rouge_metric.py` computes them, length buckets, mean/std over seeds and expected calibration error.

Rouge-L is `rouge_score`'s F-measure (its own tokenizer: lowercase, non-alphanumerics to spaces; Porter
stemmer on tokens longer than 3 characters), times 100, the maximum over a prompt's references.
Exact match follows the reference's normalisation, adapted from SQuAD v1.1 *without* dropping articles:
lowercase, delete ASCII punctuation (`string.punctuation`), collapse whitespace. `drop_articles=True`
gives the SQuAD rule (a/an/the removed) for comparison with other papers.
"""

from __future__ import annotations

import functools
import math
import re
import string
from typing import Sequence

import numpy as np
from jaxtyping import Bool, Float

# Gold-response lengths in tokens: [0, 5), [5, 10), [10, 20), [20, 50), [50, inf); the lower edges.
LENGTH_BUCKETS = (0, 5, 10, 20, 50)

_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


@functools.cache
def _scorer():
    """One scorer for the process: building it loads the stemmer."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _check_references(references: Sequence[str]) -> None:
    if isinstance(references, str) or not references:
        raise ValueError(f"references must be a non-empty list of strings, got {references!r}")


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """Rouge-L F-measure x 100 against the best-matching reference."""
    _check_references(references)
    scorer = _scorer()
    return 100.0 * max(scorer.score(target=ref, prediction=prediction)["rougeL"].fmeasure for ref in references)


def normalize_answer(text: str, *, drop_articles: bool = False) -> str:
    """Lowercase, delete punctuation, collapse whitespace (and drop a/an/the if asked)."""
    text = text.lower().translate(_PUNCTUATION)
    if drop_articles:
        text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, references: Sequence[str], *, drop_articles: bool = False) -> float:
    """100 if the normalised prediction equals some normalised reference, else 0."""
    _check_references(references)
    target = normalize_answer(prediction, drop_articles=drop_articles)
    return 100.0 * any(target == normalize_answer(ref, drop_articles=drop_articles) for ref in references)


def score(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean Rouge-L and exact match over a set (both x 100)."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists (need equal, > 0)")
    return {"rouge_l": float(np.mean([rouge_l(p, r) for p, r in zip(predictions, references)])),
            "exact_match": float(np.mean([exact_match(p, r) for p, r in zip(predictions, references)]))}


def distinct_ngrams(tokens: Sequence, n: int = 4) -> float | None:
    """Dist-n of one response (MiniLLM's diversity table): the number of distinct n-grams over the number of
    n-gram positions, N / (L - n + 1), in [0, 1]; None when the response is shorter than n."""
    if n < 1:
        raise ValueError(f"n={n} must be >= 1")
    tokens = list(tokens)
    positions = len(tokens) - n + 1
    if positions < 1:
        return None
    return len({tuple(tokens[i:i + n]) for i in range(positions)}) / positions


def dist_n(responses: Sequence[Sequence], n: int = 4) -> float | None:
    """Dist-n x 100 of a set: the mean of each response's `distinct_ngrams` (responses shorter than n are left
    out; None when every one is). Tokens are whatever the items are (the evaluation passes generated ids)."""
    values = [v for v in (distinct_ngrams(r, n) for r in responses) if v is not None]
    return 100.0 * float(np.mean(values)) if values else None


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for one value): the spread between seeds."""
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def bucket_means(values: Sequence[float], lengths: Sequence[int], edges: Sequence[int] = LENGTH_BUCKETS) -> list[dict]:
    """Mean of `values` grouped by `lengths` into [edges[i], edges[i+1]) and a last open bucket; an empty
    bucket reports count 0 and mean None."""
    edges = [int(e) for e in edges]
    if not edges or edges != sorted(set(edges)):
        raise ValueError(f"length bucket edges {edges}: expected increasing integers")
    values, lengths = np.asarray(values, np.float64), np.asarray(lengths)
    rows = []
    for low, high in zip(edges, edges[1:] + [None]):
        inside = (lengths >= low) & (lengths < high if high is not None else True)
        count = int(inside.sum())
        rows.append({"bucket": f"[{low}, {high if high is not None else 'inf'})", "low": low, "high": high,
                     "count": count, "mean": float(values[inside].mean()) if count else None})
    return rows


def expected_calibration_error(confidences: Float[np.ndarray, " N"], correct: Bool[np.ndarray, " N"],
                               n_bins: int = 10) -> float:
    """ECE (Guo et al. 2017): sum over equal-width bins ((k-1)/n, k/n] of |bin| / N * |accuracy - confidence|;
    a confidence of exactly 0 falls in the first bin."""
    confidences, correct = np.asarray(confidences, np.float64), np.asarray(correct, np.float64)
    if confidences.shape != correct.shape or confidences.ndim != 1 or not len(confidences):
        raise ValueError(f"confidences {confidences.shape} and correct {correct.shape}: expected equal, 1-D, non-empty")
    if n_bins < 1 or ((confidences < 0) | (confidences > 1)).any():
        raise ValueError(f"n_bins={n_bins} must be >= 1 and confidences in [0, 1]")
    edges = np.arange(n_bins + 1) / n_bins  # exact k / n, so a confidence of 0.3 lands in (0.2, 0.3]
    bins = np.clip(np.searchsorted(edges, confidences, side="left") - 1, 0, n_bins - 1)
    error = 0.0
    for b in range(n_bins):
        inside = bins == b
        if inside.any():
            error += inside.mean() * abs(correct[inside].mean() - confidences[inside].mean())
    return float(error)


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN: undefined numbers (an exposure-bias ratio over 0) become null."""
    return float(value) if math.isfinite(value) else None
