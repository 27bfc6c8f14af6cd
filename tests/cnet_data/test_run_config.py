"""`cnet-data index|check|buckets --config RUN.yaml`: the training config's data section read
by cnet-data alone, flags over the file, bucket defaults from the model family."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import pytest
import yaml

from cnet_data.buckets import FAMILY_RESOLUTIONS, BucketConfig, BucketSettings, BucketTable
from cnet_data.cli import main
from cnet_data.index import DatasetIndex
from cnet_data.run_config import (
    DATA_KEYS,
    DEFAULT_SCAN,
    MOVED_DATA_KEYS,
    ModelFamily,
    RunConfigError,
    bucket_config,
    detect_family,
    load_run_config,
    resolve_buckets,
    run_buckets,
)
from cnet_data.scan import ScanConfig
from cnet_data.sources import SourceConfig
from cnet_data.synthetic import write_fill_dataset

EXAMPLES = Path(__file__).parents[2] / "examples"

KEYS = {"image": "picture", "conditioning_image": "hint_map", "text": "prompt"}
"""Manifest keys renamed, so that a config whose keys were ignored would index nothing."""


def _renamed_manifest(root: Path) -> Path:
    """A 9-sample fill dataset whose manifest uses the keys of `KEYS`."""
    manifest = write_fill_dataset(root, 9)
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    renamed = [{KEYS[k]: v for k, v in line.items()} for line in lines]
    out = root / "renamed.jsonl"
    out.write_text("".join(json.dumps(line) + "\n" for line in renamed))
    return out


def _write_config(path: Path, data: dict[str, Any], **top: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"run_dir": "runs/one", "model": {"source": "org/model"}, **top, "data": data}
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def _source(path: str) -> dict[str, Any]:
    return {
        "path": path,
        "image_key": KEYS["image"],
        "conditioning_key": KEYS["conditioning_image"],
        "caption_key": KEYS["text"],
    }


def _fake_model(folder: Path, unet: dict[str, Any]) -> Path:
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text(json.dumps(unet))
    return folder


SD15_UNET = {"cross_attention_dim": 768, "sample_size": 64}
SD21_UNET = {"cross_attention_dim": 1024, "use_linear_projection": True, "sample_size": 96}
SDXL_UNET = {"cross_attention_dim": 2048, "addition_embed_type": "text_time", "sample_size": 128}


def _index_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# -- index / check / buckets with --config --------------------------------------------------


def test_index_from_config_equals_index_from_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = _renamed_manifest(tmp_path / "data")
    config = _write_config(
        tmp_path / "cfg" / "run.yaml",
        {"source": _source(str(manifest)), "scan": {"workers": 1, "verify": "decode"}},
    )
    monkeypatch.chdir(tmp_path)
    assert main(["index", "--config", str(config), "--quiet"]) == 0
    from_config = tmp_path / "cfg" / "runs" / "one" / "index"  # RUN_DIR/index, by default
    assert f"index: {from_config}" in capsys.readouterr().out
    by_hand = tmp_path / "by-hand"
    argv = ["index", str(manifest), "--out", str(by_hand), "--quiet", "--workers", "1"]
    keys = ["--image-key", "picture", "--conditioning-key", "hint_map", "--caption-key", "prompt"]
    assert main([*argv, *keys, "--verify", "decode"]) == 0
    assert len(DatasetIndex(from_config)) == 9
    assert _index_files(from_config) == _index_files(by_hand)
    report = json.loads(from_config.with_name("index.report.json").read_text())
    assert report == json.loads(by_hand.with_name("by-hand.report.json").read_text())


def test_index_writes_data_index_when_the_config_sets_it(tmp_path: Path) -> None:
    manifest = _renamed_manifest(tmp_path / "data")
    config = _write_config(
        tmp_path / "run.yaml",
        {"source": _source(str(manifest)), "index": "indexes/main", "scan": {"workers": 1}},
    )
    assert main(["index", "--config", str(config), "--quiet"]) == 0
    assert len(DatasetIndex(tmp_path / "indexes" / "main")) == 9
    assert not (tmp_path / "runs").exists()


def test_check_uses_the_launch_scan_default_and_a_flag_overrides_it(
    tmp_path: Path, bad_corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # No data.scan section: cnet-train's default, on_bad skip, where the CLI alone fails.
    config = _write_config(tmp_path / "run.yaml", {"source": {"path": str(bad_corpus)}})
    assert main(["check", "--config", str(config), "--quiet", "--max-pixels", "1000000"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["bad"] == 12
    assert "on_bad skip" in captured.err
    assert main(["check", str(bad_corpus), "--quiet", "--max-pixels", "1000000"]) == 1
    capsys.readouterr()
    argv = ["check", "--config", str(config), "--quiet", "--max-pixels", "1000000"]
    assert main([*argv, "--on-bad", "fail"]) == 1
    assert "bad sample(s)" in capsys.readouterr().err


def test_a_given_scan_section_takes_the_class_defaults_for_the_rest(
    tmp_path: Path, bad_corpus: Path
) -> None:
    # As cnet-train structures it: `scan: {max_pixels: ...}` leaves on_bad at ScanConfig's fail.
    data = {"source": {"path": str(bad_corpus)}, "scan": {"max_pixels": 1_000_000}}
    config = _write_config(tmp_path / "run.yaml", data)
    assert load_run_config(config).scan == ScanConfig(max_pixels=1_000_000)
    assert main(["check", "--config", str(config), "--quiet"]) == 1
    assert main(["check", "--config", str(config), "--quiet", "--on-bad", "skip"]) == 0


def test_a_source_flag_overrides_the_config(
    tmp_path: Path, fill_manifest: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The config's renamed keys do not fit the fixture's manifest; the flags put them back.
    config = _write_config(tmp_path / "run.yaml", {"source": _source(str(fill_manifest))})
    assert main(["check", "--config", str(config), "--quiet"]) == 1
    assert json.loads(capsys.readouterr().out)["bad_by_kind"] == {"manifest_error": 12}
    keys = ["--image-key", "image", "--conditioning-key", "conditioning_image"]
    assert main(["check", "--config", str(config), "--quiet", *keys, "--caption-key", "text"]) == 0
    assert json.loads(capsys.readouterr().out)["accepted"] == 12


def _buckets_run(
    tmp_path: Path, name: str, model: dict[str, Any], buckets: dict[str, int] | None = None
) -> Path:
    """A config of its own folder whose index is the fill dataset's, indexed by the CLI."""
    data: dict[str, Any] = {"source": {"path": "../fill/manifest.jsonl"}, "scan": {"workers": 1}}
    if buckets is not None:
        data["buckets"] = buckets
    config = _write_config(tmp_path / name / "run.yaml", data, model=model)
    assert main(["index", "--config", str(config), "--quiet"]) == 0
    return config


def _table_sizes(output: str) -> set[str]:
    return {line.split()[1] for line in output.splitlines()[2:] if "x" in line.split()[1]}


@pytest.mark.usefixtures("fill_manifest")
@pytest.mark.parametrize(("family", "unet"), [("sd15", SD15_UNET), ("sdxl", SDXL_UNET)])
def test_buckets_follow_the_family_of_the_model_folder(
    tmp_path: Path, family: str, unet: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    _fake_model(tmp_path / "model", unet)
    config = _buckets_run(tmp_path, family, {"source": "../model"})
    capsys.readouterr()
    assert main(["buckets", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    side = FAMILY_RESOLUTIONS[family]
    assert out.startswith(f"bucket area {side * side} ({side}x{side}): the {family} default")
    expected = BucketTable.from_config(BucketConfig.for_resolution(side))
    index = DatasetIndex(tmp_path / family / "runs" / "one" / "index")
    ids = set(expected.assign(index.widths, index.heights).tolist())
    assert _table_sizes(out) == {f"{expected[i].width}x{expected[i].height}" for i in ids}


@pytest.mark.usefixtures("fill_manifest")
def test_bucket_flags_and_config_keys_win_over_the_family(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _buckets_run(tmp_path, "run", {"source": "org/x", "family": "sd15"}, {"step": 32})
    capsys.readouterr()
    assert main(["buckets", "--config", str(config)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("bucket area 262144 (512x512): the sd15 default (model.family sd15)")
    assert first.endswith("sides 256..1024, step 32")
    assert main(["buckets", "--config", str(config), "--area", "65536", "--min-side", "64"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        "bucket area 65536 (256x256): set by --area; sides 64..1024, step 32"
    )


@pytest.mark.usefixtures("fill_manifest")
def test_an_unknown_family_keeps_the_default_area_and_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _buckets_run(tmp_path, "run", {"source": "org/hub-model"})
    capsys.readouterr()
    assert main(["buckets", "--config", str(config)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("bucket area 1048576 (1024x1024): the default (SDXL's)")
    assert "'org/hub-model' is a hub id" in first and "set model.family" in first


def test_buckets_without_an_index_or_config_says_what_to_give(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["buckets"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "cnet-data buckets: error: no index folder: none given"
    assert "give INDEX" in err[1]
    assert main(["check", "--quiet"]) == 2
    assert "no dataset source given" in capsys.readouterr().err


# -- reading the file -----------------------------------------------------------------------


def test_relative_paths_resolve_against_the_yaml_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    _fake_model(home / "models" / "xl", SDXL_UNET)
    data = {"source": {"path": "../data/train.jsonl"}, "index": "~/indexes/a"}
    config = _write_config(tmp_path / "cfg" / "run.yaml", data, model={"source": "~/models/xl"})
    monkeypatch.chdir(tmp_path / "cfg")  # anywhere else must not change the result
    elsewhere = load_run_config(Path("run.yaml"))
    monkeypatch.chdir(tmp_path)
    run = load_run_config(config)
    assert run.source.path == tmp_path / "cfg" / ".." / "data" / "train.jsonl"
    assert run.index == home / "indexes" / "a"
    assert run.family.name == "sdxl"
    assert elsewhere.source.path == run.source.path and elsewhere.index == run.index
    without_index = _write_config(tmp_path / "b" / "run.yaml", {"source": {"path": "m.jsonl"}})
    assert load_run_config(without_index).index == tmp_path / "b" / "runs" / "one" / "index"


def test_every_problem_is_named_by_its_dotted_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = {
        "source": {"path": "m.jsonl", "imge_key": "x", "caption_key": ""},
        "bucket": {"area": 4096},
        "scan": {"workers": "4", "on_bad": "skp"},
        "buckets": {"step": 0},
        "batch_size": 2,  # cnet-train's: known, not checked here
        "caption_dropout": 0.1,  # an earlier config's key: refused, saying where it went
    }
    ignored = {"optimizer": {"bogus": 1}, "trainer": {"devices": "lots"}}
    config = _write_config(tmp_path / "run.yaml", data, **ignored)
    with pytest.raises(RunConfigError) as caught:
        load_run_config(config)
    assert sorted(caught.value.problems) == [
        "data.bucket: unknown key (did you mean buckets?)",
        "data.buckets: buckets.step must be positive, got 0",
        "data.caption_dropout moved to conditioning.caption_dropout (same meaning and values)",
        "data.scan.on_bad: must be one of 'skip', 'fail', got 'skp'",
        "data.scan.workers: expected an integer, got '4'",
        "data.source.caption_key: must not be empty",
        "data.source.imge_key: unknown key (did you mean image_key?)",
    ]
    assert main(["check", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "invalid config" in err and "data.bucket: unknown key" in err and "hint:" in err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("run_dir: r\n", "data: required key is missing"),
        ("data: {source: {format: jsonl}}\n", "data.source.path: required key is missing"),
        ("data: {source: {path: 3}}\n", "data.source.path: expected a path (a string), got 3"),
        ("data: {source: {path: m}, scan: null}\n", "data.scan: expected a mapping of keys"),
        ("data: {source: {path: m}, index: []}\n", "data.index: expected a path (a string)"),
        ("data: {source: {path: m}}\nmodel: {family: sd3}\n", "model.family: must be one of"),
        ("data: {source: {path: m}, buckets: {area: true}}\n", "data.buckets.area: expected an"),
    ],
)
def test_wrong_values_are_refused(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(RunConfigError) as caught:
        load_run_config(path)
    assert any(p.startswith(expected) for p in caught.value.problems), caught.value.problems


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("data: {source: {path: a}}\ndata: {}\n", "key 'data' given twice (line 1 and line 2)"),
        ("[" * 100 + "]" * 100, "nested deeper than 64 levels"),
        ("- just\n- a list\n", "must hold a mapping of keys"),
        ("data: [unclosed\n", "is not valid YAML"),
    ],
)
def test_a_file_that_is_not_a_config_is_refused(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(RunConfigError, match="config file") as caught:
        load_run_config(path)
    assert expected in str(caught.value)
    with pytest.raises(RunConfigError, match="does not exist"):
        load_run_config(tmp_path / "missing.yaml")


def test_sections_left_out_take_the_launch_defaults(tmp_path: Path) -> None:
    config = _write_config(tmp_path / "run.yaml", {"source": {"path": "m.jsonl"}})
    run = load_run_config(config)
    assert run.scan == DEFAULT_SCAN and run.scan.on_bad == "skip"
    assert run.source == SourceConfig(tmp_path / "m.jsonl")
    assert dict(run.buckets) == {}


# -- the family and its bucket defaults ------------------------------------------------------


@pytest.mark.parametrize(
    ("unet", "family", "resolution"),
    [
        (SD15_UNET, "sd15", 512),
        (SD21_UNET, "sd21", 768),
        ({**SD21_UNET, "sample_size": 64}, "sd21", 512),
        ({**SD15_UNET, "sample_size": 96}, "sd15", 768),  # a full-size UNet states its side
        ({**SDXL_UNET, "sample_size": 16}, "sdxl", 1024),  # a tiny one takes the default
        ({"cross_attention_dim": 1024}, "sd21", 768),
        (SDXL_UNET, "sdxl", 1024),
        ({"addition_embed_type": "image"}, None, None),
    ],
)
def test_the_family_is_read_from_the_model_folder(
    tmp_path: Path, unet: dict[str, Any], family: str | None, resolution: int | None
) -> None:
    _fake_model(tmp_path / "model", unet)
    config = _write_config(
        tmp_path / "run.yaml", {"source": {"path": "m"}}, model={"source": "model"}
    )
    found = load_run_config(config).family
    assert (found.name, found.resolution) == (family, resolution)


def test_a_named_family_wins_over_the_folder(tmp_path: Path) -> None:
    _fake_model(tmp_path / "model", SDXL_UNET)
    model = {"source": "./model", "family": "sd21"}
    config = _write_config(tmp_path / "run.yaml", {"source": {"path": "m"}}, model=model)
    assert load_run_config(config).family.name == "sd21"


def test_a_missing_or_broken_model_folder_only_leaves_the_family_unknown(tmp_path: Path) -> None:
    (tmp_path / "broken" / "unet").mkdir(parents=True)
    (tmp_path / "broken" / "unet" / "config.json").write_text("{not json")
    for source, why in (("./absent", "does not exist"), ("./broken", "cannot be read")):
        model = {"source": source}
        config = _write_config(tmp_path / "run.yaml", {"source": {"path": "m"}}, model=model)
        family = load_run_config(config).family
        assert family.name is None and why in family.reason


@pytest.mark.parametrize("resolution", [512, 768, 1024])
def test_the_family_bucket_defaults_are_what_the_examples_write(resolution: int) -> None:
    config = BucketConfig.for_resolution(resolution)
    assert (config.area, config.min_side, config.max_side) == (
        resolution**2,
        resolution // 2,
        resolution * 2,
    )
    assert BucketConfig.for_resolution(1024) == BucketConfig()  # SDXL's is the class default


@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl"])
def test_the_examples_read_and_match_their_family_defaults(name: str) -> None:
    run = load_run_config(EXAMPLES / f"{name}.yaml")
    family_default = BucketConfig.for_resolution(FAMILY_RESOLUTIONS[name])
    assert dict(run.buckets) == attrs.asdict(family_default)


def test_a_null_bucket_key_is_unset_and_takes_the_family_default(tmp_path: Path) -> None:
    data = {"source": {"path": "m"}, "buckets": {"area": None, "step": 32}}
    config = _write_config(tmp_path / "run.yaml", data, model={"source": "x", "family": "sd15"})
    run = load_run_config(config)
    assert dict(run.buckets) == {"step": 32}
    assert bucket_config(run.buckets, run.family)[0] == BucketConfig.for_resolution(512, 32)


def test_bucket_keys_that_do_not_fit_the_family_are_refused_at_load(tmp_path: Path) -> None:
    # 128x128 fits the class defaults' sides (512..2048) nowhere, nor SD 1.5's (256..1024).
    data = {"source": {"path": "m"}, "buckets": {"area": 128 * 128}}
    config = _write_config(tmp_path / "run.yaml", data, model={"source": "x", "family": "sd15"})
    with pytest.raises(RunConfigError) as caught:
        load_run_config(config)
    (problem,) = caught.value.problems
    assert problem.startswith("data.buckets: bucket settings {'area': 16384} do not fit")
    # With min_side lowered too they fit; SD 1.5's max_side stays.
    fits = {**data, "buckets": {"area": 128 * 128, "min_side": 64}}
    path = _write_config(tmp_path / "run.yaml", fits, model={"source": "x", "family": "sd15"})
    run = load_run_config(path)
    assert bucket_config(run.buckets, run.family)[0].max_side == 1024


def test_run_buckets_reads_the_family_of_a_relative_model_folder(tmp_path: Path) -> None:
    _fake_model(tmp_path / "model", SD15_UNET)
    settings = BucketSettings(step=32)
    found = run_buckets(settings, "./model", None, tmp_path)
    assert found.config == BucketConfig.for_resolution(512, 32)
    assert found.line().startswith("bucket area 262144 (512x512): the sd15 default (./model/")
    unknown = run_buckets(settings, "org/hub", None, tmp_path)
    assert unknown.config == BucketConfig(step=32)
    assert "set model.family" in unknown.origin
    named = run_buckets(BucketSettings(area=640 * 640), "org/hub", "sd15", tmp_path)
    assert (named.config.area, named.config.min_side) == (640 * 640, 256)
    assert named.origin.startswith("data.buckets.area")


def test_bucket_settings_that_do_not_fit_the_family_are_one_error() -> None:
    family = ModelFamily("sd15", 512, "model.family sd15")
    assert bucket_config({"min_side": 512}, family)[0].area == 512 * 512
    with pytest.raises(RunConfigError, match="do not fit") as caught:
        bucket_config({"min_side": 1024}, family)  # a 1024 side cannot fit a 512x512 area
    assert "min_side" in caught.value.hint
    assert (
        resolve_buckets({"min_side": 512}, family).config
        == bucket_config({"min_side": 512}, family)[0]
    )


# -- kept in step with cnet-train and cnet-models (skipped where cnet-data is installed alone)


def test_data_keys_and_defaults_match_cnet_train() -> None:
    config = pytest.importorskip("cnet_train.config")
    assert tuple(f.name for f in attrs.fields(config.DataConfig)) == DATA_KEYS
    moved = pytest.importorskip("cnet_train.conditioning_config").MOVED_KEYS
    data_moved = {k.removeprefix("data."): v for k, v in moved.items() if k.startswith("data.")}
    assert data_moved == MOVED_DATA_KEYS
    defaults = config.DataConfig(source=SourceConfig(Path("m")))
    assert defaults.scan == DEFAULT_SCAN
    assert defaults.buckets == BucketSettings()  # unset: the family's defaults


def test_reading_matches_cnet_train_load_config(tmp_path: Path) -> None:
    config_io = pytest.importorskip("cnet_train.config_io")
    train_data = pytest.importorskip("cnet_train.data")
    _fake_model(tmp_path / "model", SD15_UNET)
    configs: list[tuple[dict[str, Any], dict[str, Any]]] = [
        ({"source": {"path": "a/m.jsonl"}}, {"source": "org/model"}),
        ({"source": _source("~/m.jsonl"), "index": "../i", "scan": {"workers": 2}}, {}),
        ({"source": {"path": "f", "format": "folder"}, "buckets": {"step": 32}}, {}),
        ({"source": {"path": "f"}, "buckets": {"max_side": 768}}, {"source": "../model"}),
        ({"source": {"path": "f"}}, {"source": "org/model", "family": "sdxl"}),
    ]
    for i, (data, model) in enumerate(configs):
        path = _write_config(tmp_path / f"c{i}" / "run.yaml", data, model=model or {"source": "x"})
        ours, theirs = load_run_config(path), config_io.load_config(path)
        assert ours.source == theirs.data.source and ours.scan == theirs.data.scan
        assert dict(ours.buckets) == theirs.data.buckets.given()
        table, line = bucket_config(ours.buckets, ours.family)
        trained = train_data.run_buckets(theirs)
        assert table == trained.config
        # The same origin; a model folder is named as written here, made absolute there.
        assert line.partition("(")[2].split()[:3] == trained.line().partition("(")[2].split()[:3]
        assert ours.index == (theirs.data.index or theirs.run_dir / "index")


def test_detection_and_resolutions_match_cnet_models() -> None:
    families = pytest.importorskip("cnet_models.families")
    assert {n: f.default_resolution for n, f in families.FAMILIES.items()} == FAMILY_RESOLUTIONS
    for unet in (SD15_UNET, SD21_UNET, SDXL_UNET, {"use_linear_projection": True}, {}):
        assert detect_family(unet) == families.detect_family(unet).name
    with pytest.raises(families.FamilyDetectionError):
        families.detect_family({"addition_embed_type": "image"})
    assert detect_family({"addition_embed_type": "image"}) is None


def test_the_remote_source_settings_are_checked_by_key(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    source = {"path": "kept", "url": "s3://b/shards", "read_cache_gib": 20.5, "split": "train"}
    config.write_text(yaml.safe_dump({"data": {"source": source}}))
    loaded = load_run_config(config)
    assert loaded.source.url == "s3://b/shards" and loaded.source.read_cache_gib == 20.5
    for bad, problem in (
        ({"read_cache_gib": "lots"}, "data.source.read_cache_gib: expected a number, got 'lots'"),
        ({"read_cache_gib": -1}, "data.source.read_cache_gib: must be a finite number of GiB"),
        ({"split": ""}, "data.source.split: must not be empty"),
    ):
        config.write_text(yaml.safe_dump({"data": {"source": {**source, **bad}}}))
        with pytest.raises(RunConfigError) as refused:
            load_run_config(config)
        assert any(p.startswith(problem) for p in refused.value.problems), refused.value.problems
