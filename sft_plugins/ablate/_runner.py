"""Planning the arms and running each one in a fresh child process.

The parent never imports torch: it resolves plugin names (so an unknown plugin fails in a second),
starts ``python -m sft_plugins.ablate._arm`` per arm, one after another (parallel arms would share
the CPU cores or the GPU and spoil each other's timings), streams the child's progress events, and
kills an arm that exceeds its timeout.
"""

from __future__ import annotations

import json
import os
import pathlib
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .._discovery import PluginInfo, available, info_for_object, load_object
from .._errors import PluginError
from .._stack import compose
from ._arm import EVENT_PREFIX
from ._config import BASELINE, AblationConfig, ConfigError

TAIL_LINES = 25


@dataclass
class Arm:
    name: str
    plugins: list[str]
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: str | None = None  # why the arm is not run (a plugin that does not load)

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.+-]", "_", self.name)


def load_locals(config: AblationConfig) -> dict[str, Any]:
    """The ``--load`` plugin objects, imported in the parent too so that a typo fails at once."""
    out = {}
    for name, spec in config.load.items():
        try:
            out[name] = load_object(spec)
        except Exception as exc:
            raise ConfigError(f"--load {name}={spec}: cannot import it ({type(exc).__name__}: {exc})") from None
    return out


def plugin_infos(local: dict[str, Any]) -> dict[str, PluginInfo]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a broken plugin becomes a skipped arm with its error
        infos = dict(available())
    for name, obj in local.items():
        infos[name] = info_for_object(name, obj, source="local", value=config_value(obj))
    return infos


def config_value(obj: Any) -> str:
    return str(getattr(obj, "__name__", type(obj).__name__))


def plan_arms(config: AblationConfig, infos: dict[str, PluginInfo], local: dict[str, Any]) -> list[Arm]:
    """The arms to run, baseline first; raises ConfigError for names that cannot compose."""
    arms: list[Arm] = []
    if config.arms:
        twice = sorted({a for a in config.arms if config.arms.count(a) > 1})
        if twice:
            raise ConfigError(f"arm {twice[0]!r} is named twice in --arms; name each arm once")
        names = [BASELINE] + [a for a in config.arms if a != BASELINE]  # the reference always runs, first
    elif config.config_plugins:  # a `trl sft` config's plugins: each alone, then all of them as the file says
        names = [BASELINE] + list(config.config_plugins)
        if len(config.config_plugins) > 1:
            names.append("+".join(config.config_plugins))
    else:
        wide = config.all_singles or config.all
        singles = [n for n, i in infos.items() if wide or i.source == "builtin"]
        names = [BASELINE] + singles
        if config.all:
            together = [n for n in singles if infos[n].ok]
            if len(together) > 1:
                names.append("+".join(together))
    for name in names:
        if name == BASELINE:
            arms.append(Arm(name, []))
            continue
        plugins = [p.strip() for p in name.split("+")]
        if BASELINE in plugins or "" in plugins:
            raise ConfigError(f"arm {name!r}: write a combination as a+b of plugin names (baseline always runs)")
        broken = [p for p in plugins if p in infos and not infos[p].ok]
        if broken and not config.arms:
            arms.append(Arm(name, plugins, skipped=f"{broken[0]} does not load: {infos[broken[0]].error}"))
            continue
        options = {p: dict(config.plugin_options[p]) for p in plugins if p in config.plugin_options}
        try:  # resolves the names and registers the hookimpls: unknown or malformed plugins fail here
            compose(plugins, options, plugins=local)
        except PluginError as exc:
            raise ConfigError(f"arm {name!r}: {' '.join(str(exc).split())}") from None
        arms.append(Arm(name, plugins, options))
    used = {p for a in arms for p in a.plugins}
    stray = sorted(set(config.plugin_options) - used)
    if stray:
        raise ConfigError(f"plugin options given for {', '.join(stray)}, which no arm uses")
    return arms


def base_spec(config: AblationConfig) -> dict[str, Any]:
    """What every arm shares: same model, data, seed and hyperparameters."""
    return {
        "model": config.model, "dataset": config.dataset, "dataset_split": config.dataset_split,
        "dataset_size": config.dataset_size, "steps": config.steps, "batch_size": config.batch_size,
        "max_length": config.max_length, "lr": config.resolved_lr(), "seed": config.seed,
        "trainer": config.trainer, "lora": config.lora, "lora_r": config.lora_r, "lora_alpha": config.lora_alpha,
        "device": config.device, "load": dict(config.load), "trl_config": config.trl_config,
        "trl_flags": list(config.trl_flags),
    }


def child_env() -> dict[str, str]:
    """The child imports what the parent can: the parent's sys.path goes first on PYTHONPATH (so a
    ``--load`` module importable here, e.g. from a test directory, is importable there)."""
    env = dict(os.environ)
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers would warn after fork; we do not fork
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return env


def run_child(spec: dict[str, Any], arm_dir: pathlib.Path, timeout: float,
              on_event: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run one child to completion (or kill it at ``timeout``); return its result, whatever happened."""
    arm_dir.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "arm_dir": str(arm_dir), "result_path": str(arm_dir / "result.json")}
    result_path = pathlib.Path(spec["result_path"])
    result_path.unlink(missing_ok=True)
    (arm_dir / "spec.json").write_text(json.dumps(spec, indent=1))
    log_path = arm_dir / "log.txt"
    events: queue.Queue[dict[str, Any] | None] = queue.Queue()
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    started = time.monotonic()
    # A new session gives the child its own process group, so a timeout kills it and anything it
    # started (dataloader workers, compile workers) and nothing else.
    proc = subprocess.Popen([sys.executable, "-m", "sft_plugins.ablate._arm", str(arm_dir / "spec.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            text=True, errors="replace", bufsize=1, env=child_env(), start_new_session=True)

    def read() -> None:
        assert proc.stdout is not None
        with open(log_path, "w") as log:
            for line in proc.stdout:
                if line.startswith(EVENT_PREFIX):
                    try:
                        events.put(json.loads(line[len(EVENT_PREFIX):]))
                        continue
                    except json.JSONDecodeError:
                        pass
                log.write(line)
                log.flush()
                tail.append(line.rstrip("\n"))
        events.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    timed_out = False
    try:
        while True:
            remaining = timeout - (time.monotonic() - started)
            if remaining <= 0 and not timed_out:
                timed_out = True
                _kill(proc)
            try:
                event = events.get(timeout=max(0.05, min(0.5, remaining)) if not timed_out else 5.0)
            except queue.Empty:
                if timed_out:
                    break
                continue
            if event is None:
                break
            if on_event is not None:
                on_event(event)
    except BaseException:
        # Ctrl-C reaches only the parent (the child has its own session): take the child down with us
        _kill(proc)
        raise
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        _kill(proc)
        proc.wait()
    reader.join(timeout=5)
    if proc.stdout is not None:
        proc.stdout.close()
    wall = time.monotonic() - started

    result: dict[str, Any] = {}
    if result_path.is_file():
        try:
            result = json.loads(result_path.read_text())
        except json.JSONDecodeError:
            result = {}
    result.setdefault("steps", [])
    result.update(exit_code=proc.returncode, wall_s=wall, log=str(log_path), error_tail="\n".join(tail))
    if timed_out:
        result.update(status="timeout", error=f"killed after the {timeout:g} s timeout "
                                              f"({len(result['steps'])} steps done)")
    elif result.get("status") in (None, "running"):
        # the process died without finishing its result: a hard crash (os._exit, a signal, OOM kill)
        last = next((line for line in reversed(tail) if line.strip()), "")
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
        result.update(status="failed", error=f"the arm's process died ({how}): {last}"[:2000])
    return result


def _kill(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the child's own group (start_new_session)
    except (ProcessLookupError, PermissionError):
        proc.kill()


RESULT_PREFIX = "RESULT "


def run_arm_subprocess(cmd: Sequence[str], timeout: float, *, env: Mapping[str, str] | None = None,
                       cwd: str | os.PathLike[str] | None = None, prefix: str = RESULT_PREFIX) -> dict[str, Any]:
    """Run one arm's command to completion, or kill it at ``timeout`` seconds, and read its result.

    The simple protocol of the benchmark scripts (``benchmarks/``), where an arm is a command that
    prints its result as one stdout line ``RESULT {json}`` (``prefix``; the last such line counts). As
    in :func:`run_child`, the command gets its own process group, so a timeout or Ctrl-C takes down it
    and whatever it started, and nothing else. Returns ``result`` (the parsed dict, or None when no
    line parsed), ``timed_out``, ``returncode``, ``wall_s``, ``stdout`` and ``stderr``; what a missing
    result or a timeout means is the caller's to say.
    """
    started = time.monotonic()
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=None if env is None else dict(env), text=True,
                            errors="replace", stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill(proc)
        out, err = proc.communicate()
    except BaseException:
        _kill(proc)  # Ctrl-C reaches only this process (the child has its own session)
        raise
    result = None
    for line in reversed(out.splitlines()):
        if line.startswith(prefix):
            try:
                result = json.loads(line[len(prefix):])
                break
            except json.JSONDecodeError:
                continue
    return {"result": result, "timed_out": timed_out, "returncode": proc.returncode,
            "wall_s": time.monotonic() - started, "stdout": out, "stderr": err}
