"""Measures of classifiers and explanations, on arrays and models: classification metrics with
bootstrap CIs, localisation against a known truth, faithfulness curves, map similarity (paper
1's robustness), heatmap statistics (paper 2), the model-randomisation sanity check, CyCE's
domain transfer (paper 3), misclassified slices."""

from voxplain.evaluate.classification import (bootstrap_metrics, chance_p_value,
                                              classification_metrics, confusion_matrices,
                                              cross_validation_metrics, prediction_metrics)
from voxplain.evaluate.faithfulness import faithfulness_curves
from voxplain.evaluate.localisation import (localisation_auc, localisation_scores, pointing_game,
                                            relevance_mass_inside, truth_on_grid)
from voxplain.evaluate.permutation import covariate_design, permutation_test
from voxplain.evaluate.sanity import model_randomisation_test, passes_model_randomisation
from voxplain.evaluate.similarity import (cosine_matrix, prob_cnn, rank_correlation,
                                          rank_correlation_matrix, roi_cosine_similarity,
                                          roi_vectors)
from voxplain.evaluate.slices import misclassified_slices, slice_summary
from voxplain.evaluate.stats import (cluster_table, one_sample_ttest, percentile_test,
                                     two_sample_ttest)
from voxplain.evaluate.transfer import transfer_probabilities, transfer_table

__all__ = ["bootstrap_metrics", "chance_p_value", "classification_metrics", "cluster_table",
           "confusion_matrices", "cosine_matrix", "covariate_design", "cross_validation_metrics",
           "faithfulness_curves", "localisation_auc", "localisation_scores", "misclassified_slices",
           "model_randomisation_test", "one_sample_ttest", "passes_model_randomisation",
           "percentile_test", "permutation_test", "pointing_game", "prediction_metrics", "prob_cnn",
           "rank_correlation", "rank_correlation_matrix", "relevance_mass_inside",
           "roi_cosine_similarity", "roi_vectors", "slice_summary", "transfer_probabilities",
           "transfer_table", "truth_on_grid", "two_sample_ttest"]
