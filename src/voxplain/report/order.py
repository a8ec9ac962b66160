"""The order of the report's sections, in one place: findings and results first, how the run
was made (cohort, configuration, software versions) last; the interactive viewers go between
them (see :func:`voxplain.report.html.build_report`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from voxplain.report.cohorts import external_cohorts_section
from voxplain.report.faithfulness import faithfulness_section
from voxplain.report.sanity import randomisation_section
from voxplain.report.sections import (ReportContext, Section, classification_section,
                                      cohort_section, configuration_section,
                                      explanations_section, findings_section,
                                      localisation_section, masks_section, networks_section,
                                      robustness_section, search_section, slices_section,
                                      statistics_section)

SECTIONS: tuple[Callable[[ReportContext], Section], ...] = (
    findings_section, classification_section, search_section, networks_section,
    external_cohorts_section, localisation_section, faithfulness_section, explanations_section,
    slices_section, masks_section, robustness_section, randomisation_section,
    statistics_section)
TRAILING_SECTIONS: tuple[Callable[[ReportContext], Section], ...] = (
    cohort_section, configuration_section)


def all_sections(context: ReportContext, sections: Iterable[Callable[[ReportContext], Section]]
                 = SECTIONS) -> list[Section]:
    """The sections that concern the run (``applies``), built in order."""
    built = [build(context) for build in sections]
    return [section for section in built if section.applies]
