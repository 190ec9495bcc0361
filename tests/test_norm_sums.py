"""Per-sample norms are summed in float64 (README, "The method, exactly").

An outlier feature, as in LLMs' massive activations: one sample's norm is 2**22 and the
others' are below a quarter, so a float32 running sum (spacing 0.5 at 2**22) drops
every later sample while a float64 one keeps them: the stored norm then differs from a
float64 reference by about 2e-5 relative instead of by float32 rounding (6e-8)."""

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoTokenizer

from mlarch.ingest.scoring import run_pass, scored_modules

OUTLIER = 2.0 ** 22
SAMPLES = 2000


class Toy(nn.Module):
    """Token embedding -> one linear layer: its input is the embedding rows, known exactly."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.embed_tokens = nn.Embedding.from_pretrained(table, freeze=True)
        self.proj = nn.Linear(table.shape[1], 2, bias=False)

    def get_input_embeddings(self):
        return self.embed_tokens

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return self.proj(self.embed_tokens(input_ids))


@pytest.mark.parametrize("batch_size", [1, 2])
def test_norms_are_summed_in_float64(model_dir, batch_size):
    tokenizer = AutoTokenizer.from_pretrained(model_dir["gpt2"])  # no special tokens added
    (outlier,) = tokenizer("!")["input_ids"]
    rng = np.random.default_rng(0)
    table = np.empty((len(tokenizer), 3), np.float32)
    table[:, 0] = rng.uniform(0.005, 0.02, len(table))  # small: a sample's norm stays below 0.1
    table[:, 1:] = rng.normal(size=(len(table), 2))
    table[outlier, 0] = OUTLIER
    words = "the river runs slowly through old town in spring many birds return each year".split()
    texts = ["!"] + [" ".join(rng.choice(words, int(rng.integers(1, 6)))) for _ in range(SAMPLES - 1)]
    model = Toy(torch.from_numpy(table))
    (module,) = scored_modules(model)
    result = run_pass(model, tokenizer, [module], texts, batch_size=batch_size, max_length=64,
                      device=torch.device("cpu"))

    ids = tokenizer(texts)["input_ids"]
    assert ids[0] == [outlier] and all(outlier not in seq for seq in ids[1:])
    assert result.n_tokens == sum(map(len, ids))
    per_sample = np.array([np.sqrt((table[seq].astype(np.float64) ** 2).sum(axis=0)) for seq in ids])
    expected = per_sample.sum(axis=0)
    # the case is real: the later samples add more than float32 can hold beside the outlier
    dropped = per_sample[1:, 0].sum()
    assert dropped / expected[0] > 1e-5 and per_sample[1:, 0].max() < np.spacing(np.float32(OUTLIER)) / 2
    np.testing.assert_allclose(result.norms["proj"], expected, rtol=2e-6)
