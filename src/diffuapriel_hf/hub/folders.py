"""Writing model folders without losing anything: a folder that holds files is written only when the caller says so,
and a model is written to a staging folder beside its target and moved into place only once complete, so that an
interrupted write leaves the old folder (or nothing), never old and new files mixed.

The files a model folder is made of (weights, configs, tokenizer files, remote code) are replaced as a whole: an old
tokenizer file that the new model does not write is dropped with the old model. Every other file or folder of the
target (a hand-written README.md, checkpoints, logs, a `.git` folder) is carried over into the new folder.
"""

import fnmatch
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Union

__all__ = ["describe", "folder_entries", "move_into_place", "staging_folder", "staging_path", "writing_folder"]

# The files `save_pretrained` of a model, its generation config and its tokenizer write.
MODEL_FILE_PATTERNS = (
    "config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
    "pytorch_model.bin.index.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*",
    "merges.txt", "chat_template.jinja", "*.py", "training_args.bin",
)
STAGING_SUFFIX, RETIRED_SUFFIX = ".partial", ".replaced"


def is_model_file(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in MODEL_FILE_PATTERNS)


def folder_entries(folder: Union[str, Path]) -> list[str]:
    """The names in `folder`, sorted; [] where it does not exist. A file at that path is refused."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file, not a folder: name a folder to write the model to")
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def same_folder(a: Union[str, Path], b: Union[str, Path]) -> bool:
    """Whether two paths name one folder, or one lies inside the other."""
    a, b = Path(a).resolve(), Path(b).resolve()
    return a == b or a in b.parents or b in a.parents


def describe(entries: list[str], limit: int = 4) -> str:
    shown = ", ".join(entries[:limit])
    return shown + (f" and {len(entries) - limit} more" if len(entries) > limit else "")


def staging_path(target: Union[str, Path]) -> Path:
    """Where `target`'s new contents are written: beside it (one file system, so that a rename moves it), under a name
    that is a function of the target's, so that every process of a distributed run finds it."""
    target = Path(os.path.abspath(target))
    return target.with_name(f".{target.name}{STAGING_SUFFIX}")


def staging_folder(target: Union[str, Path]) -> Path:
    """The empty staging folder of `target` (`staging_path`), a leftover of an interrupted write cleared."""
    staging = staging_path(target)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)  # the carried-over files cost no space
    except OSError:
        shutil.copy2(source, destination)


def keep_all_but_model_files(name: str) -> bool:
    return not is_model_file(name)


def move_into_place(staging: Path, target: Union[str, Path], keep: Callable[[str], bool] = keep_all_but_model_files):
    """Carry the old target's entries for which `keep(name)` holds (and that the new folder does not have) into the
    complete `staging` folder, then put it in the target's place: two renames, the old folder kept aside until the
    new one is there."""
    target = Path(os.path.abspath(target))
    for name in folder_entries(target):
        if keep(name) and not (staging / name).exists():
            old = target / name
            if old.is_dir() and not old.is_symlink():
                shutil.copytree(old, staging / name, symlinks=True, copy_function=_link_or_copy)
            else:
                _link_or_copy(str(old), str(staging / name))
    if not target.exists():
        os.rename(staging, target)
        return
    retired = target.with_name(f".{target.name}{RETIRED_SUFFIX}")
    if retired.exists():
        shutil.rmtree(retired)
    os.rename(target, retired)
    os.rename(staging, target)
    shutil.rmtree(retired)


@contextmanager
def writing_folder(target: Union[str, Path], keep: Callable[[str], bool] = keep_all_but_model_files) -> Iterator[Path]:
    """`with writing_folder(target) as staging:` write the new contents into `staging`; on leaving the block they
    replace the target's (see `move_into_place`); on an error the staging folder is removed and the target is
    untouched."""
    staging = staging_folder(target)
    try:
        yield staging
        move_into_place(staging, target, keep)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
