"""The ten pipelines' names and keys are ADC's (shared/adc-pipelines.md, section 1)."""
from __future__ import annotations

import pytest

from worker.pipelines.catalog import ADC_MODELS_BASE_URL, ADC_SLUGS, PIPELINES, algorithm_key, all_models

pytestmark = pytest.mark.timeout(30)

# slug -> (pipeline name, filtered, terminal key), the doc's table
TABLE = {
    "panama_moths_2023": ("Panama Species Classifier 2023", True, "panama_species_classifier_2023"),
    "panama_moths_2024": ("Panama Species Classifier - Apr 2024", True, "panama_species_classifier_apr_2024"),
    "quebec_vermont_moths_2023": ("Quebec & Vermont Species Classifier - Apr 2024", True,
                                  "quebec_vermont_species_classifier_apr_2024"),
    "uk_denmark_moths_2023": ("UK & Denmark Species Classifier - Apr 2024", True, "uk_denmark_species_classifier_apr_2024"),
    "costa_rica_moths_turing_2024": ("Turing Costa Rica Species Classifier", True, "turing_costa_rica_species_classifier"),
    "anguilla_moths_turing_2024": ("Turing Anguilla Species Classifier", True, "turing_anguilla_species_classifier"),
    "kenya-uganda_moths_turing_2024": ("Turing Kenya and Uganda Species Classifier", True,
                                       "turing_kenya_and_uganda_species_classifier"),
    "global_moths_2024": ("Global Species Classifier - Aug 2024", True, "global_species_classifier_aug_2024"),
    "moth_binary": ("Moth / Non-Moth Classifier", False, "moth_nonmoth_classifier"),
    "insect_orders_2025": ("Insect Order Classifier", False, "insect_order_classifier"),
}


def test_ten_slugs_in_adc_order():
    assert list(ADC_SLUGS) == list(TABLE)


@pytest.mark.parametrize("slug", list(TABLE))
def test_names_keys_and_filter_match_adc(slug):
    name, filtered, key = TABLE[slug]
    spec = PIPELINES[slug]
    assert spec.name == name and spec.classifier.key == key
    assert (spec.binary is not None) == filtered
    assert spec.detector.key == "fasterrcnn_for_ami_moth_traps_2023"
    assert [m.task_type for m in spec.models()] == ["localization"] + ["classification"] * (2 if filtered else 1)
    if filtered:
        assert spec.binary.key == "moth_nonmoth_classifier" and spec.binary.taxon_rank == "SUPERFAMILY"
    assert all(m.weights_url.startswith(ADC_MODELS_BASE_URL + "/") for m in spec.models())


def test_key_rule_follows_adc_slugify():
    for name, key in [(TABLE[s][0], TABLE[s][2]) for s in TABLE]:
        assert algorithm_key(name) == key
    assert algorithm_key("FasterRCNN for AMI Moth Traps 2023") == "fasterrcnn_for_ami_moth_traps_2023"
    assert algorithm_key(" _A  b_ ") == "a_b"  # spaces -> "__" -> "_" once; outer "_" trimmed
    assert algorithm_key("a   b") == "a__b"  # three underscores: one left-to-right pass leaves two, as ADC's


def test_ranks_sizes_and_transforms():
    assert PIPELINES["insect_orders_2025"].classifier.taxon_rank == "ORDER"
    assert PIPELINES["insect_orders_2025"].classifier.architecture == "convnext_tiny"
    turing = PIPELINES["anguilla_moths_turing_2024"].classifier
    assert (turing.architecture, turing.input_size_px, turing.transform) == ("turing_resnet50", 300, "turing")
    assert PIPELINES["global_moths_2024"].classifier.taxon_rank == "SPECIES"
    # 10 pipelines share one detector and one filter: 1 + 1 + 8 species + 1 orders = 11 distinct models
    assert len(all_models()) == 11
