"""CT-MR alignment: normalised mutual information in the mask, before and after a cheap rigid refinement."""

from __future__ import annotations

import math

import numpy as np

from latent.core.qa.config import QAConfig

#: CT range of the joint histogram (HU): air to dense bone; metal above is clipped.
CT_NMI_RANGE = (-1000.0, 2000.0)


def nmi(mr: np.ndarray, ct: np.ndarray, mask: np.ndarray, bins: int) -> float:
    """(H(MR) + H(CT)) / H(MR, CT) over the mask: 1 for independent images, 2 for identical ones.

    The MR is binned between its 0.5th and 99.5th percentile in the mask, the CT over
    :data:`CT_NMI_RANGE`.
    """
    body = mask > 0
    a, b = mr[body].astype(np.float64), np.clip(ct[body].astype(np.float64), *CT_NMI_RANGE)
    low, high = np.percentile(a, [0.5, 99.5])
    if high <= low:
        return 1.0
    joint, _, _ = np.histogram2d(np.clip(a, low, high), b, bins=bins, range=[[low, high], list(CT_NMI_RANGE)])
    joint /= joint.sum()

    def entropy(p: np.ndarray) -> float:
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    joint_entropy = entropy(joint)
    return (entropy(joint.sum(axis=1)) + entropy(joint.sum(axis=0))) / joint_entropy if joint_entropy > 0 else 1.0


def _image(array: np.ndarray, spacing_xyz):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    image.SetSpacing(tuple(float(s) for s in spacing_xyz))
    return image


def rigid_refinement(mr: np.ndarray, ct: np.ndarray, mask: np.ndarray, spacing_xyz,
                     config: QAConfig) -> tuple[np.ndarray, float, float]:
    """Register the CT rigidly onto the MR (Mattes MI, Euler3D, few iterations on a shrunk pyramid).

    Returns:
        ``(CT resampled onto the MR, translation in mm, rotation in degrees)``.
    """
    import SimpleITK as sitk

    fixed, moving = _image(mr, spacing_xyz), _image(np.clip(ct, *CT_NMI_RANGE), spacing_xyz)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=config.nmi_bins)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(config.registration_sampling, seed=config.forest_seed + 1)
    method.SetMetricFixedMask(sitk.Cast(_image(mask > 0, spacing_xyz), sitk.sitkUInt8))
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=0.01,
                                                    numberOfIterations=config.registration_iterations,
                                                    relaxationFactor=0.5)
    method.SetOptimizerScalesFromPhysicalShift()
    shrink = list(config.registration_shrink)
    method.SetShrinkFactorsPerLevel(shrink)
    method.SetSmoothingSigmasPerLevel([max(0.0, f / 2.0) for f in shrink])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    initial = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                                sitk.CenteredTransformInitializerFilter.GEOMETRY)
    method.SetInitialTransform(initial, inPlace=True)
    method.Execute(fixed, moving)
    moved = sitk.Resample(_image(ct, spacing_xyz), fixed, initial, sitk.sitkLinear, float(CT_NMI_RANGE[0]))
    parameters = initial.GetParameters()
    angle = math.degrees(max(abs(v) for v in parameters[:3]))
    shift = float(np.linalg.norm(parameters[3:6]))
    return sitk.GetArrayFromImage(moved), shift, angle


def alignment_descriptors(mr: np.ndarray, ct: np.ndarray, mask: np.ndarray, spacing_xyz,
                          config: QAConfig) -> dict[str, float]:
    """NMI before and after the rigid refinement, the gain, and how far the refinement moved the CT."""
    before = nmi(mr, ct, mask, config.nmi_bins)
    result = {"nmi_before": before, "nmi_after": before, "nmi_delta": 0.0, "rigid_shift_mm": 0.0,
              "rigid_rotation_deg": 0.0}
    if config.registration:
        moved, shift, angle = rigid_refinement(mr, ct, mask, spacing_xyz, config)
        after = nmi(mr, moved, mask, config.nmi_bins)
        result.update(nmi_after=after, nmi_delta=after - before, rigid_shift_mm=shift, rigid_rotation_deg=angle)
    return result
