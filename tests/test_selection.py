"""The rule that picks the stored basis from the allocation's estimates (offline.selection.pick)."""

from bitsmoe_vllm.offline.selection import pick

KINDS = [["int8-layer", "fp16-layer"], ["int8", "fp16"], ["identity"]]


def test_the_error_feedback_picks_within_a_kind_and_rounding_to_nearest_across_kinds():
    """The trained MoE's estimates at 4 bits: rounded to nearest they rate the int8 basis per layer lowest, the
    error feedback the fp16 one (measured: KL 0.000165 against 0.000038), and the identity lowest of all, which
    rounding to nearest refutes (its feedback estimate is loose for correlated channels)."""
    feedback = {"int8-layer": 3.74e-5, "fp16-layer": 2.90e-5, "int8": 4.53e-5, "fp16": 5.21e-5, "identity": 2.23e-5}
    nearest = {"int8-layer": 1.50e-4, "fp16-layer": 1.66e-4, "int8": 2.19e-4, "fp16": 3.72e-4, "identity": 3.83e-4}
    assert pick(KINDS, feedback, nearest) == "fp16-layer"
    # another kind whose rounded-to-nearest estimate is lower wins, whatever its feedback estimate
    assert pick(KINDS, feedback, nearest | {"int8": 1.6e-4}) == "int8"
    # at 2.5 bits both estimates rate the int8 basis per layer lowest of its kind
    assert pick(KINDS, feedback | {"fp16-layer": 4e-5}, nearest) == "int8-layer"


def test_ties_go_to_the_earlier_basis():
    same = dict.fromkeys(("int8-layer", "fp16-layer", "int8", "fp16", "identity"), 1.0)
    assert pick(KINDS, same, same) == "int8-layer"
