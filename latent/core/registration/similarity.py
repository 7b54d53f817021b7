"""Normalised mutual information between MR and CT in a mask: the similarity ``latent register``
checks its results with and ``latent qa`` judges alignment by."""

from __future__ import annotations

import numpy as np

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
