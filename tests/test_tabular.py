"""GBDT and LR model files: saved as skops, scored like the LSTM, refused when unsafe."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import skops.io as sio

from common.features import AGGREGATE_FEATURES
from common.tabular import (
    TABULAR_FORMAT,
    TABULAR_KINDS,
    TabularModel,
    aggregate_features,
    load_tabular,
    save_tabular,
)
from simulations.cli import checks, main
from simulations.cli.runs import model_in, run_models
from simulations.methods import AGGREGATE_METHODS

AT = "2025-03-15"
SETS = ["--set", "synthetic.num-merchants=2", "--set", "synthetic.users-median=60"]


class _Rows:
    """The one attribute the tabular models read from a ``Snapshots``."""

    def __init__(self, static: np.ndarray) -> None:
        self.static = static


def _tiny_gbdt(seed: int = 0) -> tuple[TabularModel, np.ndarray]:
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(400, len(AGGREGATE_FEATURES))).astype(np.float32)
    y = (x[:, 0] + 0.5 * rng.normal(size=400) > 0).astype(np.float32)
    args = {"max_iter": 15, "random_state": seed}
    model = TabularModel("gbdt", HistGradientBoostingClassifier(**args).fit(x, y),
                         HistGradientBoostingRegressor(**args).fit(x, x[:, 1]),
                         (0.25, HistGradientBoostingClassifier(**args).fit(x, y), 0.5, 0.1))
    return model, x


def test_saved_model_predicts_exactly_as_in_memory(tmp_path: Path) -> None:
    model, x = _tiny_gbdt()
    loaded = load_tabular(save_tabular(model, tmp_path / "model.skops"))
    before, after = model.predict(_Rows(x)), loaded.predict(_Rows(x))
    for key in ("decay", "interest", "activation"):
        np.testing.assert_array_equal(before[key], after[key])
    assert after["activation"].shape == (len(x), 4)
    np.testing.assert_array_equal(after["activation"][:, 0], np.float32(0.25))


def test_a_model_of_an_earlier_layout_reads_its_columns_by_name(tmp_path: Path) -> None:
    from sklearn.linear_model import LinearRegression, LogisticRegression

    # Saved before some aggregates existed: it read every third column, in its own order.
    names = AGGREGATE_FEATURES[::3][::-1]
    cols = [AGGREGATE_FEATURES.index(n) for n in names]
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, len(AGGREGATE_FEATURES))).astype(np.float32)
    y = (x[:, cols[0]] - x[:, cols[1]] > 0).astype(int)
    old = TabularModel("lr", LogisticRegression().fit(x[:, cols], y),
                       LinearRegression().fit(x[:, cols], x[:, cols[2]]), (0.3,),
                       features=tuple(names))
    loaded = load_tabular(save_tabular(old, tmp_path / "model.skops"))
    assert loaded.features == tuple(names)
    np.testing.assert_allclose(loaded.predict(_Rows(x))["decay"],
                               old.decay.predict_proba(x[:, cols])[:, 1], rtol=1e-6)
    # One that needs an aggregate this version does not compute is refused by name.
    gone = TabularModel("lr", old.decay, old.interest, (0.3,),
                        features=(*names[:-1], "log_n_retired"))
    with pytest.raises(ValueError, match="log_n_retired.*train it again"):
        load_tabular(save_tabular(gone, tmp_path / "gone.skops"))


class Planted:
    """Building this from a file creates ``marker``: proof that a load ran code."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __setstate__(self, state: dict) -> None:
        Path(state["marker"]).touch()
        self.__dict__.update(state)


def test_an_untrusted_type_is_refused_in_one_line_and_never_built(tmp_path: Path,
                                                                   capsys) -> None:
    model, _ = _tiny_gbdt()
    marker = tmp_path / "ran"
    path = tmp_path / "model.skops"
    sio.dump({"format": TABULAR_FORMAT, "kind": "gbdt", "features": list(AGGREGATE_FEATURES),
              "decay": Planted(str(marker)), "interest": model.interest,
              "activation": list(model.activation)}, path)
    with pytest.raises(ValueError, match="untrusted type.*Planted"):
        load_tabular(path)
    events = tmp_path / "events.csv"
    events.write_text("user_id,timestamp,event\nu1,2025-01-02T00:00:00Z,view\n")
    assert main(["score", "--model", str(path), "--events", str(events)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refusing to load untrusted type" in err, err
    assert not marker.exists()


def test_a_tree_pointing_outside_itself_is_refused(tmp_path: Path) -> None:
    model, _ = _tiny_gbdt()
    tree = model.decay._predictors[0][0]
    inner = np.flatnonzero(tree.nodes["is_leaf"] == 0)[0]
    tree.nodes["right"][inner] = len(tree.nodes) + 7
    with pytest.raises(ValueError, match="decay: a tree node indexes outside"):
        load_tabular(save_tabular(model, tmp_path / "model.skops"))


def test_fail_fast_reads_the_skops_schema_only(tmp_path: Path) -> None:
    assert checks.TABULAR_FORMAT == TABULAR_FORMAT
    assert checks.TABULAR_KINDS == TABULAR_KINDS == AGGREGATE_METHODS
    model, _ = _tiny_gbdt()
    good = save_tabular(model, tmp_path / "gbdt" / "model.skops")
    assert checks.model_file(good) == good and checks.model_kind(good) == "gbdt"
    (tmp_path / "junk.skops").write_bytes(b"PK\x03\x04 not really")
    other = tmp_path / "other.skops"
    sio.dump({"a": 1}, other)
    for bad, text in ((tmp_path / "junk.skops", "not a readable skops model"),
                      (other, "not a fedecay skops model")):
        with pytest.raises(ValueError, match=text) as err:
            checks.model_file(bad)
        assert "\n" not in str(err.value)
    # A comparison's folder names it gbdt; its own folder is a run holding one model.
    (tmp_path / "centralised").mkdir()
    (tmp_path / "centralised" / "model.keras").write_bytes(b"")
    assert set(run_models(tmp_path)) == {"gbdt", "centralised"}
    assert model_in(tmp_path, "gbdt") == ("gbdt", good)
    assert model_in(tmp_path / "gbdt", None) == ("gbdt", good)


def test_train_gbdt_then_score_gives_the_in_memory_risks(tmp_path: Path, capsys) -> None:
    from common.io import load_events
    from common.snapshots import unlabelled_snapshots
    from simulations.baselines import run_gbdt
    from simulations.experiment import prepare
    from simulations.settings import experiment_from_flat

    runs = tmp_path / "runs"
    assert main(["train", "--mode", "gbdt", "--preset", "quick", *SETS,
                 "--set", f"experiment.output-dir={runs}"]) == 0
    [run] = runs.iterdir()
    sidecar = json.loads((run / "gbdt" / "model.json").read_text())
    assert sidecar["kind"] == "gbdt" and "policy.risk-threshold" in sidecar
    data = tmp_path / "data"
    assert main(["data", "synth", "--preset", "quick", *SETS, "--out", str(data)]) == 0
    out = tmp_path / "scores.csv"
    capsys.readouterr()
    assert main(["score", "--model", str(run), "--events", str(data / "events.parquet"),
                 "--at", AT, "--out", str(out)]) == 0
    assert "gbdt" in capsys.readouterr().out
    scores = pd.read_csv(out, keep_default_na=False)
    assert len(scores) > 30 and set(scores["action"]) <= {"none", "recommend", "coupon", "push"}

    exp = experiment_from_flat(json.loads((run / "config.json").read_text()))
    prepared = prepare(exp)
    in_memory = run_gbdt(exp, prepared).model  # same data and seed: the same trees
    snaps, _ = unlabelled_snapshots(load_events(data / "events.parquet").events, AT,
                                    prepared.snapshot_config)
    risk = in_memory.decay.predict_proba(aggregate_features(snaps))[:, 1]
    expected = pd.DataFrame({"user_id": snaps.user_id, "merchant_id": snaps.merchant_id,
                             "risk": risk})
    got = scores.merge(expected, on=["merchant_id", "user_id"], validate="1:1")
    assert len(got) == len(scores) == len(expected)
    np.testing.assert_allclose(got["decay_risk"], got["risk"], rtol=1e-6, atol=1e-9)

    assert main(["monitor", "--model", str(run), "--input", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a gbdt model" in err

    # The top-20 table on the terminal: ids escaped (a terminal would run an escape
    # sequence) and cut (a 100k-character id padded every row).
    log = pd.read_parquet(data / "events.parquet")
    top = scores.sort_values("decay_risk", ascending=False)["user_id"].iloc[:2].tolist()
    log["user_id"] = log["user_id"].replace({top[0]: "\x1b]0;owned\x07\x1b[2J",
                                             top[1]: "x" * 100_000})
    log.to_parquet(data / "hostile.parquet")
    assert main(["score", "--model", str(run), "--events", str(data / "hostile.parquet"),
                 "--at", AT]) == 0
    shown = capsys.readouterr().out
    assert "\x1b" not in shown and "\\x1b]0;owned\\x07" in shown
    assert "x" * 39 + "…" in shown and len(shown) < 20_000
