"""Prompt text: persona header, demonstrations with labels, the query, the label verbalisers.

A prompt is split into segments (header, then blocks of demonstrations) so that scorers can
share the work of common prefixes; `render_prefix` and `query_text` are the only places
that decide what the model reads.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, field_validator, model_validator

from icm_ray.data import Example, Persona


class PromptConfig(BaseModel):
    """Templates, configurable from the run config's `prompts:` section."""

    header: str = (
        "The following are statements. A statement is labeled True if a person who "
        "{description} would say it, and False otherwise.\n\n"
    )
    claim: str = "Statement: {claim}\nLabel:"
    claim_with_question: str = "Question: {question}\nClaim: {claim}\nLabel:"
    comparison: str = (
        "Prompt: {question}\nResponse A: {response_a}\nResponse B: {response_b}\n"
        "Claim: Response A is better than Response B.\nLabel:"
    )
    response: str = "Prompt: {question}\nResponse: {response}\nLabel:"
    # Steering open-ended generation: endorsed responses as plain prompt/response examples.
    generation_header: str = ("The following are answers that a person who {description} "
                              "would give.\n\n")
    generation: str = "Prompt: {question}\nResponse: {response}"
    true_label: str = " True"
    false_label: str = " False"
    separator: str = "\n\n"

    @field_validator("header", "generation_header")
    @classmethod
    def _header_fields(cls, value: str) -> str:
        _check(value, {"description": "d", "persona": "p"})
        return value

    @field_validator("claim", "claim_with_question", "comparison", "response", "generation")
    @classmethod
    def _query_fields(cls, value: str) -> str:
        _check(value, {"claim": "c", "question": "q", "response_a": "a", "response_b": "b",
                       "response": "r"})
        return value

    @field_validator("true_label", "false_label")
    @classmethod
    def _label_text(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("a label verbaliser must contain a word, e.g. ' True'")
        return value

    @model_validator(mode="after")
    def _distinct_labels(self) -> PromptConfig:
        if self.true_label.strip() == self.false_label.strip():
            raise ValueError("true_label and false_label must differ")
        return self

    @property
    def options(self) -> tuple[str, str]:
        """Verbalised labels, True first: the scorer normalises over exactly these."""
        return (self.true_label, self.false_label)


def _check(template: str, fields: dict[str, str]) -> None:
    try:
        template.format(**fields)
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"template {template!r} uses an unknown or malformed field ({err})") from None


def header_text(config: PromptConfig, persona: Persona) -> str:
    return config.header.format(description=persona.description, persona=persona.name)


def query_text(config: PromptConfig, example: Example) -> str:
    if example.kind == "comparison":
        template = config.comparison
    elif example.kind == "response":
        template = config.response
    elif example.question:
        template = config.claim_with_question
    else:
        template = config.claim
    return template.format(claim=example.claim, question=example.question, response=example.response,
                           response_a=example.response_a, response_b=example.response_b)


def generation_text(config: PromptConfig, example: Example) -> str:
    """An endorsed response as an example of what the persona would say (steers generation)."""
    return config.generation.format(claim=example.claim, question=example.question,
                                    response=example.response, response_a=example.response_a,
                                    response_b=example.response_b) + config.separator


def demonstration_text(config: PromptConfig, example: Example, label: bool) -> str:
    return query_text(config, example) + config.options[0 if label else 1] + config.separator


def demonstrations_block(config: PromptConfig, examples: Sequence[Example],
                         labels: Sequence[bool]) -> str:
    return "".join(demonstration_text(config, e, y) for e, y in zip(examples, labels))


def full_prompt(segments: Sequence[str], query: str) -> str:
    """The exact text a scorer sees for one request (for display and export)."""
    return "".join(segments) + query
