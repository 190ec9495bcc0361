-- mlarch catalog, schema version 1.
-- Tables hold what ingest writes; views answer the questions (see README "SQL contract").

CREATE TABLE models (
    model            VARCHAR PRIMARY KEY,  -- name in the archive (--name)
    source           VARCHAR NOT NULL,     -- REF as given: folder, .gguf file or hub id
    source_kind      VARCHAR NOT NULL,     -- 'folder' | 'gguf' | 'hub'
    revision         VARCHAR,              -- requested revision (hub)
    commit_sha       VARCHAR,              -- resolved hub commit, where known
    weights_sha256   VARCHAR NOT NULL,     -- digest over the weight files
    dtype            VARCHAR NOT NULL,     -- dtype the weights were scored in
    architecture     VARCHAR,
    n_modules        INTEGER NOT NULL,
    n_scored_params  BIGINT NOT NULL,
    magnitudes_group VARCHAR NOT NULL,     -- zarr group holding `magnitudes`: |W| of all modules, float32
    created_at       TIMESTAMP NOT NULL
);

CREATE TABLE modules (
    model    VARCHAR NOT NULL,
    module   VARCHAR NOT NULL,  -- qualified name from model.named_modules()
    layer    INTEGER,           -- transformer block index; NULL outside blocks
    kind     VARCHAR NOT NULL,  -- 'linear' | 'conv1d'
    n_rows   BIGINT NOT NULL,   -- out features (Conv1D weights are transposed to out x in)
    n_cols   BIGINT NOT NULL,   -- in features = length of the activation-norm vector
    n_params BIGINT NOT NULL,
    position     INTEGER NOT NULL,  -- order in model.named_modules()
    param_offset BIGINT NOT NULL,   -- start of this module in the per-parameter arrays (magnitudes, levels)
    norm_offset  BIGINT NOT NULL,   -- start of this module in the per-run norms array
    PRIMARY KEY (model, module)
);

CREATE TABLE runs (
    run_id        VARCHAR PRIMARY KEY,
    model         VARCHAR NOT NULL,
    lang          VARCHAR NOT NULL,
    role          VARCHAR NOT NULL,   -- 'math' | 'control'
    dataset       VARCHAR NOT NULL,
    seed          BIGINT NOT NULL,
    n_samples     BIGINT NOT NULL,
    n_tokens      BIGINT,
    status        VARCHAR NOT NULL,   -- 'RUNNING' | 'FINISHED' | 'FAILED'
    started_at    TIMESTAMP NOT NULL,
    finished_at   TIMESTAMP,
    n_truncated   BIGINT,
    k_values      DOUBLE[] NOT NULL,  -- ascending; level code j+1 means "in top-k_values[j]"
    config_digest VARCHAR NOT NULL,   -- identical configurations share it (rerun detection)
    in_use        BOOLEAN NOT NULL DEFAULT false,  -- the run the derived tables use
    arrays_group  VARCHAR NOT NULL,   -- zarr group holding `norms` and `levels` (modules concatenated)
    host          VARCHAR,            -- where a RUNNING run's process lives (gc spares live ones)
    pid           INTEGER,
    provenance    JSON
);

CREATE TABLE run_samples (
    run_id     VARCHAR NOT NULL,
    position   INTEGER NOT NULL,  -- order in which the sample was drawn
    item_index BIGINT NOT NULL,   -- 0-based index in the language's item list, file order
    PRIMARY KEY (run_id, position)
);

CREATE TABLE arrays (
    path    VARCHAR PRIMARY KEY,  -- inside arrays.zarr
    owner   VARCHAR NOT NULL,     -- run_id, or the model name for magnitudes
    kind    VARCHAR NOT NULL,     -- 'magnitudes' | 'norms' | 'levels'
    dtype   VARCHAR NOT NULL,
    shape   BIGINT[] NOT NULL,
    sha256  VARCHAR NOT NULL,     -- of the C-order array bytes
    nbytes  BIGINT NOT NULL       -- uncompressed
);

-- Math-only set sizes per (model, k, seed, lang, module): top-k(math) minus top-k(control).
CREATE TABLE selections (
    model          VARCHAR NOT NULL,
    k              DOUBLE NOT NULL,
    seed           BIGINT NOT NULL,
    lang           VARCHAR NOT NULL,
    module         VARCHAR NOT NULL,
    n_math_top     BIGINT NOT NULL,
    n_control_top  BIGINT NOT NULL,
    n_selected     BIGINT NOT NULL,
    math_run_id    VARCHAR NOT NULL,
    control_run_id VARCHAR NOT NULL,
    PRIMARY KEY (model, k, seed, lang, module)
);

-- Histogram of membership patterns: how many parameters of a module were selected by
-- exactly the languages in `langs` (sorted; empty pattern not stored).
CREATE TABLE patterns (
    model    VARCHAR NOT NULL,
    k        DOUBLE NOT NULL,
    seed     BIGINT NOT NULL,
    module   VARCHAR NOT NULL,
    langs    VARCHAR[] NOT NULL,
    n_params BIGINT NOT NULL
);

CREATE VIEW set_sizes AS
SELECT s.model, s.k, s.seed, s.lang, s.module, m.layer, m.n_params,
       s.n_math_top, s.n_control_top, s.n_selected, s.math_run_id, s.control_run_id
FROM selections s JOIN modules m ON m.model = s.model AND m.module = s.module;

CREATE VIEW selection_langs AS
SELECT DISTINCT model, k, seed, lang FROM selections;

CREATE VIEW lang_pairs AS
SELECT a.model, a.k, a.seed, a.lang AS lang_a, b.lang AS lang_b
FROM selection_langs a
JOIN selection_langs b ON a.model = b.model AND a.k = b.k AND a.seed = b.seed AND a.lang < b.lang;

CREATE VIEW overlap_by_module AS
SELECT p.model, p.k, p.seed, p.lang_a, p.lang_b, m.module, m.layer,
       coalesce(sum(q.n_params) FILTER (WHERE list_contains(q.langs, p.lang_a)
                                          AND list_contains(q.langs, p.lang_b)), 0)::BIGINT AS n_intersection,
       coalesce(sum(q.n_params) FILTER (WHERE list_contains(q.langs, p.lang_a)
                                          OR list_contains(q.langs, p.lang_b)), 0)::BIGINT AS n_union
FROM lang_pairs p
JOIN modules m ON m.model = p.model
LEFT JOIN patterns q ON q.model = p.model AND q.k = p.k AND q.seed = p.seed AND q.module = m.module
GROUP BY p.model, p.k, p.seed, p.lang_a, p.lang_b, m.module, m.layer;

CREATE VIEW overlap_by_layer AS
SELECT model, k, seed, lang_a, lang_b, layer,
       sum(n_intersection)::BIGINT AS n_intersection,
       sum(n_union)::BIGINT AS n_union,
       CASE WHEN sum(n_union) > 0 THEN sum(n_intersection) / sum(n_union) END AS jaccard,
       (k * (1 - k)) / (2 - k * (1 - k)) AS chance_jaccard
FROM overlap_by_module
GROUP BY model, k, seed, lang_a, lang_b, layer;

CREATE VIEW overlap_global AS
SELECT model, k, seed, lang_a, lang_b,
       sum(n_intersection)::BIGINT AS n_intersection,
       sum(n_union)::BIGINT AS n_union,
       CASE WHEN sum(n_union) > 0 THEN sum(n_intersection) / sum(n_union) END AS jaccard,
       (k * (1 - k)) / (2 - k * (1 - k)) AS chance_jaccard
FROM overlap_by_module
GROUP BY model, k, seed, lang_a, lang_b;

CREATE VIEW language_unique AS
SELECT l.model, l.k, l.seed, l.lang, m.layer,
       coalesce(sum(q.n_params) FILTER (WHERE q.langs = [l.lang]), 0)::BIGINT AS n_unique
FROM selection_langs l
JOIN modules m ON m.model = l.model
LEFT JOIN patterns q ON q.model = l.model AND q.k = l.k AND q.seed = l.seed AND q.module = m.module
GROUP BY l.model, l.k, l.seed, l.lang, m.layer;
