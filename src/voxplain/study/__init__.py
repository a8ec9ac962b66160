"""Blinded user studies of explanation methods (paper 3, 3.4): make, serve, analyse."""

from voxplain.study.analyse import analyse
from voxplain.study.make import StudyFolder, make_questionnaires
from voxplain.study.serve import AnswerStore, serve

__all__ = ["AnswerStore", "StudyFolder", "analyse", "make_questionnaires", "serve"]
