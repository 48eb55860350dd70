"""Qwen3 base models from the Hugging Face hub, for Qwen Encoder Loader: which hub ids are in
the local Hugging Face cache (listed as they are), which are not (listed with "(download)"),
and the download itself: its size said up front, its progress in ComfyUI's progress bar,
resumed where it stopped (huggingface_hub keeps partial files), and one plain message when
it cannot happen (offline) saying how to get the model instead."""

from __future__ import annotations

import fnmatch
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger("qwenclip")

HUB_IDS = ["Qwen/Qwen3-0.6B", "Qwen/Qwen3-1.7B", "Qwen/Qwen3-4B", "Qwen/Qwen3-8B"]
DOWNLOAD = " (download)"
# What an encoder reads from a model repository (the library's hub.rs needs the same).
FILES = ["config.json", "tokenizer.json", "*.safetensors", "model.safetensors.index.json"]


def _cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT") or None


def cached(repo_id: str) -> str | None:
    """The cached snapshot folder of `repo_id` when it holds a complete model, else None."""
    refs = _cache_dir() / f"models--{repo_id.replace('/', '--')}"
    try:
        commit = (refs / "refs" / "main").read_text().strip()
    except OSError:
        return None
    snap = refs / "snapshots" / commit
    if not (snap / "config.json").is_file() or not (snap / "tokenizer.json").is_file():
        return None
    index = snap / "model.safetensors.index.json"
    if index.is_file():
        import json

        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        return str(snap) if shards and all((snap / s).is_file() for s in shards) else None
    return str(snap) if (snap / "model.safetensors").is_file() else None


def choices() -> list[str]:
    """The known hub ids: as they are when cached, with "(download)" when not."""
    return [rid if cached(rid) else rid + DOWNLOAD for rid in HUB_IDS]


def repo_of(choice: str) -> str:
    return choice[: -len(DOWNLOAD)] if choice.endswith(DOWNLOAD) else choice


class Unavailable(ValueError):
    """A hub model that is not cached and cannot be downloaded."""


def _how_to_get(repo_id: str, folders: str) -> str:
    return (
        f"On a machine with network, `huggingface-cli download {repo_id}` puts it in the Hugging Face "
        f"cache ({_cache_dir()}; copy that folder here), or put the model folder (config.json, "
        f"tokenizer.json, *.safetensors) under {folders}."
    )


def resolve(repo_id: str, progress, folders: str) -> str:
    """A local folder for `repo_id`: the cached snapshot, or a download into the cache.
    `progress(done_bytes, total_bytes)` is called while downloading (ComfyUI's bar: it
    raises on Cancel; the partial files stay and the next try resumes)."""
    hit = cached(repo_id)
    if hit:
        return hit
    from huggingface_hub import HfApi, hf_hub_download

    try:
        info = HfApi(endpoint=_endpoint()).model_info(repo_id, files_metadata=True)
    except Exception as e:  # offline, unknown repo, gated, ...
        raise Unavailable(
            f"qwenclip: {repo_id} is not in the Hugging Face cache and could not be downloaded "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no answer'}). "
            + _how_to_get(repo_id, folders)
        ) from None
    files = [s for s in info.siblings if any(fnmatch.fnmatch(s.rfilename, p) for p in FILES)]
    total = sum(s.size or 0 for s in files)
    log.info(
        "qwenclip: downloading %s: %d files, %.2f GB into %s", repo_id, len(files), total / 1e9, _cache_dir()
    )
    blobs = _cache_dir() / f"models--{repo_id.replace('/', '--')}" / "blobs"
    done = 0
    for s in files:
        failure: list[BaseException] = []

        def fetch(name=s.rfilename, failure=failure):
            try:
                hf_hub_download(repo_id, name, endpoint=_endpoint())
            except BaseException as e:  # reported by the waiting thread
                failure.append(e)

        worker = threading.Thread(target=fetch, daemon=True)
        worker.start()
        while worker.is_alive():
            partial = sum(f.stat().st_size for f in blobs.glob("*.incomplete")) if blobs.is_dir() else 0
            progress(min(done + partial, total), total)
            worker.join(0.25)
        if failure:
            raise Unavailable(
                f"qwenclip: downloading {repo_id} stopped at {s.rfilename} ({failure[0]}); queue again to "
                "resume it. " + _how_to_get(repo_id, folders)
            ) from None
        done += s.size or 0
        progress(done, total)
    path = cached(repo_id)
    if path is None:
        raise Unavailable(
            f"qwenclip: {repo_id} was downloaded but its snapshot is incomplete. "
            + _how_to_get(repo_id, folders)
        )
    log.info("qwenclip: %s ready at %s", repo_id, path)
    return path
