"""The provenance record: one set of sidecar names, written and read back the same."""

from bidsharmony.provenance import SIDECAR_KEYS, Provenance


def test_a_record_round_trips_through_its_sidecar_and_leaves_out_what_is_not_there():
    prov = Provenance(method="bhdiff (3D)", model={"Name": "m", "Sha256": "ab" * 32}, parameters={"ode_steps": 2},
                      slices_harmonized=90, slices_total=120, harmonization_seconds=1.5, quality={"SimilarityToInput": 0.9})
    side = prov.to_sidecar()
    assert "FallbackSlices" not in side and "Standardisation" not in side  # a 3D method has no fallback slices
    assert side["SlicesHarmonized"] == 90 and side["Model"]["Name"] == "m"
    assert Provenance.from_sidecar({**side, "Sources": ["bids:raw:x"], "SoftwareVersion": "1"}) == prov  # the sink's own fields are not its
    assert set(side) <= set(SIDECAR_KEYS.values())


def test_every_field_has_one_sidecar_name():
    from dataclasses import fields

    names = [f.name for f in fields(Provenance)]
    assert names and set(names) == set(SIDECAR_KEYS) and len(set(SIDECAR_KEYS.values())) == len(SIDECAR_KEYS)
