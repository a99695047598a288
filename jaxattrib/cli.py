"""The ``jaxattrib`` command: demo, train, generate, attribute, report, info.

Every command is a thin edge over the library: it loads a config / model / run directory,
calls pure functions, and writes files. ``jaxattrib COMMAND --help`` documents each one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Data attribution and copyright authentication for diffusion models "
                       "(JAX).")


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@app.command()
def demo(run_dir: Path = typer.Option(Path("runs/demo"), help="Run directory (reused)."),
         config: str = typer.Option("demo", help="Config file or packaged config name."),
         set_: List[str] = typer.Option([], "--set", help="Override: key=value (repeatable)."),
         fresh: bool = typer.Option(False, help="Delete the run directory first."),
         no_progress: bool = typer.Option(False, help="Hide progress bars.")):
    """The embedded default demo: fine-tune the shipped base model on new concepts, generate,
    attribute (D-TRAK, TRAK, baselines) and write RUN_DIR/report.html. Reuses finished stages."""
    from jaxattrib.config import ConfigError, load_config
    from jaxattrib.demo import run_demo
    from jaxattrib.models.convert import CheckpointError
    try:
        cfg = load_config(config, set_)
        if fresh and run_dir.exists():
            shutil.rmtree(run_dir)
        run_demo(cfg, run_dir, progress=not no_progress)
    except (ConfigError, CheckpointError) as e:
        _fail(str(e))


@app.command()
def train(config: str = typer.Argument(..., help="Config file or packaged name "
                                                 "(e.g. finetune_folder)."),
          run_dir: Path = typer.Option(Path("runs/train"), help="Run directory (resumable)."),
          set_: List[str] = typer.Option([], "--set", help="Override: key=value (repeatable)."),
          no_progress: bool = typer.Option(False, help="Hide the progress bar.")):
    """Fine-tune a pipeline (full or LoRA) on a data set, writing a trajectory record.

    Rerunning the same command resumes from the record's last checkpoint."""
    from jaxattrib.config import ConfigError, load_config
    from jaxattrib.data.dataset import DataError
    from jaxattrib.models.convert import CheckpointError
    from jaxattrib.train.record import RecordError
    from jaxattrib.workflow import train_run
    try:
        _, record = train_run(load_config(config, set_), run_dir, progress=not no_progress)
        typer.echo(f"record: {run_dir / 'record'} (checkpoints {record.steps()})")
        record.close()
    except (ConfigError, DataError, CheckpointError, RecordError) as e:
        _fail(str(e))


@app.command()
def attribute(run_dir: Path = typer.Argument(..., help="Run directory from `jaxattrib train`."),
              queries: Path = typer.Option(..., help="Folder of query PNGs + prompts.txt "
                                                     "(from `jaxattrib generate`)."),
              method: str = typer.Option("dtrak", help="trak | dtrak | journey-trak | tracin"),
              k: int = typer.Option(2048, help="Projection dimension."),
              params: str = typer.Option("attn", help="Regex over UNet parameter paths."),
              timesteps: int = typer.Option(10, help="Timesteps K of the output function."),
              lam_ratio: float = typer.Option(1.0, help="λ = ratio · mean(diag ΦᵀΦ)."),
              topk: int = typer.Option(10),
              journey_step: Optional[int] = typer.Option(None, help="Journey-TRAK: sampling "
                                                                    "step to attribute."),
              no_progress: bool = typer.Option(False, help="Hide progress bars.")):
    """Attribute query images to a run's training data (resumable feature stores)."""
    from jaxattrib.attribution.store import StoreMismatchError
    from jaxattrib.config import ConfigError
    from jaxattrib.workflow import attribute_run
    try:
        s = attribute_run(run_dir, queries, method, k=k, params=params,
                          num_timesteps=timesteps, lam_ratio=lam_ratio, topk=topk,
                          journey_step=journey_step, progress=not no_progress)
    except (ConfigError, StoreMismatchError, ValueError) as e:
        _fail(str(e))
    typer.echo(f"scores [{s.shape[0]} queries x {s.shape[1]} training images] written to "
               f"{run_dir / 'scores'}; `jaxattrib report {run_dir}` renders them")


@app.command()
def generate(prompt: List[str] = typer.Option(..., "--prompt", "-p", help="Prompt (repeatable)."),
             out: Path = typer.Option(Path("runs/generate"), help="Output folder for PNGs."),
             model: str = typer.Option("embedded", help="'embedded' or a diffusers pipeline "
                                                        "folder (safetensors)."),
             record: Optional[Path] = typer.Option(None, help="Use UNet params from this "
                                                              "trajectory record."),
             step: Optional[int] = typer.Option(None, help="Record step (default: latest)."),
             num: int = typer.Option(1, help="Images per prompt."),
             seed: int = typer.Option(0), steps: int = typer.Option(25, help="DDIM steps."),
             guidance: float = typer.Option(3.0, help="Classifier-free guidance scale."),
             trajectory: bool = typer.Option(False, help="Also save the sampling trajectory "
                                                         "(x_t and x̂0 per step) as .npz."),
             allow_pickle: bool = typer.Option(False, help="Allow pickle weights (unsafe).")):
    """Generate images with a pipeline (the embedded base model by default)."""
    import jax
    import numpy as np
    from jaxattrib.generate import generate as gen, save_images
    from jaxattrib.models.convert import CheckpointError
    try:
        pipe = _load_model(model, allow_pickle)
        unet_params = None
        if record is not None:
            from jaxattrib.train.record import TrajectoryRecord
            rec = TrajectoryRecord.open(record.resolve())
            s = rec.latest_step() if step is None else step
            unet_params = rec.load(s)["unet"]
        prompts = [p for p in prompt for _ in range(num)]
        g = gen(pipe, prompts, jax.random.PRNGKey(seed), unet_params=unet_params,
                num_inference_steps=steps, guidance_scale=guidance, return_trajectory=trajectory)
        paths = save_images(out, np.clip(np.asarray(g.images), -1, 1), prompts)
        if trajectory:
            np.savez(out / "trajectory.npz", timesteps=np.asarray(g.trajectory.timesteps),
                     xs=np.asarray(g.trajectory.xs), x0_preds=np.asarray(g.trajectory.x0_preds))
        typer.echo(f"wrote {len(paths)} images to {out}")
    except CheckpointError as e:
        _fail(str(e))


def _load_model(model: str, allow_pickle: bool = False):
    from jaxattrib.base_model import load_base_model
    from jaxattrib.models.pipeline import load_pipeline
    if model == "embedded":
        return load_base_model()
    return load_pipeline(model, allow_pickle=allow_pickle)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run directory with results/*.json."),
           screenshot: Optional[Path] = typer.Option(None, help="Also render a PNG screenshot "
                                                                "with headless Chromium.")):
    """Render RUN_DIR/report.html (self-contained: opens with no server and no network)."""
    from jaxattrib.report.html import ReportError, render_run_report
    try:
        path = render_run_report(run_dir)
    except (ReportError, FileNotFoundError) as e:
        _fail(str(e))
    typer.echo(f"wrote {path}")
    if screenshot is not None:
        import subprocess
        script = Path(__file__).resolve().parents[1] / "scripts" / "screenshot_report.sh"
        subprocess.run(["bash", str(script), str(path), str(screenshot)], check=True)
        typer.echo(f"wrote {screenshot}")


@app.command()
def info(model: str = typer.Argument("embedded", help="'embedded' or a pipeline folder.")):
    """Load a model (checks every tensor) and print its components and sizes."""
    import jax
    from jaxattrib.models.convert import CheckpointError
    try:
        pipe = _load_model(model)
    except CheckpointError as e:
        _fail(str(e))
    count = lambda t: sum(x.size for x in jax.tree_util.tree_leaves(t))  # noqa: E731
    typer.echo(f"pipeline: {pipe.folder}")
    typer.echo(f"  unet: {count(pipe.unet_params):,} params, sample "
               f"{pipe.unet_config.sample_size}x{pipe.unet_config.sample_size}x"
               f"{pipe.unet_config.in_channels}")
    typer.echo(f"  text_encoder: {count(pipe.text_params):,} params")
    typer.echo(f"  vae: {'none (pixel space)' if pipe.vae_params is None else f'{count(pipe.vae_params):,} params'}")
    typer.echo(f"  scheduler: {json.dumps(pipe.scheduler_config)}")


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    main()
