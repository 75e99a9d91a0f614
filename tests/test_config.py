import pytest

from clframe.config import RunConfig, parse_set, resolve_config
from clframe.errors import ClframeError
from clframe.scenarios.split_digits import SplitDigitsConfig
from clframe.strategies.linear import LinearConfig


def resolve(sets=(), config_file=None, **cli):
    values = dict(scenario="split_digits", strategy="linear", **cli)
    return resolve_config(values, config_file, list(sets), SplitDigitsConfig, LinearConfig)


def test_defaults_come_from_yaml_files():
    config = resolve()
    assert config.run.image_size == 16  # configs/split_digits.yaml
    assert config.run.lr == 0.01        # configs/linear.yaml
    assert config.strategy.train_mask == "current"


def test_precedence_file_then_cli_then_set(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text("run:\n  epochs: 7\n  lr: 0.5\nlinear:\n  train_mask: none\n")
    config = resolve(config_file=str(path), sets=["lr=0.25"], epochs=2)
    assert config.run.epochs == 2            # CLI beats the file
    assert config.run.lr == 0.25             # --set beats everything
    assert config.strategy.train_mask == "none"


def test_set_sections_and_types():
    config = resolve(sets=["split_digits.n_tasks=2", "run.pretrained=false", "model_kwargs={depth: 1}"])
    assert config.scenario.n_tasks == 2
    assert config.run.pretrained is False
    assert config.run.model_kwargs == {"depth": 1}


@pytest.mark.parametrize("sets, message", [
    (["epoch=3"], "unknown config key 'run.epoch' (did you mean epochs"),
    (["epochs=three"], "wants an integer"),
    (["epochs=-1"], "must be >= 0"),
    (["optimizer=lbfgs"], "must be one of adam, adamw, sgd"),
    (["linear.train_mask=all"], "must be one of seen, current, none"),
    (["l2p.pool_size=3"], "unknown section 'l2p'"),
    (["pretrained=maybe"], "wants true or false"),
])
def test_bad_values_are_one_clear_error(sets, message):
    with pytest.raises(ClframeError, match=None) as info:
        resolve(sets=sets)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_malformed_set():
    with pytest.raises(ClframeError, match="write --set key=value"):
        parse_set("epochs")


def test_flatten_is_what_mlflow_logs():
    flat = resolve().flatten()
    assert flat["run.epochs"] == 3 and flat["split_digits.n_tasks"] == 5 and flat["linear.train_mask"] == "current"
    assert set(k.split(".")[0] for k in flat) == {"run", "split_digits", "linear"}


def test_every_run_field_has_help():
    import dataclasses
    assert all(f.metadata.get("help") for f in dataclasses.fields(RunConfig))


def test_yaml_words_on_off_stay_strings_for_choice_fields():
    config = resolve(sets=["amp=off", "train_aug=off"])
    assert config.run.amp == "off" and config.run.train_aug is False
