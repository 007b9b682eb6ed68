"""``dunet-serve``: serve a model, or a native model repository, with a real Triton server.

Examples::

    dunet-serve --engine runs/export/model.onnx --http-port 8000 --grpc-port 8001
    dunet-infer --engine runs/export/model.onnx --triton-url grpc://127.0.0.1:8001 \\
        scan.nii.gz -o out

    dunet-export runs/best.pt -o export --format triton --triton-backend python
    dunet-serve --repository export/triton
    dunet-infer --engine export/model.onnx --triton-url http://127.0.0.1:8000 \\
        --server-side scan.nii.gz -o out

The server listens on 127.0.0.1 unless ``--host`` says otherwise, prints one ``ready``
line with its models and URLs only when every model answers ready, and stops cleanly on
SIGINT or SIGTERM. Triton's own log is hidden unless ``--verbose``; a busy port or a
model that fails to load is one ``error:`` line, exit 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from dunet_deploy.choices import BACKENDS, PRECISIONS
from dunet_deploy.cli._common import DunetCommand, handle_errors
from dunet_deploy.errors import DunetError


@click.command(cls=DunetCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--engine", "model_path", default=None,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Model to serve: .onnx, or a TensorRT .plan with its sidecar.")
@click.option("--repository", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Serve this Triton model repository instead (e.g. dunet-export "
                   "--format triton's triton/ folder, with dunet_volume).")
@click.option("--backend", default="auto", show_default=True,
              type=click.Choice(["auto", *BACKENDS]),
              help="Runtime backend behind the server (--engine).")
@click.option("--precision", default="auto", show_default=True,
              type=click.Choice(PRECISIONS))
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Backend threads per instance.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address the endpoints bind to.")
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=8002, show_default=True)
@click.option("--max-batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Largest batch Triton's dynamic batcher forms.")
@click.option("--max-queue-delay-us", type=click.IntRange(min=0), default=2000,
              show_default=True, help="How long the batcher waits to fill a batch.")
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="Model instances (one runner each).")
@click.option("--model-name", default="dunet", show_default=True,
              help="Triton model name (the description is served as <name>_spec).")
@click.option("-v", "--verbose", is_flag=True, help="Show Triton's own start-up and request log.")
@handle_errors
def main(model_path: Path | None, repository: Path | None, backend: str, precision: str,
         threads: int | None, host: str, http_port: int, grpc_port: int, metrics_port: int,
         max_batch_size: int, max_queue_delay_us: int, instances: int, model_name: str,
         verbose: bool) -> None:
    """Serve MODEL's slabs -> probabilities (or a model repository) through Triton."""
    from dunet_deploy.runtime.serve import ServeConfig, serve, serve_repository
    from dunet_deploy.runtime.tritonserver import Endpoints

    if (model_path is None) == (repository is None):
        raise DunetError("give exactly one of --engine MODEL and --repository DIR")

    def ready(doc: dict[str, Any]) -> None:
        click.echo(f"ready {json.dumps(doc)}")

    if repository is not None:
        serve_repository(repository, Endpoints(host, http_port, grpc_port, metrics_port),
                         verbose=verbose, on_ready=ready)
    else:
        assert model_path is not None
        cfg = ServeConfig(
            model_path=model_path, backend=backend, host=host, http_port=http_port,
            grpc_port=grpc_port, metrics_port=metrics_port, max_batch_size=max_batch_size,
            max_queue_delay_us=max_queue_delay_us, instances=instances, model_name=model_name,
            threads=threads, precision=precision, verbose=verbose,
        )
        serve(cfg, on_ready=ready)
    click.echo("stopped")


if __name__ == "__main__":
    main()
