"""``dunet-serve``: serve a model through a Triton Inference Server (PyTriton).

Example::

    dunet-serve --engine runs/export/model.onnx --http-port 8000 --grpc-port 8001
    dunet-infer --engine runs/export/model.onnx --triton-url grpc://127.0.0.1:8001 \\
        scan.nii.gz -o out

The server listens on 127.0.0.1 unless ``--host`` says otherwise, prints one
``ready`` line with its URLs when it accepts requests, and stops cleanly on
SIGINT or SIGTERM.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from dunet_deploy.choices import BACKENDS, PRECISIONS
from dunet_deploy.cli._common import DunetCommand, handle_errors


@click.command(cls=DunetCommand)
@click.option("--engine", "model_path", required=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Model to serve: .onnx, or a TensorRT .plan with its sidecar.")
@click.option("--backend", default="auto", show_default=True,
              type=click.Choice(["auto", *BACKENDS]),
              help="Runtime backend behind the server.")
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
@handle_errors
def main(model_path: Path, backend: str, precision: str, threads: int | None, host: str,
         http_port: int, grpc_port: int, metrics_port: int, max_batch_size: int,
         max_queue_delay_us: int, instances: int, model_name: str) -> None:
    """Serve MODEL's slabs -> probabilities through Triton, with dynamic batching."""
    from dunet_deploy.runtime.serve import ServeConfig, serve

    cfg = ServeConfig(
        model_path=model_path, backend=backend, host=host, http_port=http_port,
        grpc_port=grpc_port, metrics_port=metrics_port, max_batch_size=max_batch_size,
        max_queue_delay_us=max_queue_delay_us, instances=instances, model_name=model_name,
        threads=threads, precision=precision,
    )

    def ready(urls: dict[str, str]) -> None:
        click.echo(f"ready {json.dumps({'model': model_name, **urls})}")

    serve(cfg, on_ready=ready)
    click.echo("stopped")


if __name__ == "__main__":
    main()
