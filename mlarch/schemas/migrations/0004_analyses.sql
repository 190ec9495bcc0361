-- mlarch catalog, schema version 4: analyses as first-class records. A model's runs belong
-- to a named analysis (a configuration: math and control sources, samples, max length, k
-- values); the run in use is the newest finished one per (model, analysis, lang, role, seed),
-- and every derived row and view carries the analysis. Existing runs are placed in one
-- analysis per model when this migration runs (mlarch.store.analyses.place_legacy), which
-- also fills the '' placeholders below and re-seals the record digests it had verified.

CREATE TABLE analyses (
    model         VARCHAR NOT NULL,
    analysis      VARCHAR NOT NULL,   -- --analysis, or derived from the sources (e.g. gsm8k-vs-flores)
    config        JSON NOT NULL,      -- math, control, samples, max_length, top_k, only_correct
    config_digest VARCHAR NOT NULL,   -- sha256 of the canonical config: one name, one configuration
    created_at    TIMESTAMP NOT NULL,
    PRIMARY KEY (model, analysis)
);

ALTER TABLE runs ADD COLUMN analysis VARCHAR;         -- NULL only for rows of a pre-analysis bundle being placed
ALTER TABLE evaluations ADD COLUMN analysis VARCHAR;  -- whose sets an intervention changed (NULL: no intervention)

DROP VIEW language_unique;
DROP VIEW overlap_global;
DROP VIEW overlap_by_layer;
DROP VIEW overlap_by_module;
DROP VIEW lang_pairs;
DROP VIEW selection_langs;
DROP VIEW set_sizes;
DROP VIEW intervention_effects;
DROP VIEW accuracy;
DROP VIEW evaluations_current;  -- re-created as it was: its * now includes the analysis

-- the derived tables gain the analysis in their key: rebuilt, rows kept
CREATE TABLE selections_v4 (
    model          VARCHAR NOT NULL,
    analysis       VARCHAR NOT NULL,
    k              DOUBLE NOT NULL,
    seed           BIGINT NOT NULL,
    lang           VARCHAR NOT NULL,
    module         VARCHAR NOT NULL,
    n_math_top     BIGINT NOT NULL,
    n_control_top  BIGINT NOT NULL,
    n_selected     BIGINT NOT NULL,
    math_run_id    VARCHAR NOT NULL,
    control_run_id VARCHAR NOT NULL,
    PRIMARY KEY (model, analysis, k, seed, lang, module)
);
INSERT INTO selections_v4
SELECT model, '', k, seed, lang, module, n_math_top, n_control_top, n_selected, math_run_id, control_run_id
FROM selections;
DROP TABLE selections;
ALTER TABLE selections_v4 RENAME TO selections;

CREATE TABLE patterns_v4 (
    model    VARCHAR NOT NULL,
    analysis VARCHAR NOT NULL,
    k        DOUBLE NOT NULL,
    seed     BIGINT NOT NULL,
    module   VARCHAR NOT NULL,
    langs    VARCHAR[] NOT NULL,
    n_params BIGINT NOT NULL
);
INSERT INTO patterns_v4 SELECT model, '', k, seed, module, langs, n_params FROM patterns;
DROP TABLE patterns;
ALTER TABLE patterns_v4 RENAME TO patterns;

CREATE VIEW set_sizes AS
SELECT s.model, s.analysis, s.k, s.seed, s.lang, s.module, m.layer, m.n_params,
       s.n_math_top, s.n_control_top, s.n_selected, s.math_run_id, s.control_run_id
FROM selections s JOIN modules m ON m.model = s.model AND m.module = s.module;

CREATE VIEW selection_langs AS
SELECT DISTINCT model, analysis, k, seed, lang FROM selections;

CREATE VIEW lang_pairs AS
SELECT a.model, a.analysis, a.k, a.seed, a.lang AS lang_a, b.lang AS lang_b
FROM selection_langs a
JOIN selection_langs b ON a.model = b.model AND a.analysis = b.analysis AND a.k = b.k AND a.seed = b.seed
                      AND a.lang < b.lang;

CREATE VIEW overlap_by_module AS
SELECT p.model, p.analysis, p.k, p.seed, p.lang_a, p.lang_b, m.module, m.layer,
       coalesce(sum(q.n_params) FILTER (WHERE list_contains(q.langs, p.lang_a)
                                          AND list_contains(q.langs, p.lang_b)), 0)::BIGINT AS n_intersection,
       coalesce(sum(q.n_params) FILTER (WHERE list_contains(q.langs, p.lang_a)
                                          OR list_contains(q.langs, p.lang_b)), 0)::BIGINT AS n_union
FROM lang_pairs p
JOIN modules m ON m.model = p.model
LEFT JOIN patterns q ON q.model = p.model AND q.analysis = p.analysis AND q.k = p.k AND q.seed = p.seed
                    AND q.module = m.module
GROUP BY p.model, p.analysis, p.k, p.seed, p.lang_a, p.lang_b, m.module, m.layer;

CREATE VIEW overlap_by_layer AS
SELECT model, analysis, k, seed, lang_a, lang_b, layer,
       sum(n_intersection)::BIGINT AS n_intersection,
       sum(n_union)::BIGINT AS n_union,
       CASE WHEN sum(n_union) > 0 THEN sum(n_intersection) / sum(n_union) END AS jaccard,
       (k * (1 - k)) / (2 - k * (1 - k)) AS chance_jaccard
FROM overlap_by_module
GROUP BY model, analysis, k, seed, lang_a, lang_b, layer;

CREATE VIEW overlap_global AS
SELECT model, analysis, k, seed, lang_a, lang_b,
       sum(n_intersection)::BIGINT AS n_intersection,
       sum(n_union)::BIGINT AS n_union,
       CASE WHEN sum(n_union) > 0 THEN sum(n_intersection) / sum(n_union) END AS jaccard,
       (k * (1 - k)) / (2 - k * (1 - k)) AS chance_jaccard
FROM overlap_by_module
GROUP BY model, analysis, k, seed, lang_a, lang_b;

CREATE VIEW language_unique AS
SELECT l.model, l.analysis, l.k, l.seed, l.lang, m.layer,
       coalesce(sum(q.n_params) FILTER (WHERE q.langs = [l.lang]), 0)::BIGINT AS n_unique
FROM selection_langs l
JOIN modules m ON m.model = l.model
LEFT JOIN patterns q ON q.model = l.model AND q.analysis = l.analysis AND q.k = l.k AND q.seed = l.seed
                    AND q.module = m.module
GROUP BY l.model, l.analysis, l.k, l.seed, l.lang, m.layer;

CREATE VIEW evaluations_current AS
SELECT * FROM evaluations WHERE status = 'FINISHED'
QUALIFY row_number() OVER (PARTITION BY config_digest ORDER BY finished_at DESC, eval_id) = 1;

-- evaluations: the analysis whose sets an intervention changed (NULL for baselines, which
-- serve every analysis of the model)
CREATE VIEW accuracy AS
SELECT eval_id, model, analysis, dataset, lang, intervention, target_lang, k, seed, factor, n_set, n_params_changed,
       n_items, value AS accuracy, stderr, finished_at
FROM evaluations_current WHERE task = 'accuracy';

CREATE VIEW intervention_effects AS
SELECT e.eval_id, e.model, e.analysis, e.task, e.dataset, e.role, e.lang, e.intervention, e.target_lang, e.k, e.seed,
       e.factor, e.n_set, e.n_params_changed, e.n_items,
       b.value AS baseline, e.value, e.value - b.value AS delta,
       CASE WHEN b.value <> 0 THEN (e.value - b.value) / abs(b.value) END AS relative_change,
       b.stderr AS baseline_stderr, e.stderr, b.eval_id AS baseline_eval_id
FROM evaluations_current e
JOIN evaluations_current b ON b.baseline_key = e.baseline_key AND b.intervention = 'none'
-- only sets still in use: after a re-ingest or `rm` of a run, evaluations of the sets it
-- replaced stay archived but leave the view
JOIN runs m ON m.run_id = e.math_run_id AND m.in_use
JOIN runs c ON c.run_id = e.control_run_id AND c.in_use
WHERE e.intervention <> 'none';
