-- mlarch catalog, schema version 3: evaluations, with and without interventions on the
-- math-only sets (`mlarch eval`). Same lifecycle as runs: RUNNING, then FINISHED with its
-- items in one transaction (or FAILED; `gc` removes both).

CREATE TABLE evaluations (
    eval_id          VARCHAR PRIMARY KEY,
    model            VARCHAR NOT NULL,   -- model name in the archive (--name)
    weights_sha256   VARCHAR NOT NULL,   -- digest of the weight files evaluated
    task             VARCHAR NOT NULL,   -- 'nll' | 'accuracy'
    dataset          VARCHAR NOT NULL,   -- named source or path template, as for runs
    role             VARCHAR NOT NULL,   -- which texts of the source: 'math' | 'control'
    lang             VARCHAR NOT NULL,   -- the evaluated language
    intervention     VARCHAR NOT NULL,   -- 'none' | 'prune' | 'scale' | 'random' | 'fraction'
    target_lang      VARCHAR,            -- whose math-only set was changed (NULL for 'none')
    k                DOUBLE,             -- of that set (NULL for 'none')
    math_run_id      VARCHAR,            -- the runs whose sets were used (NULL for 'none')
    control_run_id   VARCHAR,
    seed             BIGINT NOT NULL,    -- runs whose drawn items are held out; the set's seed; random draws
    factor           DOUBLE,             -- scale factor, or pruned fraction; NULL otherwise
    n_set            BIGINT,             -- size of the math-only set of target_lang at k
    n_params_changed BIGINT,             -- entries the intervention set to 0 or scaled (0 for 'none')
    n_items          BIGINT,
    n_tokens         BIGINT,             -- nll: predicted tokens; accuracy: generated tokens
    value            DOUBLE,             -- nll: nats per predicted token; accuracy: fraction correct
    stderr           DOUBLE,
    status           VARCHAR NOT NULL,   -- 'RUNNING' | 'FINISHED' | 'FAILED'
    created_at       TIMESTAMP NOT NULL,
    finished_at      TIMESTAMP,
    config_digest    VARCHAR NOT NULL,   -- identical evaluations share it (reuse, --force reruns)
    baseline_key     VARCHAR NOT NULL,   -- shared by an evaluation and its baseline: all but the intervention
    host             VARCHAR,            -- where a RUNNING evaluation's process lives (gc spares live ones)
    pid              INTEGER,
    record_sha256    VARCHAR,            -- canonical digest of this row and its items (verify)
    provenance       JSON
);

CREATE TABLE evaluation_items (
    eval_id       VARCHAR NOT NULL,
    position      INTEGER NOT NULL,   -- order of evaluation
    item_index    BIGINT NOT NULL,    -- 0-based index in the language's item list, file order
    n_tokens      BIGINT NOT NULL,    -- nll: predicted tokens of the item; accuracy: generated tokens
    nll           DOUBLE,             -- nll: summed nats over those tokens
    prompt_sha256 VARCHAR,            -- accuracy: of the full prompt text
    completion    VARCHAR,            -- accuracy: generated text, cut at the stop strings
    extracted     VARCHAR,            -- accuracy: the answer read from the completion (NULL: none)
    reference     VARCHAR,            -- accuracy: the reference number
    correct       BOOLEAN,            -- accuracy
    PRIMARY KEY (eval_id, position)
);

-- The newest finished evaluation of each configuration (a --force rerun replaces its elder).
CREATE VIEW evaluations_current AS
SELECT * FROM evaluations WHERE status = 'FINISHED'
QUALIFY row_number() OVER (PARTITION BY config_digest ORDER BY finished_at DESC, eval_id) = 1;

CREATE VIEW accuracy AS
SELECT eval_id, model, dataset, lang, intervention, target_lang, k, seed, factor, n_set, n_params_changed,
       n_items, value AS accuracy, stderr, finished_at
FROM evaluations_current WHERE task = 'accuracy';

-- Each intervened evaluation next to its baseline (same model, weights, task, data, items
-- and settings: baseline_key covers them all): the cross-lingual matrix is
--   SELECT target_lang, lang, relative_change FROM intervention_effects WHERE intervention = 'prune' AND k = 0.01
CREATE VIEW intervention_effects AS
SELECT e.eval_id, e.model, e.task, e.dataset, e.role, e.lang, e.intervention, e.target_lang, e.k, e.seed,
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
