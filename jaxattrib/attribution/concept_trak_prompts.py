"""Concept-TRAK's prompts: finding and removing a concept phrase, and concept relevance.

A concept query needs the prompt without the concept (c⁻ [paper]); :func:`remove_concept`
drops the phrase (whole words, case-insensitive), :func:`concept_queries` builds one
:class:`ConceptQuery` per concept and refuses a concept the prompt lacks (``ValueError``
naming both). Pure string functions; re-exported by :mod:`jaxattrib.attribution.concept_trak`.
"""

from __future__ import annotations

import re
from typing import NamedTuple, Sequence

import numpy as np


def _concept_pattern(concept: str) -> re.Pattern:
    words = concept.strip().split()
    if not words:
        raise ValueError(f"concept={concept!r}: empty concept")
    return re.compile(r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words) + r"(?!\w)",
                      re.IGNORECASE)


def has_concept(prompt: str, concept: str) -> bool:
    """Whether ``concept`` (a word or phrase) occurs in ``prompt`` as whole word(s)."""
    return bool(_concept_pattern(concept).search(prompt))


def remove_concept(prompt: str, concept: str) -> str:
    """``c⁻``: ``prompt`` with every whole-word occurrence of ``concept`` removed.

    ``remove_concept("a red circle on a blue background", "red")`` →
    ``"a circle on a blue background"``. Raises ``ValueError`` naming both when the prompt does
    not contain the concept.
    """
    pat = _concept_pattern(concept)
    if not pat.search(prompt):
        raise ValueError(f"prompt {prompt!r} does not contain the concept {concept!r}")
    return " ".join(pat.sub(" ", prompt).split())


class ConceptQuery(NamedTuple):
    """One (prompt, concept) to attribute; ``negative`` is ``c⁻``."""

    prompt: str
    concept: str
    negative: str


def concept_queries(prompt: str, concepts: Sequence[str] | str) -> list[ConceptQuery]:
    """One :class:`ConceptQuery` per concept of a (multi-concept) prompt, attributed separately."""
    concepts = [concepts] if isinstance(concepts, str) else list(concepts)
    if not concepts:
        raise ValueError(f"no concept given for prompt {prompt!r}")
    return [ConceptQuery(prompt, c, remove_concept(prompt, c)) for c in concepts]


def concept_relevance(train_prompts: Sequence[str], concepts: Sequence[str]) -> np.ndarray:
    """Ground truth ``[Q, N]`` bool: training prompt ``i`` contains concept ``q``."""
    return np.array([[has_concept(p, c) for p in train_prompts] for c in concepts], bool)


__all__ = ["ConceptQuery", "concept_queries", "concept_relevance", "has_concept", "remove_concept"]
