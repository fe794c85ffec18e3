"""Choosing steering examples from a finished run: the k best for a persona and a query.

"Best" means: the most confident labels (probability of the label given all other labels),
ranked by relevance to an optional query text (TF-IDF cosine over words), optionally
balanced between True and False. The chosen examples become a ready-to-use prompt block.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

_WORD = re.compile(r"[a-z0-9']+")


@dataclass(frozen=True)
class SteeringExample:
    id: str
    text: str
    label: bool
    confidence: float
    demonstration: str
    kind: str = "claim"
    generation: str = ""  # kind "response": the endorsed answer as a plain prompt/response example

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> SteeringExample:
        return cls(row["id"], row["text"], bool(row["label"]), float(row["confidence"] or 0.0),
                   row["demonstration"], row.get("kind", "claim"), row.get("generation", ""))


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def relevance(query: str, texts: Sequence[str]) -> list[float]:
    """TF-IDF cosine similarity of each text to the query (0 when nothing is shared)."""
    documents = [Counter(_words(t)) for t in texts]
    frequency = Counter(word for doc in documents for word in doc)
    n = len(documents)

    def vector(counts: Counter) -> dict[str, float]:
        return {w: c * math.log((1 + n) / (1 + frequency.get(w, 0))) for w, c in counts.items()}

    q = vector(Counter(_words(query)))
    q_norm = math.sqrt(sum(v * v for v in q.values())) or 1.0
    scores = []
    for doc in documents:
        d = vector(doc)
        dot = sum(q.get(w, 0.0) * v for w, v in d.items())
        d_norm = math.sqrt(sum(v * v for v in d.values())) or 1.0
        scores.append(dot / (q_norm * d_norm))
    return scores


def select(examples: Sequence[SteeringExample], k: int, query: str | None = None,
           balance: bool = False) -> list[SteeringExample]:
    """The k examples to show: by relevance to `query` (ties and no query: by confidence)."""
    if k <= 0 or not examples:
        return []
    scores = relevance(query, [e.text for e in examples]) if query else [0.0] * len(examples)
    ranked = sorted(range(len(examples)), key=lambda i: (-scores[i], -examples[i].confidence,
                                                         examples[i].id))
    if not balance:
        return [examples[i] for i in ranked[:k]]
    by_label = {True: [i for i in ranked if examples[i].label],
                False: [i for i in ranked if not examples[i].label]}
    chosen: list[int] = []
    half_true = (k + 1) // 2
    chosen += by_label[True][:half_true]
    chosen += by_label[False][:k - len(chosen)]
    if len(chosen) < k:  # one label ran out: fill from the other
        rest = [i for i in ranked if i not in set(chosen)]
        chosen += rest[:k - len(chosen)]
    chosen.sort(key=ranked.index)
    return [examples[i] for i in chosen]


@dataclass
class PersonaEntry:
    """One persona's results as the API serves them."""

    name: str
    header: str
    summary: dict[str, Any]
    run: str
    examples: list[SteeringExample]
    prompts: Any = None  # the run's PromptConfig: new statements are rendered the same way
    generation_header: str = ""

    @property
    def generates(self) -> bool:
        """A persona of open-ended responses: its steering examples steer generation."""
        return any(e.kind == "response" for e in self.examples)


def load_run(uri: str) -> dict[str, PersonaEntry]:
    """The personas of one finished run (local directory or s3://)."""
    from icm_ray.data import Persona
    from icm_ray.errors import UserError
    from icm_ray.prompts import PromptConfig, header_text
    from icm_ray.store import open_store, safe_name

    store = open_store(uri)
    if not store.exists("summary.json"):
        raise UserError(f"{uri}: not a finished run (no summary.json)")
    summary = store.read_json("summary.json")
    inputs = store.read_json("inputs.json")
    entries = {}
    try:  # a run written by another version or edited by hand: say so in one line
        prompts = PromptConfig.model_validate(inputs["config"]["prompts"])
        for row in summary["personas"]:
            name = row["persona"]
            persona = Persona(name, inputs["personas"][name])
            rows = store.read_jsonl(f"steering_examples/{safe_name(name)}.jsonl")
            entries[name] = PersonaEntry(name, header_text(prompts, persona), row, uri,
                                         [SteeringExample.from_row(r) for r in rows], prompts,
                                         prompts.generation_header.format(description=persona.description,
                                                                          persona=name))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise UserError(f"{uri}: not a readable icm-ray run ({type(err).__name__}: {err})") from None
    return entries


def prompt_block(header: str, chosen: Sequence[SteeringExample]) -> str:
    """Persona header and demonstrations, ready to prepend to a query."""
    return header + "".join(e.demonstration for e in chosen)


def generation_block(entry: PersonaEntry, k: int, query: str | None = None) -> str:
    """For open-ended generation: the k endorsed responses most relevant to `query` (most
    confident first), as plain prompt/response examples under the persona's generation header."""
    endorsed = [e for e in entry.examples if e.kind == "response" and e.label]
    return entry.generation_header + "".join(e.generation for e in select(endorsed, k, query))
