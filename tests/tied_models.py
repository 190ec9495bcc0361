"""Tiny fixture models with ties planted where top-k sets are cut, for the tests of the
selection paths (numpy on the host, torch where the weights are): rows made equal, inputs
zeroed so whole columns score 0, weights quantised to a few values; wide enough that some
modules take selection's sampled-bound route (>= 4 * 2**14 entries)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fixtures import build_model

KS = [0.001, 0.01, 0.05, 0.15, 0.6]  # 0.6: the cut falls inside the zero scores of a dead input
SAMPLED = 4 * 2 ** 14  # from here on selection takes the sampled bound (selection._candidates)
# wide enough that lm_head (llama) and c_fc (gpt2) have more than SAMPLED entries
SIZES = {"llama": dict(hidden_size=192, intermediate_size=384), "gpt2": dict(n_embd=160)}


def plant_ties(kind: str, model) -> None:
    """Weights whose scores tie exactly where the sets are cut."""
    with torch.no_grad():
        if kind == "llama":
            layers = model.model.layers
            q = layers[0].self_attn.q_proj.weight
            q.copy_(q[0].expand_as(q))  # every row the same: each column one run of equal scores
            layers[1].mlp.up_proj.weight[::2] = 0  # half of down_proj's inputs are 0: zero norms, zero scores
            head = model.lm_head.weight
            head[1::2] = head[::2]  # rows in equal pairs, in a sampled-size module
        else:
            blocks = model.transformer.h
            attn = blocks[0].attn.c_attn.weight  # Conv1D: in x out, so equal columns are equal scored rows
            attn[:, 1::2] = attn[:, ::2]
            fc = blocks[1].mlp.c_fc.weight  # quantised to 5 levels: runs of ties in a sampled-size module
            fc.copy_(torch.round(fc / fc.abs().max() * 2))


def build_tied(folder: Path) -> dict[str, Path]:
    """{kind: folder} of a tied llama (untied head) and a tied gpt2 (Conv1D modules)."""
    from transformers import AutoModelForCausalLM

    paths = {}
    for kind in ("llama", "gpt2"):
        path = build_model(kind, folder, **SIZES[kind])
        model = AutoModelForCausalLM.from_pretrained(path)
        plant_ties(kind, model)
        model.save_pretrained(path)
        paths[kind] = path
    return paths


def crowded_cuts(module_scores: np.ndarray, counts: list[int]) -> list[tuple[int, float]]:
    """(set size, score at the cut) for each of `counts` whose cut falls inside a run of
    equal scores: there the tie rule, not the score, decides who is in."""
    ranked = np.sort(module_scores.reshape(-1))[::-1]
    return [(c, float(ranked[c])) for c in counts if 0 < c < ranked.size and ranked[c - 1] == ranked[c]]
