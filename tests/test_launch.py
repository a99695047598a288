"""`python -m jaxattrib.launch ... --dry-run`: the plan for train / attribute with sd15_lora
on a tiny pipeline, and each bad option refused with exit 2 naming it."""

import json

from tiny import write_pngs


def test_launch_dry_run_with_sd15_lora(tiny_pipeline_dir, tmp_path, capsys):
    from jaxattrib import launch
    write_pngs(tmp_path / "db" / "dog", 4, 0)
    args = ["sd15_lora", "--set", f"model={tiny_pipeline_dir}", "--set",
            f"data.path={tmp_path / 'db'}", "--set", "data.size=8", "--set",
            "finetune.batch_size=4", "--set", f"out_dir={tmp_path / 'out'}"]
    assert launch.main(["train", *args, "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out.split("config OK\n", 1)[1])
    assert plan["task"] == "pipeline_finetune" and plan["n_examples"] == 4
    assert plan["mode"] == "lora" and plan["record"] == str(tmp_path / "out" / "record")
    assert not (tmp_path / "out").exists()
    assert launch.main(["featurize", *args, "--dry-run"]) == 2
    assert "'featurize' is for task configs" in capsys.readouterr().err
    # attribute: the run's settings when it exists, else the config's; --set on top
    assert launch.main(["attribute", *args, "--set", "attribution.k=32", "--chunk-size", "16",
                        "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out.split("config OK\n", 1)[1])
    assert plan["task"] == "pipeline_attribute" and not plan["run_exists"]
    assert (plan["k"], plan["chunk_size"], plan["params"]) == (32, 16, "attn2")
    assert plan["logs"] == str(tmp_path / "out" / "logs" / "attribute.log")
    assert launch.main(["attribute", *args, "--set", "attribution.k=0", "--dry-run"]) == 2
    assert "attribution.k=0: expected a positive integer" in capsys.readouterr().err
    assert launch.main(["attribute", *args, "--chunk-size", "0", "--dry-run"]) == 2
    assert "--chunk-size=0" in capsys.readouterr().err
    assert launch.main(["attribute", "featurize_digits:tiny", "--dry-run"]) == 2
    assert "'attribute' needs a pipeline fine-tuning config" in capsys.readouterr().err
    (tmp_path / "run" / "record").mkdir(parents=True)   # a run made with k=8, projection gaussian
    (tmp_path / "run" / "config.json").write_text(json.dumps(
        {"attribution": {"k": 8, "projection": "gaussian"}}))
    assert launch.main(["attribute", "sd15_lora", "--set", f"out_dir={tmp_path / 'run'}",
                        "--set", "attribution.projection=sjlt", "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out.split("config OK\n", 1)[1])
    assert plan["run_exists"] and (plan["k"], plan["projection"]) == (8, "sjlt")
    assert launch.main(["train", *args, "--set", "finetune.batch_size=8", "--dry-run"]) == 2
    assert "finetune.batch_size=8 > 4 examples" in capsys.readouterr().err
    assert launch.main(["train", *args, "--set", "model=/nonexistent", "--dry-run"]) == 2
    assert "no model_index.json" in capsys.readouterr().err
    assert launch.main(["train", "dreambooth", "--dry-run"]) == 2     # not silently plain
    assert "DreamBooth configs" in capsys.readouterr().err
