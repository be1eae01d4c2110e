"""Content-loss intensity groups fitted from the data: which ExM intensities must become which EM intensities.

The content loss (:class:`exem.losses.IntensityGroupContentLoss`) splits each domain into intensity groups and
asks the translation to map groups onto each other. Which groups suit a stain cannot be guessed: pan-protein ExM
is bright where EM is dark (membranes, mitochondria), a direct stain is not. :func:`fit_content_groups` fits them
from samples of both domains, normalised to [0, 1] exactly as training sees them:

1. thresholds per domain with multi-level Otsu (:func:`skimage.filters.threshold_multiotsu`); groups are
   numbered from dark (0) to bright;
2. the volume fraction of each group;
3. the mapping: every EM group goes to one LM group, every LM group receives at least one EM group, and the
   intensity order is kept (``direct``) or reversed (``pan_protein``): a stain's brightness is monotone in the
   density of what it stains, in ExM as in EM. Of these mappings the one whose mapped fractions are closest
   wins (``score`` = 1 − total-variation distance between the LM fractions and the mapped EM fractions,
   1 = identical). E.g. pan-protein ExM: the bright ~25 % of ExM ↔ the dark ~25 % of EM. (The published
   mapping, bright ExM ↔ mid-grey EM, is not monotone; it stays available with ``auto: false``.)

Mappings whose scores lie within ``tie_tolerance`` of the best are ties. Blur widens bright ExM structures, so the
bright ExM fraction can sit between a pan-protein and a direct candidate. An optional stain prior (``pan_protein``:
bright LM ↔ dark EM, ``direct``: bright ↔ bright) breaks such ties, and a warning says when the data disagree with
the prior (the data win). Without a prior the skewness of the two histograms breaks them: the sparse structures of
a domain make a long tail on their side (pan-protein ExM: a bright tail; EM: a dark tail), so opposite skews mean
``pan_protein`` and equal ones ``direct``, when both are clear (``|skew| > 0.2``); otherwise a warning asks for the
prior.

Before the fit each sampled patch is smoothed in-plane (Gaussian, ``smooth_sigma`` voxels): voxel noise (EM grain,
ExM shot noise) otherwise widens the dominant mode (cytoplasm) until Otsu splits it in two instead of separating
structures. Voxels at exactly 0 or 1 (clipped by the normalisation, padding, saturation) are left out of the fit and
reported, so a black frame around an aligned EM stack does not become a group of its own.

The names below are imported from here; the settings and the fit record live in :mod:`exem.content_groups_record`,
the fit in :mod:`exem.content_groups_fit`, the picture and the files in :mod:`exem.content_groups_report`.
"""

from __future__ import annotations

from exem.content_groups_fit import (
    SATURATED_WARNING,
    SKEW_CLEAR,
    CalibrationResult,
    check_levels,
    fit_content_groups,
    fit_from_datamodule,
    group_fractions,
    otsu_thresholds,
    sample_patch_shape,
    smooth_inplane,
)
from exem.content_groups_record import (
    FIT_KEYS,
    OTSU_BINS,
    RECORD_KEYS,
    STAINS,
    CalibrationError,
    ContentFitSettings,
    ContentGroups,
    check_stain,
    group_name,
)
from exem.content_groups_report import content_groups_panel, write_content_groups

__all__ = [
    "FIT_KEYS",
    "OTSU_BINS",
    "RECORD_KEYS",
    "SATURATED_WARNING",
    "SKEW_CLEAR",
    "STAINS",
    "CalibrationError",
    "CalibrationResult",
    "ContentFitSettings",
    "ContentGroups",
    "check_levels",
    "check_stain",
    "content_groups_panel",
    "fit_content_groups",
    "fit_from_datamodule",
    "group_fractions",
    "group_name",
    "otsu_thresholds",
    "sample_patch_shape",
    "smooth_inplane",
    "write_content_groups",
]
