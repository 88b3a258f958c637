"""``fastface app``: a local web app over a store (Explore fronts and galleries, Compare presets, Generate).

The top floor, above ``flows/`` (docs/architecture.md): it imports ``fastface``, ``storage`` and
``evaluation.pareto``, and no other package imports it. :mod:`app.data` holds the store queries,
:mod:`app.pages` the HTML, :mod:`app.server` the HTTP server, :mod:`app.generate` the Generate tab's
pipeline calls.
"""
