"""How probabilities are shown to people (dashboard, burned-in text, KOS)."""

from dicom_ai_node.infer.prediction import percent


def test_percent_never_rounds_to_certainty() -> None:
    assert [percent(p) for p in (0.0, 0.0004, 0.25, 0.994, 0.9996, 1.0)] == [
        "0%",
        "<1%",
        "25%",
        "99%",
        ">99%",
        "100%",
    ]
