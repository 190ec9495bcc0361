-- mlarch catalog, schema version 5: questions across models. Layer-wise views gain `depth`
-- = layer / (n_layers - 1) (n_layers: distinct non-NULL layers of the model in `modules`;
-- 0.0 for a one-block model; NULL outside blocks) so models of different depth share one
-- axis; sizes gain `share` (of the scored parameters they are counted over), and two views
-- give per-model totals: set_totals and language_unique_share. Existing columns keep their
-- names, order and values; the new ones follow them.

DROP VIEW language_unique;
DROP VIEW overlap_global;
DROP VIEW overlap_by_layer;
DROP VIEW overlap_by_module;
DROP VIEW set_sizes;

-- one row per (model, block): the block's relative depth
CREATE VIEW layer_depth AS
SELECT model, layer, n_layers,
       CASE WHEN n_layers > 1 THEN layer::DOUBLE / (n_layers - 1) ELSE 0.0 END AS depth
FROM (SELECT DISTINCT model, layer, count(DISTINCT layer) OVER (PARTITION BY model) AS n_layers
      FROM modules WHERE layer IS NOT NULL);

CREATE VIEW set_sizes AS
SELECT s.model, s.analysis, s.k, s.seed, s.lang, s.module, m.layer, m.n_params,
       s.n_math_top, s.n_control_top, s.n_selected, s.math_run_id, s.control_run_id,
       d.depth, s.n_selected / m.n_params AS share
FROM selections s JOIN modules m ON m.model = s.model AND m.module = s.module
LEFT JOIN layer_depth d ON d.model = m.model AND d.layer = m.layer;

-- per (model, analysis, k, seed, lang) over every scored module: share of the model's scored parameters
CREATE VIEW set_totals AS
SELECT s.model, s.analysis, s.k, s.seed, s.lang,
       sum(s.n_selected)::BIGINT AS n_selected, sum(m.n_params)::BIGINT AS n_params,
       sum(s.n_selected) / sum(m.n_params) AS share
FROM selections s JOIN modules m ON m.model = s.model AND m.module = s.module
GROUP BY s.model, s.analysis, s.k, s.seed, s.lang;

CREATE VIEW overlap_by_module AS
SELECT p.model, p.analysis, p.k, p.seed, p.lang_a, p.lang_b, m.module, m.layer,
       coalesce(sum(q.n_params) FILTER (WHERE list_contains(q.langs, p.lang_a)
                                          AND list_contains(q.langs, p.lang_b)), 0)::BIGINT AS n_intersection,
       coalesce(sum(q.n_params) FILTER (WHERE list_contains(q.langs, p.lang_a)
                                          OR list_contains(q.langs, p.lang_b)), 0)::BIGINT AS n_union,
       any_value(d.depth) AS depth
FROM lang_pairs p
JOIN modules m ON m.model = p.model
LEFT JOIN layer_depth d ON d.model = m.model AND d.layer = m.layer
LEFT JOIN patterns q ON q.model = p.model AND q.analysis = p.analysis AND q.k = p.k AND q.seed = p.seed
                    AND q.module = m.module
GROUP BY p.model, p.analysis, p.k, p.seed, p.lang_a, p.lang_b, m.module, m.layer;

CREATE VIEW overlap_by_layer AS
SELECT model, analysis, k, seed, lang_a, lang_b, layer,
       sum(n_intersection)::BIGINT AS n_intersection,
       sum(n_union)::BIGINT AS n_union,
       CASE WHEN sum(n_union) > 0 THEN sum(n_intersection) / sum(n_union) END AS jaccard,
       (k * (1 - k)) / (2 - k * (1 - k)) AS chance_jaccard,
       any_value(depth) AS depth
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
       coalesce(sum(q.n_params) FILTER (WHERE q.langs = [l.lang]), 0)::BIGINT AS n_unique,
       any_value(d.depth) AS depth
FROM selection_langs l
JOIN modules m ON m.model = l.model
LEFT JOIN layer_depth d ON d.model = m.model AND d.layer = m.layer
LEFT JOIN patterns q ON q.model = l.model AND q.analysis = l.analysis AND q.k = l.k AND q.seed = l.seed
                    AND q.module = m.module
GROUP BY l.model, l.analysis, l.k, l.seed, l.lang, m.layer;

-- over the whole model: parameters selected for this language and no other archived one
-- (at the same analysis, k, seed), as a share of the language's math-only set
CREATE VIEW language_unique_share AS
SELECT t.model, t.analysis, t.k, t.seed, t.lang,
       coalesce(u.n_unique, 0)::BIGINT AS n_unique, t.n_selected,
       CASE WHEN t.n_selected > 0 THEN coalesce(u.n_unique, 0) / t.n_selected END AS share
FROM set_totals t
LEFT JOIN (SELECT model, analysis, k, seed, langs[1] AS lang, sum(n_params) AS n_unique
           FROM patterns WHERE len(langs) = 1 GROUP BY ALL) u
       ON u.model = t.model AND u.analysis = t.analysis AND u.k = t.k AND u.seed = t.seed AND u.lang = t.lang;
