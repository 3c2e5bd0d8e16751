"""Plain-data records: validation, msgpack round trips, stable keys."""
import msgpack
import pytest

from planner import Candidate, LayerSignature, Plan


def test_plan_round_trips_through_msgpack():
    plan = Plan(adaptive_r=2, overlap_degree=4, a2a_algo="2d", expert_kernel="grouped")
    data = msgpack.unpackb(msgpack.packb(plan.to_dict()))
    assert Plan.from_dict(data) == plan
    assert plan.label() == "r=2 d=4 2d grouped"


@pytest.mark.parametrize("kwargs, named", [
    ({"adaptive_r": -1}, "adaptive_r"),
    ({"overlap_degree": 0}, "overlap_degree"),
    ({"a2a_algo": "ring"}, "a2a_algo"),
    ({"expert_kernel": "fast"}, "expert_kernel"),
])
def test_plan_rejects_bad_values_naming_the_field(kwargs, named):
    with pytest.raises(ValueError, match=named):
        Plan(**kwargs)


def test_signature_key_is_stable_and_distinguishes_fields():
    sig = LayerSignature(4096, 14336, 8, 2, dtype="bfloat16", training=True, capacity_factor=1.0)
    assert sig.key() == "D4096-H14336-E8-k2-bfloat16-ffn-train-cf1"
    assert LayerSignature.from_dict(msgpack.unpackb(msgpack.packb(sig.to_dict()))) == sig
    variants = {sig.key(),
                LayerSignature(4096, 14336, 8, 2, training=False).key(),
                LayerSignature(4096, 14336, 8, 2, capacity_factor=0.0).key(),
                LayerSignature(4096, 14336, 8, 2, capacity_factor=-1.0).key(),
                LayerSignature(4096, 14336, 8, 2, dtype="float32").key(),
                LayerSignature(4096, 14336, 8, 2, expert_type="gated_ffn").key()}
    assert len(variants) == 6


def test_signature_validation_and_derived_sizes():
    with pytest.raises(ValueError, match="top_k must be in \\[1, 4\\]"):
        LayerSignature(64, 128, 4, 5)
    with pytest.raises(ValueError, match="dtype"):
        LayerSignature(64, 128, 4, 2, dtype="int8")
    gated = LayerSignature(64, 128, 4, 2, dtype="float32", expert_type="gated_ffn")
    assert gated.dtype_bytes == 4
    assert gated.expert_weight_bytes == 3 * 64 * 128 * 4


def test_candidate_round_trip_keeps_reasons_and_breakdown():
    cand = Candidate(Plan(), None, ["2d all-to-all needs more than one node"], {})
    assert not cand.feasible
    again = Candidate.from_dict(msgpack.unpackb(msgpack.packb(cand.to_dict())))
    assert again == cand
    ok = Candidate(Plan(), 1.5, [], {"a2a": 0.5, "experts": 1.0})
    assert ok.feasible and Candidate.from_dict(ok.to_dict()) == ok
