"""The demo's query plan and generation-accuracy metric follow the base model's data spec
(issue 21: a latent base model with more backgrounds must not be prompted or classified with
the 16-px pixel model's three)."""

import numpy as np
from ml_collections import ConfigDict

from jaxattrib.data.synthetic import SyntheticConceptSpec, make_withheld, parse_caption
from jaxattrib.runs import demo

HELD = [{"shape": "star", "color": "purple"}, {"shape": "square", "color": "red"}]


def _config(per_concept=40, seed=0):
    return ConfigDict({"seed": seed, "generate": {"per_concept": per_concept}})


def test_query_plan_draws_backgrounds_from_the_spec():
    plan = demo.demo_query_plan(_config(), HELD, ("orange", "cyan", "pink"))
    bgs = {parse_caption(str(p))["background"] for p in plan["prompts"]}
    assert bgs == {"orange", "cyan", "pink"}
    for p, c in zip(plan["prompts"], plan["concept"]):
        words = parse_caption(str(p))
        assert (words["shape"], words["color"]) == (HELD[c]["shape"], HELD[c]["color"])
    # the default stays the pixel model's three backgrounds, drawn as before (runs resume)
    default = demo.demo_query_plan(_config(), HELD)
    assert ({parse_caption(str(p))["background"] for p in default["prompts"]}
            == {"black", "white", "gray"})


def test_generation_accuracy_uses_the_base_models_vocabularies():
    spec = SyntheticConceptSpec(backgrounds=("black", "orange", "cyan"), size=32,
                                per_combination=2)
    renders = make_withheld(spec, 5, HELD)
    concept = np.array([HELD.index({"shape": s, "color": c}) for s, c in
                        zip(renders.label_strings("shape"), renders.label_strings("color"))])
    queries = {"images": np.asarray(renders.images), "concept": concept}
    acc = demo._generation_accuracy(queries, HELD, spec)
    assert acc == {"shape": 1.0, "color": 1.0}
    # ground truth by construction: swapping the prompted concepts makes every shape wrong
    swapped = {"images": queries["images"], "concept": 1 - concept}
    assert demo._generation_accuracy(swapped, HELD, spec)["shape"] == 0.0
