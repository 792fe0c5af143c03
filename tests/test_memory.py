"""python -m bit_zoo.memory: parameter counts, the per-device estimate and its advice."""

from __future__ import annotations

from pathlib import Path

import pytest

import bit_zoo
from bit_zoo.tools import memory

ROOT = Path(__file__).resolve().parents[1]
SEED = ROOT / "configs" / "seed" / "bit_m_r101x3_cifar10.yaml"


def test_parameter_counts_are_the_models():
    from mindspore.nn.utils import no_init_parameters

    for name in bit_zoo.list_models():
        for classes in (10, 1000, 21843):
            with no_init_parameters():
                model = bit_zoo.create_model(name, num_classes=classes)
            count = sum(int(p.size) for p in model.get_parameters())
            assert memory.param_count(memory.geometry(name, num_classes=classes))[0] == count, (name, classes)


def test_seed_config_at_32_gb(capsys):
    cfg = memory.load_config(SEED)
    p = memory.plan(cfg, devices=8, device_memory_gb=32)
    assert (p.micro_batch, p.image_size, p.amp_level, p.params) == (64, 160, "O2", 381_851_338)
    assert p.parts_gb["optimizer slots (rmsprop: 2)"] == pytest.approx(2 * p.parts_gb["parameters"], abs=0.02)
    assert p.parts_gb["EMA"] == p.parts_gb["parameters"] > 1.5
    assert p.fits and 25 < p.total_gb < 32  # the estimate the config header states (28.5 GB)
    assert memory.main(["-c", str(SEED), "--device_memory_gb", "32"]) == 0
    assert "fits" in capsys.readouterr().out
    # On a smaller device (or with a larger estimate) the advice: recompute, or accum_steps 2.
    options = memory.suggest(cfg, devices=8, device_memory_gb=24)
    assert [(o.recompute, o.accum_steps) for o in options] == [(True, 1), (False, 2)]
    assert all(o.fits and o.total_gb < p.total_gb for o in options)
    assert memory.main(["-c", str(SEED), "--device_memory_gb", "24"]) == 0
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "recompute: true, accum_steps: 1" in out and "accum_steps: 2" in out


def test_recompute_fp16_and_micro_batch_shrink_activations():
    g = memory.Geometry((3, 4, 23, 3), 3, 10)

    def total(**kw):
        return sum(memory.activation_bytes(g, 160, 64, **kw).values())

    assert total(fp16=False, recompute=True) < total(fp16=False, recompute=False) / 2
    assert total(fp16=True, recompute=False) < total(fp16=False, recompute=False)
    half = sum(memory.activation_bytes(g, 160, 32, fp16=True, recompute=False).values())
    assert half == pytest.approx(total(fp16=True, recompute=False) / 2)


def test_config_errors_are_clear(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: bit_m_r50x1\nbatch_size: 12\nimage_size: 128\n")
    assert memory.main(["-c", str(bad)]) == 2
    assert "does not split into 8 devices" in capsys.readouterr().err
    bad.write_text("model: bit_m_r50x1\nbatch_size: 16\n")
    assert memory.main(["-c", str(bad)]) == 2
    assert "image_size" in capsys.readouterr().err
    bad.write_text("model: vit_b16\nbatch_size: 16\nimage_size: 128\n")
    assert memory.main(["-c", str(bad)]) == 2
    assert "vit_b16" in capsys.readouterr().err


def test_class_count_from_the_data():
    p = memory.plan({"model": "resnetv2", "layers": [1, 1, 1, 1], "batch_size": 8, "image_size": 32, "classes": [6, 7, 8, 9]},
                    devices=1, device_memory_gb=8)  # fmt: skip
    assert p.params == memory.param_count(memory.Geometry((1, 1, 1, 1), 1, 4))[0]
