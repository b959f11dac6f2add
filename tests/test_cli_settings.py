"""The command line's flags come from the configs' fields (one generator, no kept lists), and
`serve --workers N` hands its processes one resolved settings object."""

import dataclasses
import json
import os

import pytest

from service.cli import RETROFIT_POLICY, build_parser, pick, prepare_worker_environment, service_config
from service.core.model import ClassifierConfig
from service.core.routing import RoutingPolicy
from service.core.train import FROM_DATASET, TrainConfig
from service.web.settings import CONFIG_ENV, ServiceConfig, usable_cores


def names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_every_config_field_is_a_flag_and_train_defaults_are_the_fields():
    parser = build_parser()
    train = vars(parser.parse_args(["train"]))
    assert names(TrainConfig) | (names(ClassifierConfig) - set(FROM_DATASET)) | names(RoutingPolicy) <= set(train)
    assert not set(FROM_DATASET) & set(train)  # the data set decides them
    assert pick(TrainConfig, parser.parse_args(["train"])) == TrainConfig()
    assert pick(ClassifierConfig, parser.parse_args(["train"])) == ClassifierConfig()
    assert pick(RoutingPolicy, parser.parse_args(["train"])) == RoutingPolicy()
    serve = vars(parser.parse_args(["serve"]))
    assert all(serve[f] is None for f in ServiceConfig.model_fields)  # unset: the environment decides
    retrofit = vars(parser.parse_args(["retrofit", "--name", "m"]))
    assert set(RETROFIT_POLICY) == names(RoutingPolicy) - {"confidence_threshold", "ood_threshold"}  # chosen on validation
    assert all(retrofit[f] is None for f in RETROFIT_POLICY)  # unset: the model's setting is kept


def test_flags_the_docs_and_tests_use_parse():
    parser = build_parser()
    ns = parser.parse_args(["train", "--exclude-classes", "Bag", "Coat", "--limit-train", "100", "--no-progress",
                            "--memory", "trainable", "--new-class-threshold", "0.3", "--no-taught-rows",
                            "--augment-pad", "2", "--precision", "fp32"])
    tc = pick(TrainConfig, ns)
    assert tc.exclude_classes == ("Bag", "Coat") and tc.limit_train == 100 and not tc.progress
    assert pick(RoutingPolicy, ns) == RoutingPolicy(new_class_threshold=0.3, taught_rows=False)
    ns = parser.parse_args(["serve", "--workers", "2", "--port", "8765", "--top-k", "3", "--memory-index", "ivf",
                            "--no-protect-feedback", "--confidence-threshold", "0.9"])
    assert (ns.workers, ns.port, ns.top_k, ns.memory_index, ns.protect_feedback) == (2, 8765, 3, "ivf", False)
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--memory-index", "hnsw"])  # a Literal's choices


def test_serve_flags_go_over_the_environment(monkeypatch):
    monkeypatch.setenv("TOP_K", "7")
    monkeypatch.setenv("CONFIDENCE_THRESHOLD", "0.9")
    config = service_config(build_parser().parse_args(["serve"]))
    assert config.top_k == 7 and config.policy_overrides() == {"confidence_threshold": 0.9}
    assert service_config(build_parser().parse_args(["serve", "--top-k", "3"])).top_k == 3


def test_worker_processes_get_the_resolved_settings_whatever_else_the_environment_says(monkeypatch, tmp_path):
    for key in (CONFIG_ENV, "OMP_NUM_THREADS", "PROMETHEUS_MULTIPROC_DIR"):
        # set then removed, so that monkeypatch removes what serve sets here after the test too
        # (a variable it never saw would leak into every later test and server process)
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    config = ServiceConfig(top_k=3, confidence_threshold=0.9, state_dir=str(tmp_path), api_token="t")
    prepare_worker_environment(config, workers=2, port=8765)
    monkeypatch.setenv("TOP_K", "9")  # a variable set after serve resolved its settings is not read
    share = max(1, usable_cores() // 2)
    worker = ServiceConfig.from_environment()
    assert worker == config.model_copy(update={"decode_threads": share})
    assert json.loads(os.environ[CONFIG_ENV])["api_token"] == "t"
    assert os.environ["OMP_NUM_THREADS"] == str(share)
    folder = tmp_path / "prometheus-8765"
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(folder.resolve()) and folder.is_dir()
    monkeypatch.delenv(CONFIG_ENV)
    assert ServiceConfig.from_environment().top_k == 9  # without serve's settings: the environment's


def test_every_service_setting_is_documented_in_the_configuration_page():
    from pathlib import Path

    from service.web.settings import ServiceConfig

    page = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    missing = [name.upper() for name in ServiceConfig.model_fields if f"`{name.upper()}`" not in page]
    assert not missing, f"settings not in docs/configuration.md: {missing}"
