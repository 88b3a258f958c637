"""evaluation/config.py: the shipped configs validate, and bad configs fail before anything runs, naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from evaluation.config import ConfigError, config_from_dict, load_config, resolve_uri

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def base(**changes) -> dict:
    config = {
        "name": "t", "weights": "tiny", "face_backend": "dlib",
        "dataset": {"identities": [{"uri": "package://insightface/data/images/Tom_Hanks_54745.png"}]},
        "sweep": {"models": ["tiny-hyper"], "sets": [{"prompts": "joint", "presets": ["ff-am2"]}], "steps": 4},
    }
    for dotted, value in changes.items():
        node = config
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return config


def test_shipped_configs(tmp_path):
    smoke = load_config(CONFIGS / "smoke.yaml")
    assert smoke.weights == "tiny" and set(smoke.presets()) == {"baseline", "ff-am2"}
    assert len(smoke.sweep.ip_adapter_scales) == 2 and smoke.face_backend == "dlib"
    assert Path(resolve_uri(smoke.dataset.identities[0].uri)).is_file()
    ci = load_config(CONFIGS / "ci.yaml")
    assert ci.sweep.size == 32 and ci.steps_for("tiny-hyper") == 2
    # The paper's design needs the authors' data folder: missing, it fails naming the field.
    with pytest.raises(ConfigError, match=r"dataset\.folder: data/fastface-authors does not exist"):
        load_config(CONFIGS / "paper.yaml")
    (tmp_path / "id_photos").mkdir()
    paper = load_config(CONFIGS / "paper.yaml", {"dataset.folder": str(tmp_path)})
    design = {s.prompts: set(s.presets) for s in paper.sweep.sets}
    assert design == {"stylistic": {"dcg"}, "realistic": {"am1", "am2"}, "joint": {"ff-am1", "ff-am2"}}
    assert paper.sweep.models == ("hyper", "lightning", "lcm", "turbo") and paper.sweep.lora_scales == (1.0, 0.5)
    assert paper.sweep.ip_adapter_scales == (0.1, 0.35, 0.5, 0.65, 0.8, 0.95)
    assert paper.face_backend == "insightface" and "ir" in paper.metrics.names


@pytest.mark.parametrize("changes, message", [
    ({"sweep.models": ["tiny-hyperr"]}, r"sweep\.models: unknown model 'tiny-hyperr'; allowed: .*tiny-hyper"),
    ({"sweep.models": ["hyper"]}, r"sweep\.models: 'hyper' does not fit weights: tiny"),
    ({"sweep.sets": [{"prompts": "joint", "presets": ["ff-am3"]}]}, r"presets: unknown preset 'ff-am3'; allowed: .*ff-am2"),
    ({"sweep.steps": 2}, r"sweep\.steps: preset 'ff-am2' has per-step guidance lists for 4 steps but 2"),
    ({"sweep.ip_adapter_scales": [0.8, 2.0]}, r"sweep\.ip_adapter_scales: .*\[2\.0\] are out of range"),
    ({"metrics": {"names": ["id", "clp"]}}, r"metrics\.names: unknown metric 'clp'; allowed: .*clip"),
    ({"face_backend": "insightface"}, r"face_backend: 'insightface' gives 512-d .* use face_backend: dlib"),
    ({"face_backend": "opencv"}, r"face_backend: unknown face backend 'opencv'; valid: dlib, insightface"),
    ({"dataset": {"folder": "/nonexistent/authors"}}, r"dataset\.folder: /nonexistent/authors does not exist"),
    ({"dataset": {"identities": [{"uri": "package://insightface/nope.png"}]}}, r"dataset\.identities\[0\]\.uri: .* not found"),
    ({"sweep.sets": [{"prompts": "funny", "presets": ["dcg"]}]}, r"sweep\.sets\.0\.prompts: .*'realistic', 'stylistic' or 'joint'"),
    ({"sweep.lora_scale": [1.0]}, r"sweep\.lora_scale: unknown field"),
    ({"report": {"ip_adapter_scale": 0.5}}, r"report\.ip_adapter_scale: 0\.5 is not swept"),
    ({"name": "bad name"}, r"name: .*not a valid name"),
])
def test_bad_configs_name_the_field(changes, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(base(**changes))


def test_cli_check_fails_before_running(tmp_path, capsys):
    from fastface.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nweights: tiny\nface_backend: dlib\ndataset: {folder: /nope}\n"
                   "sweep: {models: [tiny-lcm], sets: [{prompts: joint, presets: [dcg]}], steps: 3}\n")
    assert main(["evaluate", "--config", str(bad), "--root", str(tmp_path / "root"), "--check"]) == 2
    err = capsys.readouterr().err
    assert "dataset.folder" in err and "sweep.steps" in err  # every problem at once
    assert not (tmp_path / "root").exists()
    assert main(["evaluate", "--config", str(CONFIGS / "ci.yaml"), "--root", str(tmp_path / "r"), "--check",
                 "--set", "sweep.size=64"]) == 0
    assert "is valid" in capsys.readouterr().out
