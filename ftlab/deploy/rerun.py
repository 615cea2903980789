"""``ftlab rerun RUN_DIR``: a run repeated from its ``manifest.json``, in a new folder.

The manifest holds the run's overrides; the same overrides on the same ftlab give the same
config. What cannot be repeated from the folder alone is the machine: the library versions,
ftlab's commit, the CPU flags that pick kernels and the data. Each is compared with this machine
before the run (one ``note:`` line per difference) and the data's fingerprint after it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ftlab.errors import FtlabError
from ftlab.manifest import MANIFEST_FILE, environment, read_manifest

__all__ = ["differences", "rerun_run"]

NOT_REPEATED = ("resume=", "ckpt_path=", "hydra.run.dir=", "hydra.sweep.dir=")  # where and how it ran, not what


def differences(then: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Lines naming what differs between the environment a run recorded and this one."""
    out = []
    for name in sorted(set(then.get("packages") or {}) | set(now.get("packages") or {})):
        a, b = (then.get("packages") or {}).get(name), (now.get("packages") or {}).get(name)
        if a != b:
            out.append(f"{name} {b or 'not installed'} here, {a or 'not installed'} when it ran")
    if then.get("ftlab") != now.get("ftlab"):
        out.append(f"ftlab {now.get('ftlab')} here, {then.get('ftlab')} when it ran")
    a, b = (then.get("git") or {}).get("commit"), (now.get("git") or {}).get("commit")
    if a and b and a != b:
        out.append(f"ftlab commit {b[:10]} here, {a[:10]} when it ran")
    cpu_then = ((then.get("hardware") or {}).get("cpu") or {}).get("flags")
    cpu_now = ((now.get("hardware") or {}).get("cpu") or {}).get("flags")
    if cpu_then is not None and cpu_then != cpu_now:
        out.append(f"CPU flags {cpu_now} here, {cpu_then} when it ran (kernels, and so the last digits, may differ)")
    gpus_then, gpus_now = (then.get("hardware") or {}).get("gpus"), (now.get("hardware") or {}).get("gpus")
    if gpus_then is not None and gpus_then != gpus_now:
        out.append(f"GPUs {gpus_now or 'none'} here, {gpus_then or 'none'} when it ran")
    return out


def rerun_run(run_dir: Path, extra: Sequence[str], train: Callable[[Sequence[str]], None]) -> Path:
    """Run ``run_dir``'s overrides (plus ``extra``) again through ``train`` (the command line's);
    return the new run folder."""
    run_dir = Path(run_dir)
    try:
        manifest = read_manifest(run_dir)
    except FileNotFoundError:
        raise FtlabError(f"{run_dir}: no {MANIFEST_FILE} (not a run folder, or one written before ftlab recorded "
                         "manifests)") from None
    except ValueError as exc:
        raise FtlabError(f"{run_dir / MANIFEST_FILE}: not valid JSON ({exc})") from None
    replaced = {o.split("=", 1)[0].lstrip("+~") for o in extra}  # an extra override replaces the run's own
    overrides = [o for o in manifest.get("overrides") or []
                 if not o.startswith(NOT_REPEATED) and o.split("=", 1)[0].lstrip("+~") not in replaced] + list(extra)
    out = Path("outputs/runs") / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_rerun_{run_dir.resolve().name}"
    for line in differences(manifest, environment()):
        print(f"note: {line}")
    print(f"ftlab: rerunning {run_dir} into {out}: python -m ftlab {' '.join(overrides)}")
    train([*overrides, f"hydra.run.dir={out}"])
    try:
        now = read_manifest(out).get("data")
    except (OSError, ValueError):
        return out
    if manifest.get("data") and now and manifest["data"] != now:
        print(f"note: the data differs from the original run's ({manifest['data']} then, {now} now)")
    return out
