"""Stable, colour-blind-safe colours and marker shapes per language code.

The same language gets the same colour in every chart. Known codes use Okabe-Ito first,
then Paul Tol's muted palette; any other code gets a fallback picked by a hash of its
name, so it is the same on every run and machine.
"""

from __future__ import annotations

import hashlib

# Okabe-Ito (without yellow, which vanishes on white), then Tol muted.
LANGUAGE_COLORS = {
    "en": "#0072B2",  # blue
    "de": "#E69F00",  # orange
    "fr": "#009E73",  # bluish green
    "hi": "#D55E00",  # vermillion
    "bn": "#CC79A7",  # reddish purple
    "zh": "#56B4E9",  # sky blue
    "es": "#000000",  # black
    "ru": "#882255",  # wine
    "ja": "#44AA99",  # teal
    "sw": "#999933",  # olive
    "te": "#332288",  # indigo
    "th": "#CC6677",  # rose
    "ar": "#117733",  # green
}
FALLBACK_COLORS = ["#88CCEE", "#DDCC77", "#AA4499", "#661100", "#6699CC", "#888888", "#1D4F60", "#B07AA1"]

SHAPES = ["circle", "square", "triangle-up", "diamond", "triangle-down", "cross", "triangle-right",
          "triangle-left"]
LANGUAGE_SHAPES = {lang: SHAPES[i % len(SHAPES)] for i, lang in enumerate(LANGUAGE_COLORS)}

# Language pairs are not languages: they take colours in order from this list (Tol
# muted, then Okabe-Ito), with marker shapes cycling so that repeats stay distinct.
PAIR_COLORS = ["#332288", "#E69F00", "#44AA99", "#CC6677", "#0072B2", "#999933", "#AA4499", "#117733",
               "#D55E00", "#88CCEE", "#882255", "#000000"]

CHANCE_COLOR = "#666666"
NEUTRAL = "#4D4D4D"
ABSENT = "#DDDDDD"


def _digest(code: str) -> int:
    return int.from_bytes(hashlib.sha256(code.encode()).digest()[:4], "big")


def color(lang: str) -> str:
    """The colour of one language code (deterministic for unknown codes)."""
    return LANGUAGE_COLORS.get(lang) or FALLBACK_COLORS[_digest(lang) % len(FALLBACK_COLORS)]


def shape(lang: str) -> str:
    """The point shape of a language's lines: fixed for known languages, else derived from its code."""
    return LANGUAGE_SHAPES.get(lang) or SHAPES[_digest(lang) % len(SHAPES)]


def pair_color(index: int) -> str:
    """The colour of the index-th language pair's line (cycling through PAIR_COLORS)."""
    return PAIR_COLORS[index % len(PAIR_COLORS)]


def pair_shape(index: int) -> str:
    """The point shape of the index-th language pair, shifted each colour cycle so colour and shape pairs stay
    distinct."""
    return SHAPES[(index // len(PAIR_COLORS) + index) % len(SHAPES)]
