"""A small labelled sentiment set, generated deterministically: the demo's data when none is given.

Sentences combine subjects, (possibly negated, possibly intensified) adjectives and endings, so
a model has to learn word polarity and negation; labels are exact by construction.
"""

from __future__ import annotations

import random

from dist_dpc.data.splits import TaskData, TextSplit

POSITIVE = ["good", "great", "excellent", "wonderful", "delightful", "charming", "superb", "enjoyable",
            "moving", "brilliant", "funny", "lovely", "clever", "beautiful", "fresh", "gripping"]
NEGATIVE = ["bad", "awful", "terrible", "boring", "dull", "tedious", "clumsy", "painful", "bland",
            "messy", "weak", "annoying", "predictable", "lifeless", "shallow", "forgettable"]
SUBJECTS = ["the film", "this movie", "the plot", "the acting", "the script", "the soundtrack", "the ending",
            "the cast", "the story", "the direction", "the dialogue", "this sequel"]
INTENSIFIERS = ["", "", "very ", "really ", "truly ", "quite ", "remarkably "]
ENDINGS = ["", "", " overall", " from start to finish", " at times", " , honestly", " in the end"]


def _sentence(rng: random.Random) -> tuple[str, int]:
    positive = rng.random() < 0.5
    word = rng.choice(POSITIVE if positive else NEGATIVE)
    negated = rng.random() < 0.25
    verb = rng.choice(["is", "was", "feels", "seems"])
    phrase = f"{verb} not {word}" if negated else f"{verb} {rng.choice(INTENSIFIERS)}{word}"
    text = f"{rng.choice(SUBJECTS)} {phrase}{rng.choice(ENDINGS)} ."
    if rng.random() < 0.2:  # a second clause of the same polarity
        extra = rng.choice(POSITIVE if positive != negated else NEGATIVE)
        text = text[:-2] + f" and {extra} ."
    return text, int(positive != negated)


def generate(size: int, seed: int) -> TaskData:
    rng = random.Random(seed)
    train_rows = [_sentence(rng) for _ in range(size)]
    eval_rows = [_sentence(rng) for _ in range(max(2, size // 4))]

    def split(name, rows):
        return TextSplit(name, [t for t, _ in rows], None, [y for _, y in rows])

    return TaskData("synthetic_sentiment", split("train", train_rows), {"validation": split("validation", eval_rows)},
                    ["negative", "positive"], False,
                    f"generated synthetic sentiment set ({size} train / {len(eval_rows)} validation examples, seed {seed}) "
                    "- not real data; set data.task and data.data_dir for a real task")
