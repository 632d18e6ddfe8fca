"""Config composition: the schema catches mistakes at start-up, experiments carry the paper's numbers."""

from __future__ import annotations

import sys

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from pirl_fast.data.config import check_config
from pirl_fast.train.config import Config, ConfigError, to_dataclass, validate


def make(*overrides: str, hydra_cfg: bool = False):
    with initialize_config_module("pirl_fast.train.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra_cfg)


def test_default_config_composes_into_the_dataclasses():
    cfg = to_dataclass(make("data.shards=/some/dir"))
    assert isinstance(cfg, Config)
    assert cfg.method == "pirl" and cfg.resume == "auto"
    assert cfg.name == "pirl_resnet50"  # ${method}_${model.arch}, resolved
    validate(cfg, world_size=1)


@pytest.mark.parametrize("override", ["optim.lrr=0.1", "trainer.max_step=3", "bank.num_negative=5", "datta.x=1"])
def test_misspelt_key_fails_at_composition(override):
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as err:
        make(override)
    assert override.split("=")[0].split(".")[-1] in str(err.value) + str(err.value.__cause__)


@pytest.mark.parametrize("override", ["optim.lr=fast", "trainer.max_steps=two", "trainer.compile=maybe"])
def test_wrong_type_fails_at_composition(override):
    with pytest.raises((ConfigCompositionException, ValidationError)):
        make(override)


def test_batch_that_does_not_divide_over_ranks_names_the_fix():
    cfg = to_dataclass(make("experiment=smoke", "data.backend=synthetic", "data.batch_size=10"))
    validate(cfg, world_size=2)  # 10 = 2 x 5: fine
    with pytest.raises(ConfigError, match=r"data.batch_size=10 is the GLOBAL batch.*4 ranks.*multiple of 4"):
        validate(cfg, world_size=4)


def test_missing_shards_without_synthetic_backend_names_the_fix():
    cfg = to_dataclass(make())
    assert cfg.data.shards == "???"
    with pytest.raises(ConfigError, match=r"data.shards is not set.*pirl_fast.shard.*data.backend=synthetic"):
        validate(cfg, world_size=1)
    validate(to_dataclass(make("data.backend=synthetic")), world_size=1)  # synthetic needs no shards


@pytest.mark.parametrize("overrides, named", [
    (["optim.lr=nan"], "optim.lr=nan"), (["loss.temperature=inf"], "loss.temperature=inf"),
    (["bank.momentum=-inf", "optim.weight_decay=nan"], "bank.momentum=-inf, optim.weight_decay=nan"),
    (["data.image_scale=[0.08,nan]"], r"data.image_scale\[1\]=nan"),
])
def test_non_finite_numbers_anywhere_in_the_tree_are_refused_at_start(overrides, named):
    """Found by walking the dataclass tree, not key by key: a float any group adds later is covered."""
    with pytest.raises(ConfigError, match=rf"^{named}: every number in the configuration must be finite"):
        validate(to_dataclass(make("data.backend=synthetic", *overrides)), world_size=1)


@pytest.mark.parametrize("override, message", [
    ("data.image_size=0", r"data.image_size=0 is out of range: it must be >= 1 \(224"),
    ("data.grid=0", r"data.grid=0 is out of range: it must be >= 1 \(3 for the 3x3 jigsaw"),
    ("data.patch_size=0", r"data.patch_size=0 is out of range: it must be >= 1"),
    ("data.patch_crop_size=-3", r"data.patch_crop_size=-3 is out of range: it must be >= 1"),
    ("data.hue=0.7", r"data.hue=0.7 is out of range: it must be in \[0, 0.5\]"),
    ("data.gray_p=1.5", r"data.gray_p=1.5 is out of range: it must be in \[0, 1\]"),
    ("data.prefetch=0", r"data.prefetch=0 is out of range: it must be >= 1"),
    ("data.on_corrupt=ignore", r"data.on_corrupt='ignore' is not one of error, skip"),
    ("data.workers=-1", r"data.workers=-1 is out of range: it must be >= 1 for DALI .* and >= 0 for torch"),
    ("data.workers=many", r"data.workers='many' is neither auto nor a number"),
    ("data.grid=1", r"model.num_patches=9 but data.grid=1 cuts 1 patches per image: set model.num_patches=1"),
])
def test_sizes_and_rates_are_checked_naming_the_key_and_the_range(override, message):
    """Before: image_size=0 blamed the shards, grid=0 raised ZeroDivisionError, patch_size=0 a conv error."""
    with pytest.raises(ConfigError, match=message):
        validate(to_dataclass(make("data.backend=synthetic", "data.patch_crop_size=255", override)), world_size=1)


def test_sizes_between_the_extremes_pass():
    validate(to_dataclass(make("data.backend=synthetic", "data.image_size=96", "data.patch_crop_size=90",
                               "data.patch_size=24", "data.hue=0.5", "data.gray_p=1", "data.flip_p=0")), world_size=1)
    validate(to_dataclass(make("data.backend=synthetic", "data.grid=2", "model.num_patches=4",
                               "data.patch_crop_size=64", "data.patch_size=20")), world_size=1)


@pytest.mark.parametrize("override,key", [("method=jigsaw", "method"), ("trainer.precision=fp8", "trainer.precision"),
                                          ("resume=sometimes", "resume"), ("trainer.device=tpu", "trainer.device")])
def test_unknown_choices_name_the_valid_ones(override, key):
    with pytest.raises(ConfigError, match=key):
        validate(to_dataclass(make("data.backend=synthetic", override)), world_size=1)


def test_paper_experiment_carries_the_papers_recipe():
    cfg = to_dataclass(make("experiment=pirl_in1k_r50", "data.shards=/x"))
    assert cfg.model.arch == "resnet50" and cfg.model.embed_dim == 128
    assert cfg.data.batch_size == 1024 and cfg.data.image_size == 224 and cfg.data.patch_size == 64
    assert cfg.optim.name == "sgd" and cfg.optim.momentum == 0.9 and cfg.optim.weight_decay == 1e-4
    assert cfg.optim.lr * cfg.data.batch_size / cfg.optim.reference_batch == pytest.approx(0.12)
    assert cfg.optim.lr * cfg.optim.final_lr_ratio == pytest.approx(0.00012)
    assert cfg.trainer.epochs == 800 and cfg.trainer.max_steps == 0
    assert cfg.bank.num_negatives == 32000 and cfg.bank.momentum == 0.5
    assert cfg.loss.temperature == 0.07 and cfg.loss.lam == 0.5 and cfg.loss.kind == "nce"
    assert cfg.model.head == "linear"
    d = cfg.data  # the reference's augmentation (vissl pirl_jigsaw_4node_resnet50.yaml)
    assert (d.brightness, d.contrast, d.saturation, d.hue, d.jitter_p) == (0.4, 0.4, 0.4, 0.2, 1.0)
    assert d.photometric_p == 0.66 and d.posterize_bits == [4, 8] and d.sharpness == [0.1, 1.9]
    assert d.solarize_threshold == [0, 256] and d.gray_p == 0.2 and d.blur_p == 0.0 and d.flip_p == 0.5
    validate(cfg, world_size=8)
    check_config(cfg.data, world_size=8)  # the loader's own grid arithmetic accepts it


def test_improved_experiment_is_the_references_mlp_gblur_recipe():
    """The paper's recipe plus vissl's resnet50_mlphead.yaml and photo_gblur.yaml, nothing else."""
    paper = to_dataclass(make("experiment=pirl_in1k_r50", "data.shards=/x"))
    cfg = to_dataclass(make("experiment=pirl_mlp_in1k_r50", "data.shards=/x"))
    assert cfg.name == "pirl_mlp_in1k_r50" and cfg.model.head == "mlp"
    assert cfg.loss.kind == "infonce" and cfg.loss.temperature == 0.1 and cfg.loss.lam == 0.5
    d = cfg.data
    assert (d.brightness, d.contrast, d.saturation, d.hue, d.jitter_p) == (0.8, 0.8, 0.8, 0.2, 0.8)
    assert d.photometric_p == 0.0 and d.gray_p == 0.2 and d.blur_p == 0.5 and d.blur_sigma == [0.1, 2.0]
    assert (cfg.optim, cfg.bank, cfg.trainer) == (paper.optim, paper.bank, paper.trainer)
    assert cfg.data.batch_size == paper.data.batch_size and cfg.model.arch == paper.model.arch
    validate(cfg, world_size=8)
    check_config(cfg.data, world_size=8)


def test_smoke_experiment_is_small_and_its_crop_sizes_fit_the_grid():
    cfg = to_dataclass(make("experiment=smoke"))
    assert cfg.model.arch == "resnet18" and cfg.bank.num_negatives <= 1024 and cfg.trainer.max_steps <= 40
    assert cfg.data.patch_crop_size % cfg.data.grid == 0
    assert cfg.data.patch_size <= cfg.data.patch_crop_size // cfg.data.grid
    for world_size in (1, 2, 4, 8):
        check_config(cfg.data, world_size=world_size)


def test_run_dir_is_the_same_for_every_rank():
    """No ${now:} in the default run dir: ranks composing a second apart must agree."""
    cfg = make("experiment=smoke", hydra_cfg=True)
    assert "now:" not in cfg.hydra.run._get_node("dir")._value()
    assert cfg.hydra.run.dir == "runs/smoke"
    assert cfg.hydra.job_logging.handlers.keys() == {"console"}  # no per-rank log file in the run dir
    assert cfg.hydra.output_subdir is None


def test_slurm_launcher_is_documented_but_not_imported():
    import pirl_fast.train.loop  # noqa: F401

    assert not any(name.startswith(("submitit", "hydra_plugins.hydra_submitit")) for name in sys.modules)
    from importlib.resources import files

    slurm = files("pirl_fast.train.conf").joinpath("hydra/launcher/slurm.yaml").read_text()
    assert "pip install hydra-submitit-launcher" in slurm and "submitit_slurm" in slurm


def test_jigsaw_experiment_carries_the_reference_recipe():
    cfg = to_dataclass(make("experiment=jigsaw_in1k_r50", "data.shards=/x"))
    assert cfg.method == "jigsaw" and cfg.model.jigsaw_head == "reference" and cfg.data.num_permutations == 2000
    assert cfg.data.batch_size == 256 and cfg.optim.lr * cfg.data.batch_size / cfg.optim.reference_batch == 0.1
    assert cfg.optim.schedule == "multistep" and cfg.optim.milestones == [30, 60, 90, 100]
    assert cfg.optim.warmup_epochs == 5 and cfg.optim.warmup_start_ratio == 0.25 and cfg.trainer.epochs == 105
    assert cfg.optim.weight_decay == 1e-4 and not cfg.optim.nesterov
    assert (cfg.data.patch_crop_size // cfg.data.grid - cfg.data.patch_size) == 21  # patch_jitter 21
    validate(cfg, world_size=8)
    check_config(cfg.data, world_size=8)
    with pytest.raises(ConfigError, match="milestones"):
        validate(to_dataclass(make("data.backend=synthetic", "optim.schedule=multistep")), world_size=1)


@pytest.mark.parametrize("override, message", [
    ("data.hw_decoder_load=1.5", r"data.hw_decoder_load=1.5 is out of range: it must be in \[0, 1\] \(a share"),
    ("data.hw_decoder_load=-0.1", r"data.hw_decoder_load=-0.1 is out of range: it must be in \[0, 1\]"),
    ("data.device_memory_padding=-1", r"data.device_memory_padding=-1 is out of range: it must be >= 0 \(bytes"),
    ("data.host_memory_padding=-8", r"data.host_memory_padding=-8 is out of range: it must be >= 0 \(bytes"),
    ("data.preallocate_width_hint=-5980", r"data.preallocate_width_hint=-5980 is out of range: it must be >= 0"),
    ("data.preallocate_height_hint=-1", r"data.preallocate_height_hint=-1 is out of range: it must be >= 0"),
    ("data.output_dtype=bfloat16", r"data.output_dtype='bfloat16' is not one of float32, float16"),
])
def test_dali_decoder_knobs_are_checked_like_the_other_data_keys(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(to_dataclass(make("data.backend=synthetic", override)), world_size=1)


def test_dali_decoder_knobs_default_to_dalis_and_accept_values_between_the_extremes():
    cfg = to_dataclass(make("data.backend=synthetic"))
    assert (cfg.data.hw_decoder_load, cfg.data.device_memory_padding, cfg.data.host_memory_padding,
            cfg.data.preallocate_width_hint, cfg.data.preallocate_height_hint, cfg.data.output_dtype) == (
        0.65, 16777216, 8388608, 0, 0, "float32")  # nvidia.dali.fn.decoders.image's own defaults
    validate(to_dataclass(make("data.backend=synthetic", "data.hw_decoder_load=0.8", "data.output_dtype=float16",
                               "data.device_memory_padding=211025920", "data.host_memory_padding=140544512",
                               "data.preallocate_width_hint=5980", "data.preallocate_height_hint=6430")), world_size=1)
    for edge in ("0", "1"):
        validate(to_dataclass(make("data.backend=synthetic", f"data.hw_decoder_load={edge}")), world_size=1)
