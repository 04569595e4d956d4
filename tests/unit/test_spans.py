"""Tensors a full load leaves as the input's own bytes are named by their span in the input
(``_worker._spans``), read by the host from its own descriptor, and verified like any other
returned tensor: a forged span gets the file's bytes, never the payload's, and the same
findings as forged bytes would."""

from __future__ import annotations

import dataclasses
import operator
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from sandbox import _api, _convert, _verify
from sandbox._worker import _protocol as P
from sandbox._worker import _spans
from sandbox._worker._extract import extract
from sandbox.errors import OutputRejected
from tests.checkpoints import Reduce, save


def _model() -> torch.nn.Module:
    torch.manual_seed(11)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))


def _mapped_load(path: Path) -> tuple[Any, dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """What the loader has after a full load of ``path`` (mapped, as in the sandbox): the
    object, the extraction's stored tensors and entries, and its skeleton and views."""
    obj = torch.load(path, mmap=True, weights_only=False)
    ex = extract(obj, digests=False)
    return obj, ex.stored, ex.entries, {"skeleton": ex.skeleton, "views": ex.views}


def _spans_of(path: Path, stored: dict[str, Any]) -> dict[str, tuple[int, int]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return _spans.file_spans(stored, _spans.SelfViews(), fd)
    finally:
        os.close(fd)


def _sent(
    out: Path, stored: dict[str, Any], entries: list[dict[str, Any]], rest: dict[str, Any], spans: Any
) -> P.Manifest:
    """What the sandbox sends: the manifest naming ``spans`` (by tensor name), as the host
    validates it, and the SafeTensors file ``out`` of the other tensors of ``stored``."""
    for e in entries:
        e.pop("span", None)
        if e["name"] in spans:
            e["span"] = list(spans[e["name"]])
    manifest = P.Manifest.from_obj(
        {"protocol": P.PROTOCOL_VERSION, "format": "torch-zip", "tensors": entries, **rest}
    )
    save_file({k: t.contiguous() for k, t in stored.items() if k not in spans}, str(out))
    return manifest


def _handed_over(
    path: Path, stored: dict[str, Any], entries: list[dict[str, Any]], rest: dict[str, Any], spans: Any
) -> tuple[dict[str, torch.Tensor], P.Manifest]:
    """What the host holds once the sandbox sent ``spans`` and the other tensors' bytes: the
    manifest, and the tensors ``load_tensors`` makes of them."""
    out = path.with_name(path.name + ".handoff.safetensors")
    manifest = _sent(out, stored, entries, rest, spans)
    try:
        return _convert.load_tensors(str(out), manifest, source=str(path)), manifest
    finally:
        out.unlink()


def _all_by_span(
    tmp_path: Path, entries: list[dict[str, Any]], rest: dict[str, Any], spans: dict[str, tuple[int, int]]
) -> tuple[P.Manifest, Path]:
    """The manifest naming every tensor by its span, and the (empty) tensors file beside it."""
    out = tmp_path / "empty.safetensors"
    return _sent(out, {}, entries, rest, spans), out


def _findings(path: Path, manifest: P.Manifest, tensors: dict[str, torch.Tensor]) -> list[Any]:
    return _verify.weights(str(path), manifest, tensors, reading=_verify.Reading(str(path), None, spans=True))


def test_a_mapped_loads_untouched_tensors_are_named_by_span_and_verified_without_a_compare(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model()
    path = save({"model": model, "extra": torch.arange(10.0)}, tmp_path / "m.pt")
    _, stored, entries, rest = _mapped_load(path)
    spans = _spans_of(path, stored)
    assert set(spans) == set(stored)
    data = path.read_bytes()
    for name, (begin, end) in spans.items():
        assert data[begin:end] == stored[name].contiguous().view(torch.uint8).numpy().tobytes()

    def no_compare(*_: Any) -> bool:
        raise AssertionError("a tensor the host read from its span was compared again")

    monkeypatch.setattr(_verify._FileBytes, "equal", no_compare)
    tensors, manifest = _handed_over(path, stored, entries, rest, spans)
    assert _findings(path, manifest, tensors) == []
    want = torch.load(path, weights_only=False)
    assert torch.equal(tensors["model.0.weight"], want["model"][0].weight.detach())
    assert torch.equal(tensors["extra"], want["extra"])
    # the host's tensors are its own memory, not the file's pages: writing one changes nothing
    tensors["extra"].fill_(7.0)
    assert path.read_bytes() == data


def test_a_tensor_changed_in_place_while_loading_is_sent_not_named(tmp_path: Path) -> None:
    """The kernel's page map tells a page the load wrote (an anonymous copy) from the file's:
    the changed tensor's bytes cross, and the host compares them with the file's."""
    torch.manual_seed(12)
    big = torch.randn(64, 64)  # 16 KiB: pages of its own
    path = save({"model": _model(), "w": big, "hook": Reduce(operator.imul, big, 2.0)}, tmp_path / "m.pt")
    _, stored, entries, rest = _mapped_load(path)
    assert torch.equal(stored["w"], big * 2.0)  # what torch.load returns
    spans = _spans_of(path, stored)
    assert "w" not in spans and "model.0.weight" in spans
    tensors, manifest = _handed_over(path, stored, entries, rest, spans)
    assert torch.equal(tensors["w"], big * 2.0)  # the load's result, not the file's bytes
    found = {f.rule: f for f in _findings(path, manifest, tensors)}
    assert [t["name"] for t in found["weights-tampered"].evidence["tensors"]] == ["w"]
    # a copy made while loading lies in no mapping of the input; no page map: nothing is named
    assert _spans_of(path, {"copy": stored["model.0.weight"].clone()}) == {}
    fd = os.open(path, os.O_RDONLY)
    try:
        blind = _spans.SelfViews()
        os.close(blind.pagemap)
        blind.pagemap = -1
        assert _spans.file_spans(stored, blind, fd) == {}
    finally:
        os.close(fd)
        os.close(blind.maps)


def test_forged_spans_give_the_files_bytes_and_the_same_findings_as_forged_bytes(tmp_path: Path) -> None:
    """A payload controls what the loader names. Swapped spans of two tensors the file names:
    the host returns the file's bytes at each span and calls both tampered; a span over
    bytes that are no tensor of the file (the pickle's): unverified."""
    torch.manual_seed(13)
    a, b = torch.randn(32, 32), torch.randn(32, 32)
    path = save({"model": _model(), "a": a, "b": b}, tmp_path / "m.pt")
    _, stored, entries, rest = _mapped_load(path)
    spans = _spans_of(path, stored)
    swapped = {**spans, "a": spans["b"], "b": spans["a"]}
    tensors, manifest = _handed_over(path, stored, entries, rest, swapped)
    assert torch.equal(tensors["a"], b) and torch.equal(tensors["b"], a)
    found = {f.rule: f for f in _findings(path, manifest, tensors)}
    assert sorted(t["name"] for t in found["weights-tampered"].evidence["tensors"]) == ["a", "b"]
    # a span of the right length over the archive's first bytes (headers and the pickle)
    n = spans["model.0.weight"][1] - spans["model.0.weight"][0]
    elsewhere = {**spans, "model.0.weight": (0, n)}
    tensors, manifest = _handed_over(path, stored, entries, rest, elsewhere)
    found = {f.rule: f for f in _findings(path, manifest, tensors)}
    assert found["weights-unverified"].evidence["tensors"] == ["model.0.weight"]


def test_spans_the_host_cannot_read_are_refused(tmp_path: Path) -> None:
    path = save({"model": _model()}, tmp_path / "m.pt")
    _, stored, entries, rest = _mapped_load(path)
    spans = _spans_of(path, stored)
    size = path.stat().st_size
    name = "model.2.bias"
    n = spans[name][1] - spans[name][0]
    with pytest.raises(OutputRejected, match="past the input's end"):
        _handed_over(path, stored, entries, rest, {**spans, name: (size - n + 4, size + 4)})
    # the length must be the tensor's; no negative offsets
    for bad in ([spans[name][0], spans[name][1] + 4], [-4, n - 4], [0], "0-128"):
        forged = [dict(e, span=bad) if e["name"] == name else e for e in entries]
        with pytest.raises(P.ProtocolError, match="span malformed"):
            P.Manifest.from_obj({"protocol": P.PROTOCOL_VERSION, "format": "x", "tensors": forged, **rest})
    # without the host's own descriptor of the input, a span names nothing it may read
    manifest, out = _all_by_span(tmp_path, entries, rest, spans)
    with pytest.raises(OutputRejected, match="does not hold"):
        _convert.load_tensors(str(out), manifest)


def test_spans_count_against_the_output_cap(tmp_path: Path) -> None:
    """Naming the whole input ten thousand times costs the loader nothing; the host would read
    each span into memory of its own, so their sum is held to the output cap."""
    path = save({"model": _model()}, tmp_path / "m.pt")
    _, stored, entries, _ = _mapped_load(path)
    e = next(e for e in entries if e["name"] == "model.0.weight")
    span = list(_spans_of(path, stored)["model.0.weight"])
    many = [dict(e, name=f"t{i}", span=span) for i in range(10_000)]
    manifest = P.Manifest.from_obj(
        {"protocol": P.PROTOCOL_VERSION, "format": "x", "tensors": many, "views": [], "skeleton": None}
    )
    cap = 10 * path.stat().st_size
    with pytest.raises(OutputRejected, match="span in the input would hold more than"):
        _api._check_views(manifest, cap)
    _api._check_views(dataclasses.replace(manifest, tensors=manifest.tensors[:5]), cap)


def test_a_manifest_keeps_its_spans_across_the_wire() -> None:
    entry = P.TensorEntry(
        name="w", dtype="float32", shape=(2, 2), stored_as="F32", nbytes=16, sha256=None, span=(64, 80)
    )
    manifest = P.Manifest(format="torch-zip", tensors=(entry,))
    again = P.Manifest.from_json(manifest.to_json())
    assert again.tensors[0].span == (64, 80)
    assert pickle.dumps(again) == pickle.dumps(manifest)  # equal documents (a dataclass, no torch)


def _scanned(path: Path) -> P.Manifest:
    """The manifest the loader sends in a scan of ``path`` (no bytes cross), made by the
    worker's own code: a span for each tensor the load left as the file's bytes, else the
    sandbox's digest."""
    from sandbox._worker import _loader

    obj = torch.load(path, mmap=True, weights_only=False)
    fd = os.open(path, os.O_RDONLY)
    os.dup2(fd, P.INPUT_FD)
    os.close(fd)
    tensors_fd, manifest_fd = P.memfd_create("tensors"), P.memfd_create("manifest")
    try:
        _loader.write_outputs(
            obj,
            "torch-zip",
            {},
            tensors_fd=tensors_fd,
            manifest_fd=manifest_fd,
            tensors=False,
            views=_spans.SelfViews(),
        )
        assert os.fstat(tensors_fd).st_size == 0  # nothing of the tensors is written in a scan
        return P.Manifest.from_json(os.pread(manifest_fd, 1 << 24, 0))
    finally:
        for f in (tensors_fd, manifest_fd, P.INPUT_FD):
            os.close(f)


def test_a_scan_names_untouched_tensors_by_span_and_hashes_only_the_rest(tmp_path: Path) -> None:
    """In a scan no bytes cross: a span is the sandbox's word, as a digest is, and verifies
    the same way (a span where the file stores that tensor; any other, the file's digest
    there), so neither side hashes the tensors the load left alone."""
    torch.manual_seed(14)
    big = torch.randn(64, 64)
    obj = {
        "model": _model(),
        "a": torch.randn(64, 64),
        "spacer": torch.randn(64, 64),  # keeps a off the page w shares with its neighbour
        "w": big,
        "hook": Reduce(operator.imul, big, 2.0),
    }
    path = save(obj, tmp_path / "m.pt")
    manifest = _scanned(path)
    by_name = {e.name: e for e in manifest.tensors}
    assert by_name["model.0.weight"].span is not None and by_name["model.0.weight"].sha256 is None
    assert by_name["w"].span is None and by_name["w"].sha256 is not None  # changed: hashed
    found = {f.rule: f for f in _findings_scan(path, manifest)}
    assert [t["name"] for t in found["weights-tampered"].evidence["tensors"]] == ["w"]
    # a span over bytes that are no tensor of the file, under a name the file gives
    found = {f.rule: f for f in _findings_scan(path, _at_the_start(manifest, "a"))}
    assert sorted(t["name"] for t in found["weights-tampered"].evidence["tensors"]) == ["a", "w"]
    # ... and under a name only a module gives: no tensor of the file
    found = {f.rule: f for f in _findings_scan(path, _at_the_start(manifest, "model.0.weight"))}
    assert found["weights-unverified"].evidence["tensors"] == ["model.0.weight"]


def _at_the_start(manifest: P.Manifest, name: str) -> P.Manifest:
    """``manifest`` with ``name``'s span moved to the file's first bytes (its length kept)."""
    out = []
    for e in manifest.tensors:
        if e.name == name:
            assert e.span is not None
            e = dataclasses.replace(e, span=(0, e.span[1] - e.span[0]))
        out.append(e)
    return dataclasses.replace(manifest, tensors=tuple(out))


def _findings_scan(path: Path, manifest: P.Manifest) -> list[Any]:
    return _verify.weights(str(path), manifest, None, reading=_verify.Reading(str(path), None, spans=True))


def test_a_plain_state_dicts_scan_by_span_is_compared_with_the_files_digests(tmp_path: Path) -> None:
    """A plain state dict the full loader read (its reading is a reconstruction): the span
    each tensor is named by stands for the file's digest there, compared name by name."""
    torch.manual_seed(15)
    sd = {"a": torch.randn(16, 16), "b": torch.randn(16, 16)}
    path = save(sd, tmp_path / "sd.pt")
    manifest = _scanned(path)
    assert all(e.span is not None for e in manifest.tensors)
    assert _verify.weights(str(path), manifest, None) == []
    spans = {e.name: e.span for e in manifest.tensors}
    swapped = dataclasses.replace(
        manifest,
        tensors=tuple(
            dataclasses.replace(e, span=spans["b" if e.name == "a" else "a"]) for e in manifest.tensors
        ),
    )
    found = {f.rule for f in _verify.weights(str(path), swapped, None)}
    assert "weights-tampered" in found


def test_a_span_never_comes_with_a_digest_of_the_sandboxs(tmp_path: Path) -> None:
    """A span tensor's bytes are the file's, read by the host; a sha256 beside the span was
    never checked against them, yet the verification took it for the tensor's digest: b's
    bytes under a's name with a's digest came out of a plain state dict's load clean."""
    torch.manual_seed(16)
    a, b = torch.randn(32, 32), torch.randn(32, 32)
    path = save({"a": a, "b": b}, tmp_path / "sd.pt")
    _, stored, entries, rest = _mapped_load(path)
    spans = _spans_of(path, stored)
    for e in entries:
        if e["name"] == "a":
            e["sha256"] = _convert.tensor_digest(a)
    with pytest.raises(P.ProtocolError, match="a span and a sha256"):
        _handed_over(path, stored, entries, rest, {**spans, "a": spans["b"]})
    # ... in a scan too, where the span is the claim and the file's digest there stands for it
    scanned = {**next(e for e in entries if e["name"] == "a"), "span": list(spans["a"])}
    with pytest.raises(P.ProtocolError, match="a span and a sha256"):
        P.Manifest.from_obj({"protocol": P.PROTOCOL_VERSION, "format": "x", "tensors": [scanned], **rest})


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("by_span", [True, False], ids=["named-by-span", "sent"])
def test_a_strided_nested_tensor_comes_back_whole_from_a_mapping(tmp_path: Path, by_span: bool) -> None:
    """With ``mmap=True`` a returned tensor lies at an offset in a mapping of a whole file (the
    input, or the tensors memfd), and ``_nested_view_from_buffer`` counts the pieces' offsets
    from its buffer's storage, not from the buffer: a nested tensor came back as the file's
    first bytes (its zip header and pickle), and the verification, which checks the parts,
    found nothing."""
    torch.manual_seed(17)
    nested = torch.nested.nested_tensor([torch.randn(300), torch.randn(500)])
    path = save({"pad": torch.randn(1000), "nt": nested}, tmp_path / "nt.pt")
    _, stored, entries, rest = _mapped_load(path)
    spans = _spans_of(path, stored) if by_span else {}
    assert ("nt.values" in spans) is by_span
    out = tmp_path / "handoff.safetensors"
    manifest = _sent(out, stored, entries, rest, spans)
    for mmap in (False, True):
        tensors = _convert.load_tensors(str(out), manifest, mmap=mmap, source=str(path))
        got = _convert.rebuild(manifest.skeleton, tensors, weights_only=False)["nt"]
        assert [p.tolist() for p in got.unbind()] == [p.tolist() for p in nested.unbind()], mmap


def test_map_location_is_handed_each_tensors_own_bytes_not_the_whole_mapping(tmp_path: Path) -> None:
    """With ``mmap=True`` the tensors named by span share one mapping of the whole input; a
    callable ``map_location`` (``lambda s, loc: s.cuda()``) was handed that whole storage for
    each of them, so it copied the input once per tensor (a payload naming 10,000 small spans
    of a large input made that 10,000 copies). torch hands it each storage of the file."""
    path = save({"model": _model(), "extra": torch.arange(10.0)}, tmp_path / "m.pt")
    _, stored, entries, rest = _mapped_load(path)
    manifest, out = _all_by_span(tmp_path, entries, rest, _spans_of(path, stored))
    tensors = _convert.load_tensors(str(out), manifest, mmap=True, source=str(path))
    handed: list[int] = []

    def copy(storage: Any, location: str) -> Any:
        handed.append(storage.nbytes())
        return storage.clone()

    placed = _convert.place(tensors, manifest, copy)
    assert sorted(handed) == sorted(e.nbytes for e in manifest.tensors)
    for name, t in tensors.items():
        assert placed[name].untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
        assert placed[name].view(torch.uint8).tolist() == t.view(torch.uint8).tolist(), name
    # a map_location that keeps the storage keeps the tensor, mapped
    kept = _convert.place(tensors, manifest, lambda storage, location: storage)
    assert all(kept[n] is t for n, t in tensors.items())
