"""The toy pair's whole language: its words, and prompts put in the one form its models were trained on.

The toy models saw only prompts of the form "a <colour> <shape> moving <direction>" (toy/data.py),
tokenized word by word. A prompt in any other spelling ("Red circle, moving LEFT.") means the same
video, so it is put in that form first; a word outside the vocabulary ("purple", "cat") would reach
the model as <unk> and give a near-black video, so it is refused with the vocabulary instead.
Pure Python: the CLI checks prompts before torch is imported.
"""
from __future__ import annotations

import re

from flowblend.errors import FlowblendError

COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
FILLER_WORDS = ("a", "moving")
ARTICLES = ("a", "an", "the")  # all read as "a", the only article of the training prompts
VOCAB = ("<pad>", "<unk>") + FILLER_WORDS + COLOURS + SHAPES + DIRECTIONS
EXAMPLE = "a red circle moving left"
# `flowblend demo`'s defaults: every direction, three shapes, four colours
DEMO_PROMPTS = ("a red circle moving left", "a blue square moving up",
                "a green triangle moving right", "a yellow circle moving down")
DEMO_PLANS = ("LLL", "LSL:0.4,0.2", "SSS")


def vocabulary_line() -> str:
    """One line naming every word the toy pair knows (README, --help and error messages)."""
    return (f"colours {', '.join(COLOURS)}; shapes {', '.join(SHAPES)}; directions {', '.join(DIRECTIONS)} "
            f"(e.g. \"{EXAMPLE}\"; case, punctuation and a/an/the are ignored)")


def words(prompt: str) -> list[str]:
    """Lower-case words without punctuation, every article read as "a". Letters are Unicode letters, so that
    "ünïcödé" is one (unknown) word, named as typed, not the ASCII pieces "n, c, d"."""
    return ["a" if w in ARTICLES else w for w in re.findall(r"[^\W\d_]+", prompt.lower())]


def unknown_words(prompt: str) -> list[str]:
    return [w for w in words(prompt) if w not in VOCAB[2:]]


def check_words(prompt: str, what: str = "prompt") -> None:
    """FlowblendError listing the vocabulary if `prompt` has a word the toy models never saw."""
    unknown = unknown_words(prompt)
    if unknown:
        raise FlowblendError(f"toy {what} {prompt.strip()!r}: unknown word(s) {', '.join(dict.fromkeys(unknown))}; "
                             f"the toy pair knows {vocabulary_line()}")


def normalise_prompt(prompt: str, negative: bool = False) -> str:
    """`prompt` in the training form "a <colour> <shape> moving <direction>"; FlowblendError if it is not one.

    A negative prompt only has to use known words; it is returned lower-cased without punctuation.
    """
    what = "negative prompt" if negative else "prompt"
    check_words(prompt, what)
    found = words(prompt)
    if negative:
        return " ".join(found)
    picks = {name: [w for w in found if w in options]
             for name, options in (("colour", COLOURS), ("shape", SHAPES), ("direction", DIRECTIONS))}
    wrong = [f"{len(p)} {name}s ({', '.join(p)})" if p else f"no {name}" for name, p in picks.items() if len(p) != 1]
    if wrong:
        raise FlowblendError(f"toy prompt {prompt.strip()!r} has {' and '.join(wrong)}: give one colour, one shape "
                             f"and one direction; the toy pair knows {vocabulary_line()}")
    return f"a {picks['colour'][0]} {picks['shape'][0]} moving {picks['direction'][0]}"
