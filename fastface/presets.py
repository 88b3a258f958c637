"""FastFace presets (method-spec §4): which DCG and AM each named configuration uses."""

from __future__ import annotations

from dataclasses import dataclass, replace

from fastface.attention import AM1, AM2, AM2_NO_ADAIN, AMConfig, PartValues
from fastface.guidance import DCG_PRESET, DCGConfig, TimestepSchedule, constant_guidance
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


# -- the paper's ablations (configs/ablations/, the report's ablation sections) ---------------------------
# All at the `dcg` preset's strengths where not varied: α = 1.5, β = 3.0 in the guided steps, φ = 0.75,
# variant `id`; AM1 at its values (method-spec §3). Each group lists its presets in the figure's order.
_GUIDED_A, _GUIDED_B = 1.5, 3.0


def _steps(guided: tuple[int, ...], value: float) -> tuple[float, ...]:
    return tuple(value if i in guided else 1.0 for i in range(4))


#: Fig. 3: DCG's scheduling regimes: which of the 4 steps are guided (the `dcg` preset: steps 1-2 only;
#: the figure shows that also guiding the first or the last step alters the image), and a timestep schedule
#: (:data:`fastface.guidance.TIMESTEP_SCHEDULES`, the authors' cfg_schedulers) in place of per-step lists.
FIG3_SCHEDULES: tuple[Preset, ...] = (
    Preset("dcg-sched-first", DCGConfig(alpha=_steps((0, 1, 2), _GUIDED_A), beta=_steps((0, 1, 2), _GUIDED_B),
                                        rescale=0.75), None, "Fig. 3: DCG in steps 0-2 (the first step too)"),
    Preset("dcg-sched-last", DCGConfig(alpha=_steps((1, 2, 3), _GUIDED_A), beta=_steps((1, 2, 3), _GUIDED_B),
                                       rescale=0.75), None, "Fig. 3: DCG in steps 1-3 (the last step too)"),
    Preset("dcg-sched-all", DCGConfig(alpha=_steps((0, 1, 2, 3), _GUIDED_A), beta=_steps((0, 1, 2, 3), _GUIDED_B),
                                      rescale=0.75), None, "Fig. 3: DCG in all four steps"),
    Preset("dcg-sched-linear", DCGConfig(alpha=_GUIDED_A, beta=_GUIDED_B, rescale=0.75,
                                         alpha_schedule=TimestepSchedule("clamped_linear", {"c": 1.0}),
                                         beta_schedule=TimestepSchedule("clamped_linear", {"c": 1.0})), None,
           "Fig. 3: DCG weighted by timestep, max(1, w·(1 − t/T)), at every step"),
)
#: Fig. 15: the DCG variants (Eq. 16-18) over an α × β grid, guided in steps 1-2 as the `dcg` preset
#: (α = 1.5, β = 3 is the preset itself for the `id` variant).
FIG15_VARIANTS = ("id", "text", "independent")
FIG15_ALPHAS = (1.0, 1.5, 2.0)
FIG15_BETAS = (1.5, 3.0, 4.5)


def fig15_preset_name(variant: str, alpha: float, beta: float) -> str:
    return f"dcg-{variant}-a{alpha:g}-b{beta:g}"


FIG15_GRID: tuple[Preset, ...] = tuple(
    Preset(fig15_preset_name(v, a, b), DCGConfig(alpha=_steps((1, 2), a), beta=_steps((1, 2), b), rescale=0.75,
                                                 variant=v), None,
           f"Fig. 15: DCG variant {v!r}, α = {a:g}, β = {b:g} in steps 1-2")
    for v in FIG15_VARIANTS for a in FIG15_ALPHAS for b in FIG15_BETAS)
#: Fig. 16: AM1's two components apart (scale only: p = 1; power only: s = 1) and together (`am1`).
FIG16_COMPONENTS: tuple[Preset, ...] = (
    Preset("am1-scale-only", None, replace(AM1, power=PartValues.same(1.0), name="AM1-scale-only"),
           "Fig. 16: AM1 with its scale s only (p = 1)"),
    Preset("am1-power-only", None, replace(AM1, scale=PartValues.same(1.0), name="AM1-power-only"),
           "Fig. 16: AM1 with its power p only (s = 1)"),
)
for _p in FIG3_SCHEDULES + FIG15_GRID + FIG16_COMPONENTS:
    PRESETS.register(_p.name, _p)
#: Per figure, the presets it compares, in its order (each against `baseline`).
ABLATION_PRESETS: dict[str, tuple[str, ...]] = {
    "fig3": ("dcg", *(p.name for p in FIG3_SCHEDULES)),
    "fig15": tuple(p.name for p in FIG15_GRID),
    "fig16": ("am1-scale-only", "am1-power-only", "am1"),
}


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
