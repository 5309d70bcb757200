"""A small, offline kustomize: renders deploy/'s kustomizations into plain manifests for tests.

It implements only what deploy/ uses, and refuses anything else, so a new kustomize feature in
deploy/ fails loudly here instead of rendering wrongly:

- ``resources``: YAML files and directories holding a kustomization, recursively;
- ``components``: directories holding a ``Component``, applied after the resources;
- ``patches``: strategic-merge patches (maps merged, lists of named items merged by ``name``,
  other lists replaced, ``null`` deletes) matched by kind and name, and JSON 6902 patches
  (``add``, ``replace``, ``remove``), either kind aimed with a ``target`` (kind, name,
  labelSelector ``key=value,...``);
- ``images`` (``newName``, ``newTag``, ``digest``) and ``namespace``.

The order is kustomize's: resources, components, patches, namespace, images.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

Manifest = dict[str, Any]

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED = {"apiVersion", "kind", "resources", "components", "patches", "images", "namespace"}
TARGET_KEYS = {"kind", "name", "labelSelector"}


class UnsupportedKustomization(ValueError):
    """The kustomization uses something this renderer does not implement."""


def render(directory: Path) -> list[Manifest]:
    """Every manifest the kustomization in ``directory`` produces, in order."""
    return _build(directory.resolve(), expected_kind="Kustomization")


def load_kustomization(directory: Path) -> Manifest:
    """The kustomization file of ``directory``, parsed."""
    for name in KUSTOMIZATION_FILES:
        path = directory / name
        if path.is_file():
            loaded: Manifest = yaml.safe_load(path.read_text())
            return loaded
    raise FileNotFoundError(f"no kustomization in {directory}")


def load_documents(path: Path) -> list[Manifest]:
    """The non-empty YAML documents of one file."""
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _build(directory: Path, *, expected_kind: str) -> list[Manifest]:
    kustomization = load_kustomization(directory)
    kind = kustomization.get("kind", "Kustomization")
    if kind != expected_kind:
        raise UnsupportedKustomization(f"{directory}: expected a {expected_kind}, found {kind}")
    unknown = set(kustomization) - SUPPORTED
    if unknown:
        raise UnsupportedKustomization(f"{directory}: unsupported fields {sorted(unknown)}")
    manifests = _resources(directory, kustomization.get("resources", []))
    return _transform(directory, kustomization, manifests)


def _resources(directory: Path, entries: list[str]) -> list[Manifest]:
    manifests: list[Manifest] = []
    for entry in entries:
        path = (directory / entry).resolve()
        if path.is_dir():
            manifests.extend(_build(path, expected_kind="Kustomization"))
        else:
            manifests.extend(load_documents(path))
    return manifests


def _transform(
    directory: Path, kustomization: Manifest, manifests: list[Manifest]
) -> list[Manifest]:
    for entry in kustomization.get("components", []):
        manifests = _apply_component((directory / entry).resolve(), manifests)
    for patch in kustomization.get("patches", []):
        manifests = _apply_patch(directory, patch, manifests)
    namespace = kustomization.get("namespace")
    if namespace:
        for manifest in manifests:
            manifest.setdefault("metadata", {})["namespace"] = namespace
    for image in kustomization.get("images", []):
        for manifest in manifests:
            _set_image(manifest, image)
    return manifests


def _apply_component(directory: Path, manifests: list[Manifest]) -> list[Manifest]:
    component = load_kustomization(directory)
    if component.get("kind") != "Component":
        raise UnsupportedKustomization(f"{directory} is not a Component")
    unknown = set(component) - SUPPORTED
    if unknown:
        raise UnsupportedKustomization(f"{directory}: unsupported fields {sorted(unknown)}")
    # A component's own patches see everything accumulated so far, its resources included.
    accumulated = manifests + _resources(directory, component.get("resources", []))
    return _transform(directory, component, accumulated)


def _apply_patch(directory: Path, spec: Manifest, manifests: list[Manifest]) -> list[Manifest]:
    unknown = set(spec) - {"path", "patch", "target"}
    if unknown:
        raise UnsupportedKustomization(f"patch fields {sorted(unknown)}")
    text = (directory / spec["path"]).read_text() if "path" in spec else spec["patch"]
    documents = [doc for doc in yaml.safe_load_all(text) if doc]
    target = spec.get("target")
    if target is not None and set(target) - TARGET_KEYS:
        raise UnsupportedKustomization(f"target fields {sorted(set(target) - TARGET_KEYS)}")
    if len(documents) == 1 and isinstance(documents[0], list):
        if target is None:
            raise UnsupportedKustomization("a JSON 6902 patch needs a target")
        matched = [m for m in manifests if _selected(m, target)]
        if not matched:
            raise UnsupportedKustomization(f"patch target {target} matches nothing")
        for manifest in matched:
            for operation in documents[0]:
                _json6902(manifest, operation)
        return manifests
    for patch in documents:
        selector = target or {"kind": patch["kind"], "name": patch["metadata"]["name"]}
        matched = [m for m in manifests if _selected(m, selector)]
        if not matched:
            raise UnsupportedKustomization(f"patch target {selector} matches nothing")
        for manifest in matched:
            body = {key: value for key, value in patch.items() if key not in ("apiVersion", "kind")}
            if target is not None:
                body.get("metadata", {}).pop("name", None)
            merged = strategic_merge(manifest, body)
            manifest.clear()
            manifest.update(merged)
    return manifests


def _selected(manifest: Manifest, target: Mapping[str, str]) -> bool:
    metadata = manifest.get("metadata", {})
    if "kind" in target and manifest.get("kind") != target["kind"]:
        return False
    if "name" in target and metadata.get("name") != target["name"]:
        return False
    if "labelSelector" in target:
        labels = metadata.get("labels", {})
        for requirement in target["labelSelector"].split(","):
            key, sep, value = requirement.partition("=")
            if not sep or "!" in key:
                raise UnsupportedKustomization(f"label selector {requirement!r}")
            if labels.get(key.strip()) != value.strip():
                return False
    return True


def strategic_merge(base: Any, patch: Any) -> Any:
    """``patch`` merged into a copy of ``base``, as a strategic-merge patch does for the
    fields deploy/ patches."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = copy.deepcopy(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value)
            else:
                merged[key] = copy.deepcopy(value)
        return merged
    if isinstance(base, list) and isinstance(patch, list) and _named(base) and _named(patch):
        merged_list = copy.deepcopy(base)
        positions = {item["name"]: index for index, item in enumerate(merged_list)}
        for item in patch:
            if item["name"] in positions:
                index = positions[item["name"]]
                merged_list[index] = strategic_merge(merged_list[index], item)
            else:
                merged_list.append(copy.deepcopy(item))
        return merged_list
    return copy.deepcopy(patch)


def _named(items: list[Any]) -> bool:
    return bool(items) and all(isinstance(item, dict) and "name" in item for item in items)


def _json6902(manifest: Manifest, operation: Manifest) -> None:
    op, path = operation["op"], operation["path"]
    *parents, last = [_unescape(part) for part in path.lstrip("/").split("/")]
    node: Any = manifest
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if op == "remove":
        del node[int(last) if isinstance(node, list) else last]
        return
    value = copy.deepcopy(operation["value"])
    if op == "replace":
        if isinstance(node, list):
            node[int(last)] = value
        elif last not in node:
            raise KeyError(f"replace: {path} does not exist")
        else:
            node[last] = value
    elif op == "add":
        if isinstance(node, list):
            node.insert(len(node) if last == "-" else int(last), value)
        else:
            node[last] = value
    else:
        raise UnsupportedKustomization(f"JSON 6902 operation {op!r}")


def _unescape(part: str) -> str:
    return part.replace("~1", "/").replace("~0", "~")


def containers(manifest: Manifest) -> Iterator[Manifest]:
    """The containers (init containers too) of a workload's pod template."""
    pod = manifest.get("spec", {}).get("template", {}).get("spec", {})
    yield from pod.get("initContainers", [])
    yield from pod.get("containers", [])


def _set_image(manifest: Manifest, image: Mapping[str, str]) -> None:
    for container in containers(manifest):
        name, tag, digest = split_image(container["image"])
        if name != image["name"]:
            continue
        name = image.get("newName", name)
        if "digest" in image:
            container["image"] = f"{name}@{image['digest']}"
        elif "newTag" in image:
            container["image"] = f"{name}:{image['newTag']}"
        elif digest:
            container["image"] = f"{name}@{digest}"
        else:
            container["image"] = f"{name}:{tag}" if tag else name


def split_image(reference: str) -> tuple[str, str | None, str | None]:
    """``name``, ``tag`` and ``digest`` of an image reference (a registry port is no tag)."""
    name, _, digest = reference.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon + 1 :], digest or None
    return name, None, digest or None
