"""``fedecay explain``: faithfulness and stability of the per-customer reasons.

On the held-out period of the run's own data (its ``config.json``): the deletion curve of
the LSTM's attributions, the rank stability of the group attributions across two models
(a second model given with ``--second``, or a centralised model trained here with the
run's seed + 1 on the same prepared data), and five customers' reasons. Writes
``explanations.json`` and ``explanations.png`` beside the model.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated, Any

import typer

from . import checks
from .console import current
from .errors import guarded
from .options import MethodOption
from .runs import model_in


def register(app: typer.Typer) -> None:
    app.command("explain")(explain)


def _config(run: Path, model_path: Path) -> Path:
    """The run's config.json: beside the model, or in the run folder above it."""
    for folder in (model_path.parent, model_path.parent.parent, run):
        if (folder / "config.json").is_file():
            return folder / "config.json"
    raise FileNotFoundError(f"no config.json beside {model_path} or in {run}: explain "
                            "needs the run's settings to rebuild its held-out snapshots")


@guarded
def explain(
    run: Annotated[Path, typer.Argument(metavar="RUN_DIR", show_default=False,
                                        help="A run folder of train, simulate or compare.")],
    method: MethodOption = None,
    second: Annotated[Path | None, typer.Option(
        metavar="RUN_DIR|FILE", show_default="train a centralised model with seed + 1",
        help="The second model of the stability check (a model.keras or a run folder, "
             "--method picks in it too).")] = None,
    users: Annotated[int, typer.Option(
        min=10, metavar="N", help="Held-out customers sampled (seeded).")] = 2000,
    seed: Annotated[int, typer.Option(
        metavar="N", help="Seed of the sample and of the random deletions.")] = 0,
    epochs: Annotated[int | None, typer.Option(
        min=1, metavar="N", show_default="the run's train.epochs",
        help="Epochs of the seed + 1 model.")] = None,
    quadrature: Annotated[bool, typer.Option(
        help="Also compare IG with 1, 2, 4 and 8 Gauss-Legendre points against 32 on the "
             "sampled customers (top reason agreement, completeness gap; one XLA "
             "compile per rule).")] = False,
) -> None:
    """Reasons' faithfulness (deletion curve) and stability across seeds (Spearman)."""
    console = current()
    name, model_path = model_in(run, method)
    checks.model_file(model_path)
    if model_path.suffix != ".keras":
        raise ValueError(f"{model_path}: explain measures the LSTM's attributions; GBDT/LR "
                         "reasons come from occlusion of the aggregates (see README)")
    second_path = model_in(second, method)[1] if second is not None else None
    if second_path is not None:
        _same_features(model_path, checks.model_file(second_path))
    config = _config(run.expanduser().resolve(), model_path)
    for output in (model_path.parent / n for n in ("explanations.json", "explanations.png")):
        if output.is_dir():  # found now, not after minutes of work
            raise ValueError(f"{output}: is a folder, and explain writes this file there; "
                             "move the folder away")
    checks.writable_parent(model_path.parent, "explain")
    import numpy as np

    from common.model import load_model
    from common.reasons import CategoryNames, Reference, group_attributions
    from common.reasons import explain as reasons
    from simulations.experiment import prepare, write_json
    from simulations.explain import deletion_curve, format_explanations, plot_curve, rank_stability
    from simulations.settings import experiment_from_flat

    flat = json.loads(config.read_text())
    exp = experiment_from_flat(flat)
    data = prepare(exp, progress=console)
    model = load_model(model_path)
    test = data.snapshots.split_part("test")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(test), size=min(users, len(test)), replace=False))
    sample = test.subset(rows)
    width = int(model.input["static"].shape[-1])
    full = Reference.mean_of(test)
    reference = Reference(full.numeric, full.static[:width])
    console.say(f"model: {model_path} ({name}); {len(sample):,} of {len(test):,} held-out "
                "customers")
    faith = deletion_curve(model, sample, reference, seed=seed, progress=console)

    if second_path is not None:
        other, against = load_model(second_path), f"second model {second_path}"
    else:
        from simulations.baselines import run_centralised

        exp2 = experiment_from_flat({**exp.flat, "experiment.seed": exp.seed + 1})
        _, other = run_centralised(exp2, data, epochs=epochs, progress=console)
        against = f"centralised model trained with seed {exp.seed + 1}"
    ref2 = Reference(full.numeric, full.static[:int(other.input["static"].shape[-1])])
    stability = rank_stability(group_attributions(model, sample, reference),
                               group_attributions(other, sample, ref2))
    stability["against"] = against

    names = CategoryNames(data.events["category_id"].dropna().unique().astype(str),
                          data.snapshot_config.hash_buckets)
    by_risk = np.argsort(-model.predict_on_batch(
        {**sample.inputs(), "static": sample.static[:, :width]})["decay"], kind="stable")
    # Five different customers (a customer has a snapshot at each test cutoff).
    seen: set[tuple[str, str]] = set()
    picked: list[int] = []
    for r in by_risk:
        who = (str(sample.merchant_id[r]), str(sample.user_id[r]))
        if who not in seen and len(picked) < 5:
            seen.add(who)
            picked.append(int(r))
    risky = np.array(picked, int)
    examples = reasons(model, sample.subset(risky), data.snapshot_config, reference, names)
    points = None
    if quadrature:
        from common.reasons import customer_facts
        from simulations.explain import quadrature_agreement

        points = quadrature_agreement(model, sample, reference, customer_facts(
            sample, data.snapshot_config, names), progress=console)
    result: dict[str, Any] = {
        "model": str(model_path), "method": name, "seed": seed,
        "faithfulness": faith, "stability": stability, "quadrature": points,
        "examples": [{"user_id": str(sample.user_id[r]), "merchant_id": str(sample.merchant_id[r]),
                      "reason_codes": "|".join(c), "reasons": "; ".join(t),
                      "fading_categories": f}
                     for r, c, t, f in zip(risky, examples.codes, examples.texts,
                                           examples.fading, strict=True)],
    }
    out = model_path.parent / "explanations.json"
    write_json(out, result)
    png = plot_curve(faith, model_path.parent / "explanations.png")
    console.close()
    print(format_explanations(result))
    for e in result["examples"]:
        print(f"  {e['merchant_id']}/{e['user_id']}: {e['reasons']}  [{e['reason_codes']}]"
              f"  fading: {e['fading_categories'] or '-'}")
    print(f"wrote {out} and {png}")
    console.next(f"fedecay score --model {shlex.quote(str(run))} --events EVENTS --out "
                 "scores.csv  (reasons for the customers the policy targets)")


def _same_features(first: Path, second: Path) -> None:
    """Refuse a second model trained on other features: its attributions would rank
    other inputs, and the stability figure would compare unlike things."""
    from common.bundle import feature_differences, feature_settings

    if second.suffix != ".keras":
        raise ValueError(f"--second {second}: explain compares two LSTMs' attributions; "
                         "give a model.keras")
    differences = feature_differences(feature_settings(second), feature_settings(first))
    if differences:
        key, theirs, mine = differences[0]
        raise ValueError(f"--second {second}: trained with {key}={theirs:g}, the first "
                         f"model with {mine:g}: their attributions are not comparable")
