"""The evaluation library: what a run computes and shows, without Prefect (docs/architecture.md).

- :mod:`evaluation.config` — the run's config model (``EvaluationConfig``), loaded from YAML;
- :mod:`evaluation.sweep` — planning: the sweep's examples (Arrow), what is missing, shards, the
  pools' and workers' options; :mod:`evaluation.plan` — ``fastface evaluate --plan``;
- :mod:`evaluation.dataset` — dataset construction: prompts, the authors' layout, synthesis and
  similarity filtering logic; :mod:`evaluation.photos` — the photos and prompts a config names;
  :mod:`evaluation.rehearsal` — the synthetic dataset of ``weights: rehearsal``;
- :mod:`evaluation.analysis` — the statistics of the protocol (means, bootstrap intervals,
  paired comparisons) on rows;
- :mod:`evaluation.report_data` — the same aggregations in DuckDB over a store (never a table
  in Python);
- :mod:`evaluation.report` — the HTML report and its figures, from those aggregates
  (:mod:`evaluation.html`: its tables and thumbnails);
- :mod:`evaluation.paper`, :mod:`evaluation.claims`, :mod:`evaluation.ablations`,
  :mod:`evaluation.pareto` — the paper's tables and claims, the ablation sections, the Pareto fronts;
- :mod:`evaluation.retries` — which failures a shard task retries.

``flows/`` wires these into Prefect flows and tasks; this package imports ``fastface``,
``storage`` and ``actors`` only (tests/test_layers.py).
"""
