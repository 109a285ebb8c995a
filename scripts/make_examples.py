"""Regenerate examples/*.jsonl: small, structured data that a tiny model learns in seconds.

Deterministic (seeded), so the examples in the repository are exactly what this prints.
Run: python scripts/make_examples.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "examples"

ANIMALS = ["cat", "dog", "horse", "bird", "fish", "cow", "sheep", "fox", "bear", "wolf", "duck", "goat"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "brown", "grey"]
PLACES = ["the garden", "the forest", "the river", "the field", "the barn", "the hill", "the lake"]
ACTIONS = ["sleeps", "runs", "eats", "plays", "waits", "sings", "rests", "hides"]
FRENCH = {
    "cat": "chat",
    "dog": "chien",
    "horse": "cheval",
    "bird": "oiseau",
    "fish": "poisson",
    "cow": "vache",
    "sheep": "mouton",
    "fox": "renard",
    "bear": "ours",
    "wolf": "loup",
    "duck": "canard",
    "goat": "chèvre",
    "red": "rouge",
    "blue": "bleu",
    "green": "vert",
    "yellow": "jaune",
    "black": "noir",
    "white": "blanc",
}


def stories(rng: random.Random, n: int) -> list[dict[str, str]]:
    out = []
    for _ in range(n):
        a, c, p, v = rng.choice(ANIMALS), rng.choice(COLORS), rng.choice(PLACES), rng.choice(ACTIONS)
        out.append({"text": f"The {c} {a} {v} in {p}. Every day the {a} {v} in {p} again."})
    return out


def arithmetic(rng: random.Random, n: int) -> list[dict[str, str]]:
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        out.append({"prompt": f"What is {a} plus {b}?\nAnswer:", "completion": f" {a + b}"})
    return out


def translations(rng: random.Random, n: int) -> list[dict[str, object]]:
    words = sorted(FRENCH)
    out = []
    for _ in range(n):
        w = rng.choice(words)
        out.append(
            {
                "messages": [
                    {"role": "system", "content": "You translate English words into French."},
                    {"role": "user", "content": f"Translate '{w}' into French."},
                    {"role": "assistant", "content": f"In French, '{w}' is '{FRENCH[w]}'."},
                ]
            }
        )
    return out


def main() -> None:
    rng = random.Random(7)
    OUT.mkdir(exist_ok=True)
    for name, rows in (
        ("stories.jsonl", stories(rng, 240)),
        ("arithmetic.jsonl", arithmetic(rng, 240)),
        ("french_chat.jsonl", translations(rng, 160)),
    ):
        with open(OUT / name, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        print(f"wrote {OUT / name}: {len(rows)} lines")


if __name__ == "__main__":
    main()
