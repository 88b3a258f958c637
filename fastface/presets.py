"""FastFace presets (method-spec §4): which DCG and AM each named configuration uses."""

from __future__ import annotations

from dataclasses import dataclass

from fastface.attention import AM1, AM2, AM2_NO_ADAIN, AMConfig
from fastface.guidance import DCG_PRESET, DCGConfig, constant_guidance
from fastface.registry import Registry


@dataclass(frozen=True)
class Preset:
    """``dcg=None`` means the model's default guidance (method-spec §1 table)."""

    name: str
    dcg: DCGConfig | None
    am: AMConfig | None
    description: str = ""

    def resolve(self, default_guidance: float) -> tuple[DCGConfig, AMConfig | None]:
        """The DCG config this preset runs with on a model whose default guidance is ``default_guidance``."""
        return (self.dcg if self.dcg is not None else constant_guidance(default_guidance)), self.am

    def check_steps(self, num_steps: int) -> None:
        """Fail before any model is loaded when a per-step schedule does not fit ``num_steps``."""
        if self.dcg is not None:
            self.dcg.check_steps(num_steps, preset=self.name)
        if self.am is not None:
            self.am.check_steps(num_steps, preset=self.name)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "dcg": None if self.dcg is None else self.dcg.to_dict(),
            "am": None if self.am is None else self.am.to_dict(),
        }


PRESETS: Registry[Preset] = Registry("preset")
for _p in (
    Preset("baseline", None, None, "the model's own guidance, diffusers' IP-Adapter attention"),
    Preset("dcg", DCG_PRESET, None, "decoupled guidance in the intermediate steps (stylistic prompts)"),
    Preset("am1", None, AM1, "attention manipulation AM1 (scale-power)"),
    Preset("am2", None, AM2_NO_ADAIN, "attention manipulation AM2 (scheduled softmax), without AdaIN as the authors' AM-only config"),
    Preset("ff-am1", DCG_PRESET, AM1, "FastFace: DCG + AM1"),
    Preset("ff-am2", DCG_PRESET, AM2, "FastFace: DCG + AM2 with AdaIN"),
):
    PRESETS.register(_p.name, _p)


def get_preset(name: str) -> Preset:
    return PRESETS.get(name)


#: λ (IP-Adapter scale) of the paper's tables; also the pipeline's and the CLI's default λ.
TABLE_IP_ADAPTER_SCALE = 0.8


def table_ip_adapter_scale(swept: "list[float] | tuple[float, ...]") -> float:
    """The λ a report tabulates when none is chosen: the paper's 0.8 if swept, else the largest swept λ."""
    scales = [float(s) for s in swept]
    if not scales or any(abs(s - TABLE_IP_ADAPTER_SCALE) < 1e-9 for s in scales):
        return TABLE_IP_ADAPTER_SCALE
    return max(scales)
