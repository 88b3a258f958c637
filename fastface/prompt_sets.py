"""Prompt kinds and the prompt sets the protocol reports on (method-spec §6): their one home.

A prompt is ``realistic`` (a plain description) or ``stylistic`` (a style, then ``;``, then the
description). A prompt *set* is what a sweep runs and a report aggregates over: one kind, or
``joint`` = both kinds together (the paper's "joint" columns).
"""

from __future__ import annotations

from typing import Literal

PROMPT_KINDS: tuple[str, ...] = ("realistic", "stylistic")
PROMPT_SETS: dict[str, tuple[str, ...]] = {"realistic": ("realistic",), "stylistic": ("stylistic",),
                                           "joint": PROMPT_KINDS}
PromptSet = Literal["realistic", "stylistic", "joint"]


def set_kinds(prompt_set: str) -> tuple[str, ...]:
    """The prompt kinds a prompt set holds (``joint`` → both); a clear error for an unknown set."""
    try:
        return PROMPT_SETS[prompt_set]
    except KeyError:
        raise ValueError(f"unknown prompt set {prompt_set!r}; valid: {', '.join(PROMPT_SETS)}") from None


def _check() -> None:  # the Literal above is written out for type checkers; it must say what PROMPT_SETS says
    assert PromptSet.__args__ == tuple(PROMPT_SETS), (PromptSet.__args__, tuple(PROMPT_SETS))


_check()
