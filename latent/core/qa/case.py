"""One case's QA: descriptors, rule findings with reasons in words, and flagged slices."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from latent.core.cases import Case, CaseError
from latent.core.prepare import read_native
from latent.core.qa import fov, mismatch
from latent.core.qa.alignment import alignment_descriptors
from latent.core.qa.config import QAConfig
from latent.core.qa.descriptors import (banding_slices, ct_descriptors, metal_components, metal_descriptors,
                                        mr_descriptors)

#: Labels from best to worst.
LABELS = ("GREEN", "YELLOW", "RED")
#: Reason codes of ``slices.csv`` (stable: training's slice exclusion reads them).
SLICE_REASONS = ("metal", "ct_air", "mr_dark", "mr_banding", "mr_void", "one_modality", "fov_cut")


@dataclass(frozen=True)
class Finding:
    """One flag of a case: its level (``RED``, ``YELLOW`` or ``NOTE``), a stable code and the reason in words."""

    level: str
    code: str
    text: str


@dataclass
class CaseQA:
    """Descriptors (``values``), findings and flagged slices ``(slice, reason code)`` of one case."""

    pid: str
    region: str
    values: dict[str, float | str]
    findings: list[Finding] = field(default_factory=list)
    slices: list[tuple[int, str]] = field(default_factory=list)

    def worst_slices(self, count: int) -> list[int]:
        """Up to ``count`` slices to show: the most often flagged first, then the metal centroid."""
        tally: dict[int, int] = {}
        for index, _ in self.slices:
            tally[index] = tally.get(index, 0) + 1
        ordered = sorted(tally, key=lambda k: (-tally[k], k))
        centre = self.values.get("metal_centroid_z")
        if isinstance(centre, float) and np.isfinite(centre) and int(round(centre)) not in ordered:
            ordered.insert(0, int(round(centre)))
        if len(ordered) > count:  # spread over the flagged range rather than the first few
            picks = np.linspace(0, len(ordered) - 1, count).round().astype(int)
            ordered = [ordered[i] for i in picks]
        return ordered


def describe_case(case: Case, config: QAConfig) -> CaseQA:
    """Read a case with :func:`latent.core.prepare.read_native` and compute every descriptor and rule.

    Raises:
        CaseError: no CT (QA compares CT and MR), or what :func:`read_native` refuses.
    """
    if case.ct is None:
        raise CaseError(f"{case.pid}: no CT file in {case.folder}; QA needs the CT")
    mr, mask, ct, properties = read_native(case)
    spacing = tuple(float(s) for s in properties.spacing)
    metal = metal_components(ct, mask, spacing, config)
    values: dict[str, float | str] = {}
    values.update(ct_descriptors(ct, mask, config))
    values.update(metal_descriptors(ct, mr, mask, spacing, config, metal))
    values.update(mr_descriptors(mr, mask, spacing, config))
    values.update(fov.geometry_descriptors(mask, spacing))
    values.update(alignment_descriptors(mr, ct, mask, spacing, config))
    void_slices, void_mm3 = mismatch.signal_void(mr, ct, mask, metal.mask, spacing, config)
    lone_slices, lone_mm3 = mismatch.one_modality(mr, ct, mask, spacing, config)
    cut_slices = mismatch.fov_cut(mr, ct, mask, config)
    values.update(mr_void_mm3=void_mm3, one_modality_mm3=lone_mm3, fov_cut_slices=float(len(cut_slices)))
    slices = sorted(set(_slice_flags(mr, ct, mask, metal.mask, config))
                    | {(k, "mr_void") for k in void_slices} | {(k, "one_modality") for k in lone_slices}
                    | {(k, "fov_cut") for k in cut_slices})
    judged = fov.body_slices(mask, config)
    values.update(body_slices=float(judged), flagged_slices=float(len({k for k, _ in slices})))
    qa = CaseQA(case.pid, case.region, values, slices=slices)
    qa.findings = rule_findings(qa, fov.border_findings(mask, config), judged, config)
    return qa


def _slice_flags(mr, ct, mask, metal, config: QAConfig) -> list[tuple[int, str]]:
    """Every flagged ``(slice, reason code)``, sorted."""
    found = {(int(k), "metal") for k in np.nonzero(metal.reshape(metal.shape[0], -1).any(axis=1))[0]}
    found |= {(k, "ct_air") for k in fov.air_slices(ct, mask, config)}
    found |= {(k, "mr_dark") for k in fov.dark_slices(mr, mask, config)}
    found |= {(k, "mr_banding") for k in banding_slices(mr, ct, mask, config)[0]}
    return sorted(found)


def _of(qa: CaseQA, reason: str) -> list[int]:
    return [k for k, code in qa.slices if code == reason]


def rule_findings(qa: CaseQA, borders: list[str], judged: int, config: QAConfig) -> list[Finding]:
    """The case's own rules (no cohort): metal, streaks, alignment, slices, MR bias field, borders."""
    v = qa.values
    found: list[Finding] = []
    volume = float(v["metal_volume_mm3"])
    if volume > 0:
        void = float(v["metal_mr_ratio"])
        confirmed = "; MR signal void confirms it" if np.isfinite(void) and void < config.void_ratio else ""
        span = f"slices {int(v['metal_slice_first'])}-{int(v['metal_slice_last'])}"
        if volume >= config.metal_large_mm3:
            found.append(Finding("RED", "metal_large", f"large metal burden ({volume:.0f} mm^3, {span}{confirmed})"))
        else:
            found.append(Finding("YELLOW", "metal", f"metal implant ({volume:.0f} mm^3 in "
                                                    f"{int(v['metal_components'])} component(s), {span}{confirmed})"))
        if float(v["streak_ratio"]) > config.streak_ratio_max:
            found.append(Finding("YELLOW", "metal_streaks", f"metal streaks ({float(v['streak_ratio']):.0%} of the "
                                                            f"metal's neighbourhood <= {config.streak_hu:g} HU)"))
    if float(v["nmi_before"]) < config.nmi_low:
        found.append(Finding("RED", "nmi_low", f"low CT-MR similarity (NMI {float(v['nmi_before']):.3f})"))
    if float(v["nmi_delta"]) > config.nmi_gain or float(v["rigid_motion_mm"]) > config.rigid_motion_mm:
        found.append(Finding("RED", "misregistered", (
            f"CT-MR misregistration (a rigid registration moves the CT by {float(v['rigid_motion_mm']):.1f} mm "
            f"in-plane, {float(v['rigid_motion_z_mm']):.1f} mm along z; NMI {float(v['nmi_before']):.3f} -> "
            f"{float(v['nmi_after']):.3f})")))
    for code, words in (("ct_air", "mask overlaps CT air on slices"), ("mr_dark", "MR dark inside the mask on slices"),
                        ("mr_banding", "MR banding on slices"),
                        ("mr_void", f"MR signal void in soft tissue ({float(v['mr_void_mm3']):.0f} mm^3) on slices"),
                        ("one_modality", f"tissue in one modality only ({float(v['one_modality_mm3']):.0f} mm^3) "
                                         "on slices"),
                        ("fov_cut", "body cut by the field of view on slices")):
        hits = _of(qa, code)
        if hits:
            found.append(Finding("YELLOW", code, f"{words} {fov.ranges(hits)}"))
    flagged = int(v["flagged_slices"])
    if judged and flagged / judged > config.slices_red_fraction:
        found.append(Finding("RED", "many_slices", f"{flagged} of {judged} body slices flagged"))
    if float(v["bias_field_ratio"]) > config.bias_field_max:
        found.append(Finding("YELLOW", "bias_field", f"strong MR bias field (p95/p5 {float(v['bias_field_ratio']):.2f})"))
    for where in borders:
        found.append(Finding("YELLOW", "border", f"body touches the volume border at {where}"))
    return found
