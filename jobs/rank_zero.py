"""Every MLflow side effect of a training worker, made by rank 0 alone (`RankZeroTracker`),
and the picture it logs: target | reconstruction | error of the dropped channel, titled."""

from __future__ import annotations

import numpy as np
import torch

from jobs.tracking import mlflow_client

CHANNEL_NAMES = {1: "a", 2: "b"}  # model.MASTOutput.dropped: which Lab channel was dropped
MIN_PANEL_WIDTH = 128  # small crops are enlarged (nearest) so a title fits above each panel
TITLE_HEIGHT = 16


def comparison_image(
    target: torch.Tensor, reconstruction: torch.Tensor, dropped: int | None = None
) -> np.ndarray:
    """Titled uint8 picture of one training sample's dropped channel: target | reconstruction
    | |error| side by side, each under its title ("target (b)", "reconstruction (b)",
    "|error|"); target and reconstruction in [-1, 1] shown as grey levels, error in [0, 1]."""
    t = target.detach().float().cpu().reshape(target.shape[-2:])
    r = reconstruction.detach().float().cpu().reshape(reconstruction.shape[-2:])
    to_u8 = lambda x: ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # noqa: E731
    err = ((r - t).abs().clamp(0, 1) * 255).round().to(torch.uint8)
    channel = f" ({CHANNEL_NAMES[int(dropped)]})" if dropped in CHANNEL_NAMES else ""
    panels = [to_u8(t).numpy(), to_u8(r).numpy(), err.numpy()]
    titles = [f"target{channel}", f"reconstruction{channel}", "|error|"]
    return np.concatenate([titled(p, title) for p, title in zip(panels, titles)], axis=1)


def titled(panel: np.ndarray, title: str) -> np.ndarray:
    """(H, W) grey panel -> (TITLE_HEIGHT + k*H, k*W): enlarged by an integer factor k to at
    least MIN_PANEL_WIDTH wide, with `title` in white on black above it."""
    import cv2

    k = max(1, -(-MIN_PANEL_WIDTH // panel.shape[1]))
    body = np.kron(panel, np.ones((k, k), np.uint8))  # nearest: the pixels stay visible
    header = np.zeros((TITLE_HEIGHT, body.shape[1]), np.uint8)
    cv2.putText(header, title, (3, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 255, 1, cv2.LINE_AA)
    header[:, -1] = 0  # a black column between panels
    return np.concatenate([header, body], axis=0)


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

    def log_picture(
        self, target: torch.Tensor, reconstruction: torch.Tensor, step: int, dropped: int
    ) -> None:
        if self.enabled:
            import mlflow

            image = comparison_image(target, reconstruction, dropped)
            mlflow.log_image(image, artifact_file=f"images/step_{step:08d}.png")

    def set_tag(self, key: str, value: str) -> None:
        if self.enabled:
            import mlflow

            mlflow.set_tag(key, value)
