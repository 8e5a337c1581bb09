"""Live logging of a run while it goes (`logger=tensorboard`): every evaluation point's metrics, the
median over seeds and each seed, as TensorBoard scalars in <run folder>/tensorboard/. Off by default
(`logger=none`); needs the `tensorboard` extra. It only watches: nothing it writes is a result."""
from __future__ import annotations

from pathlib import Path

import numpy as np

LOGGERS = ("none", "tensorboard")
NOT_LOGGED = ("seed", "step", "samples", "queries")


def check_logger(name: str) -> None:
    """Refuse an unknown logger or a missing extra before any compute (ConfigError names the field)."""
    from ratebench.core.errors import ConfigError

    if name not in LOGGERS:
        raise ConfigError("logger", f"unknown logger {name!r}; allowed: {', '.join(LOGGERS)}")
    if name == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("logger", "logger=tensorboard needs the tensorboard package: "
                                        "pip install 'ratebench[tensorboard]'") from None


class NoLog:
    def log(self, frame) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLog:
    """Scalars `<metric>/median` and `<metric>/seed_<s>` at global step = the sample counter."""

    def __init__(self, out_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))

    def log(self, frame) -> None:  # frame: one or more evaluation points (one step each), one row per live seed
        for _, point in frame.groupby("step", sort=False):
            at = int(point["samples"].iloc[0])
            for column in point.columns:
                if column in NOT_LOGGED:
                    continue
                values = point[column].to_numpy(dtype=float)
                finite = values[np.isfinite(values)]
                if finite.size:
                    self.writer.add_scalar(f"{column}/median", float(np.median(finite)), global_step=at)
                for seed, value in zip(point["seed"], values):
                    if np.isfinite(value):
                        self.writer.add_scalar(f"{column}/seed_{int(seed)}", float(value), global_step=at)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def live_logger(name: str | None, out_dir: Path):
    """The run's live logger: NoLog for None/'none', TensorBoardLog for 'tensorboard'."""
    return TensorBoardLog(out_dir) if name == "tensorboard" else NoLog()
