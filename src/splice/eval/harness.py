"""EleutherAI's lm-evaluation-harness on a checkpoint, offline.

A named harness task (``hellaswag``) fetches its dataset from the Hugging Face Hub when it runs;
with no network that fails deep inside ``datasets``. A task can instead be a local task YAML
(``--lm-eval path/to/task.yaml``) whose data is a local file (``dataset_path: json`` with
``dataset_kwargs: {data_files: ...}``): relative data files are found beside the YAML, so the
example in ``examples/lm-eval/`` runs from any folder. Every failure a user can cause (harness not
installed, a task file missing, a dataset that needs the network, an unknown task) is one line
that names the task and says what to do.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import SpliceError, option

EXAMPLE_TASK = "examples/lm-eval/tiny_choice.yaml"
_LOCAL_HINT = f"give a local task file instead: {option('lm_eval', 'path/to/task.yaml')} (example: {EXAMPLE_TASK})"

# exception class names (anywhere in the cause chain) that mean "the data had to come from the network"
_OFFLINE_ERRORS = {
    "ConnectionError",
    "ConnectTimeout",
    "ReadTimeout",
    "OfflineModeIsEnabled",
    "LocalEntryNotFoundError",
    "DatasetNotFoundError",
    "HfHubHTTPError",
    "RepositoryNotFoundError",
    "gaierror",
}


class HarnessError(SpliceError):
    """A harness task could not run (one line naming the task)."""


def is_task_file(task: str) -> bool:
    return task.endswith((".yaml", ".yml")) or os.sep in task or "/" in task


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def needs_network(e: BaseException) -> bool:
    """Whether an exception (or one it came from) is a failed or refused download."""
    for x in _chain(e):
        if type(x).__name__ in _OFFLINE_ERRORS:
            return True
        text = str(x)
        if "offline" in text.lower() and ("HF_HUB_OFFLINE" in text or "HF_DATASETS_OFFLINE" in text or "offline mode" in text.lower()):
            return True
        if isinstance(x, OSError) and any(
            w in text for w in ("Name or service not known", "Temporary failure in name resolution", "Network is unreachable")
        ):
            return True
    return False


def _absolute_data_files(value, folder: Path):
    """``data_files`` (a path, a list, or a split -> either mapping) with relative paths that exist beside the YAML made absolute."""
    if isinstance(value, str):
        p = Path(value).expanduser()
        return str(folder / p) if not p.is_absolute() and (folder / p).exists() else value
    if isinstance(value, list):
        return [_absolute_data_files(v, folder) for v in value]
    if isinstance(value, dict):
        return {k: _absolute_data_files(v, folder) for k, v in value.items()}
    return value


def _harness_yaml_loader():
    """The harness's own task-YAML reader (``include:``, ``!function``): ``lm_eval.utils.load_yaml_config``
    up to 0.4.9, ``lm_eval.tasks._yaml_loader.load_yaml`` from 0.4.10 on."""
    from lm_eval import utils

    if hasattr(utils, "load_yaml_config"):
        return utils.load_yaml_config
    from functools import partial

    from lm_eval.tasks._yaml_loader import load_yaml

    return partial(load_yaml, resolve_func=True)


def load_task_file(path: str) -> dict:
    """A local task YAML as the harness takes it (a config dict), its data files found beside it."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise HarnessError(f"{option('lm_eval', path)}: task file not found")
    try:
        cfg = _harness_yaml_loader()(str(p))
    except Exception as e:  # noqa: BLE001 - a YAML or include error is the file's fault
        raise HarnessError(f"{p}: not a readable lm-eval task file ({type(e).__name__}: {e})") from None
    if not isinstance(cfg, dict) or "task" not in cfg:
        raise HarnessError(f"{p}: an lm-eval task file needs a 'task:' name")
    kwargs = cfg.get("dataset_kwargs")
    if isinstance(kwargs, dict):
        for key in ("data_files", "data_dir"):
            if key in kwargs:
                kwargs[key] = _absolute_data_files(kwargs[key], p.parent.resolve())
    return cfg


def _task_name(task) -> str:
    return task["task"] if isinstance(task, dict) else str(task)


def run_lm_eval(ref, tasks: list[str], *, batch_size: int = 8, limit: int | None = None) -> dict:
    """Run lm-evaluation-harness tasks on a checkpoint.

    Args:
        ref: the model (folder, ``.safetensors``, ``.gguf``: non-folders are converted to a
            temporary HF folder first).
        tasks: harness task names, or paths to local task YAML files.
        batch_size, limit: passed to the harness (limit: items per task).

    Returns:
        ``{"results": ..., "versions": ...}`` as the harness reports them.

    Raises:
        HarnessError: one line naming the task: the harness not installed, a task file missing,
            a task whose dataset needs the (unreachable) Hugging Face Hub, an unknown task.
    """
    shown = ",".join(tasks)
    try:
        from lm_eval import simple_evaluate
    except ImportError:
        named = [t for t in tasks if not is_task_file(t)]
        hint = (
            f"; its named tasks ({', '.join(named)}) download their datasets from the Hugging Face Hub, so offline {_LOCAL_HINT}"
            if named
            else ""
        )
        raise HarnessError(f"{option('lm_eval', shown)}: lm-evaluation-harness is not installed (pip install lm-eval){hint}") from None
    loaded = [load_task_file(t) if is_task_file(t) else t for t in tasks]  # before any model work
    import tempfile

    from ..checkpoint.reader import FolderSource, open_model

    src = open_model(ref)
    tmp = None
    path = Path(src.path)
    if type(src) is not FolderSource:
        from ..checkpoint.gguf import gguf_to_folder

        tmp = tempfile.TemporaryDirectory(prefix="splice-lmeval-")
        path = gguf_to_folder(src, tmp.name)
    src.close()
    try:
        r = simple_evaluate(
            model="hf",
            model_args=f"pretrained={path},dtype=float32,trust_remote_code=False",
            tasks=loaded,
            batch_size=batch_size,
            limit=limit,
            device="cpu",
        )
    except SpliceError:
        raise
    except Exception as e:  # noqa: BLE001 - the harness's own failures, made one line
        names = ", ".join(_task_name(t) for t in loaded)
        if needs_network(e):
            named = [t for t in loaded if not isinstance(t, dict)]
            which = ", ".join(named) or names
            raise HarnessError(
                f"{option('lm_eval', which)}: the task's dataset must be downloaded from the Hugging Face Hub, which cannot be reached; {_LOCAL_HINT}"
            ) from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise HarnessError(f"{option('lm_eval', names)}: lm-evaluation-harness failed: {type(e).__name__}: {first}") from None
    finally:
        if tmp is not None:
            tmp.cleanup()
    return {"results": r.get("results", {}), "versions": r.get("versions", {})} if r else {}
