"""mlsae.analysis.findings: the side-by-side table and the findings sentences read back the
numbers of the files the commands write (fake run folders, no model)."""

import json

from mlsae.analysis.findings import comparison, findings


def fake_run(path, lens, ratio, multi, fvu, seed_ratio, rel_var_t):
    path.mkdir(parents=True)
    (path / "analysis").mkdir()
    (path / "config.json").write_text(json.dumps({"run": {"train": {"lens": lens}}}))
    (path / "summary.json").write_text(json.dumps({"mean": {"fvu": fvu}}))
    (path / "analysis" / "summary.json").write_text(json.dumps({
        "aggregated_layer_var": 2.0, "per_token_layer_var": 2.0 / ratio,
        "aggregated_over_per_token_ratio": ratio, "frac_latents_multi_layer": multi,
        "alive_latents": 100, "frac_pairs_single_layer": 0.7, "persistence": 0.4,
        "frac_pairs_contiguous": 0.9,
        "seed_code_variant": {"aggregated_over_per_token_ratio": seed_ratio,
                              "rel_var_t": rel_var_t}}))
    return path


def test_comparison_and_findings(tmp_path):
    a = fake_run(tmp_path / "a", None, 12.5, 0.8, 0.25, 900.0, 0.002)
    b = fake_run(tmp_path / "b", "lenses/x", 10.0, 0.7, 0.3, 800.0, 0.004)
    (tmp_path / "a" / "eval.json").write_text(json.dumps({
        "mean": {"dce": 0.4, "fvu": 0.26},
        "replacement": {"ce_clean": 3.46, "ce_replaced": 7.24, "dce": 3.78}}))
    (tmp_path / "a" / "analysis" / "resid_sim.json").write_text(json.dumps({"models": {
        "smollm2-135m": {"mean": 0.81, "n_layers": 30},
        "gemma3-270m": {"mean": 0.74, "n_layers": 18}}}))
    header, rows = comparison([a, b])
    assert header == ["number", "a (no lens)", "b (tuned lens)", "meaning"]
    by = {r[0]: r[1:3] for r in rows}
    assert by["held-out FVU"] == [0.25, 0.3]
    assert by["dCE (nats)"] == [0.4, None]
    assert by["ratio (active pairs)"] == [12.5, 10.0]
    assert by["ratio (seed code, global)"] == [900.0, 800.0]
    assert by["ratio (seed code, per batch)"] == [500.0, 250.0]  # 1 / rel_var_t
    assert by["multi-layer latents"] == [0.8, 0.7]
    text = " ".join(findings(a, [b]))
    assert "ratio 12.5" in text and "900" in text and "0.8 of 100 alive" in text
    assert "smollm2-135m 0.81" in text and "different families" in text
    assert "Lens comparison" in text and "3.46 -> 7.24" in text
    assert "mlsae analyze" in findings(tmp_path / "nothing")[0]
