"""Three different jobs for the continual-training benchmark (scripts/bench_continual.py): arithmetic,
French chat and simple-English stories, generated from templates.

They differ in everything a tiny model can forget: the record shape (prompt/completion, messages, plain
text), the language, and what is predictable (a sum follows from its operands; a French answer from its
English words; a story's second half from its first). Each is learnable by the embedded model in a few
hundred steps, so training on the next one measurably undoes it. Deterministic: the same ``n`` and
``seed`` give the same rows, so every arm and round of the benchmark trains the very same files.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

Row = dict[str, Any]

ANIMALS = ["cat", "dog", "horse", "bird", "fish", "cow", "sheep", "fox", "bear", "wolf", "duck", "goat"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "grey"]
PLACES = ["the old mill", "the deep forest", "the quiet river", "the big farm", "the small village", "the hill"]
FRIENDS = ["Tom", "Anna", "Ben", "Lucy", "Sam", "Mia"]
THINGS = ["a red ball", "a blue hat", "a small key", "a green apple", "a wooden box", "a yellow kite"]
# English noun -> (French noun, feminine); English colour -> (masculine, feminine)
NOUNS_FR = {
    "cat": ("chat", False),
    "dog": ("chien", False),
    "horse": ("cheval", False),
    "bird": ("oiseau", False),
    "fish": ("poisson", False),
    "cow": ("vache", True),
    "house": ("maison", True),
    "apple": ("pomme", True),
    "book": ("livre", False),
    "moon": ("lune", True),
    "tree": ("arbre", False),
    "car": ("voiture", True),
    "flower": ("fleur", True),
    "table": ("table", True),
}
COLORS_FR = {
    "red": ("rouge", "rouge"),
    "blue": ("bleu", "bleue"),
    "green": ("vert", "verte"),
    "yellow": ("jaune", "jaune"),
    "black": ("noir", "noire"),
    "white": ("blanc", "blanche"),
    "grey": ("gris", "grise"),
}
GREETINGS = [
    ("Bonjour !", "Bonjour ! Comment allez-vous aujourd'hui ?"),
    ("Salut, ça va ?", "Ça va très bien, merci. Et vous ?"),
    ("Merci beaucoup.", "De rien, avec plaisir."),
    ("Bonne nuit.", "Bonne nuit et faites de beaux rêves."),
    ("Au revoir !", "Au revoir, à bientôt !"),
]


def arithmetic(n: int, seed: int) -> list[Row]:
    """``{"prompt": "12+7=", "completion": "19"}``: sums and differences of numbers up to 49."""
    rng = random.Random(f"arithmetic-{seed}")
    out: list[Row] = []
    for _ in range(n):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        if rng.random() < 0.5:
            out.append({"prompt": f"{a}+{b}=", "completion": str(a + b)})
        else:
            a, b = max(a, b), min(a, b)
            out.append({"prompt": f"{a}-{b}=", "completion": str(a - b)})
    return out


def french_chat(n: int, seed: int) -> list[Row]:
    """Short French conversations (messages): a word to translate, or a greeting to answer."""
    rng = random.Random(f"french-{seed}")
    nouns, colors = sorted(NOUNS_FR), sorted(COLORS_FR)
    out: list[Row] = []
    for _ in range(n):
        if rng.random() < 0.85:
            w, c = rng.choice(nouns), rng.choice(colors)
            noun, feminine = NOUNS_FR[w]
            article = "l'" if noun[0] in "aeiou" else "la " if feminine else "le "
            french = f"{article}{noun} {COLORS_FR[c][feminine]}"
            user, answer = f"Comment dit-on « the {c} {w} » en français ?", f"En français, on dit « {french} »."
        else:
            user, answer = rng.choice(GREETINGS)
        out.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]})
    return out


def stories(n: int, seed: int) -> list[Row]:
    """Two- to three-sentence stories in simple English (plain text, every token trained)."""
    rng = random.Random(f"stories-{seed}")
    out: list[Row] = []
    for _ in range(n):
        c, a, p = rng.choice(COLORS), rng.choice(ANIMALS), rng.choice(PLACES)
        f, t = rng.choice(FRIENDS), rng.choice(THINGS)
        text = f"Once upon a time a {c} {a} lived near {p}. One day {f} gave the {a} {t}."
        if rng.random() < 0.5:
            text += f" The {a} was very happy and kept {t} forever."
        out.append({"text": text})
    return out


# The benchmark's jobs, in the order they are trained.
JOBS: dict[str, Callable[[int, int], list[Row]]] = {
    "arithmetic": arithmetic,
    "french_chat": french_chat,
    "stories": stories,
}
