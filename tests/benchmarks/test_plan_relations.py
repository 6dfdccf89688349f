"""The plan-relations diagnostic: the expectation read-out, and end to end on a stand-in
planner whose coordinates follow the relation word (so every number is known)."""

from __future__ import annotations

import torch

from lavida_agent.benchmarks.plan_relations import (
    PAIRS,
    RELATIONS,
    expected_coordinates,
    plan_relations,
    sampled_relations,
)
from lavida_agent.model.modeling_lavida import LavidaOutput
from tests.fakes import tiny_pipeline

WORDS = " ".join(["large", "of", *RELATIONS, *(w for pair in PAIRS for label in pair for w in label.split())])


def test_expected_coordinate_of_a_peak_and_of_a_flat_distribution():
    logits = torch.zeros(2, 100)
    logits[0, 10 + 17] = 50.0  # <LOC_17> with loc_token_offset 10
    out = expected_coordinates(logits, loc_token_offset=10, num_loc_tokens=65)
    torch.testing.assert_close(out, torch.tensor([17.0, 32.0]))


class RelationReader(torch.nn.Module):
    """Puts every coordinate at 10 after `left`/`above` and at 50 after `right`/`below`."""

    def __init__(self, model, tokenizer):
        super().__init__()
        self.model, self.config = model, model.config
        self.low = [tokenizer.convert_tokens_to_ids(w) for w in ("left", "above")]
        self.high = [tokenizer.convert_tokens_to_ids(w) for w in ("right", "below")]

    def forward(self, input_ids, **_):
        c = self.config
        logits = torch.zeros(*input_ids.shape, c.vocab_size)
        low = torch.isin(input_ids, torch.tensor(self.low)).any(1)
        value = torch.where(low, 10, 50)
        logits[torch.arange(len(input_ids)), :, c.loc_token_offset + value] = 100.0
        return LavidaOutput(text_logits=logits)


def test_plan_relations_measures_a_planner_that_reads_the_relation():
    pipe = tiny_pipeline(corpus=[WORDS, "purple orange"])
    random_model = plan_relations(pipe)
    assert random_model["n"] == len(PAIRS) * len(RELATIONS) * 4 and random_model["n_sampled"] == 48
    assert 0.0 <= random_model["relation_holds"] <= 1.0 and 0.0 <= random_model["sampled_holds"] <= 1.0
    assert plan_relations(pipe) == random_model  # deterministic

    pipe.model = RelationReader(pipe.model, pipe.tokenizer)
    out = plan_relations(pipe, sampled=False)
    assert out["relation_shift_px"] == 40.0  # 50 - 10 px on both axes (64 px over 64 bins)
    assert out["partner_shift_px"] == 0.0  # it never looks at the other box
    assert out["centres"]["left of | partner right"] == [10.0, 10.0]
    assert out["relation_holds"] == 1.0  # every partner's centre lies between 10 and 50


class FixedPlanner:
    """Plans the first object at x = y = 10 px and the second at 50 px, whatever the prompt."""

    def plan(self, prompts, seed=0):
        plan = [("a", (5, 5, 15, 15)), ("b", (45, 45, 55, 55))]
        return type("Out", (), {"plans": [plan for _ in prompts]})()


def test_sampled_relations_scores_the_plans_centres():
    out = sampled_relations(FixedPlanner(), per_relation=3)
    assert out["n_sampled"] == 12
    assert out["sampled_holds"] == 0.5  # right for left of and above, wrong for the others
    assert out["sampled_separation_px"] == 0.0  # +40 px twice, -40 px twice
