"""Training log: one JSON line per step and per eval in the output directory, a tqdm bar on rank 0
(loss, learning rate, tokens/s) and optional TensorBoard scalars."""
import json
import os
import time

from tqdm import tqdm


class Log:
    def __init__(self, output_dir: str, total_steps: int, rank: int, tensorboard_path: str | None = None,
                 desc: str = "train", initial: int = 0):
        self.rank, self.start = rank, time.perf_counter()
        self.file = self.bar = self.tb = None
        if rank != 0:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.file = open(os.path.join(output_dir, "log.jsonl"), "a")
        self.bar = tqdm(total=total_steps, initial=initial, desc=desc, dynamic_ncols=True)
        if tensorboard_path:
            from torch.utils.tensorboard import SummaryWriter  # imported only when asked: slow import
            self.tb = SummaryWriter(tensorboard_path)

    def write(self, kind: str, step: int, metrics: dict) -> None:
        if self.rank != 0:
            return
        record = {"kind": kind, "step": step, "time": round(time.perf_counter() - self.start, 3), **metrics}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        for key, value in metrics.items() if self.tb else ():
            self.tb.add_scalar(f"{kind}/{key}", value, step)

    def step(self, step: int, loss: float, lr: float, tokens: int, seconds: float) -> None:
        """One optimizer step: tokens counted over all ranks."""
        metrics = {"loss": loss, "lr": lr, "tokens_per_s": tokens / seconds, "step_s": seconds}
        self.iteration(step, metrics, shown=("loss", "lr", "tokens_per_s"))

    def iteration(self, step: int, metrics: dict, shown: tuple[str, ...] = ()) -> None:
        """One step of any shape; the bar shows the `shown` metrics."""
        self.write("train", step, metrics)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{metrics[k]:.4g}" for k in shown if k in metrics})

    def eval(self, step: int, metrics: dict) -> None:
        self.write("eval", step, metrics)
        if self.bar is not None:
            self.bar.write(f"eval step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))

    def close(self) -> None:
        for handle in (self.bar, self.file, self.tb):
            if handle is not None:
                handle.close()
