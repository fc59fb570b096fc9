"""A training progress bar: step, loss (and the MTP head's), tokens/s and ETA (rich), shown on rank 0 only."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, total: int, start: int, enabled: bool = True):
        self.enabled = enabled
        self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]}{task.fields[mtp]}  val {task.fields[val]}  "
                                       "{task.fields[rate]} tok/s"),
                            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), disable=not enabled)
        self.task = self.bar.add_task("train", total=total, completed=start, loss="-", mtp="", val="-",
                                      rate="-")

    def __enter__(self) -> "TrainProgress":
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def update(self, step: int, record: dict) -> None:
        fields = {"loss": f"{record['loss']:.3f}", "rate": f"{record['tok_per_s']:.0f}"}
        if "mtp_loss" in record:
            fields["mtp"] = f"  mtp {record['mtp_loss']:.3f}"
        val = [f"{record[k]:.3f}" for k in ("val_loss", "val_mtp_loss") if k in record]
        if val:
            fields["val"] = " / ".join(val)
        self.bar.update(self.task, completed=step, **fields)
