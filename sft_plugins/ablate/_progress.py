"""The live display while arms run: one rich progress bar per arm, with its phase, loss and tokens/s.

On a non-terminal (CI logs, tests) rich draws nothing live; each finished arm still prints one line.
"""

from __future__ import annotations

from typing import Any

from ._report import fmt_bytes, one_line


class ProgressView:
    def __init__(self, arm_names: list[str], steps: int, skip_steps: int, *, console: Any = None,
                 enabled: bool = True) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.skip = skip_steps
        self.progress = Progress(TextColumn("{task.fields[mark]}"), TextColumn("{task.description:<28}"),
                                 BarColumn(bar_width=24), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                                 TimeElapsedColumn(),
                                 console=self.console, disable=not enabled, transient=False)
        self.tasks = {}
        for i, name in enumerate(arm_names, 1):
            label = f"[{i}/{len(arm_names)}] {name}"
            self.tasks[name] = self.progress.add_task(label[:28], total=steps, info="[dim]waiting[/]", mark=" ",
                                                    start=False)
        self._tok: dict[str, list[float]] = {}

    def __enter__(self) -> ProgressView:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def note(self, message: str) -> None:
        if self.enabled:
            self.progress.console.print(message)

    def started(self, name: str) -> None:
        self.progress.start_task(self.tasks[name])
        self.progress.update(self.tasks[name], info="starting process", mark="…")

    def event(self, name: str, event: dict[str, Any]) -> None:
        task = self.tasks[name]
        kind = event.get("event")
        if kind == "phase":
            self.progress.update(task, info=event.get("phase", ""))
        elif kind == "step":
            tok = self._tok.setdefault(name, [0.0, 0.0])
            if event["step"] > self.skip:  # warm-up steps stay out of the live figure too
                tok[0] += event.get("tokens", 0)
                tok[1] += event.get("time_s", 0.0)
            rate = f"  {tok[0] / tok[1]:,.0f} tok/s" if tok[1] > 0 else ""
            self.progress.update(task, completed=event["step"], info=f"loss {event['loss']:.4f}{rate}")

    def finished(self, name: str, arm: dict[str, Any]) -> None:
        task = self.tasks[name]
        status = arm.get("status")
        if status == "ok":
            info, mark = "[green]done[/]", "[green]✓[/]"
        elif status == "skipped":
            info, mark = "[dim]skipped[/]", "[dim]-[/]"
        else:
            info, mark = f"[red]{status}[/]", "[red]✗[/]"
        self.progress.update(task, info=info, mark=mark)
        self.progress.stop_task(task)
        steps = [s for s in arm.get("steps", []) if s.get("loss") is not None]
        if status == "ok" and steps:
            timed = steps[self.skip:] or steps
            secs = sum(s["time_s"] for s in timed)
            rate = sum(s["tokens"] for s in timed) / secs if secs else 0.0
            line = (f"  {name}: ok, {len(steps)} steps, loss {steps[-1]['loss']:.4f}, {rate:,.0f} tok/s, "
                    f"peak {fmt_bytes(max(s['peak_memory_bytes'] for s in steps))}, {arm.get('wall_s', 0):.0f} s")
        else:
            line = f"  {name}: {status}: {one_line(arm.get('error'), 200)}"
        self.note(line)
