"""Per-tissue HU of the phantom CT against a real CT with TotalSegmentator labels.

Prints the markdown table used in ``docs/phantom_hu.md``:

    python benchmarks/compare_phantom_hu.py [DATA_DIR] [--cases 12] [--regions AB TH]

``DATA_DIR`` (default ``../shared/data`` next to the repository) holds ``example_ct_sm.nii.gz``
and its TotalSegmentator v2 labels ``example_seg.nii.gz``. Real tissues come from labels where
TotalSegmentator has them and from HU windows inside / outside the body where it has none
(fat, air); phantom tissues come from the phantom's own label map (gas inside the body by the
same HU rule in both). Soft tissues are eroded by one voxel in-plane in both, so the rows show
the tissue rather than the partial volume at its border. Bone is split the same
way in both: interior = bone voxels left after a one-voxel 3D erosion of the bone mask
(cancellous), shell = the rest (cortex plus partial volume). The phantom is also reported
resampled to the real CT's 3 mm grid so partial volume is comparable.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from latent.core.io import read_volume
from latent.core.phantom.generate import case_ids, case_rng, render_case
from latent.core.phantom.anatomy import TISSUES

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"

# TotalSegmentator v2 "total" task class ids.
TS_SPLEEN, TS_KIDNEYS, TS_GALLBLADDER, TS_LIVER = [1], [2, 3], [4], [5]
TS_LUNGS = list(range(10, 15))
TS_VERTEBRAE = list(range(25, 51))  # sacrum, S1, L5..L1, T12..T1, C7..C1
TS_AORTA_CAVA = [52, 62, 63]
TS_MUSCLES = list(range(80, 90))  # gluteus max/med/min, autochthon, iliopsoas
TS_RIBS_STERNUM = list(range(92, 117))
#: HU window for fat among body voxels without any label (no fat class in the total task).
FAT_WINDOW = (-200.0, -30.0)
#: Threshold separating body from outside air (largest component, holes filled per slice).
BODY_HU = -500.0
ROWS = ("air (outside body)", "gas in body", "lung", "fat", "muscle", "liver", "spleen", "kidney",
        "fluid (gallbladder)", "blood (aorta, cava)", "bone interior (cancellous)", "bone shell (cortical + PV)",
        "bone, all voxels")


def body_mask(ct: np.ndarray) -> np.ndarray:
    """Largest connected component above BODY_HU with holes filled slice by slice."""
    labelled, count = ndimage.label(ct > BODY_HU)
    body = labelled == np.argmax(np.bincount(labelled.ravel())[1:]) + 1 if count else ct > BODY_HU
    inplane = np.zeros((3, 3, 3), bool)
    inplane[1] = ndimage.generate_binary_structure(2, 1)
    return ndimage.binary_fill_holes(body, structure=inplane)


def bone_split(bone: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(interior, shell) of a bone mask: one-voxel 6-connected erosion."""
    interior = ndimage.binary_erosion(bone)
    return interior, bone & ~interior


def core(mask: np.ndarray) -> np.ndarray:
    """One-voxel in-plane erosion: the tissue's own HU, not the partial volume at its border."""
    inplane = np.zeros((3, 3, 3), bool)
    inplane[1] = ndimage.generate_binary_structure(2, 1)
    return ndimage.binary_erosion(mask, structure=inplane)


def real_tissues(ct: np.ndarray, seg: np.ndarray) -> dict[str, np.ndarray]:
    """Tissue -> HU values of the real CT."""
    body = body_mask(ct)
    has = lambda ids: core(np.isin(seg, ids))  # noqa: E731
    vertebrae = np.isin(seg, TS_VERTEBRAE)
    interior, shell = bone_split(vertebrae)
    unlabelled = body & (seg == 0)
    masks = {
        "air (outside body)": ~body,
        "gas in body": body & (ct < BODY_HU) & ~has(TS_LUNGS),
        "lung": has(TS_LUNGS),
        "fat": unlabelled & (ct > FAT_WINDOW[0]) & (ct < FAT_WINDOW[1]),
        "muscle": has(TS_MUSCLES),
        "liver": has(TS_LIVER),
        "spleen": has(TS_SPLEEN),
        "kidney": has(TS_KIDNEYS),
        "fluid (gallbladder)": has(TS_GALLBLADDER),
        "blood (aorta, cava)": has(TS_AORTA_CAVA),
        "bone interior (cancellous)": interior,
        "bone shell (cortical + PV)": shell | np.isin(seg, TS_RIBS_STERNUM),
        "bone, all voxels": vertebrae | np.isin(seg, TS_RIBS_STERNUM),
    }
    return {name: ct[mask] for name, mask in masks.items()}


def phantom_tissues(ct: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Tissue -> HU values of a phantom CT from its label map (same definitions as the real)."""
    label = {name: t.label for name, t in TISSUES.items()}
    is_ = lambda *names: core(np.isin(labels, [label[n] for n in names]))  # noqa: E731
    bone = np.isin(labels, [label["cortical"], label["cancellous"]])
    interior, shell = bone_split(bone)
    masks = {
        "air (outside body)": labels == 0,
        "gas in body": (labels > 0) & (ct < BODY_HU) & ~np.isin(labels, [label["lung"]]),
        "lung": is_("lung"),
        "fat": is_("fat"),
        "muscle": is_("muscle"),
        "liver": is_("liver"),
        "spleen": is_("spleen"),
        "kidney": is_("kidney"),
        "fluid (gallbladder)": is_("fluid"),
        "blood (aorta, cava)": is_("blood"),
        "bone interior (cancellous)": interior,
        "bone shell (cortical + PV)": shell,
        "bone, all voxels": bone,
    }
    return {name: ct[mask] for name, mask in masks.items()}


def resample(array: np.ndarray, spacing_xyz, target_mm: float, nearest: bool) -> np.ndarray:
    """Resample a (z, y, x) array to isotropic ``target_mm``: labels nearest; images Gaussian
    pre-filtered to the coarser voxel's width (FWHM) first, then linear, so partial volume
    matches a scan acquired at ``target_mm`` instead of point-sampling the fine grid."""
    if not nearest:
        fwhm_mm = np.sqrt(np.maximum(target_mm**2 - np.asarray(spacing_xyz[::-1]) ** 2, 0.0))
        array = ndimage.gaussian_filter(array, fwhm_mm / 2.355 / np.asarray(spacing_xyz[::-1]))
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing_xyz))
    size = [max(1, int(round(n * s / target_mm))) for n, s in zip(image.GetSize(), image.GetSpacing())]
    interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    out = sitk.Resample(image, size, sitk.Transform(), interpolator, image.GetOrigin(), (target_mm,) * 3,
                        image.GetDirection(), -1000.0 if not nearest else 0.0, image.GetPixelID())
    return sitk.GetArrayFromImage(out)


def summary(values: np.ndarray) -> str:
    """``n, mean +- sd, p5 / p50 / p95`` cell."""
    if values.size == 0:
        return "-"
    p5, p50, p95 = np.percentile(values, [5, 50, 95])
    return f"{values.size} | {values.mean():.0f} +- {values.std():.0f} | {p5:.0f} / {p50:.0f} / {p95:.0f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", nargs="?", type=Path, default=DEFAULT_DATA,
                        help="folder with example_ct_sm.nii.gz and example_seg.nii.gz (default: ../shared/data)")
    parser.add_argument("--cases", type=int, default=12, help="phantom cases (default 12)")
    parser.add_argument("--regions", nargs="+", default=["AB", "TH"], help="phantom regions (default AB TH)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=["small", "synthrad"], default="small")
    args = parser.parse_args(argv)

    ct, properties = read_volume(args.data_dir / "example_ct_sm.nii.gz", dtype=np.float32)
    seg, _ = read_volume(args.data_dir / "example_seg.nii.gz")
    real = real_tissues(ct, seg)
    native: dict[str, list] = {name: [] for name in ROWS}
    coarse: dict[str, list] = {name: [] for name in ROWS}
    target = float(np.mean(properties.spacing))
    for region, pid in case_ids(args.cases, args.regions):
        case = render_case(pid, region, case_rng(args.seed, pid), args.size)
        for name, values in phantom_tissues(case.ct.astype(np.float32), case.labels).items():
            native[name].append(values)
        ct3 = resample(case.ct.astype(np.float32), case.properties.spacing, target, nearest=False)
        labels3 = resample(case.labels, case.properties.spacing, target, nearest=True)
        for name, values in phantom_tissues(ct3, labels3).items():
            coarse[name].append(values)

    print(f"Real: {args.data_dir.name}/example_ct_sm.nii.gz, spacing {properties.spacing} mm. "
          f"Phantom: {args.cases} '{args.size}' cases of {' '.join(args.regions)}, seed {args.seed}; "
          f"'3 mm' = resampled to {target:g} mm isotropic.\n")
    print("| tissue | real n | real mean +- sd | real p5 / p50 / p95 | phantom n | phantom mean +- sd "
          "| phantom p5 / p50 / p95 | 3 mm n | 3 mm mean +- sd | 3 mm p5 / p50 / p95 |")
    print("| --- " * 10 + "|")
    for name in ROWS:
        cells = [summary(real[name]), summary(np.concatenate(native[name])), summary(np.concatenate(coarse[name]))]
        cells = [c if c != "-" else "- | - | -" for c in cells]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
