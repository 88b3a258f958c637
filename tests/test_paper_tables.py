"""Every value of the paper's Tables 1-3 is in evaluation/data/paper_tables.yaml, none missing or different.

tests/data/paper-tables.md is the transcription of arXiv 2505.21144's tables (checked against the paper's
text); this test parses its markdown on its own and compares all 224 numbers with the YAML.
"""

from __future__ import annotations

import re
from pathlib import Path

from evaluation import paper

TRANSCRIPTION = Path(__file__).parent / "data" / "paper-tables.md"
# The transcription's column headers → this project's metric names (per table).
METRICS = {"ID": "id", "CLIP": "clip", "AE": "ae", "FFC": "ffc", "IR": "ir", "FCS": "fsc"}


def parse_transcription(text: str) -> dict[tuple, float]:
    """``(table, model, preset, lora_scale, metric) → value`` from the markdown tables."""
    values: dict[tuple, float] = {}
    for section in re.split(r"^## ", text, flags=re.M):
        found = re.match(r"Table (\d)", section)
        if not found:
            continue
        table = f"table{found.group(1)}"
        lines = [line for line in section.splitlines() if line.startswith("|") and not line.startswith("|---")]
        header = [c.strip() for c in lines[0].strip("|").split("|")]
        for line in lines[1:]:
            cells = [c.strip() for c in line.strip("|").split("|")]
            assert len(cells) == len(header), line
            model, preset = cells[0], cells[1]
            lora = 1.0
            for name, cell in zip(header[2:], cells[2:]):
                marker = re.match(r"lora (\d\.\d) (\w+)", name)
                if marker:
                    lora, name = float(marker.group(1)), marker.group(2)
                values[(table, model, preset, lora, METRICS[name])] = float(cell)
    return values


def test_all_224_published_values_are_in_the_yaml():
    published = parse_transcription(TRANSCRIPTION.read_text(encoding="utf-8"))
    assert len(published) == 224
    stored = {(c["table"], c["model"], c["preset"], c["lora_scale"], c["metric"]): c["paper"]
              for c in paper.paper_cells(paper.load_paper_tables())}
    assert len(stored) == len(paper.paper_cells(paper.load_paper_tables())) == 224  # no duplicates
    assert sorted(set(published) - set(stored)) == []  # none missing
    assert sorted(set(stored) - set(published)) == []  # none invented
    different = {k: (published[k], stored[k]) for k in published if published[k] != stored[k]}
    assert different == {}


def test_tables_carry_the_papers_column_names_and_sources():
    tables = paper.load_paper_tables()
    assert tables["tables"]["table2"]["columns"] == {"face_sim": "id", "CLIP-score": "clip", "IR": "ir", "FCS": "fsc"}
    for key, table in tables["tables"].items():
        assert table["source"].startswith("arXiv 2505.21144, Table " + key[-1])
        assert table["ip_adapter_scale"] == 0.8
    header = paper.PAPER_TABLES.read_text(encoding="utf-8").split("\npaper:")[0]
    assert "could not be read" not in header and "224" in header
    cells = paper.paper_cells(tables)
    assert {c["table"]: c["images"] for c in cells} == {"table1": 6480, "table2": 2160, "table3": 4320}
    assert {(c["table"], c["lora_scale"]) for c in cells} == {("table1", 1.0), ("table1", 0.5), ("table2", 1.0),
                                                             ("table3", 1.0), ("table3", 0.5)}


def test_a_changed_value_is_caught(tmp_path):
    """The comparison above fails when the YAML differs from the transcription by one digit."""
    text = paper.PAPER_TABLES.read_text(encoding="utf-8").replace("ID: 0.602,", "ID: 0.620,", 1)
    changed = tmp_path / "tables.yaml"
    changed.write_text(text, encoding="utf-8")
    published = parse_transcription(TRANSCRIPTION.read_text(encoding="utf-8"))
    stored = {(c["table"], c["model"], c["preset"], c["lora_scale"], c["metric"]): c["paper"]
              for c in paper.paper_cells(paper.load_paper_tables(changed))}
    assert {k for k in published if published[k] != stored[k]} == {("table1", "hyper", "ff-am1", 1.0, "id")}


def test_the_smoke_config_compares_cells_of_all_three_tables():
    """configs/smoke.yaml's design (its models, presets per set, LoRA and λ, prompt kinds) against the 224 cells:
    Table 1's baseline / ff-am2 rows and the baseline rows of Tables 2 and 3 for hyper and lcm are run, the rest not."""
    import itertools

    from evaluation.config import load_config

    config = load_config(Path(__file__).parents[1] / "configs" / "smoke.yaml")
    kinds = {"stylistic" if ";" in p else "realistic" for p in config.dataset.prompts}
    run_configs = [{"model": m, "preset": p, "lora_scale": lora, "ip_adapter_scale": lam, "prompt_kind": kind}
                   for s in config.sweep.sets for m, p, lora, lam, kind in itertools.product(
                       config.sweep.models, (config.report.baseline, *s.presets), config.sweep.lora_scales,
                       config.sweep.ip_adapter_scales, kinds)]
    cells = paper.compare_cells([], [], run_configs)  # no scores yet: run cells read "no data", the others "not run"
    run = {(c["table"], c["model"], c["preset"], c["lora_scale"]) for c in cells if c["verdict"] == "no data"}
    assert run == {("table1", m, p, 1.0) for m in ("hyper", "lcm") for p in ("baseline", "ff-am2")} | {
        (t, m, "baseline", 1.0) for t in ("table2", "table3") for m in ("hyper", "lcm")}
    assert sum(c["verdict"] == "no data" for c in cells) == 2 * 2 * 4 + 2 * 4 + 2 * 4
    assert all(not c["comparable"] for c in cells)  # tiny weights
