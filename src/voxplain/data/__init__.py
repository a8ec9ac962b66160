"""Cohorts, images, grids, atlases and synthetic data: arrays in, arrays out.

The lowest layer above configuration and file I/O (README, "Architecture"): nothing here knows
about run folders, models or explanations.
"""

from voxplain.data.atlas import Atlas
from voxplain.data.classes import class_index, patient_class, resolve_target
from voxplain.data.cohort import (Cohort, CohortError, ImageStack, bids_ids, class_counts,
                                  class_names, encode_labels, load_images, quality_check)
from voxplain.data.grid import Grid, downsample, resample_to_grid
from voxplain.data.images import ImageError, read_header, read_image
from voxplain.data.lesions import generate_lesion_cohort
from voxplain.data.ms import generate_ms_cohort
from voxplain.data.regions import region_means, top_regions
from voxplain.data.synthetic import generate_atrophy_cohort
from voxplain.data.template import brain_mask, gm_template

__all__ = ["Atlas", "Cohort", "CohortError", "Grid", "ImageError", "ImageStack", "bids_ids",
           "brain_mask", "class_counts", "class_index", "class_names", "downsample",
           "encode_labels", "generate_atrophy_cohort", "generate_lesion_cohort",
           "generate_ms_cohort", "gm_template", "load_images", "patient_class", "quality_check",
           "read_header", "read_image", "region_means", "resample_to_grid", "resolve_target",
           "top_regions"]
