"""Expected figures per preset: is this stage's outcome what a healthy run reaches?

Each preset may ship ``presets/expected/<name>.yaml``: per stage, per figure (a name from
:mod:`histodiff.headline`) either a measured range ``{min, max}`` or a literature value
``{reported, source}``. A stage compares its figures with them and says "within the expected
range" or names the figure that is off (console line and the ``histodiff.expected`` tag).
Literature values are shown for comparison and never judged: the paper's data and scale differ.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import yaml

WITHIN = "within the expected range"


@dataclass
class Verdict:
    """The comparison of one stage's figures with its preset's expected figures."""

    ok: bool | None  # None: nothing to judge (no ranges for this stage)
    off: list[str] = field(default_factory=list)
    reported: list[str] = field(default_factory=list)
    basis: str = ""

    def text(self) -> str:
        """Return the verdict as a short sentence for the console and the MLflow tag."""
        if self.ok is None and not self.reported:
            return "no expected range for this preset"
        parts = []
        if self.ok is True:
            parts.append(WITHIN + (f" ({self.basis})" if self.basis else ""))
        elif self.ok is False:
            parts.append("OFF: " + "; ".join(self.off) + (f" ({self.basis})" if self.basis else ""))
        if self.reported:
            parts.append("literature: " + "; ".join(self.reported))
        return " | ".join(parts)


@functools.lru_cache(maxsize=8)
def load(preset: str) -> dict[str, Any]:
    """Return the expected figures shipped for a preset (empty when it ships none)."""
    from histodiff.config import PRESET_DIR

    path = PRESET_DIR / "expected" / f"{preset}.yaml"
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text()) or {}


def check(preset: str, stage: str, figures: dict[str, float]) -> Verdict:
    """Return how ``figures`` of ``stage`` compare with the preset's expected ranges and reported values."""
    spec = load(preset)
    wanted = (spec.get("stages") or {}).get(stage) or {}
    verdict = Verdict(ok=None, basis=str(spec.get("basis", "")))
    for name, expect in wanted.items():
        value = figures.get(name)
        if value is None:
            continue
        if "reported" in expect:
            verdict.reported.append(f"{name} {value:.4g} vs {expect['reported']} reported ({expect.get('source', '?')})")
            continue
        low, high = expect.get("min"), expect.get("max")
        if (low is not None and value < low) or (high is not None and value > high):
            verdict.off.append(f"{name} {value:.4g} outside [{_fmt(low)}, {_fmt(high)}]")
        verdict.ok = not verdict.off
    return verdict


def _fmt(value: Any) -> str:
    return "-inf" if value is None else f"{value:g}"
