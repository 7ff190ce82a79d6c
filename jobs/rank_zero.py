"""Every MLflow side effect of a training worker, made by rank 0 alone (`RankZeroTracker`),
and the picture it logs: target | reconstruction | error of the dropped channel."""

from __future__ import annotations

import numpy as np
import torch

from jobs.tracking import mlflow_client


def comparison_image(target: torch.Tensor, reconstruction: torch.Tensor) -> np.ndarray:
    """(H, 3W) uint8 picture: target | reconstruction | |error| (normalised channel in [-1, 1])."""
    t = target.detach().float().cpu().reshape(target.shape[-2:])
    r = reconstruction.detach().float().cpu().reshape(reconstruction.shape[-2:])
    to_u8 = lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # noqa: E731
    err = ((r - t).abs().clamp(0, 1) * 255).round().to(torch.uint8)
    return torch.cat([to_u8(t), to_u8(r), err], dim=1).numpy()


class RankZeroTracker:
    """Every MLflow side effect of a training worker; a no-op on ranks other than 0."""

    def __init__(self, enabled: bool, uri: str, run_id: str, system_metrics: bool = True):
        self.enabled = enabled and bool(run_id)
        self.uri, self.run_id, self.system_metrics = uri, run_id, system_metrics
        self.logged_until: dict[str, int] = {}  # metric -> last step already in the run

    def __enter__(self) -> RankZeroTracker:
        if self.enabled:
            import mlflow

            mlflow.set_tracking_uri(self.uri)
            # A resumed attempt replays the steps after its checkpoint; whatever the failed
            # attempt already logged for them stays, and is not logged a second time.
            client = mlflow_client(self.uri)
            for key in client.get_run(self.run_id).data.metrics:
                history = client.get_metric_history(self.run_id, key)
                self.logged_until[key] = max((m.step for m in history), default=-1)
            mlflow.start_run(run_id=self.run_id, log_system_metrics=self.system_metrics)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.enabled:
            import mlflow

            # A failed attempt leaves the run RUNNING: the retried attempt continues it.
            mlflow.end_run(status="FINISHED" if exc_type is None else "RUNNING")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.enabled:
            import mlflow

            fresh = {k: float(v) for k, v in metrics.items() if step > self.logged_until.get(k, -1)}
            if fresh:
                mlflow.log_metrics(fresh, step=step)

    def log_picture(self, target: torch.Tensor, reconstruction: torch.Tensor, step: int) -> None:
        if self.enabled:
            import mlflow

            image = comparison_image(target, reconstruction)
            mlflow.log_image(image, artifact_file=f"images/step_{step:08d}.png")

    def set_tag(self, key: str, value: str) -> None:
        if self.enabled:
            import mlflow

            mlflow.set_tag(key, value)
