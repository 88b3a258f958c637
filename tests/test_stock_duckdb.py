"""A plain DuckDB session (only ``duckdb`` and the DuckLake extension, no fastface) reads the deduplicated views."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = r"""
import json, sys
import duckdb

root, extensions = sys.argv[1], json.loads(sys.argv[2])
con = duckdb.connect()
for name, path in extensions.items():
    con.execute(f"INSTALL '{path}'")
    con.execute(f"LOAD {name}")
# the snippet of docs/storage.md
con.execute(f"ATTACH 'ducklake:sqlite:{root}/catalog.sqlite' AS lake (DATA_PATH '{root}/tables/', READ_ONLY)")
counts = {t: con.execute(f"SELECT count(*) FROM lake.latest.{t}").fetchone()[0]
          for t in ("runs", "identities", "prompts", "examples", "generations", "metrics")}
counts["metric_sum"] = con.execute("SELECT round(sum(value), 6) FROM lake.latest.metrics").fetchone()[0]
counts["raw_metrics"] = con.execute("SELECT count(*) FROM lake.main.metrics").fetchone()[0]
assert not [m for m in sys.modules if m.split('.')[0] in ("fastface", "storage", "evaluation", "flows")]
print(json.dumps(counts))
"""


def test_plain_duckdb_sees_the_counts_of_fastface_sql(tmp_path, capsys):
    from fastface.cli import main
    from storage import Catalog, Store
    from storage.duck import extension_file

    store = Store(str(tmp_path))
    store.append("runs", [{"kind": "evaluate", "config": {}}], "r1")
    store.append("runs", [{"kind": "evaluate", "config": {"again": 1}}], "r1")  # a retried write
    examples = [{"example_id": f"e{i}", "identity_id": "i", "identity_hash": "h", "prompt_id": "p", "prompt": "x",
                 "prompt_kind": "realistic", "model": "m", "preset": "baseline", "ip_adapter_scale": 0.8,
                 "lora_scale": 1.0, "seed": i, "steps": 4, "width": 64, "height": 64, "config_hash": "c",
                 "code_version": "t"} for i in range(5)]
    store.append("examples", examples, "r1")
    store.append("examples", examples[:2], "r1")
    store.append("metrics", [{"example_id": f"e{i}", "metric": "id", "value": 0.1 * i} for i in range(5)], "r1")
    store.append("metrics", [{"example_id": "e1", "metric": "id", "value": 9.0}], "r1")  # the redone score wins
    store.close()

    with Catalog(Store(str(tmp_path))) as catalog:
        expected = {t: catalog.query(f"SELECT count(*) FROM {t}").column(0)[0].as_py()
                    for t in ("runs", "identities", "prompts", "examples", "generations", "metrics")}
        expected["metric_sum"] = round(catalog.query("SELECT sum(value) FROM metrics").column(0)[0].as_py(), 6)
        expected["raw_metrics"] = catalog.query("SELECT count(*) FROM metrics_raw").column(0)[0].as_py()
    assert expected == {"runs": 1, "identities": 0, "prompts": 0, "examples": 5, "generations": 0, "metrics": 5,
                        "metric_sum": round(0 + 9.0 + 0.2 + 0.3 + 0.4, 6), "raw_metrics": 6}
    assert main(["sql", "--root", str(tmp_path), "SELECT count(*) AS n FROM examples"]) == 0
    assert capsys.readouterr().out.splitlines()[2].strip() == "5"  # fastface sql says the same

    extensions = {name: str(extension_file(name)) for name in ("sqlite", "ducklake")}
    result = subprocess.run([sys.executable, "-I", "-c", SCRIPT, str(tmp_path), json.dumps(extensions)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout) == expected


def test_version(capsys):
    import pytest

    from fastface import __version__
    from fastface.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"fastface {__version__}"
