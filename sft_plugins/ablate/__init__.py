"""``sft-plugins ablate``: A/B ablation of plugins, each arm trained in a fresh process.

    sft-plugins ablate                      # embedded tiny model + generated data, baseline + every built-in
    sft-plugins ablate --arms fused_ce,packing+fused_ce --steps 50

    from sft_plugins.ablate import run_ablation
    results = run_ablation({"arms": ["fused_ce"], "steps": 10})   # the results.json content

See docs/ablate.md for what is measured and how the verdicts are made.
"""

from __future__ import annotations

import pathlib
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ._config import AGAIN, BASELINE, GPU_WORKLOAD, AblationConfig, ConfigError, load_yaml, make_config, parse_args

__all__ = ["BASELINE", "AblationConfig", "ConfigError", "load_yaml", "main", "make_config", "run_ablation"]

EXIT_OK, EXIT_ARM_FAILED, EXIT_BAD_OPTIONS = 0, 1, 2


def _preflight(config: AblationConfig, arms: list[Any], out_dir: pathlib.Path, view: Any) -> None:
    """Compose and prepare every arm once in one child before training any: an arm that cannot be
    composed (conflicting plugins, a check that fails for this model/args) is a bad option, and the
    user should hear it in seconds, not after the baseline has trained."""
    from ._runner import base_spec, run_child

    todo = [a for a in arms if a.plugins and not a.skipped]
    if not todo:
        return
    spec = {**base_spec(config), "mode": "check", "arm": "preflight",
            "check_arms": [{"name": a.name, "plugins": a.plugins, "options": a.options} for a in todo]}
    # a transient status line: on a terminal it disappears, so a bad arm still costs the user one line
    with view.console.status(f"checking that {len(todo)} arm(s) compose ..."):
        result = run_child(spec, out_dir / "arms" / "_preflight", config.timeout)
    if result.get("status") != "ok":
        raise ConfigError(f"preflight failed: {' '.join((result.get('error') or 'no result').split())}")
    problems = result.get("problems") or {}
    if problems:
        name, message = next(iter(problems.items()))
        more = f" (and {len(problems) - 1} more arm(s))" if len(problems) > 1 else ""
        raise ConfigError(f"arm {name!r} cannot run: {' '.join(message.split())}{more}")


def run_ablation(config: AblationConfig | Mapping[str, Any] | None = None, *, show_progress: bool = True,
                 console: Any = None) -> dict[str, Any]:
    """Run every arm, write results.json, report.md and the plots; return the results.

    ``config`` is an :class:`AblationConfig` or a mapping of its keys (as in the YAML file). Raises
    :class:`ConfigError` (a ``PluginError``) for bad options before any arm trains.
    """
    from ._plots import write_plots
    from ._progress import ProgressView
    from ._report import finalize, markdown, write_json
    from ._runner import base_spec, load_locals, plan_arms, plugin_infos, run_child

    if not isinstance(config, AblationConfig):
        config = make_config(config or {})
    config.validate()
    cuda = _cuda_available()
    config = with_device_workload(config, cuda)
    local = load_locals(config)
    infos = plugin_infos(local)
    arms = plan_arms(config, infos, local)
    out_dir = config.resolved_output_dir()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / ".write-test").touch()
        (out_dir / ".write-test").unlink()
    except OSError as exc:
        raise ConfigError(f"output dir {out_dir}: cannot write there ({exc.strerror or exc}); "
                          "pass --output-dir DIR") from None
    skip = config.resolved_skip_steps()
    started = time.monotonic()
    baseline = next((a for a in arms if a.name == BASELINE and not a.skipped), None)
    repeat = baseline if baseline and len(arms) > 1 and config.resolved_repeat_baseline(cuda) else None
    names = [a.name for a in arms] + ([AGAIN] if repeat else [])
    view = ProgressView(names, config.steps, skip, console=console, enabled=show_progress)
    if config.preflight or (config.preflight is None and config.arms):
        _preflight(config, arms, out_dir, view)

    spec = base_spec(config)
    results: list[dict[str, Any]] = []
    again: dict[str, Any] | None = None
    interrupted = False
    with view:
        try:
            for arm in arms:
                if arm.skipped:
                    result: dict[str, Any] = {"status": "skipped", "error": arm.skipped, "steps": []}
                else:
                    view.started(arm.name)
                    result = run_child({**spec, "arm": arm.name, "plugins": arm.plugins, "options": arm.options},
                                       out_dir / "arms" / arm.slug, config.timeout,
                                       lambda event, name=arm.name: view.event(name, event))
                result.update(name=arm.name, plugins=arm.plugins, options=arm.options)
                results.append(result)
                view.finished(arm.name, result)
            if repeat and results and results[0]["name"] == BASELINE and results[0]["status"] == "ok":
                view.started(AGAIN)
                again = run_child({**spec, "arm": BASELINE, "plugins": [], "options": {}},
                                  out_dir / "arms" / f"{repeat.slug}-again", config.timeout,
                                  lambda event: view.event(AGAIN, event))
                view.finished(AGAIN, again)
        except KeyboardInterrupt:  # Ctrl-C: the arms that finished are still reported, the rest marked
            interrupted = True
    done = {r["name"] for r in results}
    for arm in arms:
        if arm.name not in done:
            results.append({"status": "interrupted", "error": "not run: the ablation was interrupted (Ctrl-C)",
                            "steps": [], "name": arm.name, "plugins": arm.plugins, "options": arm.options})

    config_dict = {**config.as_dict(), "lr": config.resolved_lr(), "output_dir": str(out_dir)}
    final = finalize(config_dict, results, {k: v.as_dict() for k, v in infos.items()}, skip,
                     time.monotonic() - started, baseline_again=again)
    final["output_dir"] = str(out_dir)
    # interrupted arms are in results as such; a Ctrl-C during the second baseline run leaves every arm whole
    final["incomplete"] = any(a["status"] not in ("ok", "skipped") for a in results)
    try:
        plots = write_plots(final, out_dir)
    except Exception as exc:  # a plotting problem must not lose the measurements
        plots = {}
        final["plot_error"] = f"{type(exc).__name__}: {exc}"
    final["plots"] = plots
    write_json(final, out_dir / "results.json")
    (out_dir / "report.md").write_text(markdown(final, plots))
    if interrupted:
        raise AblationInterrupted(final)
    return final


class AblationInterrupted(KeyboardInterrupt):
    """Ctrl-C during an ablation, after the finished arms' report was written (``results``)."""

    def __init__(self, results: dict[str, Any]) -> None:
        super().__init__("interrupted")
        self.results = results


def with_device_workload(config: AblationConfig, cuda: bool) -> AblationConfig:
    """The config to run: on a GPU, with no model or data named, :data:`GPU_WORKLOAD` instead of the
    embedded tiny CPU default."""
    if config.workload_given or not cuda or config.device == "cpu":
        return config
    import dataclasses

    return dataclasses.replace(config, **GPU_WORKLOAD, workload_given=True)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _terminate_cleanly() -> None:
    """SIGTERM (a CI timeout, `kill`) should end the running arm too: the child has its own process
    group, so it would outlive the parent. Raising SystemExit unwinds through run_child's cleanup."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def main(argv: Sequence[str] | None = None) -> int:
    """``sft-plugins ablate [options]``: 0 when every arm ran, 1 when some arm failed (the results
    are still written), 2 for bad options (one line on stderr)."""
    from rich.console import Console

    from ._report import terminal_table

    argv = list(sys.argv[1:] if argv is None else argv)
    err = Console(stderr=True)
    _terminate_cleanly()
    try:
        config = parse_args(argv)
        results = run_ablation(config, console=err)
    except ConfigError as exc:
        print(f"sft-plugins ablate: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_BAD_OPTIONS
    except AblationInterrupted as exc:
        out = pathlib.Path(exc.results["output_dir"])
        print(f"sft-plugins ablate: interrupted; the arms that finished are in {out / 'report.md'} and "
              f"{out / 'results.json'} (marked incomplete)", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("sft-plugins ablate: interrupted", file=sys.stderr)
        return 130
    out_console = Console()
    if not out_console.is_terminal:  # logs and pipes: rich's 80 columns would wrap every cell
        out_console = Console(width=160)
    out_console.print(terminal_table(results))
    out = pathlib.Path(results["output_dir"])
    print(f"report: {out / 'report.md'}  results: {out / 'results.json'}  plots: "
          + ", ".join(pathlib.Path(p).name for p in results["plots"].values()))
    failed = [a["name"] for a in results["arms"] if a["status"] not in ("ok", "skipped")]
    return EXIT_ARM_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
